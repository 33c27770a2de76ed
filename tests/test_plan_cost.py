"""``plan --cost`` (masking_bench/plan_cost.py): FLOPs per image from the trainer's own counter, PFLOP per run,
GPU-hours at a stated device throughput, peak memory per GPU and the data's size, without reading any
dataset. The cluster suites plan on a machine without ImageNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from masking_bench import plan_cost
from masking_bench.cli import main
from masking_bench.config import DataConfig, expand, load_suite, parse_suite
from masking_bench.data import load_dataset
from masking_bench.masking import build_strategy
from masking_bench.plan_cost import DEFAULT_GPU_TFLOPS, DEFAULT_MFU, PARAM_BYTES, data_info, eval_flops
from masking_bench.status import add_costs, plan_rows
from masking_bench.train import make_model, training_flops_per_image

REPO = Path(__file__).resolve().parent.parent
CLUSTER = sorted((REPO / "suites" / "cluster").glob("*.yaml"))
IN1K = REPO / "suites" / "cluster" / "imagenet1k_vit_base.yaml"
BATCH, EPOCHS = 64, 2


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test measures afresh: no count cached by another test or by the developer."""
    monkeypatch.setenv("MASKING_BENCH_CACHE", str(tmp_path / "cache"))


def tiny_specs(tiny_suite, **data):
    suite = {
        **tiny_suite,
        "strategies": ["random"],
        "ratios": [0.75],
        "seeds": [0],
        "data": {"name": "synthetic", **data},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "amp": "none"},
    }
    return expand(parse_suite(suite))


def costed(specs, results, **kwargs):
    rows = plan_rows(specs, results)
    footer = add_costs(rows, specs, **kwargs)
    return rows, footer


def test_flops_column_is_the_trainers_counter_for_the_runs_model(tiny_suite, tmp_path):
    specs = tiny_specs(tiny_suite)
    rows, _ = costed(specs, tmp_path)
    (spec,) = [s for s in specs if s.kind == "pretrain"]
    (row,) = [r for r, s in zip(rows, specs, strict=True) if s.kind == "pretrain"]
    dataset = load_dataset("synthetic")
    model = make_model(spec, dataset)
    strategy = build_strategy("random", spec.ratio, spec.method, spec.strategy.params)
    expected = training_flops_per_image(model, strategy, spec, dataset, torch.device("cpu"))  # at batch 64
    assert row["_flops_per_image"] == pytest.approx(expected, rel=1e-12)
    assert row["gflops"] == f"{expected / 1e9:.3g}"
    floor = next(r for r, s in zip(rows, specs, strict=True) if s.kind == "random_init")
    assert floor["gflops"] == "-" and floor["_pretrain"] == 0 and floor["_eval"] > 0


def test_total_is_flops_times_images_per_epoch_times_epochs_plus_evaluation(tiny_suite, tmp_path):
    for subset, per_epoch in ((None, 512), (100, 64)):  # synthetic: 512 training images; drop_last batches
        specs = tiny_specs(tiny_suite, train_subset=subset) if subset else tiny_specs(tiny_suite)
        rows, _ = costed(specs, tmp_path)
        for spec, row in zip(specs, rows, strict=True):
            if spec.kind != "pretrain":
                continue
            assert row["_pretrain"] == row["_flops_per_image"] * per_epoch * EPOCHS
            info = data_info(spec.data)
            fwd = plan_cost.Estimator().forward_flops(spec, info)
            assert row["_eval"] == eval_flops(spec, info, fwd) > 0
            assert row["_flop"] == row["_pretrain"] + row["_eval"]


def test_evaluation_counts_every_feature_extraction(tiny_suite):
    (spec,) = [s for s in tiny_specs(tiny_suite) if s.kind == "pretrain"]
    info = data_info(spec.data)
    final = 256 + 512 + (10 + 100) * 4 * 5  # test + probe train + low-shot draws (4 classes, 5 draws)
    assert eval_flops(spec, info, 1.0) == final
    every = spec.model_copy(update={"eval": spec.eval.model_copy(update={"every": 1})})
    assert eval_flops(every, info, 1.0) == final + (EPOCHS - 1) * (256 + 512)  # every_protocols: knn
    ft = spec.eval.finetune.model_copy(update={"enabled": True, "epochs": 3, "batch_size": 100})
    tuned = spec.model_copy(update={"eval": spec.eval.model_copy(update={"finetune": ft})})
    assert eval_flops(tuned, info, 1.0) == final + 3 * 3 * 500 + 256


