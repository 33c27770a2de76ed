"""Run records on disk: one folder per run hash, atomic writes, an exclusive lock, and a status file.

Finished runs can also be archived as compact records (config, metrics, summary; no checkpoint) in
``<results>/records/<suite>/<hash>/``, which are committed to git: a run found there counts as done,
so a study resumes on another machine by running only what is missing.

``<results>/runs/<suite>/<hash>/`` holds ``config.yaml`` (the resolved run), ``metrics.jsonl`` (one
line per epoch), ``summary.json`` (final metrics, wall time, versions, git commit), ``status.json``
(pending | running | done | failed, with the reason) and ``checkpoint.pt`` (latest epoch).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config import RunSpec, spec_from_dict
from .errors import RunBusyError
from .fingerprint import changed_parts, code_fingerprint, describe_change

STATES = ("pending", "running", "done", "failed")
COMPACT_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class RunRecord:
    """The folder of one run.

    *Finished* means a summary exists; *done* means finished by the current code (its fingerprint
    matches, :mod:`masking_bench.fingerprint`), or finished at all when ``accept_stale``.
    """

    def __init__(self, root: Path, spec: RunSpec, accept_stale: bool = False):
        self.spec = spec
        self.accept_stale = accept_stale
        self.dir = Path(root) / "runs" / spec.suite / spec.run_hash
        self.archive_dir = Path(root) / "records" / spec.suite / spec.run_hash

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
    def is_archived(self) -> bool:
        return (self.archive_dir / "summary.json").is_file()

    def status(self) -> dict[str, Any]:
        if not self.status_path.is_file():
            return {"state": "done", "archived": True} if self.is_archived() else {"state": "pending"}
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {"state": "pending"}

    def is_finished(self) -> bool:
        """A summary exists (live and marked done, or archived), whatever code made it."""
        live = self.status_path.is_file() and self.status().get("state") == "done" and self.summary_path.is_file()
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
        assert state in STATES
        write_json(self.status_path, {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
                                      "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    # ---- content
    def write_config(self) -> None:
        payload = {"run_hash": self.spec.run_hash, **self.spec.model_dump(mode="json")}
        atomic_write_text(self.config_path, yaml.safe_dump(payload, sort_keys=False))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.metrics_path
        if not path.is_file() and not self.summary_path.is_file() and self.is_archived():
            path = self.archive_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one epoch; the file is rewritten atomically so a kill never leaves half a line."""
        rows = [r for r in self.read_metrics() if r.get("epoch") != row.get("epoch")] + [row]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def truncate_metrics(self, epochs_done: int) -> None:
        """Forget epochs a resume will redo (those after the last checkpoint)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) < epochs_done]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        path = self.summary_path if self.summary_path.is_file() else self.archive_dir / "summary.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def stale_parts(self) -> list[str]:
        """The code parts that changed since this finished run was made ([] = its numbers are current)."""
        summary = self.read_summary() or {}
        return changed_parts(summary.get("code"), self.code)

    def supersede(self, reason: str) -> Path | None:
        """Move a stale run's files (live folder and archived record) to ``<results>/superseded/`` so
        the run trains afresh; nothing finished is deleted. Returns where they went (None: nothing)."""
        root = self.dir.parent.parent.parent
        dest = root / "superseded" / self.spec.suite / f"{self.spec.run_hash}-{time.strftime('%Y%m%dT%H%M%S')}"
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

    def archive(self) -> bool:
        """Copy the compact files of a finished live run to ``records/``; False if not finished."""
        live_done = self.status_path.is_file() and self.status().get("state") == "done" and self.summary_path.is_file()
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
                raise RunBusyError(f"run {self.spec.run_hash} ({self.spec.short()}) is being trained by "
                                   "another process; wait for it or stop that process") from None
            yield
        finally:
            fh.close()


def iter_records(root: Path, suite: str | None = None) -> Iterator[tuple[Path, RunSpec]]:
    """Every run folder under ``root/runs`` and ``root/records`` (optionally of one suite) with its spec;
    a run present in both is yielded once (the live folder)."""
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
                seen.add((suite_dir.name, run_dir.name))
                data = yaml.safe_load((run_dir / "config.yaml").read_text())
                data.pop("run_hash", None)
                yield run_dir, spec_from_dict(data)


def archive_suite(root: Path, suite: str | None = None) -> list[str]:
    """Archive every finished live run (of ``suite``) as compact records; returns their hashes."""
    done = []
    for run_dir, spec in iter_records(root, suite):
        if run_dir.parent.parent.name == "runs" and RunRecord(root, spec).archive():
            done.append(spec.run_hash)
    return done
