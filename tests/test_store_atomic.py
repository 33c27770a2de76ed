"""Run records are written atomically (masking_bench/store.py): every writer of RunRecord goes through
a temporary file in the same folder, fsync, then a rename; it never opens its final path for writing,
and a crash in the middle of a write leaves the previous file as it was."""

from __future__ import annotations

import builtins
import io
import json
import os
import pathlib

import pytest

from masking_bench.config import expand, parse_suite
from masking_bench.store import RunRecord


@pytest.fixture
def record(tiny_suite, results_dir):
    spec = next(s for s in expand(parse_suite({**tiny_suite, "archive": True})) if s.kind == "pretrain")
    return RunRecord(results_dir, spec)


def finished(record: RunRecord) -> RunRecord:
    """Give the run a config, two epochs of metrics, a summary and status done (by the current code)."""
    record.write_config()
    record.append_metrics({"epoch": 0, "loss": 1.0})
    record.append_metrics({"epoch": 1, "loss": 0.5})
    record.write_summary({"probe_top1": 70.0, "code": {"parts": record.code}})
    record.set_status("done")
    return record


WRITERS = {
    "write_config": lambda r: r.write_config(),
    "append_metrics": lambda r: r.append_metrics({"epoch": 2, "loss": 0.25}),
    "truncate_metrics": lambda r: r.truncate_metrics(1),
    "write_summary": lambda r: r.write_summary({"probe_top1": 71.0, "code": {"parts": r.code}}),
    "set_status": lambda r: r.set_status("failed", reason="test"),
    "archive": lambda r: r.archive(),
}


def destinations(record: RunRecord, writer: str) -> list[pathlib.Path]:
    """The final files ``writer`` changes."""
    if writer == "archive":
        return [record.archive_dir / name for name in ("config.yaml", "metrics.jsonl", "summary.json")]
    return [
        {
            "write_config": record.config_path,
            "append_metrics": record.metrics_path,
            "truncate_metrics": record.metrics_path,
            "write_summary": record.summary_path,
            "set_status": record.status_path,
        }[writer]
    ]


def _writes(mode) -> bool:
    return any(c in str(mode) for c in "wax+")


@pytest.fixture
def opened_for_writing(monkeypatch):
    """Every path opened for writing, through any of the usual doors (open, io.open, os.open, Path.*)."""
    seen: list[pathlib.Path] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open
    real_path_open = pathlib.Path.open
    real_write_text, real_write_bytes = pathlib.Path.write_text, pathlib.Path.write_bytes

    def note(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(pathlib.Path(os.fsdecode(path)).resolve())

    def mode_spy(real):
        """``real(file, mode, ...)`` (open, io.open, Path.open), noting ``file`` when ``mode`` writes."""

        def spy(file, mode="r", *args, **kwargs):
            if _writes(mode):
                note(file)
            return real(file, mode, *args, **kwargs)

        return spy

    def write_spy(real):
        """``real(path, ...)`` (Path.write_text, Path.write_bytes), always noting ``path``."""

        def spy(self, *args, **kwargs):
            note(self)
            return real(self, *args, **kwargs)

        return spy

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            note(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", mode_spy(real_open))
    monkeypatch.setattr(io, "open", mode_spy(real_io_open))
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(pathlib.Path, "open", mode_spy(real_path_open))
    monkeypatch.setattr(pathlib.Path, "write_text", write_spy(real_write_text))
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_spy(real_write_bytes))
    return seen


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_never_open_their_final_path(record, opened_for_writing, writer):
    finished(record)
    opened_for_writing.clear()
    WRITERS[writer](record)
    finals = {p.resolve() for p in destinations(record, writer)}
    assert all(p.is_file() for p in finals)  # the writer did write them
    assert opened_for_writing, "no write was seen: the spy is blind"
    direct = [p for p in opened_for_writing if p in finals]
    assert not direct, f"{writer} opened its final file for writing: {direct}"
    for path in opened_for_writing:  # only temporary siblings (same folder: the rename stays atomic)
        assert path.parent in {f.parent for f in finals}, path


def _snapshot(paths):
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


@pytest.mark.parametrize("fail_in", ["replace", "fsync"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_crash_mid_write_keeps_the_previous_file(record, monkeypatch, writer, fail_in):
    finished(record)
    if writer == "archive":
        record.archive()  # a previous archived copy that must survive
        record.write_summary({"probe_top1": 99.0, "code": {"parts": record.code}})  # new content to archive
    finals = destinations(record, writer)
    before = _snapshot(finals)
    assert all(v is not None for v in before.values())

    def crash(*args, **kwargs):
        raise OSError(f"simulated crash in os.{fail_in}")

    monkeypatch.setattr(os, fail_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        WRITERS[writer](record)
    monkeypatch.undo()
    assert _snapshot(finals) == before
    leftovers = [p for f in finals for p in f.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_fsync_happens_on_the_temp_file_before_the_rename(record, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def spy_replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fsdecode(src), os.fsdecode(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    record.write_summary({"probe_top1": 70.0})
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1 and replaces[0][2] == str(record.summary_path)
    tmp = replaces[0][1]
    assert ("fsync", str(pathlib.Path(tmp).resolve())) in events[: events.index(replaces[0])]
    assert json.loads(record.summary_path.read_text()) == {"probe_top1": 70.0}
