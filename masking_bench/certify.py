"""``certify``: prove that a code change left a suite's numbers unchanged, then re-stamp its records.

A record is *stale* when the code that produced it has changed (:mod:`masking_bench.fingerprint`).
Retraining every stale run after a pure refactor would waste the compute; ``certify`` instead:

1. groups the suite's stale records by strategy and by the code parts that changed;
2. retrains ``cells`` runs of each group (default 1) with the current code in a scratch folder;
3. compares them with the records bit-for-bit — every per-epoch loss, learning rate, realised mask
   ratio and evaluation, and every final metric (timings, memory and versions excepted);
4. if every rerun matches, stamps all the group's records with the current code (the summary's
   ``code.certified`` keeps the previous fingerprint, the cells that proved it and the date); if
   any differs, the group stays stale and the first difference is shown: then `run` retrains it.

It also converts records written before the run identity covered the resolved strategy parameters
and the precision (schema 1): the parameters are taken from what the record says the strategy used
(``strategy_info.params``), the precision from its ``train.amp``; such a record is then stale
("recorded before code fingerprints") until certified or retrained.

A rerun proves equality for the cells it reran; for the others it rests on the change being a
refactor, which is why each group (strategy × changed parts) gets its own cells and ``--cells``
can be raised (``all`` reruns everything).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import SCHEMA_VERSION, RunSpec, spec_from_dict
from .errors import BenchError
from .store import RunRecord, atomic_write_bytes, write_json

_TOP_KIND = re.compile(r"^kind:", re.M)
_TOP_PRECISION = re.compile(r"^precision:", re.M)
TIMING_KEYS = {"seconds", "img_per_s", "plan_share"}
SUMMARY_KEYS = {"final_loss", "flops_per_image", "params_encoder", "params_total", "epochs"}


# ------------------------------------------------------------------------------ older schemas


def _legacy_folders(results: Path, suite: str) -> list[Path]:
    """Run folders whose ``config.yaml`` has a top-level ``kind`` but no ``precision`` (schema 1). The
    store writes configs with ``yaml.safe_dump``, so top-level keys start a line: a text search is
    enough, and ``run``/``status`` need not parse every record to warn about old ones."""
    found = []
    for area in ("runs", "records"):
        base = Path(results) / area / suite
        if base.is_dir():
            for run_dir in sorted(p for p in base.iterdir() if (p / "config.yaml").is_file()):
                try:
                    text = (run_dir / "config.yaml").read_bytes().decode("utf-8")
                except (OSError, ValueError):
                    continue  # damaged: the store names it when it reads the folder
                if _TOP_KIND.search(text) and not _TOP_PRECISION.search(text):
                    found.append(run_dir)
    return found


def legacy_count(results: Path, suite: str) -> int:
    """Run folders of ``suite`` written by an older schema (``certify`` converts them)."""
    return len(_legacy_folders(results, suite))


def upgrade_legacy(results: Path, suite: str) -> list[str]:
    """Move schema-1 run folders of ``suite`` to their current names; returns one line per folder."""
    lines = []
    for run_dir in _legacy_folders(results, suite):
        try:
            data = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError:
            lines.append(f"kept {run_dir}: its config.yaml cannot be parsed")
            continue
        if not isinstance(data, dict):
            lines.append(f"kept {run_dir}: its config.yaml is not a mapping")
            continue
        old_hash = data.pop("run_hash", run_dir.name)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if data.get("kind", "pretrain") == "pretrain":
            info = (summary or {}).get("strategy_info") or {}
            if not isinstance(info.get("params"), dict):
                lines.append(f"kept {run_dir}: no record of the parameters its strategy used")
                continue
            data["strategy"]["params"] = info["params"]
            data["precision"] = "bf16" if data.get("train", {}).get("amp") == "bf16" else "fp32"
        data.setdefault("precision", None)
        spec = spec_from_dict(data)
        target = run_dir.parent / spec.run_hash
        if target.exists():
            lines.append(f"kept {run_dir}: {target} exists already")
            continue
        payload = {"run_hash": spec.run_hash, **spec.model_dump(mode="json")}
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(payload, sort_keys=False).encode())
        if summary is not None:
            summary["run_hash"] = spec.run_hash
            summary.setdefault("legacy", {"schema": SCHEMA_VERSION - 1, "run_hash": old_hash})
            write_json(summary_path, summary)
        run_dir.rename(target)
        lines.append(f"{run_dir.parent.parent.name}/{suite}/{old_hash} -> {spec.run_hash} ({spec.short()})")
    return lines


# ------------------------------------------------------------------------------ comparing


def _epoch_numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _summary_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k in SUMMARY_KEYS or "_top1" in k}


def first_difference(record: RunRecord, rerun: RunRecord) -> str | None:
    """Where a rerun's numbers differ from the record's (None: identical, bit for bit)."""
    old_rows, new_rows = _epoch_numbers(record.read_metrics()), _epoch_numbers(rerun.read_metrics())
    if len(old_rows) != len(new_rows):
        return f"{len(new_rows)} epochs vs {len(old_rows)} recorded"
    for old, new in zip(old_rows, new_rows, strict=True):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return f"epoch {old.get('epoch')} {key}: {new.get(key)!r} vs {old.get(key)!r} recorded"
    old_sum, new_sum = _summary_numbers(record.read_summary() or {}), _summary_numbers(rerun.read_summary() or {})
    for key in sorted(set(old_sum) | set(new_sum)):
        if old_sum.get(key) != new_sum.get(key):
            return f"{key}: {new_sum.get(key)!r} vs {old_sum.get(key)!r} recorded"
    return None


# ------------------------------------------------------------------------------ certifying


@dataclass
class Group:
    label: str
    changed: tuple[str, ...]
    specs: list[RunSpec] = field(default_factory=list)
    proof: list[tuple[str, str | None]] = field(default_factory=list)  # (run, first difference or None)

    @property
    def certified(self) -> bool:
        return bool(self.proof) and all(diff is None for _, diff in self.proof)


def stale_groups(specs: list[RunSpec], results: Path) -> list[Group]:
    groups: dict[tuple[str, tuple[str, ...]], Group] = {}
    for spec in specs:
        record = RunRecord(results, spec)
        if not record.is_finished():
            continue
        parts = record.stale_parts()
        if parts:
            key = (spec.label, tuple(parts))
            groups.setdefault(key, Group(spec.label, tuple(parts))).specs.append(spec)
    return list(groups.values())


def stamp(record: RunRecord, proof: list[str]) -> None:
    """Give a finished record the current code's fingerprint, keeping the old one in ``certified``."""
    for path in (record.summary_path, record.archive_dir / "summary.json"):
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        previous = summary.get("code")
        summary["code"] = {
            "parts": record.code,
            "certified": {"by": proof, "at": time.strftime("%Y-%m-%d"), "previous": (previous or {}).get("parts")},
        }
        write_json(path, summary)


