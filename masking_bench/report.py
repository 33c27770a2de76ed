"""The report, from run records alone: leaderboards (CSV), plots (PNG) and ``report.md``.

``write_report(results, suite, out_dir)`` reads every finished run under ``<results>/runs`` and every
archived compact record under ``<results>/records``, and writes into ``out_dir`` (default ``results``)::

    leaderboard.csv                    one row per (setting, strategy, ratio): mean/std per protocol
    leaderboards/accuracy.csv          per cell and protocol: seeds, mean, std, 95 % t-CI, rank, paired Δ vs random
    leaderboards/noise_floor.csv       per suite and protocol: pooled seed std, seeds needed for a given Δ
    leaderboards/ratio_robustness.csv  per strategy and protocol: Global PIMR (both readings), AUC, peak, drops
    leaderboards/pimr_by_ratio.csv     per strategy, protocol and ratio: the PIMR readings at each ratio
    leaderboards/convergence.csv       per cell and protocol: epochs to 95/99/100 % of random's final top-1, RAUC
    leaderboards/compute.csv           per cell: time per epoch, img/s, peak memory, GFLOPs per image, plan share
    plots/accuracy_vs_ratio.png, plots/convergence.png, plots/pimr.png, plots/pareto.png
    report.md                          the tables, the plots and a generated summary

Every column is documented in ``docs/report_columns.md``; the formulas are in :mod:`masking_bench.metrics`.
The same records always give byte-identical files (fixed row order, float format, figure size, dpi,
no timestamps or software tags in the PNGs).

A *setting* is (suite, variant, method, model, epochs): runs that differ only in strategy, ratio and
seed. ``variant`` names the grid axes (other identity fields) that differ between a suite's runs, e.g.
``train.base_lr=0.001``; it is empty for a suite without such axes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics as M
from .errors import BenchError
from .store import RunRecord, atomic_write_bytes, atomic_write_text, iter_records

BASELINE = "random"  # strategy every Δ, epochs-to-X and RAUC is measured against
FLOOR = "random_init"  # the untrained encoder
PROTOCOL_ORDER = ("probe", "knn", "finetune", "probe_10shot", "knn_10shot", "probe_100shot", "knn_100shot")
SETTING = ["suite", "variant", "method", "model", "epochs"]
CELL = SETTING + ["strategy", "ratio"]
DELTAS = (0.2, 0.5, 1.0)  # effect sizes (top-1 points) of the noise-floor power table
FLOAT_FORMAT = "%.10g"  # after rounding to DECIMALS: no float noise such as 1.4e-16 in the files
DECIMALS = 6
DPI = 100

COMPUTE_METRICS = (
    "epoch_seconds",
    "train_seconds",
    "train_img_per_s",
    "wall_seconds",
    "eval_seconds",
    "peak_mem_mb",
    "gflops_per_image",
    "plan_share",
    "realised_mask_ratio",
)
LEGACY_METRICS = ("final_loss", "train_img_per_s", "train_seconds")

COLUMNS: dict[str, list[str]] = {
    "accuracy": CELL[:6]
    + [
        "interpretation",
        "ratio",
        "protocol",
        "seeds",
        "top1_mean",
        "top1_std",
        "top1_ci_low",
        "top1_ci_high",
        "rank",
        "delta_pairs",
        "delta_mean",
        "delta_std",
        "delta_ci_low",
        "delta_ci_high",
        "outside_noise",
    ],
    "noise_floor": [
        "suite",
        "protocol",
        "cells",
        "seed_std",
        "seed_std_dof",
        "diff_std",
        "diff_std_dof",
        "diff_std_source",
        "typical_pairs",
        "min_detectable_delta",
    ]
    + [f"seeds_for_delta_{d:g}" for d in DELTAS],
    "ratio_robustness": SETTING
    + [
        "strategy",
        "protocol",
        "ratios",
        "complete_seeds",
        "global_pimr_mean",
        "global_pimr_std",
        "global_pimr_ci_low",
        "global_pimr_ci_high",
        "global_pimr_ref_mean",
        "global_pimr_ref_ci_low",
        "global_pimr_ref_ci_high",
        "ratio_auc_mean",
        "ratio_auc_ci_low",
        "ratio_auc_ci_high",
        "peak_ratio",
        "peak_top1",
        "worst_drop",
        "drop_after_peak",
    ],
    "pimr_by_ratio": SETTING
    + [
        "strategy",
        "protocol",
        "ratio",
        "seeds",
        "top1_mean",
        "pimr_slope",
        "pimr_slope_ci_low",
        "pimr_slope_ci_high",
        "pimr_ref",
        "pimr_ref_ci_low",
        "pimr_ref_ci_high",
    ],
    "convergence": CELL
    + [
        "protocol",
        "seeds",
        "eval_epochs",
        "final_top1",
        "baseline_final_top1",
        "epochs_to_95",
        "epochs_to_99",
        "epochs_to_100",
        "reduction_95",
        "reduction_99",
        "reduction_100",
        "rauc",
        "rauc_norm",
        "note",
    ],
    "compute": CELL + ["seeds"] + [f"{m}_{s}" for m in COMPUTE_METRICS for s in ("mean", "std")] + ["params_encoder"],
}
LEGACY_KEYS = ["suite", "variant", "strategy", "method", "model", "ratio", "epochs", "seeds"]
PLOTS = ("accuracy_vs_ratio", "convergence", "pimr", "pareto")


# ------------------------------------------------------------------------------------ reading


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


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k in sorted(obj):
            out.update(_flatten(obj[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(obj, sort_keys=True)}


_NOT_VARIANT = {"kind", "schema", "seed", "ratio", "method", "model.preset", "train.epochs"}


def _variant_fields(identity: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in _flatten(identity).items() if k not in _NOT_VARIANT and not k.startswith("strategy.")}


def _floor_key(identity: dict[str, Any]) -> str:
    """What the untrained encoder of a run shares with it: everything but strategy, ratio, training, seed."""
    ident = {
        k: v
        for k, v in identity.items()
        if k not in ("strategy", "ratio", "train", "kind", "seed", "schema", "precision")
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _variant_labels(fields: list[dict[str, str]], kinds: list[str]) -> list[str]:
    """Per run: the fields that differ between the suite's pre-training runs, as ``key=value, …``."""
    ref = [f for f, k in zip(fields, kinds, strict=True) if k == "pretrain"] or fields
    keys = sorted({k for f in ref for k in f})
    differing = [k for k in keys if len({f.get(k) for f in ref}) > 1]
    labels = []
    for f in fields:
        parts = []
        for k in differing:
            if k in f:
                v = json.loads(f[k])
                parts.append(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
        labels.append(", ".join(parts))
    return labels


def _baseline_label(runs: pd.DataFrame) -> str:
    """The suite's baseline: the strategy labelled ``random``, else the first label whose strategy is ``random``."""
    pre = runs[runs["kind"] == "pretrain"]
    labels = sorted(set(pre.loc[pre["strategy_name"] == BASELINE, "strategy"]))
    if BASELINE in labels or not labels:
        return BASELINE
    return labels[0]


def collect(results: Path, suite: str | None = None) -> Records:
    """Every finished run under ``results/runs`` and archived under ``results/records`` (optionally one suite)."""
    rows, score_rows, curve_rows, fields = [], [], [], []
    interp: dict[str, bool | None] = {}
    stale: dict[str, list[str]] = {}
    skipped = 0
    damaged: list[str] = []
    for run_dir, spec in iter_records(results, suite, damaged):
        record = RunRecord(results, spec)
        if Path(run_dir) not in (record.dir, getattr(record, "archive_dir", None)):
            skipped += 1  # the config no longer hashes to its folder name
            continue
        if not record.is_finished():
            continue
        try:
            why = record.stale_reason()
        except BenchError as exc:  # e.g. a plugin file that is gone: its code cannot be checked
            why = f"code cannot be checked ({exc})"
        if why:
            stale.setdefault(spec.label, [])
            if why not in stale[spec.label]:
                stale[spec.label].append(why)
        s = record.read_summary() or {}
        epoch_rows = record.read_metrics()
        pretrain = spec.kind == "pretrain"
        identity = spec.identity()
        secs = [_num(r.get("seconds")) for r in epoch_rows]
        secs = [x for x in secs if math.isfinite(x)]
        epochs = spec.train.epochs if pretrain else 0
        train_seconds = sum(secs) if secs else _num(s.get("train_seconds"))
        ratios = [_num(r.get("mask_ratio_mean")) for r in epoch_rows]
        ratios = [x for x in ratios if math.isfinite(x)]
        flops = _num(s.get("flops_per_image"))
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
            "epoch_seconds": float(np.mean(secs)) if secs else (train_seconds / epochs if epochs else math.nan),
            "train_seconds": train_seconds if pretrain else math.nan,
            "train_img_per_s": _num(s.get("train_img_per_s")),
            "wall_seconds": _num(s.get("wall_seconds")),
            "eval_seconds": _num(s.get("eval_seconds")),
            "peak_mem_mb": _num(s.get("peak_mem_mb")),
            "gflops_per_image": flops / 1e9 if math.isfinite(flops) else math.nan,
            "plan_share": _num(s.get("plan_share")),
            "realised_mask_ratio": float(np.mean(ratios)) if ratios else math.nan,
            "params_encoder": _num(s.get("params_encoder")),
            "final_loss": _num(s.get("final_loss", epoch_rows[-1].get("loss") if epoch_rows else None)),
        }
        if not pretrain:
            for k in (
                "epoch_seconds",
                "train_img_per_s",
                "plan_share",
                "realised_mask_ratio",
                "final_loss",
                "gflops_per_image",
            ):
                row[k] = math.nan
        finals = {k[:-5]: _num(v) for k, v in s.items() if k.endswith("_top1") and math.isfinite(_num(v))}
        row.update({f"{p}_top1": v for p, v in finals.items()})
        rows.append(row)
        fields.append(_variant_fields(identity))
        key = {
            k: row[k] for k in ("suite", "kind", "strategy", "ratio", "seed", "method", "model", "epochs", "floor_key")
        }
        key["_i"] = len(rows) - 1
        for p, v in finals.items():
            score_rows.append({**key, "protocol": p, "top1": v})
        if pretrain:
            info = s.get("strategy_info")
            flag = info.get("interpretation") if isinstance(info, dict) else None
            if flag is not None:  # True if any run says so, None if no run recorded strategy_info
                interp[spec.label] = bool(flag) or bool(interp.get(spec.label))
            else:
                interp.setdefault(spec.label, None)
            points: dict[tuple[str, float], float] = {}
            for r in epoch_rows:
                ev, ep = r.get("eval"), _num(r.get("epoch"))
                if isinstance(ev, dict) and math.isfinite(ep):
                    for k, v in ev.items():
                        if k.endswith("_top1") and math.isfinite(_num(v)):
                            points[(k[:-5], ep + 1)] = _num(v)
            for p, v in finals.items():  # the summary's final value is the curve's last point
                points[(p, float(epochs))] = v
            for (p, ep), v in points.items():
                curve_rows.append({**key, "protocol": p, "epoch": ep, "top1": v})
    if not rows:
        where = f"{Path(results) / 'runs'} or {Path(results) / 'records'}"
        raise BenchError(f"no finished runs under {where} (suite {suite if suite is not None else 'any'})")
    runs = pd.DataFrame(rows)
    runs["variant"] = ""
    for _suite, idx in runs.groupby("suite").groups.items():
        idx = list(idx)
        labels = _variant_labels([fields[i] for i in idx], list(runs.loc[idx, "kind"]))
        runs.loc[idx, "variant"] = labels
    scores = pd.DataFrame(
        score_rows,
        columns=[
            "suite",
            "kind",
            "strategy",
            "ratio",
            "seed",
            "method",
            "model",
            "epochs",
            "floor_key",
            "_i",
            "protocol",
            "top1",
        ],
    )
    curves = pd.DataFrame(curve_rows, columns=list(scores.columns[:-1]) + ["epoch", "top1"])
    variants = runs["variant"].to_numpy()
    scores["variant"] = variants[scores["_i"].to_numpy(int)] if len(scores) else ""
    curves["variant"] = variants[curves["_i"].to_numpy(int)] if len(curves) else ""
    scores, curves = scores.drop(columns="_i"), curves.drop(columns="_i")
    present = sorted(scores["protocol"].unique(), key=_protocol_key)
    baselines = {s: _baseline_label(g) for s, g in runs.groupby("suite")}
    return Records(runs, scores, curves, present, interp, skipped, damaged, stale, baselines)


