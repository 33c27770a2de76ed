"""Faults lose nothing: a kill -9 at every write moment, damaged record files, lying statuses, a full
disk late in a run, leftovers of interrupted writes, degenerate plans and failing plugins."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, write_suite

PLUGINS = """
import torch
from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden, register


@register
class HideNothing(MaskingStrategy):
    name = "hide_nothing"

    def plan(self, images, ctx):
        return MaskPlan(mask=torch.zeros(images.shape[0], ctx.num_tokens, dtype=torch.bool, device=images.device))


@register
class HideTooFew(MaskingStrategy):
    name = "hide_too_few"

    def plan(self, images, ctx):
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        return MaskPlan(mask=hide_lowest_first(noise, 2))


@register
class Explodes(MaskingStrategy):
    name = "explodes"

    def plan(self, images, ctx):
        raise ZeroDivisionError("the plugin's own bug")
"""


def tiny(name: str, strategies=("random",), epochs: int = 2, **extra) -> dict:
    suite = {
        "name": name,
        "data": {"name": "synthetic", "train_subset": 128},
        "strategies": list(strategies),
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": epochs, "batch_size": 64, "amp": "none"},
        "eval": {
            "probe": {"epochs": 1, "train_subset": 256, "test_subset": 128},
            "low_shot": None,  # fast: the low-label protocols are not what these tests check
            "random_init": False,
        },
        "archive": True,  # the crash and damage tests read and repair the compact records
    }
    suite.update(extra)
    return suite


def numbers(results: Path, suite: str) -> dict:
    """The run's numbers (no timings) from its compact record."""
    (summary_path,) = (results / "records" / suite).glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in summary_path.with_name("metrics.jsonl").read_text().splitlines()]
    return {
        "probe": summary["probe_top1"],
        "knn": summary["knn_top1"],
        "final_loss": summary["final_loss"],
        "losses": [m["loss"] for m in metrics],
    }


