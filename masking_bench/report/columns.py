"""The CSV files' schema and format: their columns, row order and number format.

Each column of :data:`COLUMNS` is documented in docs/report_columns.md (a test keeps the two equal);
the row order and number format below are the ones it states under "Conventions", and they make the
same records give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .records import BASELINE, CELL, FLOOR, SETTING, protocol_sort_key

DELTAS = (0.2, 0.5, 1.0)  # effect sizes (top-1 points) of the noise-floor power table
FLOAT_FORMAT = "%.10g"  # after rounding to DECIMALS: no float noise such as 1.4e-16 in the files
DECIMALS = 6

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
LEGACY_KEYS = ["suite", "variant", "strategy", "method", "model", "ratio", "epochs", "seeds"]

# leaderboards/<name>.csv -> its columns, in order
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
    + [f"seeds_for_delta_{delta:g}" for delta in DELTAS],
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
    "budget_gap": CELL + ["protocol", "epoch", "seeds", "gap_mean", "gap_ci_low", "gap_ci_high", "outside_noise"],
    "budget_ranks": SETTING + ["ratio", "protocol", "epoch", "strategy", "seeds", "top1_mean", "rank"],
    "ranking_stability": SETTING
    + [
        "ratio",
        "protocol",
        "epoch",
        "last_epoch",
        "strategies",
        "seeds",
        "kendall_tau",
        "tau_ci_low",
        "tau_ci_high",
        "best",
        "best_at_last",
        "p_best_stays_best",
    ],
    "verdicts": ["claim", "paper", "statement"]
    + SETTING
    + [
        "strategy",
        "baseline",
        "protocol",
        "headline",
        "measure",
        "images_seen",
        "seeds",
        "delta_mean",
        "delta_ci_low",
        "delta_ci_high",
        "verdict",
    ],
    "compute": CELL
    + ["seeds"]
    + [f"{metric}_{stat}" for metric in COMPUTE_METRICS for stat in ("mean", "std")]
    + ["params_encoder"],
}


def legacy_protocols(protocols: Sequence[str]) -> list[str]:
    """The protocols of ``leaderboard.csv``: probe and knn always, the others when present."""
    return sorted(set(protocols) | {"probe", "knn"}, key=protocol_sort_key)


def legacy_columns(protocols: Sequence[str]) -> list[str]:
    """The columns of ``leaderboard.csv`` for results that have these protocols."""
    metrics = [f"{protocol}_top1" for protocol in legacy_protocols(protocols)] + list(LEGACY_METRICS)
    return LEGACY_KEYS + [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std")]


def _strategy_rank(df: pd.DataFrame, baselines: dict[str, str]) -> pd.Series:
    baseline = df["suite"].map(baselines).fillna(BASELINE) if "suite" in df else BASELINE
    return np.where(df["strategy"] == FLOOR, 0, np.where(df["strategy"] == baseline, 1, 2))


def ordered(df: pd.DataFrame, columns: list[str], baselines: dict[str, str]) -> pd.DataFrame:
    """``columns`` of ``df`` (missing ones empty) in the fixed row order: setting, floor → baseline →
    strategies A–Z, ratio (floor first), protocol."""
    df = df.copy()
    for column in columns:
        if column not in df:
            df[column] = np.nan
    keys = [column for column in SETTING if column in df]
    if "strategy" in df:
        df["_strategy_rank"] = _strategy_rank(df, baselines)
        keys += ["_strategy_rank", "strategy"]
    if "ratio" in df:
        keys.append("ratio")
    if "protocol" in df:
        df["_protocol_rank"] = [protocol_sort_key(protocol) for protocol in df["protocol"]]
        keys.append("_protocol_rank")
    if keys and len(df):
        df = df.sort_values(keys, na_position="first", kind="mergesort")
    return df[columns].reset_index(drop=True).infer_objects()


def to_csv(df: pd.DataFrame) -> str:
    """The CSV text: floats rounded to DECIMALS and written with FLOAT_FORMAT, ``\\n`` line ends."""
    df = df.copy()
    for column in df.columns:
        if pd.api.types.is_float_dtype(df[column]):
            df[column] = df[column].round(DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    return df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