# ------------------------------------------------------------------------------------ ordering


def _protocol_key(p: str) -> tuple[int, str]:
    return (PROTOCOL_ORDER.index(p), p) if p in PROTOCOL_ORDER else (len(PROTOCOL_ORDER), p)


def _strategy_rank(df: pd.DataFrame, baselines: dict[str, str]) -> pd.Series:
    base = df["suite"].map(baselines).fillna(BASELINE) if "suite" in df else BASELINE
    return np.where(df["strategy"] == FLOOR, 0, np.where(df["strategy"] == base, 1, 2))


def _ordered(df: pd.DataFrame, columns: list[str], baselines: dict[str, str]) -> pd.DataFrame:
    """Fixed row order: setting, floor → baseline → strategies A–Z, ratio (floor first), protocol."""
    df = df.copy()
    for c in columns:
        if c not in df:
            df[c] = np.nan
    keys = []
    for c in ("suite", "variant", "method", "model", "epochs"):
        if c in df:
            keys.append(c)
    if "strategy" in df:
        df["_srank"] = _strategy_rank(df, baselines)
        keys += ["_srank", "strategy"]
    if "ratio" in df:
        keys.append("ratio")
    if "protocol" in df:
        df["_prank"] = [_protocol_key(p) for p in df["protocol"]]
        keys.append("_prank")
    if keys and len(df):
        df = df.sort_values(keys, na_position="first", kind="mergesort")
    return df[columns].reset_index(drop=True).infer_objects()


