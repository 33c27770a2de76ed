"""Robustness to the masking ratio: ``ratio_robustness.csv``, ``pimr_by_ratio.csv`` and the per-seed
Global PIMR that the PIMR plot shows as dots.

Global PIMR, its reference reading, the AUC over ratio, peak and drops are [INTERP] readings (SBAM
names PIMR without a formula); each column is defined in docs/report_columns.md and each formula in
:mod:`masking_bench.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import metrics
from .columns import COLUMNS, ordered
from .records import SETTING, Records

_KEYS = SETTING + ["strategy", "protocol"]
_NO_STATS = metrics.SeedStats(math.nan, math.nan, 0, math.nan, math.nan)
SEED_COLUMNS = _KEYS + ["seed", "global_pimr"]


def _over_seeds(per_seed: list[float], from_mean_curve: float) -> metrics.SeedStats:
    """The t interval of a per-seed value; with no seed that has every ratio, the value of the mean curve."""
    stats = metrics.t_interval(per_seed)
    return stats if stats.n else metrics.SeedStats(from_mean_curve, math.nan, 0, math.nan, math.nan)


def _robustness_row(ratios: list[float], mean_top1: np.ndarray, complete: pd.DataFrame) -> tuple[dict, list[float]]:
    """The ``ratio_robustness.csv`` values of one strategy and protocol, and each complete seed's Global PIMR.

    ``complete`` holds the seeds (rows) that have a top-1 at every ratio (columns).
    """
    per_seed = [row.to_numpy(float) for _, row in complete.iterrows()]
    global_pimr_per_seed = [metrics.global_pimr(ratios, top1) for top1 in per_seed]
    global_pimr = _over_seeds(global_pimr_per_seed, metrics.global_pimr(ratios, mean_top1))
    reference = _over_seeds(
        [metrics.global_pimr_reference(ratios, top1) for top1 in per_seed],
        metrics.global_pimr_reference(ratios, mean_top1),
    )
    auc = _over_seeds([metrics.ratio_auc(ratios, top1) for top1 in per_seed], metrics.ratio_auc(ratios, mean_top1))
    peak_ratio, peak_top1 = metrics.peak(ratios, mean_top1)
    row = {
        "ratios": " ".join(f"{ratio:g}" for ratio in ratios),
        "complete_seeds": len(complete),
        "global_pimr_mean": global_pimr.mean,
        "global_pimr_std": global_pimr.std,
        "global_pimr_ci_low": global_pimr.ci_low,
        "global_pimr_ci_high": global_pimr.ci_high,
        "global_pimr_ref_mean": reference.mean,
        "global_pimr_ref_ci_low": reference.ci_low,
        "global_pimr_ref_ci_high": reference.ci_high,
        "ratio_auc_mean": auc.mean,
        "ratio_auc_ci_low": auc.ci_low,
        "ratio_auc_ci_high": auc.ci_high,
        "peak_ratio": peak_ratio,
        "peak_top1": peak_top1,
        "worst_drop": metrics.worst_drop(mean_top1),
        "drop_after_peak": metrics.drop_after_peak(ratios, mean_top1),
    }
    return row, global_pimr_per_seed


def _pimr_by_ratio_rows(top1_by_seed: pd.DataFrame, ratios: list[float], mean_top1: np.ndarray) -> list[dict]:
    """The ``pimr_by_ratio.csv`` values at each ratio: the slope from the previous ratio and the gain over
    the lowest ratio, each over the seeds that have both ratios."""
    columns = top1_by_seed.columns
    rows = []
    for k, ratio in enumerate(columns):
        slope = gain = _NO_STATS
        if k >= 1:
            both = top1_by_seed[[columns[k - 1], ratio]].dropna()
            slope = metrics.t_interval(
                [metrics.pimr_slopes([ratios[k - 1], ratios[k]], row.to_numpy(float))[0] for _, row in both.iterrows()]
            )
            both = top1_by_seed[[columns[0], ratio]].dropna()
            gain = metrics.t_interval((both[ratio] - both[columns[0]]).to_numpy(float))
        rows.append(
            {
                "ratio": float(ratio),
                "seeds": int(top1_by_seed[ratio].notna().sum()),
                "top1_mean": float(mean_top1[k]),
                "pimr_slope": slope.mean,
                "pimr_slope_ci_low": slope.ci_low,
                "pimr_slope_ci_high": slope.ci_high,
                "pimr_ref": gain.mean if k else 0.0,
                "pimr_ref_ci_low": gain.ci_low,
                "pimr_ref_ci_high": gain.ci_high,
            }
        )
    return rows


def robustness_tables(records: Records) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratio_robustness, pimr_by_ratio, per-seed Global PIMR) for every (setting, strategy, protocol)."""
    scores = records.scores[records.scores["kind"] == "pretrain"]
    robustness_rows, by_ratio_rows, seed_rows = [], [], []
    for key, group in scores.groupby(_KEYS, sort=True):
        names = dict(zip(_KEYS, key, strict=True))
        top1_by_seed = group.pivot_table(index="seed", columns="ratio", values="top1", aggfunc="mean")
        top1_by_seed = top1_by_seed.sort_index(axis=1)
        ratios = [float(ratio) for ratio in top1_by_seed.columns]
        mean_top1 = top1_by_seed.mean(axis=0).to_numpy(float)
        complete = top1_by_seed.dropna(axis=0, how="any")
        row, global_pimr_per_seed = _robustness_row(ratios, mean_top1, complete)
        robustness_rows.append({**names, **row})
        for seed, value in zip(complete.index, global_pimr_per_seed, strict=True):
            seed_rows.append({**names, "seed": seed, "global_pimr": value})
        by_ratio_rows += [{**names, **row} for row in _pimr_by_ratio_rows(top1_by_seed, ratios, mean_top1)]
    robustness = pd.DataFrame(robustness_rows, columns=COLUMNS["ratio_robustness"])
    by_ratio = pd.DataFrame(by_ratio_rows, columns=COLUMNS["pimr_by_ratio"])
    return (
        ordered(robustness, COLUMNS["ratio_robustness"], records.baselines),
        ordered(by_ratio, COLUMNS["pimr_by_ratio"], records.baselines),
        pd.DataFrame(seed_rows, columns=SEED_COLUMNS),
    )
