"""Step 1 of the report: the run records, read through :mod:`masking_bench.store`, as data frames.

:func:`collect` reads every finished run (live under ``<results>/runs``, archived under
``<results>/records``) and returns :class:`Records`: one row per run, the final top-1 per protocol,
and the top-1 curves over pre-training epochs. Every file is read by the store (summary with its
archive fallback, ``metrics.jsonl`` with its damaged-line handling); nothing here opens a file.

A *setting* is (suite, variant, method, model, epochs): runs that differ only in strategy, ratio and
seed. A *cell* is a setting plus strategy and ratio. Both are defined in docs/report_columns.md,
"Conventions".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import RunSpec
from ..errors import BenchError
from ..store import RunRecord, iter_records

BASELINE = "random"  # strategy every Δ, epochs-to-X and RAUC is measured against
FLOOR = "random_init"  # the untrained encoder
PROTOCOL_ORDER = ("probe", "knn", "finetune", "probe_10shot", "knn_10shot", "probe_100shot", "knn_100shot")
SETTING = ["suite", "variant", "method", "model", "epochs"]
CELL = SETTING + ["strategy", "ratio"]

# identity fields that never name a variant: they are the setting's own columns or vary inside it
_NOT_VARIANT = {"kind", "schema", "seed", "ratio", "method", "model.preset", "train.epochs"}
# summary values that only a pre-training run has (blank for the untrained floor)
_PRETRAIN_ONLY = (
    "epoch_seconds",
    "train_img_per_s",
    "plan_share",
    "realised_mask_ratio",
    "final_loss",
    "gflops_per_image",
)
# the key columns shared by the score and curve rows; "_run_index" points into the run rows
_SCORE_KEYS = ["suite", "kind", "strategy", "ratio", "seed", "method", "model", "epochs", "floor_key"]


@dataclass
class Records:
    runs: pd.DataFrame  # one row per finished run: identity, compute, protocol values
    scores: pd.DataFrame  # long: CELL + seed, kind, floor_key, protocol, top1 (final values)
    curves: pd.DataFrame  # long: CELL + seed, floor_key, protocol, epoch, top1 (pretrain runs only)
    protocols: list[str]
    interp: dict[str, bool | None] = field(default_factory=dict)  # strategy label -> interpretation flag
    skipped: int = 0  # run folders whose config no longer hashes to their folder name
    damaged: list[str] = field(default_factory=list)  # record files that could not be read
    stale: dict[str, list[str]] = field(default_factory=dict)  # strategy label -> why its runs are stale
    baselines: dict[str, str] = field(default_factory=dict)  # suite -> baseline strategy label

    def count(self, kind: str | None = None) -> int:
        """The number of finished runs (of one kind: ``pretrain`` or ``random_init``)."""
        return len(self.runs) if kind is None else int((self.runs["kind"] == kind).sum())

    def suites(self) -> list[str]:
        return sorted(self.runs["suite"].unique())


def protocol_sort_key(protocol: str) -> tuple[int, str]:
    """Protocols in the documented order (PROTOCOL_ORDER), any other protocol after them, A–Z."""
    if protocol in PROTOCOL_ORDER:
        return (PROTOCOL_ORDER.index(protocol), protocol)
    return (len(PROTOCOL_ORDER), protocol)


def in_setting(df: pd.DataFrame, setting: tuple) -> pd.DataFrame:
    """The rows of ``df`` that belong to ``setting`` (a tuple of the SETTING columns' values)."""
    mask = np.ones(len(df), dtype=bool)
    for column, value in zip(SETTING, setting, strict=True):
        mask &= (df[column] == value).to_numpy()
    return df[mask]


def setting_label(setting: tuple) -> str:
    """``suite [variant] · method · model · N ep``: names a setting in plot titles and report.md headings."""
    suite, variant, method, model, epochs = setting
    return f"{suite}" + (f" [{variant}]" if variant else "") + f" · {method} · {model} · {epochs:g} ep"


def _number_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _finite_values(rows: list[dict[str, Any]], key: str) -> list[float]:
    values = [_number_or_nan(row.get(key)) for row in rows]
    return [v for v in values if math.isfinite(v)]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for key in sorted(obj):
            out.update(_flatten(obj[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(obj, sort_keys=True)}


def _variant_fields(identity: dict[str, Any]) -> dict[str, str]:
    return {
        key: value
        for key, value in _flatten(identity).items()
        if key not in _NOT_VARIANT and not key.startswith("strategy.")
    }


def _floor_key(identity: dict[str, Any]) -> str:
    """What the untrained encoder of a run shares with it: everything but strategy, ratio, training, seed."""
    shared = {
        key: value
        for key, value in identity.items()
        if key not in ("strategy", "ratio", "train", "kind", "seed", "schema", "precision")
    }
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]


def _variant_labels(fields: list[dict[str, str]], kinds: list[str]) -> list[str]:
    """Per run: the fields that differ between the suite's pre-training runs, as ``key=value, …``."""
    reference = [f for f, kind in zip(fields, kinds, strict=True) if kind == "pretrain"] or fields
    keys = sorted({key for f in reference for key in f})
    differing = [key for key in keys if len({f.get(key) for f in reference}) > 1]
    labels = []
    for run_fields in fields:
        parts = []
        for key in differing:
            if key in run_fields:
                value = json.loads(run_fields[key])
                parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
        labels.append(", ".join(parts))
    return labels


def _baseline_label(runs: pd.DataFrame) -> str:
    """The suite's baseline: the strategy labelled ``random``, else the first label whose strategy is ``random``."""
    pretrain = runs[runs["kind"] == "pretrain"]
    labels = sorted(set(pretrain.loc[pretrain["strategy_name"] == BASELINE, "strategy"]))
    if BASELINE in labels or not labels:
        return BASELINE
    return labels[0]


def _stale_reason(record: RunRecord) -> str | None:
    try:
        return record.stale_reason()
    except BenchError as exc:  # e.g. a plugin file that is gone: its code cannot be checked
        return f"code cannot be checked ({exc})"


def _run_row(spec: RunSpec, identity: dict[str, Any], summary: dict[str, Any], epoch_rows: list[dict]) -> dict:
    """One run's identity and cost columns (the protocol values are added by the caller)."""
    pretrain = spec.kind == "pretrain"
    epoch_seconds = _finite_values(epoch_rows, "seconds")
    epochs = spec.train.epochs if pretrain else 0
    train_seconds = sum(epoch_seconds) if epoch_seconds else _number_or_nan(summary.get("train_seconds"))
    realised_ratios = _finite_values(epoch_rows, "mask_ratio_mean")
    flops = _number_or_nan(summary.get("flops_per_image"))
    last_loss = epoch_rows[-1].get("loss") if epoch_rows else None
    if epoch_seconds:
        seconds_per_epoch = float(np.mean(epoch_seconds))
    else:
        seconds_per_epoch = train_seconds / epochs if epochs else math.nan
    row = {
        "suite": spec.suite,
        "kind": spec.kind,
        "strategy": spec.label,
        "strategy_name": spec.strategy.name,
        "ratio": math.nan if spec.ratio is None else float(spec.ratio),
        "seed": spec.seed,
        "method": spec.method,
        "model": spec.model.preset,
        "epochs": epochs,
        "run_hash": spec.run_hash,
        "floor_key": _floor_key(identity),
        "epoch_seconds": seconds_per_epoch,
        "train_seconds": train_seconds if pretrain else math.nan,
        "train_img_per_s": _number_or_nan(summary.get("train_img_per_s")),
        "wall_seconds": _number_or_nan(summary.get("wall_seconds")),
        "eval_seconds": _number_or_nan(summary.get("eval_seconds")),
        "peak_mem_mb": _number_or_nan(summary.get("peak_mem_mb")),
        "gflops_per_image": flops / 1e9 if math.isfinite(flops) else math.nan,
        "plan_share": _number_or_nan(summary.get("plan_share")),
        "realised_mask_ratio": float(np.mean(realised_ratios)) if realised_ratios else math.nan,
        "params_encoder": _number_or_nan(summary.get("params_encoder")),
        "final_loss": _number_or_nan(summary.get("final_loss", last_loss)),
        "images_seen": sum(_finite_values(epoch_rows, "images")) if pretrain else 0.0,
    }
    if not pretrain:
        for key in _PRETRAIN_ONLY:
            row[key] = math.nan
    return row


def _final_top1(summary: dict[str, Any]) -> dict[str, float]:
    """protocol -> final top-1, from the summary's ``<protocol>_top1`` keys (finite values only)."""
    return {
        key[: -len("_top1")]: _number_or_nan(value)
        for key, value in summary.items()
        if key.endswith("_top1") and math.isfinite(_number_or_nan(value))
    }


def _curve_points(epoch_rows: list[dict], finals: dict[str, float], epochs: int) -> dict[tuple[str, float], float]:
    """(protocol, epochs completed) -> top-1 of every evaluation in ``metrics.jsonl``.

    The summary's final value is the curve's last point (it wins over the last row's evaluation).
    """
    points: dict[tuple[str, float], float] = {}
    for row in epoch_rows:
        evaluation, epoch = row.get("eval"), _number_or_nan(row.get("epoch"))
        if isinstance(evaluation, dict) and math.isfinite(epoch):
            for key, value in evaluation.items():
                if key.endswith("_top1") and math.isfinite(_number_or_nan(value)):
                    points[(key[: -len("_top1")], epoch + 1)] = _number_or_nan(value)
    for protocol, value in finals.items():
        points[(protocol, float(epochs))] = value
    return points


def _note_interpretation(interp: dict[str, bool | None], label: str, summary: dict[str, Any]) -> None:
    """True if any run of the strategy says it is an interpretation; None while no run recorded strategy_info."""
    info = summary.get("strategy_info")
    flag = info.get("interpretation") if isinstance(info, dict) else None
    if flag is not None:
        interp[label] = bool(flag) or bool(interp.get(label))
    else:
        interp.setdefault(label, None)


def collect(results: Path, suite: str | None = None) -> Records:
    """Every finished run under ``results/runs`` and archived under ``results/records`` (optionally one suite)."""
    run_rows: list[dict] = []
    score_rows: list[dict] = []
    curve_rows: list[dict] = []
    variant_fields: list[dict[str, str]] = []
    interp: dict[str, bool | None] = {}
    stale: dict[str, list[str]] = {}
    skipped = 0
    damaged: list[str] = []
    for run_dir, spec in iter_records(results, suite, damaged):
        record = RunRecord(results, spec)
        if Path(run_dir) not in (record.dir, record.archive_dir):
            skipped += 1  # the config no longer hashes to its folder name
            continue
        if not record.is_finished():
            continue
        why = _stale_reason(record)
        if why and why not in stale.setdefault(spec.label, []):
            stale[spec.label].append(why)
        summary = record.read_summary() or {}
        epoch_rows = record.read_metrics()
        identity = spec.identity()
        row = _run_row(spec, identity, summary, epoch_rows)
        finals = _final_top1(summary)
        row.update({f"{protocol}_top1": value for protocol, value in finals.items()})
        run_rows.append(row)
        variant_fields.append(_variant_fields(identity))
        key = {name: row[name] for name in _SCORE_KEYS}
        key["_run_index"] = len(run_rows) - 1
        for protocol, value in finals.items():
            score_rows.append({**key, "protocol": protocol, "top1": value})
        if spec.kind == "pretrain":
            _note_interpretation(interp, spec.label, summary)
            for (protocol, epoch), value in _curve_points(epoch_rows, finals, row["epochs"]).items():
                curve_rows.append({**key, "protocol": protocol, "epoch": epoch, "top1": value})
    if not run_rows:
        where = f"{Path(results) / 'runs'} or {Path(results) / 'records'}"
        raise BenchError(f"no finished runs under {where} (suite {suite if suite is not None else 'any'})")
    runs = pd.DataFrame(run_rows)
    runs["variant"] = ""
    for _suite, index in runs.groupby("suite").groups.items():
        index = list(index)
        runs.loc[index, "variant"] = _variant_labels([variant_fields[i] for i in index], list(runs.loc[index, "kind"]))
    scores = pd.DataFrame(score_rows, columns=_SCORE_KEYS + ["_run_index", "protocol", "top1"])
    curves = pd.DataFrame(curve_rows, columns=_SCORE_KEYS + ["_run_index", "protocol", "epoch", "top1"])
    variants = runs["variant"].to_numpy()
    for frame in (scores, curves):
        frame["variant"] = variants[frame["_run_index"].to_numpy(int)] if len(frame) else ""
    scores, curves = scores.drop(columns="_run_index"), curves.drop(columns="_run_index")
    protocols = sorted(scores["protocol"].unique(), key=protocol_sort_key)
    baselines = {name: _baseline_label(group) for name, group in runs.groupby("suite")}
    return Records(runs, scores, curves, protocols, interp, skipped, damaged, stale, baselines)
