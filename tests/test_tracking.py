"""Experiment logging (masking_bench/tracking.py): TensorBoard event files mirror metrics.jsonl, a
resumed run shows each epoch once, W&B runs offline inside the run folder, and logging never
changes a run's hash."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, run_cli, write_suite

from masking_bench.config import expand, parse_suite, spec_from_dict
from masking_bench.errors import BenchError
from masking_bench.store import RunRecord
from masking_bench.tracking import scalars

pytest.importorskip("tensorboard")


def tiny(name: str, logging: dict | None = None, epochs: int = 3) -> dict:
    suite = {
        "name": name,
        "data": {"name": "synthetic", "train_subset": 128},
        "strategies": ["random"],
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": epochs, "batch_size": 64, "amp": "none"},
        "eval": {"probe": {"epochs": 1, "train_subset": 256, "test_subset": 128}, "random_init": False, "every": 1},
    }
    if logging is not None:
        suite["logging"] = logging
    return suite


def train(path: Path, results: Path, **env: str):
    """``run`` the suite in a subprocess; the run's own status decides (not the suite report after it)."""
    return run_cli("run", path, "--results", results, "--no-progress", env=cli_env(**env))


def assert_done(proc, results: Path, suite: str) -> None:
    status = json.loads((run_dir(results, suite) / "status.json").read_text())
    assert status["state"] == "done", proc.stderr