def _to_csv(df: pd.DataFrame) -> str:
    df = df.copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].round(DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    return df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


# ------------------------------------------------------------------------------------ tables


def accuracy_table(rec: Records) -> pd.DataFrame:
    """Per (setting, strategy, ratio, protocol): seed statistics, rank among strategies, paired Δ vs the baseline."""
    sc = rec.scores
    agg = M.aggregate_seeds(sc, CELL + ["protocol"], "top1").rename(
        columns={
            "n": "seeds",
            "mean": "top1_mean",
            "std": "top1_std",
            "ci_low": "top1_ci_low",
            "ci_high": "top1_ci_high",
        }
    )
    pre = agg["strategy"] != FLOOR
    agg["rank"] = pd.Series(pd.NA, index=agg.index, dtype="Int64")
    if pre.any():
        groups = agg[pre].groupby(SETTING + ["ratio", "protocol"], dropna=False)
        ranks = groups["top1_mean"].transform(M.rank_descending)
        agg.loc[pre, "rank"] = ranks.astype("Int64")
    deltas = []
    for suite, g in sc[sc["kind"] == "pretrain"].groupby("suite"):
        d = M.paired_deltas(g, SETTING + ["ratio", "protocol"], rec.baselines[suite])
        if len(d):  # an empty frame has object columns and would turn every merged column into object
            deltas.append(d)
    d = pd.concat(deltas, ignore_index=True) if deltas else pd.DataFrame()
    if len(d):
        d = d.rename(columns={"delta_n": "delta_pairs"})
        agg = agg.merge(d, on=SETTING + ["ratio", "protocol", "strategy"], how="left")
    for c in ("delta_pairs", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high", "outside_noise"):
        if c not in agg:
            agg[c] = np.nan
    agg["delta_pairs"] = agg["delta_pairs"].astype("Int64")
    agg["outside_noise"] = agg["outside_noise"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v)).astype(bool)
    agg["interpretation"] = agg["strategy"].map(lambda s: bool(rec.interp.get(s)) if s != FLOOR else False)
    return _ordered(agg, COLUMNS["accuracy"], rec.baselines)


def noise_floor_table(rec: Records) -> pd.DataFrame:
    """Per (suite, protocol): pooled seed std, pooled std of paired differences, seeds needed per Δ."""
    sc = rec.scores[rec.scores["kind"] == "pretrain"]
    rows = []
    for (suite, protocol), g in sc.groupby(["suite", "protocol"], sort=True):
        cells = [c["top1"].to_numpy() for _, c in g.groupby(CELL, dropna=False)]
        sd, dof = M.pooled_std(cells)
        base = g[g["strategy"] == rec.baselines[suite]]
        merged = g[g["strategy"] != rec.baselines[suite]].merge(
            base[SETTING + ["ratio", "seed", "top1"]].rename(columns={"top1": "_b"}), on=SETTING + ["ratio", "seed"]
        )
        merged["_d"] = merged["top1"] - merged["_b"]
        diffs = [c["_d"].to_numpy() for _, c in merged.groupby(CELL, dropna=False)]
        dsd, ddof = M.pooled_std(diffs)
        source = "paired"
        if not ddof and math.isfinite(sd):
            dsd, source = math.sqrt(2) * sd, "sqrt2_seed_std"
        elif not ddof:
            source = ""
        sizes = [len(x) for x in diffs] if ddof else [len(x) for x in cells]
        typical = float(np.median(sizes)) if sizes else math.nan
        row = {
            "suite": suite,
            "protocol": protocol,
            "cells": sum(len(x) >= 2 for x in cells),
            "seed_std": sd,
            "seed_std_dof": dof,
            "diff_std": dsd,
            "diff_std_dof": ddof,
            "diff_std_source": source,
            "typical_pairs": typical,
            "min_detectable_delta": M.min_detectable_delta(dsd, typical),
        }
        for delta in DELTAS:
            row[f"seeds_for_delta_{delta:g}"] = M.seeds_needed(delta, dsd)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS["noise_floor"])
    for delta in DELTAS:
        df[f"seeds_for_delta_{delta:g}"] = df[f"seeds_for_delta_{delta:g}"].astype("Int64")
    return _ordered(df, COLUMNS["noise_floor"], rec.baselines)


