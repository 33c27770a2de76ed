"""The submitit side of running a suite: the pickled job (:class:`RunJob`), executor parameters, SLURM
job arrays (chunked to ``max_array_size``), the bookkeeping of submitted jobs, and waiting with a
progress bar. ``debug`` runs the same pickled jobs in-process through submitit's ``DebugExecutor``.

A job calls :func:`masking_bench.launch.execute_run`. On preemption or timeout submitit calls
:meth:`RunJob.checkpoint`, which requeues the job; the requeued job resumes from the run's last
epoch checkpoint. The record's ``status.json`` carries the SLURM job id (``job_id``) and
``restarts`` so ``python -m masking_bench status`` can show them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission
from tqdm.auto import tqdm

from .config import LauncherConfig, RunSpec, spec_from_dict
from .errors import BenchError
from .launch import SuiteOutcome, execute_run, one_line, status_lock
from .store import RunRecord

# a checkpointable run may time out and be requeued this many times before it counts as failed
MAX_NUM_TIMEOUT = 20
POLL_SECONDS = 1.0  # how often `run --launcher slurm` looks at the records while it waits
T = TypeVar("T")


def job_context() -> dict[str, Any]:
    """The submitit/SLURM job this process runs in (empty outside a submitit job)."""
    try:
        env = submitit.JobEnvironment()
        info: dict[str, Any] = {"job_id": str(env.job_id), "launcher": env.cluster}
    except Exception:  # not inside a submitit job
        return {}
    try:
        info["log"] = str(env.paths.stdout)
    except Exception:
        pass
    if os.environ.get("SLURM_RESTART_COUNT"):
        info["restarts"] = int(os.environ["SLURM_RESTART_COUNT"])
    return info


def export_distributed() -> tuple[int, int]:
    """(rank, world size) of this task; for a multi-task job also export the torchrun-style variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) the trainer's ``init_distributed`` reads."""
    try:
        env = submitit.JobEnvironment()
        world = env.num_tasks
    except Exception:
        return 0, 1
    if world <= 1:
        return 0, 1
    from submitit.helpers import TorchDistributedEnvironment

    # keep every GPU visible: the trainer picks cuda:LOCAL_RANK itself
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.global_rank, world


class RunJob(Checkpointable):
    """What a submitit job executes: one run, given as a plain dict so the pickle stays small and stable.

    On preemption or timeout submitit calls :meth:`checkpoint`, which resubmits this same object:
    the requeued job calls :func:`execute_run` again and that resumes from ``checkpoint.pt``. An
    outside ``scontrol requeue`` kills the job and reruns the original pickle, with the same effect.
    """

    def __init__(self, spec: dict[str, Any], results: str, raise_on_failure: bool = True):
        self.spec = spec
        self.results = str(results)
        # True on SLURM (the job ends FAILED, visible in sacct); False in-process (debug), where
        # submitit would otherwise open pdb on the exception.
        self.raise_on_failure = raise_on_failure

    def __call__(self) -> dict[str, Any]:
        spec = spec_from_dict(self.spec)
        rank, world = export_distributed()
        if rank != 0:  # a data-parallel follower: trains its share; rank 0 owns the lock and the record
            return self._follow(spec, rank, world)
        ctx = job_context()
        if world > 1:
            ctx["tasks"] = world
        record = RunRecord(Path(self.results), spec)
        print(
            f"masking_bench: run {spec.run_hash} ({spec.short()}) job {ctx.get('job_id', '-')} "
            f"restart {ctx.get('restarts', 0)} epochs done {len(record.read_metrics())} "
            f"record {record.dir}",
            flush=True,
        )
        try:
            execute_run(spec, Path(self.results), show_progress=False, job=ctx)
        except Exception as exc:
            print(f"masking_bench: run {spec.run_hash} failed: {one_line(exc)}", flush=True)
            if self.raise_on_failure:
                raise
            return {"run_hash": spec.run_hash, "state": "failed", "reason": one_line(exc)}
        print(f"masking_bench: run {spec.run_hash} done", flush=True)
        return {"run_hash": spec.run_hash, "state": "done"}

    def _follow(self, spec: RunSpec, rank: int, world: int) -> dict[str, Any]:
        from .train import train_run

        record = RunRecord(Path(self.results), spec)
        if not record.is_done():  # rank 0 sees the same record and returns early too
            train_run(spec, record, progress=None)
        return {"run_hash": spec.run_hash, "state": "follower", "rank": rank, "world": world}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Called from submitit's signal handler (preemption / time limit) while training runs in
        # the main thread: no lock here (the main thread may hold the status lock).
        spec = spec_from_dict(self.spec)
        record = RunRecord(Path(self.results), spec)
        if not record.is_done():
            record.set_status(
                "pending",
                **job_context(),
                note="preempted or timed out: requeued, resumes from the last finished epoch",
            )
        return DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------------------------ submission


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive slices of at most ``size`` items (one job array each); [] for no items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def default_folder(results: Path, suite: str) -> Path:
    return Path(results) / "submitit" / suite


