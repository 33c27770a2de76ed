"""Run a suite's runs: skip finished ones, resume partial ones, never let one failure stop the others.

This module owns *where* runs execute; today that is this process (``local``). Every run is
executed by :func:`execute_run`, which is also what a remote worker calls.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import RunSpec
from .errors import BenchError
from .store import RunRecord


@dataclass
class SuiteOutcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run, one-line reason)
    seconds: float = 0.0


def execute_run(spec: RunSpec, results: Path, show_progress: bool = True, stop_after_steps: int | None = None) -> dict:
    """Train and evaluate one run into its record folder; returns the summary. Idempotent."""
    from .train import train_run  # torch import deferred: `status`/`report` stay fast

    record = RunRecord(results, spec)
    if record.is_done():
        return record.read_summary()
    with record.lock():
        record.write_config()
        record.set_status("running")
        try:
            summary = train_run(spec, record, progress=tqdm if show_progress else None,
                                stop_after_steps=stop_after_steps)
        except KeyboardInterrupt:
            record.set_status("pending", note="interrupted; the next run resumes from the last finished epoch")
            raise
        except BenchError as exc:
            record.set_status("failed", reason=str(exc))
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            record.set_status("failed", reason=reason, traceback=traceback.format_exc())
            raise
        record.write_summary(summary)
        record.set_status("done")
        return summary


def run_local(specs: list[RunSpec], results: Path, show_progress: bool = True) -> SuiteOutcome:
    """Run every spec in this process, in order; finished runs are skipped in milliseconds."""
    outcome = SuiteOutcome()
    t0 = time.perf_counter()
    todo = []
    for spec in specs:
        (outcome.skipped if RunRecord(results, spec).is_done() else todo).append(spec)
    outcome.skipped = [s.short() for s in outcome.skipped]
    bar = tqdm(todo, desc="runs", unit="run", disable=not show_progress or not todo)
    for spec in bar:
        bar.set_postfix_str(spec.short())
        try:
            execute_run(spec, results, show_progress)
            outcome.done.append(spec.short())
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed run never blocks the others; `run` retries it next time
            reason = str(exc).splitlines()[0] if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
            outcome.failed.append((spec.short(), reason.splitlines()[0] if reason else type(exc).__name__))
    outcome.seconds = time.perf_counter() - t0
    return outcome
