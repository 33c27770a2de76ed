"""Run a suite's runs: skip finished ones, resume partial ones, never let one failure stop the others.

Where runs execute is the *launcher*: ``local`` (default) runs them one after another in this
process (:func:`run_local`); ``debug`` and ``slurm`` go through submitit (:mod:`masking_bench.slurm`).

Every run is executed by :func:`execute_run`, wherever it runs. It trains into the run's record
folder under an exclusive lock and resumes from the last epoch checkpoint, so a SLURM job that is
preempted, timed out or requeued (``scontrol requeue``) simply starts again and continues; the
final numbers equal those of a run that never stopped.
"""

from __future__ import annotations

import fcntl
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import LauncherConfig, RunSpec
from .errors import BenchError, RunBusyError
from .store import RunRecord, warn

LAUNCHERS = ("local", "debug", "slurm")


@dataclass
class SuiteOutcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run, one-line reason)
    busy: list[str] = field(default_factory=list)  # being trained by another process right now
    seconds: float = 0.0
    submitted: list[tuple[str, str]] = field(default_factory=list)  # (run, job id) sent to the cluster now
    queued: list[tuple[str, str]] = field(default_factory=list)  # (run, job id) already queued/running before
    folder: Path | None = None  # submitit logs


# ------------------------------------------------------------------------------ one run


@contextmanager
def status_lock(record: RunRecord) -> Iterator[None]:
    """Serialises read-modify-write of ``status.json`` between a submitter and the job (milliseconds).

    Separate from the training lock (``.lock``, held for the whole run): a submitter must never
    make a starting job believe another process is training its run.
    """
    record.dir.mkdir(parents=True, exist_ok=True)
    with open(record.dir / ".status.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def one_line(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def execute_run(
    spec: RunSpec,
    results: Path,
    show_progress: bool = True,
    stop_after_steps: int | None = None,
    job: dict[str, Any] | None = None,
    accept_stale: bool = False,
) -> dict:
    """Train and evaluate one run into its record folder; returns the summary. Idempotent.

    ``job`` (e.g. ``{"job_id": "12_3", "launcher": "slurm", "restarts": 1}``) is written into every
    status this call sets, so ``status`` can tell which cluster job holds the run.
    """
    from .train import train_run  # torch import deferred: `status`/`report` stay fast

    record = RunRecord(results, spec, accept_stale)
    if record.is_done():
        return record.read_summary()
    extra = dict(job or {})

    def set_status(state: str, **fields: Any) -> None:
        with status_lock(record):
            record.set_status(state, **extra, **fields)

    with record.lock():
        _repair(record)
        if record.is_done():  # finished by another process between the check above and the lock
            return record.read_summary()
        stale = record.stale_reason()
        if stale is not None:  # finished by other code: keep those files aside, train afresh
            moved = record.supersede(f"run {spec.run_hash} ({spec.short()}): {stale}")
            extra["superseded"] = str(moved)
        record.write_config()
        extra["epochs_at_start"] = len(record.read_metrics())  # > 0: this attempt resumes a checkpoint
        set_status("running")
        try:
            summary = train_run(
                spec, record, progress=tqdm if show_progress else None, stop_after_steps=stop_after_steps
            )
        except KeyboardInterrupt:
            set_status("pending", note="interrupted; the next run resumes from the last finished epoch")
            raise
        except BenchError as exc:  # a strategy's own exception keeps its traceback for the plugin's author
            set_status("failed", reason=str(exc), **({"traceback": traceback.format_exc()} if exc.__cause__ else {}))
            raise
        except Exception as exc:
            set_status("failed", reason=one_line(exc), traceback=traceback.format_exc())
            raise
        # SystemExit (submitit leaving after a preemption/timeout checkpoint) passes through: the
        # status RunJob.checkpoint wrote ("pending", requeued) stays and the lock is released.
        record.write_summary(summary)
        set_status("done")
        try:
            record.archive()  # the compact copy in results/records (committable; counts as done elsewhere)
        except OSError as exc:  # e.g. a full disk: the run is finished all the same; the next `run` retries
            warn(
                f"run {spec.run_hash} ({spec.short()}) is finished but its copy in {record.archive_dir} could not "
                f"be written ({exc.strerror or exc}); the next `run` copies it"
            )
        return summary


def run_local(
    specs: list[RunSpec], results: Path, show_progress: bool = True, accept_stale: bool = False
) -> SuiteOutcome:
    """Run every spec in this process, in order; done runs are skipped in milliseconds, stale ones retrained."""
    outcome = SuiteOutcome()
    t0 = time.perf_counter()
    todo = []
    for spec in specs:
        record = RunRecord(results, spec, accept_stale)
        _tidy(record)
        if record.is_done() and not record.is_archived():
            try:
                record.archive()  # finished before archiving existed, or the copy was deleted or failed
            except OSError as exc:
                warn(f"could not copy run {spec.run_hash} to {record.archive_dir} ({exc.strerror or exc})")
        (outcome.skipped if record.is_done() else todo).append(spec)
    outcome.skipped = [s.short() for s in outcome.skipped]
    bar = tqdm(todo, desc="runs", unit="run", disable=not show_progress or not todo)
    for spec in bar:
        bar.set_postfix_str(spec.short())
        try:
            execute_run(spec, results, show_progress, accept_stale=accept_stale)
            outcome.done.append(spec.short())
        except KeyboardInterrupt:
            raise
        except RunBusyError:  # another worker on this suite has it: share the work, do not fail
            outcome.busy.append(spec.short())
        except Exception as exc:  # one failed run never blocks the others; `run` retries it next time
            outcome.failed.append((spec.short(), one_line(exc)))
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _tidy(record: RunRecord) -> None:
    """Repair a run's folder (leftover temporary files, a damaged summary with a valid copy) when no
    other process holds it; a run being trained elsewhere is left alone."""
    if not record.leftovers() and not record.live_summary_damaged():
        return
    try:
        with record.lock():
            _repair(record)
    except RunBusyError:
        pass


def _repair(record: RunRecord) -> None:
    """Under the run's lock: drop leftovers of interrupted writes, restore a damaged summary from its
    valid copy, and say so on stderr."""
    for note in record.repair():
        print(f"note: {note}", file=sys.stderr)


def launch_suite(
    specs: list[RunSpec],
    results: Path,
    cfg: LauncherConfig,
    kind: str,
    suite: str,
    wait: bool = True,
    show_progress: bool = True,
    accept_stale: bool = False,
) -> SuiteOutcome:
    """Run ``specs`` with ``kind`` ('local', 'debug' or 'slurm'); only runs not already done are submitted.

    ``accept_stale``: count runs finished by older code as done (the report marks them); the default
    retrains them.
    """
    if kind not in LAUNCHERS:
        raise BenchError(f"unknown launcher '{kind}': accepted are {', '.join(LAUNCHERS)}")
    if kind == "local":
        return run_local(specs, results, show_progress, accept_stale)
    from .slurm import submit_suite  # submitit is imported only for the launchers that need it

    return submit_suite(specs, results, cfg, kind, suite, wait, show_progress, accept_stale)