def signal_delay_s(timeout_min: int) -> int:
    """Seconds before the time limit at which SLURM signals the job to checkpoint and requeue.

    submitit's default (90 s) would fire at once for limits of a minute or two; MAE uses 120 s.
    """
    return int(min(120, max(15, timeout_min * 60 // 10)))


def executor_parameters(cfg: LauncherConfig, kind: str, suite: str) -> dict[str, Any]:
    """``update_parameters`` keywords for a submitit AutoExecutor of ``kind`` from the suite's launcher block."""
    params: dict[str, Any] = {"name": f"mb-{suite}", "timeout_min": cfg.timeout_min}
    if kind != "slurm":
        return params
    params.update(
        nodes=cfg.nodes,
        tasks_per_node=cfg.tasks_per_node,
        cpus_per_task=cfg.cpus_per_task,
        mem_gb=cfg.mem_gb,
        slurm_array_parallelism=cfg.array_parallelism,
        slurm_signal_delay_s=signal_delay_s(cfg.timeout_min),
    )
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.partition:
        params["slurm_partition"] = cfg.partition
    if cfg.additional_parameters:
        params["slurm_additional_parameters"] = dict(cfg.additional_parameters)
    return params


def make_executor(cfg: LauncherConfig, kind: str, suite: str, folder: Path) -> submitit.AutoExecutor:
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise BenchError(
                "--launcher slurm: 'sbatch' is not on PATH; run on a SLURM login node, or start the "
                "local test cluster with 'bash scripts/slurm-local-up.sh up'"
            )
        if submitit.JobEnvironment.USR_SIG == "USR1":
            print(
                "warning: SUBMITIT_PREEMPT_SIGNAL=USR1: NCCL may swallow USR1 so runs would not checkpoint "
                "before preemption; unset it (submitit's default is USR2)",
                file=sys.stderr,
            )
    executor = submitit.AutoExecutor(
        folder=str(Path(folder) / "%j"), cluster=kind, slurm_max_num_timeout=MAX_NUM_TIMEOUT
    )
    executor.update_parameters(**executor_parameters(cfg, kind, suite))
    return executor


def live_slurm_jobs() -> dict[str, str]:
    """Job ids (array tasks expanded, ``12_3``) currently known to ``squeue`` -> state; {} when unavailable."""
    if shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def mark_submitted(record: RunRecord, job_id: str, log: Path | None) -> None:
    """Record the job id of a fresh submission without clobbering a run that is done or already started."""
    with status_lock(record):
        # any status carrying this job id was written by the job itself, so it is newer: keep it
        if record.is_done() or record.status().get("job_id") == job_id:
            return
        record.write_config()
        record.set_status(
            "pending",
            job_id=job_id,
            launcher="slurm",
            note=f"submitted as SLURM job {job_id}",
            log=str(log) if log else None,
            submitted=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )


def mark_lost(record: RunRecord, job_id: str, reason: str) -> bool:
    """The job ended without the run finishing or failing (cancelled, killed, node failure): say so."""
    with status_lock(record):
        st = record.status()
        if record.is_done() or st.get("job_id") != job_id or st.get("state") == "failed":
            return False
        record.set_status("failed", job_id=job_id, launcher="slurm", reason=reason)
        return True


def submit_suite(
    specs: list[RunSpec],
    results: Path,
    cfg: LauncherConfig,
    kind: str,
    suite: str,
    wait: bool = True,
    show_progress: bool = True,
    accept_stale: bool = False,
) -> SuiteOutcome:
    """``launch_suite`` for ``debug`` and ``slurm``: submit the runs not already done (one job array per
    ``max_array_size`` runs, never a second job for a run whose job is queued or running), then wait."""
    results = Path(results).resolve()
    folder = Path(cfg.folder).resolve() if cfg.folder else default_folder(results, suite)
    outcome = SuiteOutcome(folder=folder)
    t0 = time.perf_counter()
    todo = []
    for spec in specs:
        if RunRecord(results, spec, accept_stale).is_done():
            outcome.skipped.append(spec.short())
        else:
            todo.append(spec)
    if not todo:
        return outcome
    world = cfg.nodes * cfg.tasks_per_node if kind == "slurm" else 1
    if world > 1:  # data-parallel: each task takes an equal share of a batch
        odd = next((s for s in todo if s.train.batch_size % (world * s.train.accum_steps)), None)
        if odd is not None:
            raise BenchError(
                f"launcher.nodes {cfg.nodes} x tasks_per_node {cfg.tasks_per_node} (one data-parallel process "
                f"per task) x train.accum_steps {odd.train.accum_steps} "
                f"must divide train.batch_size {odd.train.batch_size} ({odd.short()})"
            )
    executor = make_executor(cfg, kind, suite, folder)
    if kind == "debug":
        _run_debug(executor, todo, results, cfg, outcome, show_progress)
        outcome.seconds = time.perf_counter() - t0
        return outcome

    # slurm: never submit a second job for a run whose job is still queued or running
    live = live_slurm_jobs()
    tracked: list[tuple[RunSpec, str, Any]] = []
    fresh = []
    for spec in todo:
        st = RunRecord(results, spec).status()
        job_id = st.get("job_id")
        if job_id and job_id in live and st.get("state") in ("pending", "running"):
            outcome.queued.append((spec.short(), job_id))
            tracked.append((spec, job_id, submitit.SlurmJob(folder=str(folder / "%j"), job_id=job_id)))
        else:
            fresh.append(spec)
    for chunk in chunked(fresh, cfg.max_array_size):
        try:
            with executor.batch():
                jobs = [executor.submit(RunJob(spec.model_dump(mode="json"), str(results))) for spec in chunk]
        except submitit.core.utils.FailedJobError as exc:  # sbatch said no: one line, nothing half-done
            lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
            msg = next((x for x in reversed(lines) if "error" in x.lower()), lines[-1] if lines else "failed")
            done_before = f" ({len(outcome.submitted)} runs were submitted before)" if outcome.submitted else ""
            raise BenchError(
                f"sbatch refused the job array of {len(chunk)} runs: {msg}; check the suite's "
                f"launcher block (partition, gpus_per_node, mem_gb, additional_parameters)"
                f"{done_before}"
            ) from None
        for spec, job in zip(chunk, jobs, strict=True):
            log = None
            try:
                log = job.paths.stdout
            except Exception:
                pass
            mark_submitted(RunRecord(results, spec), str(job.job_id), log)
            outcome.submitted.append((spec.short(), str(job.job_id)))
            tracked.append((spec, str(job.job_id), job))
    if wait:
        try:
            _wait_slurm(tracked, results, outcome, show_progress)
        except KeyboardInterrupt:
            print(
                f"stopped waiting: the {len(tracked)} SLURM jobs keep running (scancel to stop them); "
                "`python -m masking_bench status SUITE` shows where they are",
                file=sys.stderr,
            )
            raise
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_debug(
    executor, todo: list[RunSpec], results: Path, cfg: LauncherConfig, outcome: SuiteOutcome, show_progress: bool
) -> None:
    jobs = []
    for chunk in chunked(todo, cfg.max_array_size):
        with executor.batch():
            jobs += [
                executor.submit(RunJob(s.model_dump(mode="json"), str(results), raise_on_failure=False)) for s in chunk
            ]
    bar = tqdm(total=len(todo), desc="runs (debug)", unit="run", disable=not show_progress)
    for spec, job in zip(todo, jobs, strict=True):
        bar.set_postfix_str(spec.short())
        res = job.result()  # the debug executor runs the job here, in this process
        if res.get("state") == "done":
            outcome.done.append(spec.short())
        else:
            outcome.failed.append((spec.short(), res.get("reason", "failed")))
        bar.update(1)
    bar.close()


def _wait_slurm(
    tracked: list[tuple[RunSpec, str, Any]], results: Path, outcome: SuiteOutcome, show_progress: bool
) -> None:
    """Poll the records (and, for jobs that vanished, SLURM) until every tracked run is done or failed."""
    pending = {spec.run_hash: (spec, job_id, job) for spec, job_id, job in tracked}
    ended_once: set[str] = set()  # job seen finished once without a final record: confirm on the next poll
    bar = tqdm(total=len(pending), desc="slurm runs", unit="run", disable=not show_progress)
    try:
        while pending:
            states = {"pending": 0, "running": 0}
            for run_hash, (spec, job_id, job) in list(pending.items()):
                record = RunRecord(results, spec)
                st = record.status()
                if record.is_done():
                    outcome.done.append(spec.short())
                elif st.get("state") == "failed" and st.get("job_id") == job_id:
                    outcome.failed.append((spec.short(), f"{st.get('reason', 'failed')} [job {job_id}]"))
                else:
                    if _job_ended(job):
                        if run_hash in ended_once:
                            state = _job_state(job)
                            reason = (
                                f"SLURM job {job_id} ended ({state}) before the run finished; log: {_log_path(job)}"
                            )
                            mark_lost(record, job_id, reason)
                            st = record.status()
                            if record.is_done():
                                outcome.done.append(spec.short())
                            else:
                                outcome.failed.append((spec.short(), f"{st.get('reason', reason)} [job {job_id}]"))
                            del pending[run_hash]
                            bar.update(1)
                            continue
                        ended_once.add(run_hash)
                    else:
                        ended_once.discard(run_hash)
                    states["running" if st.get("state") == "running" else "pending"] += 1
                    continue
                del pending[run_hash]
                bar.update(1)
            bar.set_postfix(running=states["running"], queued=states["pending"], failed=len(outcome.failed))
            if pending:
                time.sleep(POLL_SECONDS)
    finally:
        bar.close()


def _job_ended(job) -> bool:
    try:
        return bool(job.done())
    except Exception:
        return False


def _job_state(job) -> str:
    try:
        return str(job.get_info(mode="force").get("State") or job.state)
    except Exception:
        return "UNKNOWN"


def _log_path(job) -> str:
    try:
        return str(job.paths.stdout)
    except Exception:
        return "?"