def robustness_tables(rec: Records) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratio_robustness, pimr_by_ratio, per-seed Global PIMR) for every (setting, strategy, protocol)."""
    sc = rec.scores[rec.scores["kind"] == "pretrain"]
    curve_rows, step_rows, seed_rows = [], [], []
    for key, g in sc.groupby(SETTING + ["strategy", "protocol"], sort=True):
        wide = g.pivot_table(index="seed", columns="ratio", values="top1", aggfunc="mean").sort_index(axis=1)
        ratios = [float(r) for r in wide.columns]
        means = wide.mean(axis=0).to_numpy(float)
        complete = wide.dropna(axis=0, how="any")
        per_seed = {name: [] for name in ("gp", "gpr", "auc")}
        for seed, acc in complete.iterrows():
            a = acc.to_numpy(float)
            per_seed["gp"].append(M.global_pimr(ratios, a))
            per_seed["gpr"].append(M.global_pimr_reference(ratios, a))
            per_seed["auc"].append(M.ratio_auc(ratios, a))
            seed_rows.append(
                {
                    **dict(zip(SETTING + ["strategy", "protocol"], key, strict=True)),
                    "seed": seed,
                    "global_pimr": per_seed["gp"][-1],
                }
            )

        def summarise(name: str, fallback: float, per_seed=per_seed) -> M.SeedStats:
            st = M.t_interval(per_seed[name])
            return st if st.n else M.SeedStats(fallback, math.nan, 0, math.nan, math.nan)

        gp = summarise("gp", M.global_pimr(ratios, means))
        gpr = summarise("gpr", M.global_pimr_reference(ratios, means))
        auc = summarise("auc", M.ratio_auc(ratios, means))
        r_peak, a_peak = M.peak(ratios, means)
        curve_rows.append(
            {
                **dict(zip(SETTING + ["strategy", "protocol"], key, strict=True)),
                "ratios": " ".join(f"{r:g}" for r in ratios),
                "complete_seeds": len(complete),
                "global_pimr_mean": gp.mean,
                "global_pimr_std": gp.std,
                "global_pimr_ci_low": gp.ci_low,
                "global_pimr_ci_high": gp.ci_high,
                "global_pimr_ref_mean": gpr.mean,
                "global_pimr_ref_ci_low": gpr.ci_low,
                "global_pimr_ref_ci_high": gpr.ci_high,
                "ratio_auc_mean": auc.mean,
                "ratio_auc_ci_low": auc.ci_low,
                "ratio_auc_ci_high": auc.ci_high,
                "peak_ratio": r_peak,
                "peak_top1": a_peak,
                "worst_drop": M.worst_drop(means),
                "drop_after_peak": M.drop_after_peak(ratios, means),
            }
        )
        r0 = wide.columns[0] if len(ratios) else None
        for k, r in enumerate(wide.columns):
            slope = ref = M.SeedStats(math.nan, math.nan, 0, math.nan, math.nan)
            if k >= 1:
                both = wide[[wide.columns[k - 1], r]].dropna()
                slope = M.t_interval(
                    [M.pimr_slopes([ratios[k - 1], ratios[k]], row.to_numpy(float))[0] for _, row in both.iterrows()]
                )
                both = wide[[r0, r]].dropna()
                ref = M.t_interval((both[r] - both[r0]).to_numpy(float))
            step_rows.append(
                {
                    **dict(zip(SETTING + ["strategy", "protocol"], key, strict=True)),
                    "ratio": float(r),
                    "seeds": int(wide[r].notna().sum()),
                    "top1_mean": float(means[k]),
                    "pimr_slope": slope.mean,
                    "pimr_slope_ci_low": slope.ci_low,
                    "pimr_slope_ci_high": slope.ci_high,
                    "pimr_ref": ref.mean if k else 0.0,
                    "pimr_ref_ci_low": ref.ci_low,
                    "pimr_ref_ci_high": ref.ci_high,
                }
            )
    rob = _ordered(
        pd.DataFrame(curve_rows, columns=COLUMNS["ratio_robustness"]), COLUMNS["ratio_robustness"], rec.baselines
    )
    steps = _ordered(pd.DataFrame(step_rows, columns=COLUMNS["pimr_by_ratio"]), COLUMNS["pimr_by_ratio"], rec.baselines)
    seeds = pd.DataFrame(seed_rows, columns=SETTING + ["strategy", "protocol", "seed", "global_pimr"])
    return rob, steps, seeds


def seed_curves(rec: Records) -> pd.DataFrame:
    """Per-seed curves (CELL, seed, protocol, epoch, top1) with the untrained encoder of the same seed at epoch 0."""
    cur = rec.curves
    floor = rec.scores[rec.scores["kind"] == "random_init"]
    if len(cur) and len(floor):
        f = (
            floor[["floor_key", "seed", "protocol", "top1"]]
            .groupby(["floor_key", "seed", "protocol"], as_index=False)
            .mean()
        )
        starts = cur.drop_duplicates(CELL + ["seed", "protocol"]).drop(columns=["epoch", "top1"])
        starts = starts.merge(f, on=["floor_key", "seed", "protocol"])
        starts["epoch"] = 0.0
        cur = pd.concat([cur[~(cur["epoch"] == 0)], starts[cur.columns]], ignore_index=True)
    return cur


def convergence_table(rec: Records, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, strategy, ratio, protocol): epochs to 95/99/100 % of the baseline's final top-1, RAUC."""
    rows = []
    if curves.empty:
        return pd.DataFrame(columns=COLUMNS["convergence"])
    groups = dict(iter(curves.groupby(CELL + ["protocol"], sort=True)))
    mean_curves = {key: M.mean_curve(g) for key, g in groups.items()}
    finals = rec.scores[rec.scores["kind"] == "pretrain"].groupby(CELL + ["protocol"])["top1"].mean()
    for key, mc in mean_curves.items():
        cell = dict(zip(CELL + ["protocol"], key, strict=True))
        base_label = rec.baselines[cell["suite"]]
        bkey = tuple(cell[k] if k != "strategy" else base_label for k in CELL + ["protocol"])
        notes = []
        row = {
            **cell,
            "seeds": int(groups[key]["seed"].nunique()),
            "eval_epochs": " ".join(f"{e:g}" for e in mc["epoch"]),
            "final_top1": finals.get(key, math.nan),
        }
        b_final = finals.get(bkey, math.nan)
        bc = mean_curves.get(bkey)
        row["baseline_final_top1"] = b_final
        e_full = float(cell["epochs"])
        for pct in (95, 99, 100):
            e = M.epochs_to_reach(mc["epoch"], mc["top1"], pct / 100 * b_final) if math.isfinite(b_final) else math.nan
            row[f"epochs_to_{pct}"] = e
            row[f"reduction_{pct}"] = M.epoch_reduction(e, e_full)
            if math.isfinite(b_final) and not math.isfinite(e):
                notes.append(f"{pct}% not reached")
        if bc is None or not len(bc):
            notes.insert(0, f"no {base_label} baseline")
            row["rauc"] = row["rauc_norm"] = math.nan
        else:
            row["rauc"] = M.rauc(mc["epoch"], mc["top1"], bc["epoch"], bc["top1"])
            row["rauc_norm"] = M.rauc_norm(mc["epoch"], mc["top1"], bc["epoch"], bc["top1"])
            if len(mc) < 2:
                notes.append("single evaluation epoch")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return _ordered(pd.DataFrame(rows, columns=COLUMNS["convergence"]), COLUMNS["convergence"], rec.baselines)


def compute_table(rec: Records) -> pd.DataFrame:
    """Per (setting, strategy, ratio): mean and sample std over seeds of the cost columns."""
    df = M.aggregate_columns(rec.runs, CELL, COMPUTE_METRICS).rename(columns={"n": "seeds"})
    params = rec.runs.groupby(CELL, dropna=False)["params_encoder"].max().reset_index()
    df = df.merge(params, on=CELL, how="left")
    df["params_encoder"] = df["params_encoder"].round().astype("Int64")
    return _ordered(df, COLUMNS["compute"], rec.baselines)


def legacy_leaderboard(rec: Records) -> pd.DataFrame:
    """``leaderboard.csv``: mean/std per protocol (probe and knn always, others when present) + cost."""
    protos = sorted(set(rec.protocols) | {"probe", "knn"}, key=_protocol_key)
    cols = [f"{p}_top1" for p in protos] + list(LEGACY_METRICS)
    df = M.aggregate_columns(rec.runs, CELL, cols).rename(columns={"n": "seeds"})
    return _ordered(df, legacy_columns(rec.protocols), rec.baselines)


def legacy_columns(protocols: Sequence[str]) -> list[str]:
    protos = sorted(set(protocols) | {"probe", "knn"}, key=_protocol_key)
    return LEGACY_KEYS + [
        f"{m}_{s}" for m in [f"{p}_top1" for p in protos] + list(LEGACY_METRICS) for s in ("mean", "std")
    ]


