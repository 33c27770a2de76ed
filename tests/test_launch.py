"""Launchers without a cluster: debug launcher records, status, retry of failures, flag vs suite,
array chunking, submit-time bookkeeping, and interrupted-then-resumed == uninterrupted on CPU."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from conftest import flaky_plugin

from masking_bench import cli
from masking_bench import launch as launch_mod
from masking_bench import slurm as slurm_mod
from masking_bench import status as status_mod
from masking_bench.config import LauncherConfig, expand, parse_suite
from masking_bench.errors import BenchError
from masking_bench.launch import execute_run
from masking_bench.slurm import (
    RunJob,
    chunked,
    executor_parameters,
    mark_lost,
    mark_submitted,
    signal_delay_s,
)
from masking_bench.store import RunRecord

# A very small model on 16x16 synthetic images: a run takes ~1-2 s on one busy core.
MICRO = {
    "preset": "cpu-tiny",
    "overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2},
}
TINY_EVAL = {"probe": {"epochs": 1, "train_subset": 128, "test_subset": 64}, "low_shot": None, "random_init": False}

FLAKY_PLUGIN = flaky_plugin("flaky_test", "tests/test_launch.py")


def tiny_suite(name: str, **over) -> dict:
    raw = {
        "name": name,
        "data": {"name": "synthetic", "image_size": 16, "train_subset": 128},
        "model": MICRO,
        "strategies": ["random"],
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.5},
        "eval": TINY_EVAL,
    }
    raw.update(over)
    return raw


def write_suite(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def flaky(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "flaky_test.py").write_text(FLAKY_PLUGIN)
    return folder


# ------------------------------------------------------------------------------ pure units


def test_chunked_splits_arrays_at_the_maximum_size():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert chunked(list(range(3)), 500) == [[0, 1, 2]]
    assert chunked(list(range(3)), 1) == [[0], [1], [2]]
    assert chunked([], 5) == []
    with pytest.raises(ValueError):
        chunked([1], 0)


def test_executor_parameters_map_the_launcher_block():
    cfg = LauncherConfig(
        kind="slurm",
        partition="gpu",
        nodes=2,
        gpus_per_node=2,
        cpus_per_task=8,
        mem_gb=32,
        timeout_min=240,
        array_parallelism=4,
        additional_parameters={"qos": "high"},
    )
    p = executor_parameters(cfg, "slurm", "sweep")
    assert p == {
        "name": "mb-sweep",
        "timeout_min": 240,
        "nodes": 2,
        "tasks_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 32,
        "gpus_per_node": 2,
        "slurm_partition": "gpu",
        "slurm_array_parallelism": 4,
        "slurm_signal_delay_s": 120,
        "slurm_additional_parameters": {"qos": "high"},
    }
    lean = executor_parameters(LauncherConfig(), "slurm", "s")
    assert "gpus_per_node" not in lean and "slurm_partition" not in lean  # never send --gpus-per-node=0
    assert executor_parameters(cfg, "debug", "s") == {"name": "mb-s", "timeout_min": 240}
    assert executor_parameters(LauncherConfig(tasks_per_node=2), "slurm", "s")["tasks_per_node"] == 2
    # the checkpoint signal comes before the time limit even for very short limits
    assert signal_delay_s(1) == 15 and signal_delay_s(10) == 60 and signal_delay_s(600) == 120


def test_slurm_launcher_without_sbatch_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_mod.shutil, "which", lambda name: None)
    specs = expand(parse_suite(tiny_suite("nosbatch")))
    with pytest.raises(BenchError, match="sbatch"):
        launch_mod.launch_suite(specs, tmp_path, LauncherConfig(kind="slurm"), "slurm", "nosbatch")
    # data-parallel tasks must split the batch evenly: said before anything is submitted
    with pytest.raises(BenchError, match="tasks_per_node 3 .* must divide train.batch_size 64"):
        launch_mod.launch_suite(specs, tmp_path, LauncherConfig(kind="slurm", tasks_per_node=3), "slurm", "x")


def _spec(name="book"):
    return expand(parse_suite(tiny_suite(name)))[0]


def test_submit_bookkeeping_never_clobbers(tmp_path):
    spec = _spec()
    rec = RunRecord(tmp_path, spec)
    mark_submitted(rec, "41_0", tmp_path / "log.out")
    st = rec.status()
    assert st["state"] == "pending" and st["job_id"] == "41_0" and "submitted" in st["note"]
    assert rec.config_path.is_file()
    # the job already wrote its own status (here: it failed fast): the submitter must keep it
    rec.set_status("failed", job_id="41_0", reason="RuntimeError: boom")
    mark_submitted(rec, "41_0", None)
    assert rec.status()["state"] == "failed"
    # a failed run of an older job is retried: the new submission takes over the record
    mark_submitted(rec, "42_0", None)
    assert rec.status()["state"] == "pending" and rec.status()["job_id"] == "42_0"
    # the job vanished (e.g. scancel while queued): the record says so, once
    assert mark_lost(rec, "42_0", "SLURM job 42_0 ended (CANCELLED) before the run finished")
    assert rec.status()["state"] == "failed" and "CANCELLED" in rec.status()["reason"]
    assert not mark_lost(rec, "42_0", "again")
    assert not mark_lost(rec, "99", "another job")  # never touch a record some other job owns
    # done runs (finished by the current code) are never touched
    rec.write_summary({"run_hash": spec.run_hash, "code": {"parts": rec.code}})
    rec.set_status("done", job_id="42_0")
    mark_submitted(rec, "43_0", None)
    assert not mark_lost(rec, "42_0", "late")
    assert rec.status()["state"] == "done" and rec.status()["job_id"] == "42_0"


def test_runjob_pickles_and_checkpoint_requeues_itself(tmp_path):
    import cloudpickle

    spec = _spec("ckpt")
    job = RunJob(spec.model_dump(mode="json"), str(tmp_path))
    again = cloudpickle.loads(cloudpickle.dumps(job))
    assert again.spec == job.spec and again.results == str(tmp_path)
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == ()
    st = RunRecord(tmp_path, spec).status()
    assert st["state"] == "pending" and "requeued" in st["note"]
    assert pickle.loads(pickle.dumps(delayed.function.spec)) == job.spec


def test_status_marks_records_whose_job_vanished(monkeypatch, tmp_path):
    spec = _spec("stale")
    mark_submitted(RunRecord(tmp_path, spec), "77_1", None)
    rows = status_mod.run_rows([spec], tmp_path)
    monkeypatch.setattr(status_mod, "slurm_states", lambda ids: {"77_1": "CANCELLED"})
    assert status_mod.annotate_with_slurm(rows)
    text = status_mod.format_status(rows, "stale", tmp_path, with_slurm=True)
    assert "77_1" in text and "CANCELLED" in text and "next `run` resubmits it" in text


# ------------------------------------------------------------------------------ through the CLI


def test_flag_wins_over_the_suite_launcher(monkeypatch, tmp_path):
    seen = []

    def fake_launch(specs, results, cfg, kind, suite, wait=True, show_progress=True, accept_stale=False):
        seen.append((kind, cfg.kind, wait))
        return launch_mod.SuiteOutcome(skipped=[s.short() for s in specs])

    monkeypatch.setattr(launch_mod, "launch_suite", fake_launch)
    monkeypatch.setattr("masking_bench.report.write_report", lambda *a, **k: tmp_path / "leaderboard.md")
    suite = write_suite(tmp_path / "s.yaml", tiny_suite("flagged", launcher={"kind": "debug", "partition": "x"}))
    assert cli.main(["run", str(suite), "--results", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["run", str(suite), "--results", str(tmp_path), "--no-progress", "--launcher", "local"]) == 0
    assert (
        cli.main(["run", str(suite), "--results", str(tmp_path), "--no-progress", "--launcher", "slurm", "--no-wait"])
        == 0
    )
    assert seen == [("debug", "debug", True), ("local", "debug", True), ("slurm", "debug", False)]
    suite2 = write_suite(tmp_path / "s2.yaml", tiny_suite("plain"))
    assert cli.main(["run", str(suite2), "--results", str(tmp_path), "--no-progress"]) == 0
    assert seen[-1][0] == "local"  # no launcher block, no flag: local stays the default


def test_debug_launcher_status_failure_and_retry(flaky, tmp_path, capsys):
    """Two good runs and two that fail in plan(): records complete, status explains, rerun retries."""
    flag = flaky / "flaky.fail"
    flag.write_text("flag file present")
    raw = tiny_suite(
        "dbg",
        strategies=["random", "flaky_test"],
        seeds=[0, 1],
        plugins=[str(flaky / "flaky_test.py")],
        launcher={"kind": "debug", "max_array_size": 3},
    )
    suite = write_suite(tmp_path / "dbg.yaml", raw)
    results = tmp_path / "results"
    try:
        code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "launcher: debug" in err and "done 2, already finished 0, failed 2" in err
        assert err.count("failed: flaky_test r=0.75 seed=") == 2 and "planned failure: flag file present" in err

        specs = expand(parse_suite(raw))
        for spec in specs:
            rec = RunRecord(results, spec)
            st = rec.status()
            assert st["job_id"].startswith("DEBUG_") and st["launcher"] == "debug"
            if spec.strategy.name == "random":
                assert rec.is_done() and len(rec.read_metrics()) == 1 and rec.checkpoint_path.is_file()
                assert rec.read_summary()["run_hash"] == spec.run_hash and rec.config_path.is_file()
            else:
                assert st["state"] == "failed" and st["reason"] == (
                    "strategy 'flaky_test' (ratio 0.75) failed in plan(): "
                    "RuntimeError: planned failure: flag file present"
                )
                assert "Traceback" in st["traceback"]

        assert cli.main(["status", str(suite), "--results", str(results)]) == 0
        out = capsys.readouterr().out
        assert "suite 'dbg': 4 runs - 2 done, 0 stale, 0 running, 0 pending, 2 failed" in out
        lines = [line for line in out.splitlines() if "flaky_test" in line]
        assert len(lines) == 2 and all("failed" in x and "planned failure" in x and "DEBUG_" in x for x in lines)
        assert sum(" done " in line and "1/1" in line for line in out.splitlines()) == 2
    finally:
        flag.unlink(missing_ok=True)

    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "done 2, already finished 2, failed 0" in err
    assert cli.main(["status", str(suite), "--results", str(results), "--no-slurm"]) == 0
    assert "4 runs - 4 done, 0 stale, 0 running, 0 pending, 0 failed" in capsys.readouterr().out


def test_status_of_a_suite_never_run(tmp_path, capsys):
    suite = write_suite(tmp_path / "fresh.yaml", tiny_suite("fresh", seeds=[0, 1, 2]))
    assert cli.main(["status", str(suite), "--results", str(tmp_path / "nothing")]) == 0
    out = capsys.readouterr().out
    assert "3 runs - 0 done, 0 stale, 0 running, 3 pending, 0 failed" in out and out.count("0/1") == 3


# ------------------------------------------------------------------------------ resume == uninterrupted


VOLATILE = {
    "seconds",
    "img_per_s",
    "plan_share",
    "wall_seconds",
    "train_seconds",
    "eval_seconds",
    "train_img_per_s",
    "peak_mem_mb",
    "versions",
    "updated",
}


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    """Two interruptions (mid-epoch 0 before any checkpoint, then mid-epoch 2) give identical final numbers."""
    raw = tiny_suite(
        "resume",
        data={"name": "synthetic", "image_size": 16, "train_subset": 256},
        train={"epochs": 3, "batch_size": 64, "warmup_epochs": 0.5},
    )  # 4 steps per epoch
    spec = expand(parse_suite(raw))[0]
    straight = execute_run(spec, tmp_path / "a", show_progress=False)

    rec = RunRecord(tmp_path / "b", spec)
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, tmp_path / "b", show_progress=False, stop_after_steps=2)  # inside epoch 0
    assert rec.status()["state"] == "pending" and not rec.checkpoint_path.exists()
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, tmp_path / "b", show_progress=False, stop_after_steps=10)  # inside epoch 2
    assert rec.status()["state"] == "pending" and len(rec.read_metrics()) == 2
    assert rec.status()["epochs_at_start"] == 0
    resumed = execute_run(spec, tmp_path / "b", show_progress=False)
    assert rec.status()["state"] == "done" and rec.status()["epochs_at_start"] == 2

    assert _stable(resumed) == _stable(straight)  # exact equality, every metric
    a = RunRecord(tmp_path / "a", spec).read_metrics()
    b = rec.read_metrics()
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert _stable(a) == _stable(b)
    assert json.loads(rec.summary_path.read_text())["final_loss"] == straight["final_loss"]


def test_two_local_workers_share_a_suite_without_failures(tmp_path, capsys):
    """A run whose lock another process holds is left to that process: not trained twice, not a failure."""
    import subprocess
    import sys
    import time

    raw = tiny_suite("shared", seeds=[0, 1])
    suite = write_suite(tmp_path / "shared.yaml", raw)
    results = tmp_path / "results"
    busy_spec, free_spec = expand(parse_suite(raw))[:2]
    holder_code = (
        "import fcntl, sys, time; fh = open(sys.argv[1], 'w'); fcntl.flock(fh, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"
    )
    lock_file = RunRecord(results, busy_spec).dir / ".lock"
    lock_file.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "left to another process 1, failed 0" in err, err
        assert time.perf_counter() - t0 < 50  # did not wait for the holder
    finally:
        holder.kill()
        holder.wait()
    assert RunRecord(results, free_spec).is_done()
    assert not RunRecord(results, busy_spec).is_done()
    assert RunRecord(results, busy_spec).status().get("state") != "failed"
    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])  # holder gone: now trained
    assert code == 0 and RunRecord(results, busy_spec).is_done()
