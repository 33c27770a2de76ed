"""Training from prepared data, gradient accumulation and multi-process layouts give the numbers of a
plain in-memory, single-process run (docs: README, "Running the papers' regime").

- ``data.storage: prepared`` (batches read by index from the file, evaluation from the mapped file)
  gives bit-identical numbers to ``memory`` on the real Fashion-MNIST path.
- ``train.accum_steps`` splits each rank's share into micro-batches: same hash, same masks, losses
  equal up to the order of float summation (measured ~1e-7 relative in fp32).
- Two gloo processes, each reading only its share of the prepared file, follow the one-process run.
"""

from __future__ import annotations

import json

import pytest
from conftest import needs_fashion
from test_ddp import launch

from masking_bench import cli
from masking_bench.config import expand, parse_suite
from masking_bench.errors import BenchError
from masking_bench.store import RunRecord
from masking_bench.train import train_run

# fp32 float sums in another order: measured differences are ~1e-7 relative (README, "Multi-node")
LOSS_TOLERANCE = {"rel": 1e-5, "abs": 1e-6}


def suite_raw(**train) -> dict:
    return {
        "name": "layout",
        "data": {"name": "fashion_mnist", "train_subset": 512},
        "model": {"preset": "cpu-tiny", "overrides": {"depth": 2, "decoder_depth": 1}},
        "strategies": ["random"],
        "ratios": [0.75],
        "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0.5, "amp": "none", **train},
        "eval": {
            "random_init": False,
            "low_shot": {"shots": [10], "draws": 1, "probe_steps": 20},
            "probe": {"epochs": 3, "train_subset": 1000, "test_subset": 500},
        },
    }


def one_spec(raw: dict, **data):
    raw = {**raw, "data": {**raw["data"], **data}}
    (spec,) = expand(parse_suite(raw))
    return spec


def numbers(results, spec, summary: dict) -> tuple[list[dict], dict]:
    """The metrics rows without timings, and the summary's accuracies, final loss and FLOPs."""
    timings = ("seconds", "img_per_s", "plan_share")
    rows = [{k: v for k, v in r.items() if k not in timings} for r in RunRecord(results, spec).read_metrics()]
    return rows, {k: v for k, v in summary.items() if "top1" in k or k in ("final_loss", "flops_per_image")}


@needs_fashion
def test_prepared_storage_gives_the_numbers_of_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKING_BENCH_PREPARED", str(tmp_path / "prepared"))
    memory = one_spec(suite_raw(), storage="memory")
    prepared = one_spec(suite_raw(), storage="prepared")
    assert memory.run_hash == prepared.run_hash  # storage is not part of the identity
    summary_m = train_run(memory, RunRecord(tmp_path / "m", memory))
    summary = train_run(prepared, RunRecord(tmp_path / "p", prepared))
    assert summary["data"]["storage"] == "prepared"
    assert summary["data"]["prepared"].startswith(str(tmp_path / "prepared" / "fashion_mnist-28px-"))
    assert summary_m["data"] == {"storage": "memory", "prepared": None}
    rows_m, top_m = numbers(tmp_path / "m", memory, summary_m)
    rows_p, top_p = numbers(tmp_path / "p", prepared, summary)
    assert len(rows_m) == 2 and rows_m == rows_p  # every loss, lr, ratio and curve value, bit for bit
    assert top_m == top_p and "probe_10shot_top1" in top_p


def test_accumulation_keeps_the_hash_masks_and_losses():
    raw = suite_raw()
    raw["data"] = {"name": "synthetic"}
    base = one_spec(raw)
    runs = {}
    for accum in (1, 4):
        spec = one_spec({**raw, "train": {**raw["train"], "accum_steps": accum}})
        assert spec.run_hash == base.run_hash  # how a step's batch is split is not part of the identity
        runs[accum] = spec
    out = {}
    for accum, spec in runs.items():
        import tempfile

        folder = tempfile.mkdtemp()
        summary = train_run(spec, RunRecord(folder, spec))
        out[accum] = (RunRecord(folder, spec).read_metrics(), summary)
    assert out[4][1]["parallel"] == {"world": 1, "accum_steps": 4}
    for a, b in zip(out[1][0], out[4][0], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], **LOSS_TOLERANCE)
        assert a["loss"] != b["loss"] or a["epoch"] == 1  # really a different summation (not a no-op)
        assert (a["mask_ratio_mean"], a["mask_ratio_min"]) == (b["mask_ratio_mean"], b["mask_ratio_min"])


@needs_fashion
def test_two_ranks_reading_their_shares_of_the_prepared_file_follow_one_process(tmp_path, monkeypatch):
    cache = tmp_path / "prepared"
    monkeypatch.setenv("MASKING_BENCH_PREPARED", str(cache))  # inherited by the worker processes
    single = one_spec(suite_raw(), storage="memory")
    ddp = one_spec(suite_raw(accum_steps=2), storage="prepared")  # 2 ranks x 2 micro-batches of 16
    for name, spec in (("single", single), ("ddp", ddp)):
        path = tmp_path / f"{name}.json"
        path.write_text(spec.model_dump_json())
        launch(path, tmp_path / name, tmp_path / f"{name}_summary.json", world=1 if name == "single" else 2)
    summary = json.loads((tmp_path / "ddp_summary.json").read_text())
    assert summary["parallel"] == {"world": 2, "accum_steps": 2} and summary["data"]["storage"] == "prepared"
    rows_1 = RunRecord(tmp_path / "single", single).read_metrics()
    rows_2 = RunRecord(tmp_path / "ddp", ddp).read_metrics()
    assert [r["epoch"] for r in rows_2] == [0, 1]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], **LOSS_TOLERANCE)
        assert a["mask_ratio_mean"] == b["mask_ratio_mean"]


def test_a_batch_the_processes_cannot_share_equally_is_one_line(tmp_path):
    raw = suite_raw(batch_size=60, accum_steps=8)
    raw["data"] = {"name": "synthetic"}
    with pytest.raises(BenchError, match="train.batch_size 60 must be a multiple of launcher.nodes 1 x"):
        parse_suite(raw)
    raw = suite_raw(batch_size=64)
    raw["launcher"] = {"kind": "slurm", "nodes": 3, "tasks_per_node": 2}
    with pytest.raises(BenchError, match="launcher.nodes 3 x launcher.tasks_per_node 2"):
        parse_suite(raw)


def test_storage_and_accumulation_are_not_grid_axes(tmp_path):
    for axis, values in (("data.storage", ["memory", "prepared"]), ("train.accum_steps", [1, 2])):
        raw = {**suite_raw(), "grid": {axis: values}}
        raw["data"] = {"name": "synthetic"}
        path = tmp_path / "s.yaml"
        import yaml

        path.write_text(yaml.safe_dump(raw))
        assert cli.main(["plan", str(path), "--results", str(tmp_path / "r")]) == 2


def test_nodes_reach_the_slurm_executor():
    from masking_bench.config import LauncherConfig
    from masking_bench.slurm import executor_parameters

    params = executor_parameters(LauncherConfig(kind="slurm", nodes=4, tasks_per_node=8, gpus_per_node=8), "slurm", "s")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (4, 8, 8)


def test_preparing_inside_a_job_uses_the_jobs_cores_not_the_nodes(monkeypatch):
    import os

    from masking_bench.prepared import usable_cores

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cores() == 1