# ------------------------------------------------------------------------------------ plots


def _style() -> dict[str, Any]:
    import seaborn as sns

    return {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("paper"),
        "font.family": "DejaVu Sans",
        "svg.hashsalt": "masking_bench",
        "path.simplify": True,
    }


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    colors = sns.color_palette("colorblind", max(len(labels), 1))
    return {label: colors[i % len(colors)] for i, label in enumerate(labels)}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _setting_label(key: tuple, many: bool) -> str:
    suite, variant, method, model, epochs = key
    text = f"{suite}" + (f" [{variant}]" if variant else "") + f" · {method} · {model} · {epochs:g} ep"
    return text if many else ""


def _clip(values) -> np.ndarray:
    """CI ends for drawing only: top-1 cannot leave [0, 100] (the CSVs keep the unclipped t interval)."""
    return np.clip(np.asarray(values, dtype=float), 0.0, 100.0)


def _title(head: str, setting: tuple, many: bool) -> str:
    return f"{head}\n{_setting_label(setting, True)}" if many else head


def _grid(nrows: int, ncols: int, w: float = 3.6, h: float = 2.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows + 0.6), dpi=DPI, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _legend(fig, handles_labels: dict[str, Any], first: Sequence[str]) -> None:
    """One legend below the panels: strategies in their fixed order, then the other artists."""
    keys = [k for k in first if k in handles_labels] + [k for k in handles_labels if k not in first]
    if keys:
        fig.legend(
            [handles_labels[k] for k in keys], keys, loc="outside lower center", ncols=min(len(keys), 6), frameon=False
        )


