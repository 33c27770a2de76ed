"""Run records on disk: one folder per run hash, atomic writes, an exclusive lock, and a status file.

Finished runs of a suite that sets ``archive: true`` are also archived as compact records (config,
metrics, summary; no checkpoint) in ``<results>/records/<suite>/<hash>/``, which are committed to git:
a run found there counts as done, so a study resumes on another machine by running only what is
missing. Other suites' runs stay in ``runs/`` (git-ignored); records already archived are read either way.

``<results>/runs/<suite>/<hash>/`` holds ``config.yaml`` (the resolved run), ``metrics.jsonl`` (one
line per epoch), ``summary.json`` (final metrics, wall time, versions, git commit), ``status.json``
(pending | running | done | failed, with the reason) and ``checkpoint.pt`` (latest epoch).

Damaged files (a truncated JSON, a garbage line, an unparsable config) are never fatal and never
count as a finished run: each is named once on stderr, a summary falls back to its valid archived
copy, and a run with no valid summary is trained again. Every write is atomic (temporary file in
the same folder, fsync, rename, fsync of the folder) and stays inside the results folder.
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .config import RunSpec, spec_from_dict
from .errors import BenchError, RunBusyError
from .fingerprint import changed_parts, code_fingerprint, describe_change

STATES = ("pending", "running", "done", "failed")
COMPACT_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
# Fault injection for the crash tests: "<glob of the path>@<n>" kills this process with SIGKILL
# during the n-th atomic write of a matching path (after the data is written, before the rename).
KILL_AT_ENV = "MASKING_BENCH_KILL_AT"
_writes_seen: dict[str, int] = {}
_warned: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, once per process (damaged files, records that could not be copied)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _maybe_kill(path: Path) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.rpartition("@")
    if fnmatch.fnmatch(str(path), pattern):
        _writes_seen[pattern] = _writes_seen.get(pattern, 0) + 1
        if _writes_seen[pattern] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        _maybe_kill(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing or damaged (a damaged file is named once on stderr)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warn(f"{path} is damaged ({type(exc).__name__}); ignoring it")
        return None
    if not isinstance(data, dict):
        warn(f"{path} is damaged (not a JSON object); ignoring it")
        return None
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of ``path`` ([] when missing); damaged lines are skipped and named once."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        warn(f"{path} cannot be read ({exc.strerror}); ignoring it")
        return []
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    if bad:
        warn(f"{path} has {bad} damaged line(s); they are skipped")
    return rows


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``root``; a one-line error otherwise (no write ever leaves results/)."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise BenchError(
            f"refusing to write '{path}': it is outside the results folder '{root}' "
            "(suite names must be plain folder names)"
        )
    return Path(path)


class RunRecord:
    """The folder of one run.

    *Finished* means a valid summary exists; *done* means finished by the current code (its
    fingerprint matches, :mod:`masking_bench.fingerprint`), or finished at all when ``accept_stale``.
    """

    def __init__(self, root: Path, spec: RunSpec, accept_stale: bool = False):
        self.spec = spec
        self.accept_stale = accept_stale
        self.root = Path(root)
        self.dir = inside(root, Path(root) / "runs" / spec.suite / spec.run_hash)
        self.archive_dir = inside(root, Path(root) / "records" / spec.suite / spec.run_hash)
        self._tracker = None  # the suite's experiment loggers (masking_bench/tracking.py), opened on demand
        self._tracker_open = False

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    # ---- status
    def _live_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path)

    def _archived_summary(self) -> dict[str, Any] | None:
        return read_json(self.archive_dir / "summary.json")

    def live_summary_damaged(self) -> bool:
        return self.summary_path.exists() and self._live_summary() is None

    def is_archived(self) -> bool:
        """A valid compact copy exists in ``records/``."""
        return self._archived_summary() is not None

    def status(self) -> dict[str, Any]:
        """The live ``status.json``; when it is missing or damaged, what the summaries say."""
        st = read_json(self.status_path)
        if st is not None and st.get("state") in STATES:
            return st
        if self._live_summary() is not None:  # finished, then the status write was cut short
            return {"state": "done", "note": "status.json damaged; the summary is complete"}
        if self.is_archived():
            return {"state": "done", "archived": True}
        return {"state": "pending"} if st is None else {"state": "pending", "note": "status.json damaged"}

    def is_finished(self) -> bool:
        """A valid summary exists (live and marked done, or archived), whatever code made it."""
        live = self.status().get("state") == "done" and self._live_summary() is not None
        return live or self.is_archived()

    def is_done(self) -> bool:
        """Finished by the current code (or finished at all, with ``accept_stale``): nothing to train."""
        return self.is_finished() and (self.accept_stale or not self.stale_parts())

    @functools.cached_property
    def code(self) -> dict[str, str]:
        """The current code's fingerprint for this run."""
        return code_fingerprint(self.spec)

    def stale_reason(self) -> str | None:
        """Why this finished run's numbers are not the current code's (None: they are, or not finished)."""
        if not self.is_finished():
            return None
        parts = self.stale_parts()
        return describe_change(parts, self.spec) if parts else None

    def set_status(self, state: str, **extra: Any) -> None:
        if state not in STATES:
            raise ValueError(f"run status '{state}' is not one of {', '.join(STATES)}")
        if state != "running":
            self.close_tracker()
        write_json(
            self.status_path,
            {
                "state": state,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **extra,
            },
        )

    def holder_alive(self) -> bool:
        """Whether some process holds this run's training lock right now (a `running` status without
        one was interrupted: killed, out of disk, or its machine went down)."""
        path = self.dir / ".lock"
        if not path.is_file():
            return False
        try:
            with open(path) as fh:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    # ---- content
    def write_config(self) -> None:
        payload = {"run_hash": self.spec.run_hash, **self.spec.model_dump(mode="json")}
        atomic_write_text(self.config_path, yaml.safe_dump(payload, sort_keys=False))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.metrics_path
        if not path.is_file() and self._live_summary() is None and self.is_archived():
            path = self.archive_dir / "metrics.jsonl"
        return read_jsonl(path)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one epoch; the file is rewritten atomically so a kill never leaves half a line. Then the
        row goes to the loggers the suite switched on (``logging``; masking_bench/tracking.py)."""
        rows = [r for r in self.read_metrics() if r.get("epoch") != row.get("epoch")] + [row]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        if not self._tracker_open:  # appended without a training start (truncate_metrics): replay the rest
            self._open_tracker([r for r in rows if r is not row])
        if self._tracker is not None:
            try:
                self._tracker.log(row)
            except Exception as exc:  # a logger never stops training: metrics.jsonl has the row
                warn(f"run {self.spec.run_hash}: experiment logging failed ({type(exc).__name__}: {exc}); it is off")
                self.close_tracker()

    def truncate_metrics(self, epochs_done: int) -> None:
        """Forget epochs a resume will redo (those after the last checkpoint) and any damaged line.
        The trainer calls this when training (re)starts: the suite's loggers open here, so a missing
        logger package fails the run before its first epoch."""
        rows = [r for r in self.read_metrics() if isinstance(r.get("epoch"), int) and r["epoch"] < epochs_done]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        self.close_tracker()
        self._open_tracker(rows)

    def _open_tracker(self, rows: list[dict[str, Any]]) -> None:
        """Start the suite's loggers on this run, primed with ``rows`` (already in metrics.jsonl)."""
        from .tracking import open_tracker

        self._tracker_open = True
        try:
            self._tracker = open_tracker(self, rows)
        except BenchError:  # an enabled logger is not installed: one line, before any training
            raise
        except Exception as exc:  # anything else never stops training: metrics.jsonl is the record
            warn(f"run {self.spec.run_hash}: experiment logging could not start ({type(exc).__name__}: {exc}); off")

    def close_tracker(self) -> None:
        """Flush and close the run's loggers (done, failed or interrupted); the next row reopens them."""
        tracker, self._tracker, self._tracker_open = self._tracker, None, False
        if tracker is not None:
            try:
                tracker.close()
            except Exception as exc:
                warn(f"run {self.spec.run_hash}: closing the experiment loggers failed ({type(exc).__name__}: {exc})")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        """The live summary, else the archived one (each only if valid)."""
        return self._live_summary() or self._archived_summary()

    def stale_parts(self) -> list[str]:
        """The code parts that changed since this finished run was made ([] = its numbers are current)."""
        summary = self.read_summary() or {}
        return changed_parts(summary.get("code"), self.code)

    def leftovers(self) -> list[Path]:
        """Temporary files that interrupted writes left in the run's live and archived folders."""
        return temp_files(self.dir) + temp_files(self.archive_dir)

    def repair(self) -> list[str]:
        """Restore damaged live files of a finished run from its valid archived copy; drop leftover
        temporary files of interrupted writes. Call under the run's lock. Returns what was done."""
        done = [f"removed {tmp}" for folder in (self.dir, self.archive_dir) for tmp in remove_temp_files(folder)]
        if self.live_summary_damaged() and self.is_archived():
            for name in ("summary.json", "metrics.jsonl"):
                atomic_write_bytes(self.dir / name, (self.archive_dir / name).read_bytes())
            self.set_status("done", note="summary restored from results/records")
            done.append(f"restored {self.summary_path} from {self.archive_dir}")
        return done

    def supersede(self, reason: str) -> Path | None:
        """Move a stale run's files (live folder and archived record) to ``<results>/superseded/`` so
        the run trains afresh; nothing finished is deleted. Returns where they went (None: nothing)."""
        dest = inside(
            self.root,
            self.root / "superseded" / self.spec.suite / f"{self.spec.run_hash}-{time.strftime('%Y%m%dT%H%M%S')}",
        )
        moved = False
        for src, sub in ((self.dir, "run"), (self.archive_dir, "record")):
            if not src.is_dir():
                continue
            for item in src.iterdir():
                if item.name.startswith(".") and item.name.endswith("lock"):
                    continue  # locks stay: another process may be waiting on them
                (dest / sub).mkdir(parents=True, exist_ok=True)
                os.replace(item, dest / sub / item.name)
                moved = True
        if not moved:
            return None
        atomic_write_text(dest / "REASON", reason + "\n")
        return dest

    def archive(self, force: bool = False) -> bool:
        """Copy the compact files of a finished live run to ``records/``; False if not finished, or if
        its suite does not ask for it (``archive: true``) and ``force`` is not given."""
        if not (self.spec.archive or force):
            return False
        live_done = self.status().get("state") == "done" and self._live_summary() is not None
        if not live_done or not self.is_done():
            return False
        for name in COMPACT_FILES:
            src = self.dir / name
            if src.is_file():
                atomic_write_bytes(self.archive_dir / name, src.read_bytes())
        return True

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking: two workers never train the same run at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / ".lock", "w")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusyError(
                    f"run {self.spec.run_hash} ({self.spec.short()}) is being trained by "
                    "another process; wait for it or stop that process"
                ) from None
            yield
        finally:
            fh.close()


