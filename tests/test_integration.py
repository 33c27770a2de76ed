"""End to end on the real Fashion-MNIST: run a tiny suite, skip it when finished, resume interrupted runs.

Every run here is tiny (a few optimizer steps of cpu-tiny, a 5-epoch probe on 2000 images): the
point is the pipeline's contract (records, idempotence, exact resume), not the numbers.
"""

from __future__ import annotations

import csv
import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import needs_fashion, popen_cli, run_cli, write_suite

from masking_bench.config import expand, parse_suite, spec_from_dict

pytestmark = [pytest.mark.integration, needs_fashion]

# feature extraction dominates a tiny run (all 50 tokens, ~80 MFLOP per image): keep the probe sets small
PROBE = {"train_subset": 1000, "test_subset": 500, "epochs": 5}
METRIC_KEYS = {"epoch", "loss", "img_per_s", "mask_ratio_mean", "mask_ratio_min", "mask_ratio_max", "lr"}


def tiny_suite(name: str, strategies, epochs: int, train_subset: int = 2048, random_init: bool = True) -> dict:
    return {
        "name": name,
        "method": "mae",
        "model": "cpu-tiny",
        "data": {"name": "fashion_mnist", "train_subset": train_subset},
        "strategies": strategies,
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": epochs, "batch_size": 256, "warmup_epochs": 0.5},
        "eval": {"probe": dict(PROBE), "low_shot": None, "random_init": random_init},
        "archive": True,  # the compact copy in records/ is checked
    }


def run_dirs(results: Path, suite: str) -> list[Path]:
    base = results / "runs" / suite
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def read_json(path: Path):
    return json.loads(path.read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------- run a suite via the CLI


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    results = tmp / "results"
    path = write_suite(tmp, tiny_suite("it_tiny", ["random", "block"], epochs=1))
    t0 = time.perf_counter()
    proc = run_cli("run", path, "--no-progress", "--results", results)
    return path, results, proc, time.perf_counter() - t0


def test_run_writes_complete_records(suite_run):
    _, results, proc, _ = suite_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"done 3, already finished 0, failed 0", proc.stderr), proc.stderr
    dirs = run_dirs(results, "it_tiny")
    assert len(dirs) == 3
    kinds = {}
    for run_dir in dirs:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config.pop("run_hash") == run_dir.name
        spec = spec_from_dict(config)
        assert spec.run_hash == run_dir.name  # the record re-hashes to its folder
        assert read_json(run_dir / "status.json")["state"] == "done"
        summary = read_json(run_dir / "summary.json")
        # a finished run is also copied, without its checkpoint, to records/ (the committable form)
        archived = results / "records" / "it_tiny" / run_dir.name
        expected = {"config.yaml", "summary.json"} | (
            {"metrics.jsonl"} if (run_dir / "metrics.jsonl").exists() else set()
        )
        assert {p.name for p in archived.iterdir()} == expected
        assert read_json(archived / "summary.json") == summary
        for key in ("probe_top1", "knn_top1", "wall_seconds"):
            assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
        assert 0 <= summary["probe_top1"] <= 100 and 0 <= summary["knn_top1"] <= 100
        assert summary["wall_seconds"] > 0
        # kNN accuracy is a count over the 500 test images
        assert abs(summary["knn_top1"] * 5 - round(summary["knn_top1"] * 5)) < 1e-6
        assert summary["eval_test_images"] == 500
        versions = summary["versions"]
        assert {"torch", "timm", "python", "git_commit"} <= set(versions)
        assert versions["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", versions["git_commit"])
        kinds[spec.label] = (spec, summary, read_metrics(run_dir))
    assert set(kinds) == {"random_init", "random", "block"}
    for label in ("random", "block"):
        spec, summary, rows = kinds[label]
        assert summary["epochs"] == 1 and len(rows) == 1  # one line per epoch
        row = rows[0]
        assert METRIC_KEYS <= set(row) and row["epoch"] == 0
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["img_per_s"] > 0 and row["lr"] > 0
        # MAE drops tokens: every sample hides exactly 49 - int(49 * 0.25) = 37 tokens (block tops up)
        for key in ("mask_ratio_mean", "mask_ratio_min", "mask_ratio_max"):
            assert row[key] == pytest.approx(37 / 49, abs=1e-6)
        assert summary["final_loss"] == row["loss"]
        assert (results / "runs" / "it_tiny" / spec.run_hash / "checkpoint.pt").is_file()
    spec, summary, rows = kinds["random_init"]
    assert spec.kind == "random_init" and summary["epochs"] == 0 and rows == []
    assert not (results / "runs" / "it_tiny" / spec.run_hash / "checkpoint.pt").exists()