class _Plots:
    def __init__(
        self,
        rec: Records,
        acc: pd.DataFrame,
        rob_seeds: pd.DataFrame,
        rob: pd.DataFrame,
        curves: pd.DataFrame,
        comp: pd.DataFrame,
    ):
        self.rec, self.acc, self.rob, self.rob_seeds, self.curves, self.comp = rec, acc, rob, rob_seeds, curves, comp
        pre = acc[acc["strategy"] != FLOOR]
        self.settings = sorted({tuple(r) for r in pre[SETTING].itertuples(index=False)})
        self.many = len(self.settings) > 1
        strategies = sorted(set(pre["strategy"]), key=lambda s: (s not in rec.baselines.values(), s))
        self.colors = _palette(strategies)
        self.strategies = strategies
        runs = rec.runs[rec.runs["kind"] == "pretrain"]
        self.floor_keys = {k: g["floor_key"].iloc[0] for k, g in runs.groupby(SETTING)}
        fl = rec.scores[rec.scores["kind"] == "random_init"]
        self.floor = fl.groupby(["floor_key", "protocol"])["top1"].mean().to_dict()

    def _sel(self, df: pd.DataFrame, setting: tuple) -> pd.DataFrame:
        mask = np.ones(len(df), dtype=bool)
        for c, v in zip(SETTING, setting, strict=True):
            mask &= (df[c] == v).to_numpy()
        return df[mask]

    def accuracy_vs_ratio(self, path: Path) -> str | None:
        import matplotlib

        protos = self.rec.protocols
        pre = self.acc[self.acc["strategy"] != FLOOR]
        if pre.empty or not protos:
            return "no pre-training runs with an evaluation"
        with matplotlib.rc_context(_style()):
            fig, axes = _grid(len(self.settings), len(protos))
            handles: dict[str, Any] = {}
            for i, setting in enumerate(self.settings):
                sub = self._sel(pre, setting)
                for j, p in enumerate(protos):
                    ax = axes[i][j]
                    d = sub[sub["protocol"] == p]
                    for s in self.strategies:
                        c = d[d["strategy"] == s].sort_values("ratio")
                        if c.empty:
                            continue
                        (line,) = ax.plot(c["ratio"], c["top1_mean"], marker="o", ms=3.5, lw=1.5, color=self.colors[s])
                        handles.setdefault(s, line)
                        lo, hi = _clip(c["top1_ci_low"]), _clip(c["top1_ci_high"])
                        ok = np.isfinite(lo) & np.isfinite(hi)
                        if ok.sum() >= 2:
                            ax.fill_between(
                                c["ratio"].to_numpy(float)[ok], lo[ok], hi[ok], color=self.colors[s], alpha=0.18, lw=0
                            )
                        elif ok.any():
                            ax.errorbar(
                                c["ratio"].to_numpy(float)[ok],
                                c["top1_mean"].to_numpy(float)[ok],
                                yerr=np.abs(
                                    np.vstack(
                                        [
                                            c["top1_mean"].to_numpy(float)[ok] - lo[ok],
                                            hi[ok] - c["top1_mean"].to_numpy(float)[ok],
                                        ]
                                    )
                                ),
                                fmt="none",
                                ecolor=self.colors[s],
                                capsize=2,
                            )
                    fv = self.floor.get((self.floor_keys.get(setting), p))
                    if fv is not None and d.shape[0]:
                        hl = ax.axhline(fv, color="0.35", ls="--", lw=1)
                        handles.setdefault("random init (untrained encoder)", hl)
                    if d.empty:
                        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                    ax.set_title(_title(p, setting, self.many), fontsize=9)
                    ax.set_xlabel("masking ratio (fraction of patches hidden)")
                    ax.set_ylabel(f"{p} top-1 accuracy (%)")
            fig.suptitle("Top-1 vs masking ratio: mean over seeds, band = 95 % t-CI (clipped to 0-100)", fontsize=10)
            _legend(fig, handles, self.strategies)
            _save(fig, path)
        return None

    def convergence(self, path: Path) -> str | None:
        import matplotlib
        from matplotlib.ticker import MaxNLocator

        cur = self.curves
        if cur.empty:
            return "no evaluation curves in metrics.jsonl"
        protos = [p for p in self.rec.protocols if (cur["protocol"] == p).any()]
        rows = sorted({(tuple(r[:5]), r[5]) for r in cur[SETTING + ["ratio"]].itertuples(index=False)})
        with matplotlib.rc_context(_style()):
            fig, axes = _grid(len(rows), len(protos), h=2.6)
            handles: dict[str, Any] = {}
            for i, (setting, ratio) in enumerate(rows):
                sub = self._sel(cur, setting)
                sub = sub[sub["ratio"] == ratio]
                for j, p in enumerate(protos):
                    ax = axes[i][j]
                    d = sub[sub["protocol"] == p]
                    for s in self.strategies:
                        c = d[d["strategy"] == s]
                        if c.empty:
                            continue
                        mc = M.mean_curve(c)
                        ci = [M.t_interval(c.loc[c["epoch"] == e, "top1"]) for e in mc["epoch"]]
                        (line,) = ax.plot(mc["epoch"], mc["top1"], marker="o", ms=3, lw=1.4, color=self.colors[s])
                        handles.setdefault(s, line)
                        lo, hi = _clip([x.ci_low for x in ci]), _clip([x.ci_high for x in ci])
                        ok = np.isfinite(lo) & np.isfinite(hi)
                        if ok.sum() >= 2:
                            ax.fill_between(
                                mc["epoch"].to_numpy(float)[ok], lo[ok], hi[ok], color=self.colors[s], alpha=0.15, lw=0
                            )
                    if d.empty:
                        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                    title = f"{p}, ratio {ratio:g}"
                    ax.set_title(_title(title, setting, self.many), fontsize=9)
                    ax.set_xlabel("pre-training epochs completed (0 = untrained)")
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    ax.set_ylabel(f"{p} top-1 accuracy (%)")
            fig.suptitle("Top-1 during pre-training: mean over seeds, band = 95 % t-CI (clipped to 0-100)", fontsize=10)
            _legend(fig, handles, self.strategies)
            _save(fig, path)
        return None

    def pimr(self, path: Path) -> str | None:
        import matplotlib

        rob = self.rob[np.isfinite(self.rob["global_pimr_mean"].to_numpy(float))]
        if rob.empty:
            return "Global PIMR needs at least two masking ratios per strategy"
        protos = [p for p in self.rec.protocols if (rob["protocol"] == p).any()]
        settings = [s for s in self.settings if len(self._sel(rob, s))]
        with matplotlib.rc_context(_style()):
            fig, axes = _grid(len(settings), len(protos), w=max(3.6, 0.7 * len(self.strategies) + 1.8), h=3.2)
            for i, setting in enumerate(settings):
                sub = self._sel(rob, setting)
                pts = self._sel(self.rob_seeds, setting)
                for j, p in enumerate(protos):
                    ax = axes[i][j]
                    d = sub[sub["protocol"] == p]
                    names = [s for s in self.strategies if (d["strategy"] == s).any()]
                    for x, s in enumerate(names):
                        r = d[d["strategy"] == s].iloc[0]
                        ax.bar(x, r["global_pimr_mean"], color=self.colors[s], width=0.7, alpha=0.85)
                        if math.isfinite(r["global_pimr_ci_low"]):
                            ax.errorbar(
                                x,
                                r["global_pimr_mean"],
                                yerr=[
                                    [r["global_pimr_mean"] - r["global_pimr_ci_low"]],
                                    [r["global_pimr_ci_high"] - r["global_pimr_mean"]],
                                ],
                                fmt="none",
                                ecolor="0.15",
                                capsize=3,
                                lw=1,
                            )
                        sp = pts[(pts["strategy"] == s) & (pts["protocol"] == p)].sort_values("seed")
                        if len(sp):
                            off = np.linspace(-0.18, 0.18, len(sp)) if len(sp) > 1 else np.zeros(1)
                            ax.scatter(x + off, sp["global_pimr"], s=10, color="0.1", zorder=3)
                    ax.axhline(0, color="0.3", lw=0.8)
                    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
                    ax.set_title(_title(p, setting, self.many), fontsize=9)
                    ax.set_xlabel("strategy")
                    ax.set_ylabel("Global PIMR (top-1 points / +10 % mask)")
            fig.suptitle(
                "Global PIMR, slope reading [INTERP]\nbar = mean, whisker = 95 % t-CI, dots = seeds", fontsize=10
            )
            _save(fig, path)
        return None

    def pareto(self, path: Path) -> str | None:
        import matplotlib

        pre = self.acc[self.acc["strategy"] != FLOOR]
        if pre.empty:
            return "no pre-training runs with an evaluation"
        comp = self.comp[self.comp["strategy"] != FLOOR]
        d = pre.merge(comp[CELL + ["gflops_per_image_mean", "train_seconds_mean"]], on=CELL, how="left")
        use_flops = bool(len(d)) and np.isfinite(d["gflops_per_image_mean"].to_numpy(float)).all()
        xcol = "gflops_per_image_mean" if use_flops else "train_seconds_mean"
        d = d[np.isfinite(d[xcol].to_numpy(float))]
        if d.empty:
            return "no compute measurements (flops_per_image or train_seconds) in the summaries"
        xlabel = (
            "training GFLOPs per image (forward + backward)"
            if use_flops
            else "pre-training time per run (s, this machine)"
        )
        protos = [p for p in self.rec.protocols if (d["protocol"] == p).any()]
        settings = [s for s in self.settings if len(self._sel(d, s))]
        with matplotlib.rc_context(_style()):
            fig, axes = _grid(len(settings), len(protos), w=4.0, h=3.0)
            handles: dict[str, Any] = {}
            for i, setting in enumerate(settings):
                sub = self._sel(d, setting)
                for j, p in enumerate(protos):
                    ax = axes[i][j]
                    c = sub[sub["protocol"] == p].sort_values([xcol, "top1_mean"])
                    for s in self.strategies:
                        cs = c[c["strategy"] == s]
                        if cs.empty:
                            continue
                        h = ax.scatter(cs[xcol], cs["top1_mean"], s=22, color=self.colors[s], zorder=3)
                        handles.setdefault(s, h)
                        for _, r in cs.iterrows():
                            ax.annotate(
                                f"{r['ratio']:g}",
                                (r[xcol], r["top1_mean"]),
                                xytext=(3, 3),
                                textcoords="offset points",
                                fontsize=6,
                                color="0.25",
                            )
                    front = c[M.pareto_front(c[xcol], c["top1_mean"])].sort_values(xcol)
                    if len(front):
                        (fl,) = ax.plot(
                            front[xcol],
                            front["top1_mean"],
                            color="0.3",
                            lw=1,
                            ls=":",
                            marker="o",
                            ms=8,
                            mfc="none",
                            drawstyle="steps-post",
                            zorder=2,
                        )
                        handles.setdefault("Pareto front", fl)
                    ax.set_title(_title(p, setting, self.many), fontsize=9)
                    ax.set_xlabel(xlabel)
                    ax.set_ylabel(f"{p} top-1 accuracy (%)")
            fig.suptitle("Accuracy vs compute (mean over seeds; labels = masking ratio)", fontsize=10)
            _legend(fig, handles, self.strategies)
            _save(fig, path)
        return None


# ------------------------------------------------------------------------------------ markdown


def _f(v: Any, digits: int = 2, signed: bool = False) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ci(lo: Any, hi: Any, digits: int = 2) -> str:
    a, b = _f(lo, digits), _f(hi, digits)
    return "" if a == "–" or b == "–" else f" [{a}, {b}]"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_(no rows)_\n"

    def esc(cell: Any) -> str:
        return str(cell).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _ratio(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:g}"


