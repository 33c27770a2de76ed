"""Integration with a real SLURM cluster, e.g. the local one of scripts/slurm-local-up.sh.

Skipped when there is no usable cluster, unless MASKING_BENCH_REQUIRE_SLURM=1 (CI, after
`bash scripts/slurm-local-up.sh up`): then a missing cluster is a failure. Run with `pytest -m slurm`.
Latencies are printed (`-s` shows them) and appended to $MASKING_BENCH_SLURM_TIMINGS when set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import flaky_plugin, needs_fashion
from test_launch import MICRO, TINY_EVAL, tiny_suite  # the micro suite of the launcher tests without a cluster

from masking_bench import cli
from masking_bench.config import expand, parse_suite
from masking_bench.launch import execute_run
from masking_bench.store import RunRecord

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = {"kind": "slurm", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 15}
JOB_ID = re.compile(r"^\d+(_\d+)?$")

FLAKY_PLUGIN = flaky_plugin("flaky_slurm", "tests/test_slurm.py")


# Random masking that also sleeps in plan(): epochs last long enough to be interrupted on any machine,
# without burning CPU (the numbers are unaffected: sleeping draws no random numbers).
SLOW_PLUGIN = """
import time

from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden, register


@register
class SlowSlurmMasking(MaskingStrategy):
    name = "slow_slurm"
    source = "tests/test_slurm.py"

    def plan(self, images, ctx):
        time.sleep(0.06)
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        return MaskPlan(mask=hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio)))
"""


def _cluster_problem() -> str | None:
    for tool in ("sinfo", "sbatch", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"'{tool}' not on PATH (no SLURM client; see scripts/slurm-local-up.sh)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hours"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"SLURM does not answer: {exc}"
    if nodes.returncode != 0:
        return f"sinfo failed: {(nodes.stderr or nodes.stdout).strip()[:200]}"
    if not {s.strip("*~#") for s in nodes.stdout.split()} & {"idle", "mixed", "allocated", "completing"}:
        return f"no usable node (sinfo states: {nodes.stdout.split()})"
    if acct.returncode != 0:
        return f"sacct fails (accounting is needed by submitit): {acct.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("MASKING_BENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"MASKING_BENCH_REQUIRE_SLURM=1 but the SLURM cluster is not usable: {problem}")
        pytest.skip(f"no SLURM cluster: {problem}")


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("slow_plugin") / "slow_slurm.py"
    path.write_text(SLOW_PLUGIN)
    return str(path)


def _slow_suite(name: str, slow: str, epochs: int, seed: int) -> dict:
    """32 steps of >= 60 ms per epoch: each epoch takes >= 2 s, however fast the machine."""
    return {
        "name": name,
        "data": {"name": "synthetic", "image_size": 16},
        "model": MICRO,
        "strategies": ["slow_slurm"],
        "ratios": [0.75],
        "seeds": [seed],
        "plugins": [slow],
        "train": {"epochs": epochs, "batch_size": 16, "warmup_epochs": 1},
        "eval": TINY_EVAL,
        "launcher": LAUNCHER,
    }


def _slow_record(tmp_path: Path, slow: str, name: str, epochs: int, seed: int):
    """The suite file (written), results folder, run spec and record of the one run of a :func:`_slow_suite`."""
    raw = _slow_suite(name, slow, epochs=epochs, seed=seed)
    suite = _write_suite(tmp_path / f"{name}.yaml", raw)
    results = tmp_path / "results"
    spec = expand(parse_suite(raw))[0]
    return suite, results, spec, RunRecord(results, spec)


def _micro_suite(name: str, **changes) -> dict:
    """test_launch's ``tiny_suite`` (one epoch of random masking, ratio 0.75, seed 0, on 128 synthetic 16x16
    images with the MICRO model) through SLURM. A dict in ``changes`` updates the suite's dict of that key
    (``train={"epochs": 2}``); any other value sets the key."""
    raw = tiny_suite(name, launcher=LAUNCHER)
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture
def in_repo(monkeypatch):
    # jobs inherit the submitter's working directory; from the repo root the package always imports
    monkeypatch.chdir(REPO)


def _timing(name: str, seconds: float) -> None:
    line = f"{name}: {seconds:.1f} s"
    print(f"\n[slurm timing] {line}")
    path = os.environ.get("MASKING_BENCH_SLURM_TIMINGS")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def _write_suite(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _diagnostics(record: RunRecord) -> str:
    st = record.status()
    log = st.get("log")
    tail = Path(log).read_text()[-2000:] if log and Path(log).is_file() else "(no log)"
    errlog = Path(log).with_suffix(".err") if log else None
    errtail = errlog.read_text()[-2000:] if errlog and errlog.is_file() else ""
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return f"status={json.dumps(st)}\nsqueue:\n{queue}\nlog:\n{tail}\nerr:\n{errtail}"


def _wait(pred, timeout: float, what: str, record: RunRecord, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_diagnostics(record)}")


def _wait_for_first_checkpoint(record: RunRecord) -> None:
    _wait(
        lambda: record.checkpoint_path.is_file() and record.status().get("state") == "running",
        180,
        "the first epoch checkpoint",
        record,
    )


def test_suite_through_slurm_records_status_and_retry(cluster, in_repo, tmp_path, capsys):
    """Smoke-like suite as job arrays (max_array_size 2 -> 2 arrays); one run fails, then is retried."""
    (tmp_path / "flaky_slurm.py").write_text(FLAKY_PLUGIN)
    flag = tmp_path / "flaky.fail"
    flag.write_text("inside the SLURM job")
    raw = _micro_suite(
        "slurm_smoke",
        strategies=["random", "flaky_slurm"],
        eval={"random_init": True},
        plugins=[str(tmp_path / "flaky_slurm.py")],
        launcher={"max_array_size": 2},
    )
    suite = _write_suite(tmp_path / "slurm_smoke.yaml", raw)
    results = tmp_path / "results"
    t0 = time.perf_counter()
    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err
    _timing("3-run suite (2 arrays) submit -> all records final", time.perf_counter() - t0)
    assert code == 1, err
    assert "launcher: slurm" in err and "done 2, already finished 0, failed 1" in err
    assert (
        "failed: flaky_slurm r=0.75 seed=0: strategy 'flaky_slurm' (ratio 0.75) failed in plan(): "
        "RuntimeError: planned failure: inside the SLURM job [job " in err
    )

    specs = expand(parse_suite(raw))
    assert len(specs) == 3
    ids, hashes = {}, {}
    for spec in specs:
        rec = RunRecord(results, spec)
        st = rec.status()
        assert JOB_ID.match(st["job_id"]) and st["launcher"] == "slurm", st
        ids[spec.strategy.name] = st["job_id"]
        hashes[spec.strategy.name] = spec.run_hash[:12]
        if spec.strategy.name == "flaky_slurm":
            assert st["state"] == "failed" and "planned failure" in st["reason"]
        else:
            assert rec.is_done() and rec.read_summary()["run_hash"] == spec.run_hash
    assert len({i.split("_")[0] for i in ids.values()}) == 2  # chunked into two job arrays

    def status_lines() -> dict[str, str]:
        assert cli.main(["status", str(suite), "--results", str(results)]) == 0
        out = capsys.readouterr().out
        assert "3 runs - 2 done, 0 stale, 0 running, 0 pending, 1 failed" in out
        # a run's line starts with its hash (a bare job id such as "3" also occurs in the header)
        lines = {name: next(x for x in out.splitlines() if x.startswith(hashes[name])) for name in ids}
        assert all(f" {ids[name]} " in line for name, line in lines.items()), lines
        return lines

    # the records are final at once; sacct (the SLURM column) lags a few seconds behind
    end = time.monotonic() + 60
    while True:
        lines = status_lines()
        ok = all(
            all(
                w in lines[name]
                for w in (("failed", "FAILED", "planned failure") if name == "flaky_slurm" else ("done", "COMPLETED"))
            )
            for name in lines
        )
        if ok or time.monotonic() > end:
            break
        time.sleep(1)
    assert ok, lines

    flag.unlink()  # the next run retries only the failed run
    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "submitted 1 runs" in err and "done 1, already finished 2, failed 0" in err
    retried = RunRecord(results, next(s for s in specs if s.strategy.name == "flaky_slurm")).status()
    assert retried["state"] == "done" and retried["job_id"] != ids["flaky_slurm"]


def test_one_run_latency_through_slurm(cluster, in_repo, tmp_path, capsys):
    """Submit-to-result latency of one tiny run, against the same run in-process."""
    raw = _micro_suite("slurm_one")
    suite = _write_suite(tmp_path / "one.yaml", raw)
    t0 = time.perf_counter()
    assert cli.main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-progress", "--no-wait"]) == 0
    submitted = time.perf_counter()
    spec = expand(parse_suite(raw))[0]
    rec = RunRecord(tmp_path / "r", spec)
    _wait(rec.is_done, 180, "the run to finish", rec, step=0.05)
    latency = time.perf_counter() - t0
    in_job = rec.read_summary()["wall_seconds"]
    _timing("1 tiny run: submit -> record done", latency)
    _timing("1 tiny run: sbatch submission (CLI --no-wait)", submitted - t0)
    _timing("1 tiny run: train+eval inside the job (summary wall_seconds)", in_job)
    assert latency < 120


def test_requeue_mid_run_resumes_and_matches_uninterrupted(cluster, in_repo, slow, tmp_path, capsys):
    """`scontrol requeue` after the first epoch checkpoint: the job is killed, restarts, resumes from the
    checkpoint and ends with exactly the numbers of an uninterrupted run."""
    suite, results, spec, rec = _slow_record(tmp_path, slow, "slurm_requeue", epochs=8, seed=3)
    assert cli.main(["run", str(suite), "--results", str(results), "--no-progress", "--no-wait"]) == 0
    job_id = rec.status()["job_id"]
    assert JOB_ID.match(job_id)

    _wait_for_first_checkpoint(rec)
    epochs_before = len(rec.read_metrics())
    assert epochs_before < spec.train.epochs - 3, "the run is too fast for this test"
    t_requeue = time.perf_counter()
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)

    # while SLURM holds the job (~11 s on the local cluster): the uninterrupted reference, in-process
    reference = execute_run(spec, tmp_path / "reference", show_progress=False)

    st = _wait(lambda: (s := rec.status()).get("restarts") == 1 and s, 240, "the requeued job to start", rec)
    _timing("scontrol requeue -> job running again", time.perf_counter() - t_requeue)
    assert st["job_id"] == job_id and st["epochs_at_start"] >= 1, st  # resumed, not restarted from scratch
    _wait(rec.is_done, 300, "the requeued run to finish", rec)
    _timing("scontrol requeue -> run done", time.perf_counter() - t_requeue)

    final = rec.status()
    assert final["state"] == "done" and final["restarts"] == 1 and final["job_id"] == job_id
    rows = rec.read_metrics()
    assert [r["epoch"] for r in rows] == list(range(spec.train.epochs))  # no epoch lost or duplicated
    log = Path(final.get("log") or rec.status().get("log") or "")
    starts = (
        [line for line in log.read_text().splitlines() if line.startswith("masking_bench: run")]
        if log.is_file()
        else []
    )
    assert sum(" restart " in line for line in starts) == 2, starts

    summary = rec.read_summary()
    for key in ("final_loss", "probe_top1", "knn_top1"):
        assert summary[key] == reference[key], (key, summary[key], reference[key])
    ref_rows = RunRecord(tmp_path / "reference", spec).read_metrics()
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]

    assert cli.main(["status", str(suite), "--results", str(results)]) == 0
    # the run's line starts with its hash (the job id alone may also occur in a printed timing)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(spec.run_hash[:12]))
    assert re.search(rf" done +8/8 +{re.escape(job_id)} +\S+ +1\b", line), line  # slurm column may lag


def test_preemption_signal_checkpoints_and_requeues(cluster, in_repo, slow, tmp_path, capsys):
    """submitit's preemption path (SIGTERM + USR2, as `job._interrupt()`): RunJob.checkpoint marks the
    record pending/requeued, submitit requeues the job, and the run resumes and finishes."""
    suite, results, spec, rec = _slow_record(tmp_path, slow, "slurm_preempt", epochs=5, seed=4)
    assert cli.main(["run", str(suite), "--results", str(results), "--no-progress", "--no-wait"]) == 0
    job_id = rec.status()["job_id"]
    _wait_for_first_checkpoint(rec)
    import submitit

    t0 = time.perf_counter()
    submitit.SlurmJob(folder=str(tmp_path / "unused"), job_id=job_id)._interrupt()
    held = _wait(
        lambda: (s := rec.status()).get("state") == "pending" and "requeued" in s.get("note", "") and s,
        60,
        "the checkpoint() status",
        rec,
        step=0.05,
    )
    assert held["job_id"] == job_id
    _wait(rec.is_done, 300, "the preempted run to finish", rec)
    _timing("preemption signal -> run done", time.perf_counter() - t0)
    final = rec.status()
    assert final["restarts"] == 1 and final["epochs_at_start"] >= 1, final
    assert [r["epoch"] for r in rec.read_metrics()] == list(range(spec.train.epochs))
    assert (
        "Calling checkpoint method" in Path(final["log"]).with_suffix(".err").read_text()
        or "Calling checkpoint method" in Path(final["log"]).read_text()
    )


@needs_fashion
def test_data_parallel_run_through_slurm(cluster, in_repo, tmp_path, capsys):
    """tasks_per_node: 2 -> one job, two gloo processes (torchrun variables from submitit), each reading
    its share of every batch from the prepared Fashion-MNIST file, in 2 micro-batches; rank 0 owns the
    record. The same run in one process, in memory, without accumulation, gives the same numbers up to
    the order of float sums (README, "Multi-node runs and gradient accumulation")."""
    data = {"name": "fashion_mnist", "image_size": None, "train_subset": 256}
    raw = _micro_suite(
        "slurm_ddp",
        data={**data, "storage": "prepared"},
        train={"epochs": 2, "accum_steps": 2, "amp": "none"},
        launcher={"tasks_per_node": 2},
    )
    suite = _write_suite(tmp_path / "ddp.yaml", raw)
    results = tmp_path / "results"
    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    spec = expand(parse_suite(raw))[0]
    one_process = _micro_suite("slurm_ddp", data={**data, "storage": "memory"}, train={"epochs": 2, "amp": "none"})
    single = expand(parse_suite(one_process))[0]
    assert single.run_hash == spec.run_hash  # the same run: layout and storage are not part of the identity
    rec = RunRecord(results, spec)
    st, summary = rec.status(), rec.read_summary()
    assert rec.is_done() and st["tasks"] == 2 and JOB_ID.match(st["job_id"]), st
    assert summary["parallel"] == {"world": 2, "accum_steps": 2} and summary["data"]["storage"] == "prepared"
    reference = execute_run(single, tmp_path / "single", show_progress=False)
    assert reference["parallel"] == {"world": 1, "accum_steps": 1} and reference["data"]["storage"] == "memory"
    ddp_rows, single_rows = rec.read_metrics(), RunRecord(tmp_path / "single", single).read_metrics()
    assert [r["epoch"] for r in ddp_rows] == [0, 1]
    worst = 0.0
    for a, b in zip(single_rows, ddp_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["mask_ratio_mean"] == b["mask_ratio_mean"]
        worst = max(worst, abs(a["loss"] - b["loss"]) / abs(a["loss"]))
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5, abs=1e-6)
    probe = (summary["probe_top1"], reference["probe_top1"])
    print(f"\n[slurm ddp] largest relative loss difference {worst:.2e}; probe top-1 2-task vs 1 process {probe}")


def test_cancelled_job_is_reported_and_the_next_run_resumes(cluster, in_repo, slow, tmp_path, capsys):
    """`scancel` mid-run while `run` waits: the run is reported failed with the job's end state (exit 1),
    `status` shows it, and the next `run` submits a new job that resumes from the checkpoint."""
    import threading

    suite, results, spec, rec = _slow_record(tmp_path, slow, "slurm_cancel", epochs=5, seed=6)
    codes = []
    waiter = threading.Thread(
        target=lambda: codes.append(cli.main(["run", str(suite), "--results", str(results), "--no-progress"]))
    )
    waiter.start()
    _wait_for_first_checkpoint(rec)
    job_id = rec.status()["job_id"]
    subprocess.run(["scancel", job_id], check=True)
    waiter.join(timeout=120)
    assert not waiter.is_alive() and codes == [1]
    err = capsys.readouterr().err
    assert f"SLURM job {job_id} ended (CANCELLED" in err, err
    st = rec.status()
    assert st["state"] == "failed" and "CANCELLED" in st["reason"] and st["job_id"] == job_id

    assert cli.main(["run", str(suite), "--results", str(results), "--no-progress"]) == 0
    st = rec.status()
    assert rec.is_done() and st["job_id"] != job_id and st["epochs_at_start"] >= 1, st
    assert [r["epoch"] for r in rec.read_metrics()] == list(range(5))