def test_leaderboard_has_every_strategy_and_the_floor(suite_run):
    _, results, proc, _ = suite_run
    assert proc.returncode == 0, proc.stderr
    assert not (results / "leaderboard.csv").exists()  # `run` leaves the top-level report to `report`
    with open(results / "suites" / "it_tiny" / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_strategy = {r["strategy"]: r for r in rows}
    assert set(by_strategy) == {"random_init", "random", "block"}
    floor = by_strategy["random_init"]
    assert floor["ratio"] == "" and floor["seeds"] == "1" and floor["epochs"] == "0"
    assert float(by_strategy["random"]["ratio"]) == 0.75
    for run_dir in run_dirs(results, "it_tiny"):
        summary = read_json(run_dir / "summary.json")
        row = by_strategy[summary["strategy"]]
        assert float(row["probe_top1_mean"]) == pytest.approx(summary["probe_top1"], abs=1e-4)


def test_rerun_skips_finished_runs(suite_run):
    path, results, first, first_seconds = suite_run
    assert first.returncode == 0, first.stderr
    watched = [p for d in run_dirs(results, "it_tiny") for p in d.iterdir() if p.suffix in (".json", ".jsonl", ".pt")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.perf_counter()
    proc = run_cli("run", path, "--no-progress", "--results", results)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"done 0, already finished 3, failed 0", proc.stderr), proc.stderr
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing trained, evaluated or rewritten
    assert seconds < first_seconds


# ---------------------------------------------------------------------- exact resume, in-process


SMALL_PROBE = {"train_subset": 500, "test_subset": 250, "epochs": 3}


def resume_spec():
    raw = tiny_suite("it_resume", ["block"], epochs=2, train_subset=512, random_init=False)
    raw["train"]["batch_size"] = 128
    raw["eval"]["probe"] = dict(SMALL_PROBE)
    (spec,) = expand(parse_suite(raw))
    return spec


def test_interrupted_run_resumes_exactly(tmp_path):
    from masking_bench.launch import execute_run
    from masking_bench.store import RunRecord

    spec = resume_spec()
    steps_per_epoch = 512 // 128
    stop = steps_per_epoch + steps_per_epoch // 2  # the middle of the second (last) epoch

    interrupted = tmp_path / "interrupted"
    record = RunRecord(interrupted, spec)
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, interrupted, show_progress=False, stop_after_steps=stop)
    assert record.status()["state"] == "pending"
    assert not record.summary_path.exists()
    state = torch.load(record.checkpoint_path, map_location="cpu", weights_only=True)
    assert state["epochs_done"] == 1
    rows = record.read_metrics()
    assert [r["epoch"] for r in rows] == [0]
    epoch0 = rows[0]

    resumed = execute_run(spec, interrupted, show_progress=False)
    assert record.status()["state"] == "done" and record.is_done()
    rows = record.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["seconds"] == epoch0["seconds"] and rows[0]["loss"] == epoch0["loss"]  # epoch 0 not redone

    straight_dir = tmp_path / "straight"
    straight = execute_run(spec, straight_dir, show_progress=False)
    straight_rows = RunRecord(straight_dir, spec).read_metrics()

    # CPU, fixed seeds, per-(seed, epoch, step) random streams: the resumed run is the same computation,
    # bit for bit (checked at 1 and 2 threads), so equality is asserted exactly
    assert len(rows) == len(straight_rows) == 2
    for a, b in zip(rows, straight_rows, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
        assert a["mask_ratio_mean"] == b["mask_ratio_mean"] == pytest.approx(37 / 49)
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["probe_top1"] == straight["probe_top1"]
    assert resumed["knn_top1"] == straight["knn_top1"]
    final_a = torch.load(record.checkpoint_path, map_location="cpu", weights_only=True)["model"]
    final_b = torch.load(RunRecord(straight_dir, spec).checkpoint_path, map_location="cpu", weights_only=True)["model"]
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # and the interruption really happened after epoch 1's checkpoint: those weights differ from the final ones
    assert not all(torch.equal(state["model"][k], final_a[k]) for k in final_a)

    # finished: a third call is a no-op returning the stored summary
    mtime = record.summary_path.stat().st_mtime_ns
    again = execute_run(spec, interrupted, show_progress=False)
    assert again["probe_top1"] == resumed["probe_top1"] and again["final_loss"] == resumed["final_loss"]
    assert record.summary_path.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------- SIGKILL, via the CLI


def test_killed_cli_run_resumes(tmp_path):
    results = tmp_path / "results"
    raw = tiny_suite("it_kill", ["random"], epochs=2, train_subset=512, random_init=False)
    raw["train"]["batch_size"] = 128  # 4 steps per epoch: the kill lands ~1 s before epoch 2 could end
    raw["eval"]["probe"] = dict(SMALL_PROBE)
    path = write_suite(tmp_path, raw)
    proc = popen_cli("run", path, "--no-progress", "--results", results)
    try:
        deadline = time.monotonic() + 300
        checkpoint = None
        while checkpoint is None:
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            found = list((results / "runs" / "it_kill").glob("*/checkpoint.pt"))
            checkpoint = found[0] if found else None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    run_dir = checkpoint.parent
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    rows_before = read_metrics(run_dir)
    assert [r["epoch"] for r in rows_before] == [0]
    assert read_json(run_dir / "status.json")["state"] == "running"  # stale: nobody could clean up

    again = run_cli("run", path, "--no-progress", "--results", results)
    assert again.returncode == 0, again.stderr
    assert re.search(r"done 1, already finished 0, failed 0", again.stderr), again.stderr
    assert read_json(run_dir / "status.json")["state"] == "done"
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["seconds"] == rows_before[0]["seconds"]  # resumed from the checkpoint, epoch 0 kept
    summary = read_json(run_dir / "summary.json")
    assert summary["epochs"] == 2 and summary["final_loss"] == rows[1]["loss"]