def _markdown(
    rec: Records,
    acc: pd.DataFrame,
    noise: pd.DataFrame,
    rob: pd.DataFrame,
    conv: pd.DataFrame,
    comp: pd.DataFrame,
    plot_notes: dict[str, str | None],
) -> str:
    pre = acc[acc["strategy"] != FLOOR]
    settings = sorted({tuple(r) for r in pre[SETTING].itertuples(index=False)})
    many = len(settings) > 1
    n_runs = len(rec.runs)
    suites = sorted(rec.runs["suite"].unique())
    lines = [
        "# masking_bench report",
        "",
        f"Generated from {n_runs} finished run(s) in suite(s) {', '.join(suites)} "
        f"({int((rec.runs['kind'] == 'pretrain').sum())} pre-training, "
        f"{int((rec.runs['kind'] == 'random_init').sum())} untrained-encoder floor). "
        "Top-1 in %, mean over seeds with a 95 % Student-t interval; Δ = paired by seed against the "
        f"`{BASELINE}` strategy of the same suite, method, ratio and epochs. "
        "Column definitions: docs/report_columns.md.",
        "",
    ]
    if rec.skipped:
        lines += [
            f"Skipped {rec.skipped} run folder(s) whose config.yaml no longer hashes to the folder name "
            "(edited by hand or written by an older schema).",
            "",
        ]
    if rec.damaged:
        lines += [
            f"Skipped {len(rec.damaged)} damaged record(s): " + ", ".join(f"`{p}`" for p in rec.damaged) + ".",
            "",
        ]
    if rec.stale:
        lines += [
            "**Stale rows** ([STALE]): these strategies' runs were made by code that has changed since "
            "(`python -m masking_bench status` names the runs; `run` retrains them, `certify` re-stamps them "
            "when a rerun proves the numbers unchanged): "
            + "; ".join(f"`{s}`: {', '.join(w)}" for s, w in sorted(rec.stale.items()))
            + ".",
            "",
        ]
    # ---- summary
    lines += ["## Summary", ""]
    for setting in settings:
        sub = pre[(pre[SETTING] == pd.Series(dict(zip(SETTING, setting, strict=True)))).all(axis=1)]
        if many:
            lines += [f"**{_setting_label(setting, True)}**", ""]
        for p in sorted(sub["protocol"].unique(), key=_protocol_key):
            d = sub[sub["protocol"] == p].dropna(subset=["top1_mean"])
            if d.empty:
                continue
            best = d.sort_values(["top1_mean", "strategy", "ratio"], ascending=[False, True, True]).iloc[0]
            delta = ""
            if math.isfinite(best["delta_mean"]):
                delta = (
                    f"; Δ vs {BASELINE} {_f(best['delta_mean'], signed=True)}"
                    f"{_ci(best['delta_ci_low'], best['delta_ci_high'])}"
                    + (" (outside seed noise)" if best["outside_noise"] else " (within seed noise)")
                )
            lines.append(
                f"- best on **{p}**: `{best['strategy']}` at ratio {_ratio(best['ratio'])}: "
                f"{_f(best['top1_mean'])}{_ci(best['top1_ci_low'], best['top1_ci_high'])} "
                f"(n={int(best['seeds'])}){delta}"
            )
        lines.append("")
    tested = pre[pre["delta_pairs"].fillna(0) >= 2]
    out = tested[tested["outside_noise"]]
    if len(tested) == 0:
        lines += [f"No Δ vs `{BASELINE}` could be tested (needs the `{BASELINE}` strategy and ≥ 2 shared seeds).", ""]
    elif out.empty:
        lines += [
            f"No Δ vs `{BASELINE}` is outside the seed noise: all {len(tested)} paired 95 % intervals include 0.",
            "",
        ]
    else:
        lines += [
            f"Δ vs `{BASELINE}` outside the seed noise ({len(out)} of {len(tested)} tested cells; paired "
            "95 % t-interval excludes 0):",
            "",
        ]
        for _, r in out.iterrows():
            where = f" [{_setting_label(tuple(r[SETTING]), True)}]" if many else ""
            lines.append(
                f"- `{r['strategy']}` ratio {_ratio(r['ratio'])}, {r['protocol']}: "
                f"{_f(r['delta_mean'], signed=True)}{_ci(r['delta_ci_low'], r['delta_ci_high'])} "
                f"points over {int(r['delta_pairs'])} seeds{where}"
            )
        lines.append("")
    interp = sorted(s for s, v in rec.interp.items() if v)
    unknown = sorted(s for s, v in rec.interp.items() if v is None)
    if interp:
        lines.append(
            "Strategies that are interpretations ([INTERP]: the source does not fully specify them, "
            f"the benchmark chose a reading — see their `source`): {', '.join(f'`{s}`' for s in interp)}."
        )
    else:
        lines.append("No strategy in these results is an interpretation ([INTERP]).")
    if unknown:
        lines.append(f"(No strategy_info recorded for {', '.join(f'`{s}`' for s in unknown)}.)")
    lines += [
        "PIMR, Global PIMR, RAUC and epochs-to-convergence are [INTERP] formulas "
        "(named by SBAM / MTO, not defined there); see docs/report_columns.md.",
        "",
    ]
    # ---- noise floor
    lines += [
        "## Noise floor",
        "",
        "Pooled seed-to-seed std of one run, std of paired differences vs the baseline, and the seeds "
        "needed to detect a Δ at 95 % confidence with 80 % power (normal approximation).",
        "",
    ]
    rows = []
    for _, r in noise.iterrows():
        diff = _f(r["diff_std"]) + (" (√2·seed std)" if r["diff_std_source"] == "sqrt2_seed_std" else "")
        needed = [r[f"seeds_for_delta_{d:g}"] for d in DELTAS]
        rows.append(
            [r["suite"], r["protocol"], _f(r["seed_std"]), diff, _f(r["min_detectable_delta"])]
            + ["–" if pd.isna(n) else str(int(n)) for n in needed]
        )
    lines.append(
        _md_table(
            ["suite", "protocol", "seed std", "paired-diff std", "detectable Δ now"]
            + [f"seeds for Δ={d:g}" for d in DELTAS],
            rows,
        )
    )
    # ---- plots
    lines += ["## Plots", ""]
    titles = {
        "accuracy_vs_ratio": "Top-1 vs masking ratio",
        "convergence": "Convergence",
        "pimr": "Global PIMR",
        "pareto": "Accuracy vs compute",
    }
    for name in PLOTS:
        note = plot_notes.get(name)
        lines += [
            f"### {titles[name]}",
            "",
            f"_plot skipped: {note}_" if note else f"![{titles[name]}](plots/{name}.png)",
            "",
        ]
    # ---- tables
    protos = rec.protocols
    for setting in settings:

        def sel(df: pd.DataFrame, setting=setting) -> pd.DataFrame:
            return df[(df[SETTING] == pd.Series(dict(zip(SETTING, setting, strict=True)))).all(axis=1)]

        head = f" — {_setting_label(setting, True)}" if many else ""
        lines += [
            f"## Accuracy{head}",
            "",
            "mean [95 % CI] over seeds; Δ = paired difference to the baseline, * = outside seed noise.",
            "",
        ]
        a = sel(acc[acc["strategy"] != FLOOR])
        rows = []
        pre_runs = rec.runs[
            (rec.runs[SETTING] == pd.Series(dict(zip(SETTING, setting, strict=True)))).all(axis=1)
            & (rec.runs["kind"] == "pretrain")
        ]
        fsc = rec.scores[(rec.scores["kind"] == FLOOR) & rec.scores["floor_key"].isin(set(pre_runs["floor_key"]))]
        if len(fsc):
            cells = []
            for p in protos:
                st = M.t_interval(fsc.loc[fsc["protocol"] == p, "top1"])
                cells += [_f(st.mean) + _ci(st.ci_low, st.ci_high) if st.n else "–", ""]
            rows.append([FLOOR, "–", str(fsc["seed"].nunique())] + cells)
        for (s, r), g in a.groupby(["strategy", "ratio"], sort=False):
            cells = []
            for p in protos:
                x = g[g["protocol"] == p]
                if x.empty:
                    cells += ["–", "–"]
                    continue
                x = x.iloc[0]
                cells.append(_f(x["top1_mean"]) + _ci(x["top1_ci_low"], x["top1_ci_high"]))
                cells.append(
                    ""
                    if not math.isfinite(x["delta_mean"])
                    else _f(x["delta_mean"], signed=True) + ("*" if x["outside_noise"] else "")
                )
            mark = (" [INTERP]" if rec.interp.get(s) else "") + (" [STALE]" if s in rec.stale else "")
            rows.append([s + mark, _ratio(r), str(int(g["seeds"].max()))] + cells)
        lines.append(_md_table(["strategy", "ratio", "seeds"] + [h for p in protos for h in (p, f"Δ {p}")], rows))
        rb = sel(rob)
        lines += [
            f"## Ratio robustness{head}",
            "",
            "Global PIMR in top-1 points per +10 % masking (slope reading; ref = mean of A(r) − A(r_min)); "
            "AUC = mean top-1 over the ratio range.",
            "",
        ]
        lines.append(
            _md_table(
                [
                    "strategy",
                    "protocol",
                    "ratios",
                    "Global PIMR",
                    "Global PIMR (ref)",
                    "AUC over ratio",
                    "peak ratio",
                    "worst drop",
                    "drop after peak",
                ],
                [
                    [
                        r["strategy"],
                        r["protocol"],
                        r["ratios"],
                        _f(r["global_pimr_mean"], signed=True) + _ci(r["global_pimr_ci_low"], r["global_pimr_ci_high"]),
                        _f(r["global_pimr_ref_mean"], signed=True),
                        _f(r["ratio_auc_mean"]),
                        _ratio(r["peak_ratio"]),
                        _f(r["worst_drop"]),
                        _f(r["drop_after_peak"]),
                    ]
                    for _, r in rb.iterrows()
                ],
            )
        )
        cv = sel(conv)
        lines += [
            f"## Convergence{head}",
            "",
            f"Epochs to reach 95 / 99 / 100 % of `{BASELINE}`'s final top-1 at the same ratio (linear "
            "interpolation between evaluations; – = not reached), reduction = 1 − E/E_full, RAUC vs "
            f"`{BASELINE}`.",
            "",
        ]
        lines.append(
            _md_table(
                [
                    "strategy",
                    "ratio",
                    "protocol",
                    "eval epochs",
                    "final",
                    "E95",
                    "E99",
                    "E100",
                    "reduction (100 %)",
                    "RAUC",
                    "RAUC_norm",
                ],
                [
                    [
                        r["strategy"],
                        _ratio(r["ratio"]),
                        r["protocol"],
                        r["eval_epochs"],
                        _f(r["final_top1"]),
                        _f(r["epochs_to_95"], 1),
                        _f(r["epochs_to_99"], 1),
                        _f(r["epochs_to_100"], 1),
                        _f(r["reduction_100"]),
                        _f(r["rauc"], 3),
                        _f(r["rauc_norm"], 3),
                    ]
                    for _, r in cv.iterrows()
                ],
            )
        )
        cp = sel(comp[comp["strategy"] != FLOOR])
        lines += [f"## Compute{head}", "", "Means over seeds.", ""]
        lines.append(
            _md_table(
                [
                    "strategy",
                    "ratio",
                    "s / epoch",
                    "img / s",
                    "peak MB",
                    "GFLOPs / img",
                    "plan share",
                    "realised ratio",
                ],
                [
                    [
                        r["strategy"],
                        _ratio(r["ratio"]),
                        _f(r["epoch_seconds_mean"]),
                        _f(r["train_img_per_s_mean"], 0),
                        _f(r["peak_mem_mb_mean"], 0),
                        _f(r["gflops_per_image_mean"], 4),
                        _f(r["plan_share_mean"], 3),
                        _f(r["realised_mask_ratio_mean"], 3),
                    ]
                    for _, r in cp.iterrows()
                ],
            )
        )
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------ entry point