def iter_records(
    root: Path, suite: str | None = None, damaged: list[str] | None = None
) -> Iterator[tuple[Path, RunSpec]]:
    """Every run folder under ``root/runs`` and ``root/records`` (optionally of one suite) with its spec;
    a run present in both is yielded once (the live folder). A folder whose ``config.yaml`` cannot be
    read as a run is skipped, named once on stderr and appended to ``damaged``."""
    seen: set[tuple[str, str]] = set()
    for area in ("runs", "records"):
        base = Path(root) / area
        if not base.is_dir():
            continue
        for suite_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            if suite is not None and suite_dir.name != suite:
                continue
            for run_dir in sorted(p for p in suite_dir.iterdir() if (p / "config.yaml").is_file()):
                if (suite_dir.name, run_dir.name) in seen:
                    continue
                try:
                    data = yaml.safe_load((run_dir / "config.yaml").read_bytes().decode("utf-8"))
                    data.pop("run_hash", None)
                    spec = spec_from_dict(data)
                except Exception as exc:  # any damage: YAML, encoding, schema, not a mapping
                    note = f"{run_dir / 'config.yaml'} is damaged ({type(exc).__name__}); skipping that run folder"
                    warn(note)
                    if damaged is not None:
                        damaged.append(str(run_dir / "config.yaml"))
                    continue
                seen.add((suite_dir.name, run_dir.name))
                yield run_dir, spec


def archive_suite(root: Path, suite: str | None = None) -> list[str]:
    """Archive every finished live run (of ``suite``) as compact records, whatever the suite's ``archive``
    flag (an explicit request); returns their hashes."""
    done = []
    for run_dir, spec in iter_records(root, suite):
        if run_dir.parent.parent.name == "runs" and RunRecord(root, spec).archive(force=True):
            done.append(spec.run_hash)
    return done


def temp_files(folder: Path) -> list[Path]:
    """The leftover temporary files of interrupted atomic writes directly in ``folder`` ([] if it is absent)."""
    folder = Path(folder)
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the leftover temporary files of interrupted atomic writes directly in ``folder``; returns them."""
    leftovers = temp_files(folder)
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    return leftovers


def remove_file(path: Path) -> None:
    """Delete ``path`` if it exists (an output file that must not outlive the data it was made from)."""
    Path(path).unlink(missing_ok=True)