def test_gpu_hours_scale_inversely_with_the_device_throughput(tiny_suite, tmp_path):
    specs = tiny_specs(tiny_suite)
    slow, footer = costed(specs, tmp_path, gpu_tflops=100.0)
    fast, _ = costed(specs, tmp_path, gpu_tflops=200.0)
    half_mfu, _ = costed(specs, tmp_path, gpu_tflops=200.0, mfu=DEFAULT_MFU / 2)
    for a, b, c in zip(slow, fast, half_mfu, strict=True):
        assert a["_gpu_h"] == pytest.approx(2 * b["_gpu_h"], rel=1e-12)
        assert c["_gpu_h"] == pytest.approx(a["_gpu_h"], rel=1e-12)
        assert a["_gpu_h"] == pytest.approx(a["_flop"] / (100e12 * DEFAULT_MFU) / 3600, rel=1e-12)
    assert any("100 TFLOP/s x 40% MFU = 40 TFLOP/s" in line for line in footer)


def test_memory_per_gpu_shares_the_batch_across_processes(tiny_suite, tmp_path):
    specs = tiny_specs(tiny_suite)
    one, _ = costed(specs, tmp_path, world=1)
    eight, footer = costed(specs, tmp_path, world=8)
    for spec, a, b in zip(specs, one, eight, strict=True):
        if spec.kind != "pretrain":
            assert a["mem_gb"] == "-"
            continue
        act = a["_activation_bytes_per_image"]
        assert act > 0
        assert a["_mem"] - b["_mem"] == pytest.approx(act * (BATCH - BATCH // 8), rel=1e-9)
        params = sum(p.numel() for p in make_model(spec, load_dataset("synthetic")).parameters())
        resident = 512 * 28 * 28  # the synthetic training split lives on the device
        assert a["_mem"] == pytest.approx(params * PARAM_BYTES + act * BATCH + resident, rel=1e-9)
    assert any("/ 8 processes" in line for line in footer)
    # gradient accumulation: 2 processes x 4 micro-batches hold the activations of an eighth of the batch
    accumulated = [s.model_copy(update={"train": s.train.model_copy(update={"accum_steps": 4})}) for s in specs]
    two_by_four, _ = costed(accumulated, tmp_path, world=2)
    for spec, a, b in zip(specs, eight, two_by_four, strict=True):
        if spec.kind == "pretrain":
            assert b["_mem"] == pytest.approx(a["_mem"], rel=1e-12)


def test_data_sizes_without_reading_the_data(tmp_path):
    fm = data_info(DataConfig(name="fashion_mnist"))
    assert (fm.train, fm.test, fm.bytes) == (60_000, 10_000, 70_000 * 28 * 28)
    syn = data_info(DataConfig(name="synthetic", image_size=224))
    assert syn.bytes == (512 + 256) * 224 * 224
    in1k = data_info(DataConfig(name="imagefolder", root="/nowhere/imagenet1k", image_size=224))
    assert (in1k.train, in1k.test, in1k.classes) == (1_281_167, 50_000, 1000)
    assert in1k.bytes == (1_281_167 + 50_000) * 3 * 224 * 224
    in100 = data_info(DataConfig(name="imagefolder", root="/data/ImageNet-100", image_size=160))
    assert (in100.train, in100.size) == (126_689, 160)
    unknown = data_info(DataConfig(name="imagefolder", root=str(tmp_path / "mine")))
    assert unknown.bytes is None
    for split, n in (("train", 3), ("val", 2)):  # an unknown ImageFolder: files counted, none decoded
        (tmp_path / "mine" / split / "cls").mkdir(parents=True)
        for i in range(n):
            (tmp_path / "mine" / split / "cls" / f"{i}.JPEG").write_bytes(b"not an image")
    mine = data_info(DataConfig(name="imagefolder", root=str(tmp_path / "mine"), image_size=32))
    assert (mine.train, mine.test, mine.classes, mine.bytes) == (3, 2, 1, 5 * 3 * 32 * 32)


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.stem)
def test_cluster_suites_plan_without_their_data(path, tmp_path, capsys):
    assert main(["plan", str(path), "--launcher", "slurm", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("total: ") and "GFLOP/img" not in out
    assert not (tmp_path / "r").exists()


def test_imagenet1k_cost_plan_never_touches_the_dataset(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plan must not load a dataset")

    import masking_bench.data as data

    monkeypatch.setattr(data, "load_dataset", refuse)
    monkeypatch.setattr(data, "load_imagefolder", refuse)
    # vit-base counts take minutes on a busy CPU: stand-in counts here, the real counter in the tests above
    monkeypatch.setattr(plan_cost.Estimator, "_measure_step", lambda self, spec, info: (56e9, 80e6, 111_000_000))
    monkeypatch.setattr(plan_cost.Estimator, "forward_flops", lambda self, spec, info: 17.5e9)
    args = ["plan", str(IN1K), "--launcher", "slurm", "--cost", "--results", str(tmp_path / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("plan for suite 'imagenet1k_vit_base': 24 runs")  # 7 labels x 3 seeds + 3 floors
    assert lines[1].split()[:12] == [
        *("run", "hash", "strategy", "ratio", "seed", "state", "epochs"),
        *("GFLOP/img", "PFLOP", "GPU-h", "mem/GPU", "run"),
    ]
    gb = (1_281_167 + 50_000) * 3 * 224 * 224 / 1e9
    assert f"1,281,167 train + 50,000 test images x 3x224x224 B = {gb:,.2f} GB as uint8" in out
    assert f"{DEFAULT_GPU_TFLOPS:g} TFLOP/s x 40% MFU" in out
    specs = expand(load_suite(IN1K), launcher="slurm")
    spec = next(s for s in specs if s.label == "sbam_amr_sample")
    info = data_info(spec.data)
    total = 56e9 * (1_281_167 // 4096 * 4096) * 800 + eval_flops(spec, info, 17.5e9)
    cells = next(line for line in lines if line.startswith(spec.run_hash)).split()
    assert cells[1:7] == ["sbam_amr_sample", "0.75", "0", "pending", "0/800", "56"]
    assert cells[7] == f"{total / 1e15:,.0f}"
    assert cells[8] == f"{total / (DEFAULT_GPU_TFLOPS * 1e12 * DEFAULT_MFU) / 3600:,.0f}"
    mem = 111_000_000 * PARAM_BYTES + 80e6 * 4096 / 8  # 8 DDP processes per run (launcher.tasks_per_node)
    assert cells[9:11] == [f"{mem / 1e9:.1f}", "GB"]
    assert not (tmp_path / "r").exists()


def test_cli_cost_flags(tiny_suite, tmp_path, capsys):
    from conftest import write_suite

    suite = {**tiny_suite, "strategies": ["random"], "ratios": [0.75], "seeds": [0]}
    path = write_suite(tmp_path, suite)
    results = tmp_path / "r"
    assert main(["plan", str(path), "--results", str(results)]) == 0
    plain = capsys.readouterr().out
    assert "GFLOP/img" not in plain and plain.splitlines()[-1].startswith("total: ")
    assert main(["plan", str(path), "--results", str(results), "--gpu-tflops", "0"]) == 2
    assert "--gpu-tflops must be > 0" in capsys.readouterr().err
    assert main(["plan", str(path), "--results", str(results), "--mfu", "0.5"]) == 0  # implies --cost
    lines = capsys.readouterr().out.splitlines()
    assert "GFLOP/img" in lines[1] and "mem/GPU" in lines[1]
    total = next(i for i, line in enumerate(lines) if line.startswith("total: "))
    assert lines[total + 1].startswith("cost of the 2 runs to train: ")
    assert "312 TFLOP/s x 50% MFU = 156 TFLOP/s" in lines[total + 2]
    assert not results.exists()