def write_report(results: Path, suite: str | None = None, out_dir: Path | None = None) -> Path:
    """Write the leaderboards, plots and ``report.md`` into ``out_dir`` (default ``results``); returns report.md.

    Raises :class:`BenchError` when there is no finished run to report on. Leftovers of an
    interrupted earlier report (temporary files) are removed first.
    """
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else results
    for folder in (out, out / "leaderboards", out / "plots"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    rec = collect(results, suite)
    acc = accuracy_table(rec)
    noise = noise_floor_table(rec)
    rob, steps, rob_seeds = robustness_tables(rec)
    curves = seed_curves(rec)
    conv = convergence_table(rec, curves)
    comp = compute_table(rec)
    tables = {
        "accuracy": acc,
        "noise_floor": noise,
        "ratio_robustness": rob,
        "pimr_by_ratio": steps,
        "convergence": conv,
        "compute": comp,
    }
    for name, df in tables.items():
        atomic_write_text(out / "leaderboards" / f"{name}.csv", _to_csv(df))
    atomic_write_text(out / "leaderboard.csv", _to_csv(legacy_leaderboard(rec)))
    plots = _Plots(rec, acc, rob_seeds, rob, curves, comp)
    notes: dict[str, str | None] = {}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        path = out / "plots" / f"{name}.png"
        notes[name] = getattr(plots, name)(path)
        if notes[name] and path.exists():  # never leave a stale plot from an earlier report
            path.unlink()
    report = out / "report.md"
    atomic_write_text(report, _markdown(rec, acc, noise, rob, conv, comp, notes))
    return report
