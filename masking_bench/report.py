"""Leaderboards from run records alone: one row per (suite, strategy, ratio) with mean and std over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .store import RunRecord, iter_records

FINAL_METRICS = ("probe_top1", "knn_top1", "final_loss", "train_img_per_s", "train_seconds")
LEADERBOARD_COLUMNS = ["suite", "strategy", "method", "ratio", "epochs", "seeds"] + [
    f"{m}_{stat}" for m in FINAL_METRICS for stat in ("mean", "std")]


def collect(results: Path, suite: str | None = None) -> pd.DataFrame:
    """One row per finished run: its identity and its final metrics."""
    rows = []
    for run_dir, spec in iter_records(results, suite):
        record = RunRecord(results, spec)
        if record.dir != run_dir or not record.is_done():
            continue
        s = record.read_summary()
        rows.append({"suite": spec.suite, "run_hash": spec.run_hash, "strategy": spec.label,
                     "method": spec.method, "ratio": spec.ratio, "seed": spec.seed,
                     "epochs": s.get("epochs", 0), **{m: s.get(m) for m in FINAL_METRICS}})
    return pd.DataFrame(rows)


def leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds per (suite, strategy, method, ratio, epochs); deterministic order."""
    if runs.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    keys = ["suite", "strategy", "method", "ratio", "epochs"]
    df = runs.copy()
    df["ratio"] = df["ratio"].astype(float)
    grouped = df.groupby(keys, dropna=False)
    out = grouped.size().rename("seeds").reset_index()
    for m in FINAL_METRICS:
        stats = grouped[m].agg(["mean", "std"]).reset_index()
        stats.columns = keys + [f"{m}_mean", f"{m}_std"]
        out = out.merge(stats, on=keys)
    out = out.sort_values(["suite", "ratio", "strategy"], na_position="first").reset_index(drop=True)
    return out[LEADERBOARD_COLUMNS]


def write_report(results: Path, suite: str | None = None, out_dir: Path | None = None) -> Path:
    """Write ``leaderboard.csv`` (to ``out_dir`` or ``results``); returns its path."""
    runs = collect(results, suite)
    table = leaderboard(runs)
    out_dir = Path(out_dir or results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "leaderboard.csv"
    table.to_csv(path, index=False, float_format="%.4f")
    return path