def run_dir(results: Path, suite: str) -> Path:
    (folder,) = (results / "runs" / suite).iterdir()
    return folder


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log folder as (step, value), as TensorBoard's reader sees it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_mirrors_metrics(events: dict, rows: list[dict]) -> None:
    """Each numeric key of each row appears once, at step = epoch, with the row's value (float32)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in scalars(row).items():
            expected.setdefault(tag, []).append((row["epoch"], value))
    assert sorted(events) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_mirrors_metrics_and_keeps_the_run_hash(tmp_path):
    results = tmp_path / "results"
    path = write_suite(tmp_path, tiny("tb", {"tensorboard": True}))
    assert_done(train(path, results), results, "tb")
    folder = run_dir(results, "tb")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    events = read_events(folder / "tb")
    assert_mirrors_metrics(events, rows)
    for tag in ("train/loss", "train/lr", "train/mask_ratio_mean", "train/img_per_s"):
        assert [s for s, _ in events[tag]] == [0, 1, 2]
    assert [s for s, _ in events["eval/knn_top1"]] == [0, 1, 2]  # eval.every 1, then the final evaluation
    assert [s for s, _ in events["eval/probe_top1"]] == [2]
    assert events["train/loss"][1][1] == pytest.approx(rows[1]["loss"], rel=1e-6)
    # logging is not part of the run: same hash as with logging off, and the record says what was on
    (plain,) = expand(parse_suite(tiny("tb")))
    assert folder.name == plain.run_hash
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["logging"] == {"tensorboard": True, "wandb": False}
    assert not (folder / "wandb").exists()


def test_resumed_run_shows_each_epoch_once(tmp_path):
    """Killed while writing the checkpoint after epoch 1 (its row and events already written): the
    resume redoes epoch 1, and TensorBoard still sees epochs 0, 1, 2 once, with the kept values."""
    results = tmp_path / "results"
    path = write_suite(tmp_path, tiny("tbkill", {"tensorboard": True}))
    killed = train(path, results, MASKING_BENCH_KILL_AT="*/runs/tbkill/*/checkpoint.pt@2")
    assert killed.returncode == -9, killed.stderr
    folder = run_dir(results, "tbkill")
    assert [s for s, _ in read_events(folder / "tb")["train/loss"]] == [0, 1]
    first_epoch1 = read_events(folder / "tb")["train/img_per_s"][1][1]
    assert_done(train(path, results), results, "tbkill")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    events = read_events(folder / "tb")
    assert_mirrors_metrics(events, rows)  # one point per epoch per tag, the values metrics.jsonl keeps
    assert events["train/img_per_s"][1][1] != first_epoch1  # epoch 1 as redone, not the killed attempt's


def test_logging_is_not_part_of_any_run_identity(tiny_suite):
    off = expand(parse_suite(tiny_suite))
    on = expand(parse_suite({**tiny_suite, "logging": {"tensorboard": True}}))
    assert [s.run_hash for s in on] == [s.run_hash for s in off]
    assert all(s.logging.tensorboard for s in on) and not any(s.logging.tensorboard for s in off)
    with pytest.raises(BenchError, match="grid axis 'logging.tensorboard' does not change"):
        expand(parse_suite({**tiny_suite, "grid": {"logging.tensorboard": [True, False]}}))
    with pytest.raises(BenchError, match="field 'logging.tb': unknown field"):
        parse_suite({**tiny_suite, "logging": {"tb": True}})


def test_committed_records_without_the_field_load_with_their_hash():
    configs = sorted((REPO / "results" / "records").glob("*/*/config.yaml"))[:5]
    if not configs:
        pytest.skip("no committed records")
    for config in configs:
        data = yaml.safe_load(config.read_text())
        data.pop("run_hash", None)
        assert "logging" not in data
        spec = spec_from_dict(data)
        assert spec.run_hash == config.parent.name
        assert not spec.logging.tensorboard and not spec.logging.wandb


def _hide_wandb(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)


def test_wandb_without_the_package_is_one_line_at_suite_load_and_run_start(tmp_path, tiny_suite, monkeypatch):
    _hide_wandb(monkeypatch)
    with pytest.raises(BenchError, match=r"field 'logging': .*pip install wandb"):
        parse_suite({**tiny_suite, "logging": {"wandb": True}})
    (spec,) = [s for s in expand(parse_suite(tiny("w"))) if s.kind == "pretrain"]
    spec = spec.model_copy(update={"logging": spec.logging.model_copy(update={"wandb": True})})
    record = RunRecord(tmp_path, spec)
    with pytest.raises(BenchError, match="pip install wandb"):
        record.truncate_metrics(0)  # what the trainer calls before its first epoch


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_cli_run_with_wandb_missing_is_one_line(tmp_path):
    path = write_suite(tmp_path, tiny("nowandb", {"wandb": True}))
    proc = run_cli("run", path, "--results", tmp_path / "results", "--no-progress")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install wandb" in proc.stderr
    assert not (tmp_path / "results" / "runs").exists()


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished, self.metrics = kwargs, [], False, []

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_offline_run_in_the_run_folder_gets_each_row_once(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    fake.Settings = dict
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (spec,) = expand(parse_suite({**tiny("w", {"wandb": True}), "eval": {"random_init": False}}))
    record = RunRecord(tmp_path, spec)
    record.truncate_metrics(0)
    record.append_metrics({"epoch": 0, "loss": 1.5, "lr": 1e-3, "mask_ratio_mean": 0.75, "img_per_s": 10.0})
    record.append_metrics({"epoch": 1, "loss": 1.25, "lr": 5e-4, "mask_ratio_mean": 0.75, "img_per_s": 11.0})
    final = {"epoch": 1, "loss": 1.25, "lr": 5e-4, "mask_ratio_mean": 0.75, "img_per_s": 11.0}
    record.append_metrics({**final, "eval": {"probe_top1": 50.0}})
    record.set_status("done")
    (run,) = runs
    assert run.init["mode"] == "offline"
    assert Path(run.init["dir"]).resolve().is_relative_to(record.dir.resolve())
    assert run.init["id"] == f"w-{spec.run_hash}"
    assert ("*", {"step_metric": "epoch"}) in run.metrics
    assert run.logged == [
        {"epoch": 0, "train/loss": 1.5, "train/lr": 1e-3, "train/mask_ratio_mean": 0.75, "train/img_per_s": 10.0},
        {"epoch": 1, "train/loss": 1.25, "train/lr": 5e-4, "train/mask_ratio_mean": 0.75, "train/img_per_s": 11.0},
        {"epoch": 1, "eval/probe_top1": 50.0},
    ]
    assert run.finished
    assert len(record.read_metrics()) == 2  # metrics.jsonl stays the record


def test_logging_off_opens_nothing(tmp_path):
    (spec,) = expand(parse_suite({**tiny("off"), "eval": {"random_init": False}}))
    record = RunRecord(tmp_path, spec)
    record.truncate_metrics(0)
    record.append_metrics({"epoch": 0, "loss": 1.0})
    assert sorted(p.name for p in record.dir.iterdir()) == ["metrics.jsonl"]