def certify(
    specs: list[RunSpec],
    results: Path,
    cells: int | None = 1,
    log=print,
    show_progress: bool = True,
    labels: list[str] | None = None,
) -> list[Group]:
    """Rerun ``cells`` runs per stale group (None = all) and re-stamp the groups whose reruns match.
    ``labels``: only the groups of these strategy labels (e.g. to share the work between processes)."""
    from .launch import execute_run

    groups = [g for g in stale_groups(specs, results) if not labels or g.label in labels]
    scratch = Path(tempfile.mkdtemp(prefix=".certify-", dir=Path(results)))
    try:
        for group in groups:
            chosen = group.specs if cells is None else group.specs[:cells]
            for spec in chosen:
                log(f"rerunning {spec.short()} ({spec.run_hash}) to check: {', '.join(group.changed)}")
                execute_run(spec, scratch, show_progress=show_progress)
                diff = first_difference(RunRecord(results, spec), RunRecord(scratch, spec))
                group.proof.append((spec.run_hash, diff))
                if diff is not None:
                    break  # one difference is enough: this group must be retrained
            if group.certified:
                for spec in group.specs:
                    stamp(RunRecord(results, spec), [h for h, _ in group.proof])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return groups


def format_outcome(groups: list[Group]) -> str:
    if not groups:
        return "no stale records: every finished run matches the current code"
    lines = []
    for g in groups:
        what = f"{g.label} ({len(g.specs)} record(s); changed: {', '.join(g.changed)})"
        if g.certified:
            lines.append(f"certified {what}: {len(g.proof)} rerun(s) bit-identical; records re-stamped")
        elif g.proof:
            run, diff = g.proof[-1]
            lines.append(f"NOT certified {what}: rerun {run} differs ({diff}); `run` retrains these")
        else:
            lines.append(f"not checked {what}")
    return "\n".join(lines)


def parse_cells(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BenchError(f"--cells '{text}': accepted are a positive number of reruns per group, or 'all'")
    return value
