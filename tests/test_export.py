"""`export`: a run's encoder loads into timm's VisionTransformer with strict=True and gives the
features our evaluation uses, for mean and cls pooling; folders without a checkpoint are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_suite

from masking_bench.config import expand, parse_suite
from masking_bench.export import export_run, load_run

timm = pytest.importorskip("timm")


def tiny(name: str, method: str = "mae") -> dict:
    return {
        "name": name,
        "method": method,
        "data": {"name": "synthetic", "train_subset": 128},
        "strategies": ["random"],
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
        "eval": {"probe": {"epochs": 1, "train_subset": 256, "test_subset": 128}, "random_init": False},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The run folder of a real one-epoch MAE run (checkpoint.pt written by the trainer)."""
    tmp = tmp_path_factory.mktemp("export")
    results = tmp / "results"
    run_cli("run", write_suite(tmp, tiny("exp")), "--results", results, "--no-progress")
    (folder,) = (results / "runs" / "exp").iterdir()
    assert json.loads((folder / "status.json").read_text())["state"] == "done"
    return folder


def images(n: int = 6) -> torch.Tensor:
    """Synthetic test images normalised as the loader does."""
    from masking_bench.data import make_synthetic

    ds = make_synthetic(n_train=16, n_test=n, seed=3)
    return (ds.test.images.float() / 255.0 - ds.mean[0]) / ds.std[0]


def load_in_timm(out: Path):
    recipe = json.loads(out.with_suffix(".json").read_text())
    net = timm.create_model(recipe["timm_model"], pretrained=False, **recipe["kwargs"])
    result = net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    return net.eval(), result, recipe


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_cli_export_loads_strictly_in_timm_with_our_features(trained, tmp_path, pool):
    out = tmp_path / "encoder.pth"
    proc = run_cli("export", trained, "--out", out, "--pool", pool)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("timm.create_model('vit_base_patch16_224', pretrained=False, img_size=28")
    net, result, recipe = load_in_timm(out)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert recipe["kwargs"]["global_pool"] == {"mean": "avg", "cls": "token"}[pool]
    assert recipe["run"]["run_hash"] == trained.name and recipe["run"]["epochs_done"] == 1
    _, ours, _ = load_run(trained)
    x = images()
    with torch.inference_mode():
        expected, got = ours.forward_features(x, pool=pool), net(x)
    assert got.shape == (6, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    cfg = timm.data.resolve_data_config({}, model=net)  # timm's preprocessing matches our loader's
    assert list(cfg["input_size"]) == [1, 28, 28] and cfg["mean"] == pytest.approx(recipe["input"]["mean"])


def test_exported_state_is_the_encoder_with_its_sincos_positions(trained, tmp_path):
    recipe = export_run(trained, tmp_path / "enc.pth")
    state = torch.load(tmp_path / "enc.pth", weights_only=True)
    _, ours, _ = load_run(trained)
    assert torch.equal(state["pos_embed"], ours.pos_embed) and state["pos_embed"].shape == (1, 50, 128)
    assert not any(k.startswith(("decoder", "mask_token", "head")) for k in state)
    assert recipe["check"]["max_abs_diff"] < 1e-5
    assert recipe["kwargs"]["global_pool"] == "avg"  # the run's eval.pool (mean) by default


def test_simmim_checkpoint_in_the_trainers_format_exports(tmp_path):
    """A SimMIM encoder (mask token inside the encoder, linear head) keeps only the encoder keys."""
    from masking_bench.data import make_synthetic
    from masking_bench.store import RunRecord
    from masking_bench.train import _save_checkpoint, make_model, make_optimizer

    (spec,) = expand(parse_suite(tiny("sim", "simmim")))
    record = RunRecord(tmp_path / "results", spec)
    record.write_config()
    model = make_model(spec, make_synthetic())
    _save_checkpoint(record, model, make_optimizer(model, spec), 1, {}, 0.0)
    recipe = export_run(record.dir, tmp_path / "sim.pth", pool="cls")
    net, result, _ = load_in_timm(tmp_path / "sim.pth")
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.inference_mode():
        torch.testing.assert_close(net(images()), model.eval().forward_features(images(), pool="cls"))
    assert recipe["run"]["method"] == "simmim"


def one_line_error(capsys, *args) -> str:
    from masking_bench.cli import main

    assert main(["export", *map(str, args)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_folders_without_a_checkpoint_are_one_line(trained, tmp_path, capsys):
    # a compact record (results/records/<suite>/<hash>/): config, metrics and summary, no checkpoint
    record = tmp_path / "results" / "records" / "exp" / trained.name
    record.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(trained / name, record / name)
    line = one_line_error(capsys, record)
    assert "records keep no checkpoint.pt" in line and "--results SCRATCH" in line
    assert "does not exist" in one_line_error(capsys, tmp_path / "nowhere")
    assert "not a run folder" in one_line_error(capsys, tmp_path)
    # the untrained-encoder floor never has weights
    floor = next(s for s in expand(parse_suite({**tiny("exp"), "eval": {}})) if s.kind == "random_init")
    folder = tmp_path / "results" / "runs" / "exp" / floor.run_hash
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(floor.model_dump(mode="json")))
    assert "untrained-encoder floor" in one_line_error(capsys, folder)
    # a damaged checkpoint
    broken = tmp_path / "results" / "runs" / "exp" / trained.name
    broken.mkdir(parents=True)
    shutil.copy(trained / "config.yaml", broken / "config.yaml")
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "not a readable masking_bench checkpoint" in one_line_error(capsys, broken)