def leftovers(results: Path) -> list[Path]:
    return [p for p in results.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The numbers of an uninterrupted run of the crash suite."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_suite(folder, tiny("crash"))
    proc = run_cli("run", path, "--results", folder / "results", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return numbers(folder / "results", "crash")


@pytest.mark.integration
@pytest.mark.parametrize(
    "moment",
    [
        "*/runs/crash/*/checkpoint.pt@1",  # the first epoch's checkpoint
        "*/runs/crash/*/checkpoint.pt@2",  # the last one
        "*/runs/crash/*/metrics.jsonl@2",  # an epoch row
        "*/runs/crash/*/summary.json@1",  # the summary
        "*/runs/crash/*/status.json@2",  # 'done'
        "*/records/crash/*/summary.json@1",  # the archive copy
        "*/suites/crash/report.md@1",  # the suite's report
    ],
)
def test_kill_at_every_write_moment_then_rerun_gives_the_same_numbers(tmp_path, reference, moment):
    path = write_suite(tmp_path, tiny("crash"))
    results = tmp_path / "results"
    killed = run_cli("run", path, "--results", results, "--no-progress", env=cli_env(MASKING_BENCH_KILL_AT=moment))
    assert killed.returncode == -9, f"the kill hook did not fire at {moment}: {killed.stderr[-500:]}"
    status = run_cli("status", path, "--results", results, "--no-slurm")
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    assert " 0 running" in status.stdout.splitlines()[0], "a killed run must not be shown as running"
    again = run_cli("run", path, "--results", results, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert numbers(results, "crash") == reference
    assert not leftovers(results), "temporary files of the killed write must be cleaned"
    final = run_cli("status", path, "--results", results, "--no-slurm").stdout
    assert "1 done" in final.splitlines()[0]


# ------------------------------------------------------------------------------ damaged records


@pytest.fixture
def finished(tmp_path):
    """A finished run of a tiny suite: (suite path, results folder, live run folder, archived folder)."""
    path = write_suite(tmp_path, tiny("damage", epochs=1))
    results = tmp_path / "results"
    proc = run_cli("run", path, "--results", results, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (live,) = (results / "runs" / "damage").iterdir()
    return path, results, live, results / "records" / "damage" / live.name


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.integration
def test_truncated_live_summary_is_restored_from_its_archived_copy(finished):
    path, results, live, archived = finished
    before = json.loads((live / "summary.json").read_text())
    _truncate(live / "summary.json")
    for cmd in (("status", path, "--no-slurm"), ("report", "--out", results.parent / "lb")):
        proc = run_cli(*cmd, "--results", results)
        _no_traceback(proc)
        assert proc.returncode == 0, proc.stderr
    status = run_cli("status", path, "--results", results, "--no-slurm").stdout
    assert "1 done" in status
    proc = run_cli("run", path, "--results", results, "--no-progress")
    _no_traceback(proc)
    assert "restored" in proc.stderr and "already finished 1" in proc.stderr
    assert json.loads((live / "summary.json").read_text()) == before


@pytest.mark.integration
def test_damaged_archive_without_live_run_is_not_done(finished):
    path, results, live, archived = finished
    shutil.rmtree(live)
    _truncate(archived / "summary.json")
    status = run_cli("status", path, "--results", results, "--no-slurm")
    _no_traceback(status)
    assert "damaged" in status.stderr and str(archived / "summary.json") in status.stderr
    assert "1 pending" in status.stdout
    proc = run_cli("run", path, "--results", results, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "done 1" in proc.stderr
    json.loads((archived / "summary.json").read_text())  # rewritten whole


@pytest.mark.integration
def test_garbage_metrics_line_and_unparsable_config_are_named_not_fatal(finished, tmp_path):
    path, results, live, archived = finished
    with open(live / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    other = results / "records" / "damage" / "ffffffffffff"
    other.mkdir()
    (other / "config.yaml").write_text("kind: [unclosed\n")
    report = run_cli("report", "--results", results, "--out", tmp_path / "lb")
    _no_traceback(report)
    assert report.returncode == 0, report.stderr
    assert "damaged line" in report.stderr and "config.yaml is damaged" in report.stderr
    assert "ffffffffffff" in (tmp_path / "lb" / "report.md").read_text()
    status = run_cli("status", path, "--results", results, "--no-slurm")
    _no_traceback(status)
    assert "1 done" in status.stdout


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_damaged_checkpoint_restarts_the_run_instead_of_sticking(tmp_path, damage):
    path = write_suite(tmp_path, tiny("ckpt", epochs=2))
    results = tmp_path / "results"
    killed = run_cli(
        "run",
        path,
        "--results",
        results,
        "--no-progress",
        env=cli_env(MASKING_BENCH_KILL_AT="*/runs/ckpt/*/metrics.jsonl@3"),
    )
    assert killed.returncode == -9
    (ckpt,) = results.glob("runs/ckpt/*/checkpoint.pt")
    if damage == "truncate":
        _truncate(ckpt)
    else:
        ckpt.write_bytes(os.urandom(4096))
    proc = run_cli("run", path, "--results", results, "--no-progress")
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "checkpoint.pt is damaged" in line]
    assert len(warning) == 1 and str(ckpt) in warning[0] and "weights_only" not in warning[0]
    assert ckpt.with_name("checkpoint.pt.damaged").is_file()
    again = run_cli("run", path, "--results", results, "--no-progress")
    assert "already finished 1" in again.stderr


# ------------------------------------------------------------------------------ status that lies


@pytest.mark.integration
def test_truncated_status_of_a_finished_run_reads_done(finished):
    path, results, live, archived = finished
    _truncate(live / "status.json")
    status = run_cli("status", path, "--results", results, "--no-slurm")
    _no_traceback(status)
    assert "1 done" in status.stdout


def test_running_status_without_a_lock_holder_reads_interrupted(tmp_path):
    from masking_bench.config import expand, parse_suite
    from masking_bench.status import run_rows
    from masking_bench.store import RunRecord

    (spec,) = expand(parse_suite(tiny("lies")))
    record = RunRecord(tmp_path, spec)
    record.dir.mkdir(parents=True)
    record.set_status("running")
    (row,) = run_rows([spec], tmp_path)
    assert row["state"] == "pending" and "interrupted" in row["reason"]
    with record.lock():  # a live holder: the status is believed
        (row,) = run_rows([spec], tmp_path)
        assert row["state"] == "running"


# ------------------------------------------------------------------------------ full disk, leftovers


def test_full_disk_while_archiving_keeps_the_run_finished(tmp_path, monkeypatch):
    import errno

    from masking_bench.config import expand, parse_suite
    from masking_bench.launch import run_local
    from masking_bench.store import RunRecord

    (spec,) = expand(parse_suite(tiny("enospc", epochs=1)))

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunRecord, "archive", full)
    outcome = run_local([spec], tmp_path, show_progress=False)
    assert outcome.failed == [] and len(outcome.done) == 1
    monkeypatch.undo()
    record = RunRecord(tmp_path, spec)
    assert record.is_done() and not record.is_archived()
    run_local([spec], tmp_path, show_progress=False)  # the next run copies it
    assert record.is_archived()


def test_full_disk_while_writing_the_report_is_one_line(tmp_path, monkeypatch):
    import errno

    from masking_bench import cli, report
    from masking_bench.errors import BenchError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(report, "write_report", full)
    with pytest.raises(BenchError, match="No space left on device.*every finished run is kept"):
        cli._write_report(tmp_path, None, None)


def test_leftover_temporary_files_are_cleaned_on_the_next_start(tmp_path):
    from masking_bench.config import expand, parse_suite
    from masking_bench.launch import run_local
    from masking_bench.store import RunRecord

    (spec,) = expand(parse_suite(tiny("tmp", epochs=1)))
    run_local([spec], tmp_path, show_progress=False)
    record = RunRecord(tmp_path, spec)
    junk = [record.dir / ".summary.json.abc.tmp", record.archive_dir / ".metrics.jsonl.def.tmp"]
    for path in junk:
        path.write_text("half a write")
    outcome = run_local([spec], tmp_path, show_progress=False)
    assert outcome.skipped and not any(p.exists() for p in junk)


def test_tmp_files_are_ignored_by_git():
    from conftest import REPO

    assert "*.tmp" in (REPO / ".gitignore").read_text().split()


def test_wall_seconds_count_every_attempt(tmp_path):
    from masking_bench.config import expand, parse_suite
    from masking_bench.launch import execute_run

    (spec,) = expand(parse_suite(tiny("wall", epochs=2)))
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, tmp_path, show_progress=False, stop_after_steps=3)
    import torch

    first = torch.load(next(tmp_path.glob("runs/wall/*/checkpoint.pt")), weights_only=True)["wall_seconds"]
    summary = execute_run(spec, tmp_path, show_progress=False)
    assert first > 0 and summary["wall_seconds"] > first


# ------------------------------------------------------------------------------ plans and plugins


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,rule",
    [
        ("hide_nothing", "hides no token"),
        ("hide_too_few", "from the requested ratio"),
        ("explodes", "failed in plan(): ZeroDivisionError: the plugin's own bug"),
    ],
)
def test_degenerate_or_failing_plans_fail_the_run_naming_strategy_and_rule(tmp_path, name, rule):
    (tmp_path / "bad_plugins.py").write_text(PLUGINS)
    path = write_suite(tmp_path, tiny("bad", [name], epochs=1, plugins=["bad_plugins.py"]))
    proc = run_cli("run", path, "--results", tmp_path / "results", "--no-progress")
    assert proc.returncode == 1
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and f"strategy '{name}'" in failed[0] and rule in failed[0]
    assert not list((tmp_path / "results").glob("records/bad/*/summary.json"))


def test_nan_advice_matches_the_precision():
    import torch

    from masking_bench.config import expand, parse_suite
    from masking_bench.errors import NonFiniteLossError
    from masking_bench.masking import build_strategy
    from masking_bench.models import build_model
    from masking_bench.step import TrainStep
    from masking_bench.train import make_optimizer

    (spec,) = expand(parse_suite(tiny("nan", epochs=1)))
    model = build_model("cpu-tiny", "mae", 28, 1)
    strategy = build_strategy("random", 0.75)
    step = TrainStep(spec, model, strategy, make_optimizer(model, spec), torch.device("cpu"), 2)
    x = torch.full((4, 1, 28, 28), float("nan"))
    with pytest.raises(NonFiniteLossError) as err:
        step(x, 0, 0)
    assert "lower train.base_lr" in str(err.value) and "amp" not in str(err.value)
