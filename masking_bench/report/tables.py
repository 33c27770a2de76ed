"""Step 2 of the report: every statistic it shows, as tables computed from :class:`Records`.

The CSV tables (columns in :mod:`.columns`, documented in docs/report_columns.md) and the in-memory
tables that only the plots and ``report.md`` use (:class:`Tables`). The formulas are in
:mod:`masking_bench.metrics`; the plots and ``report.md`` compute no statistic of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import metrics
from .budgets import gap_table, ranking_tables, verdict_table
from .columns import COLUMNS, COMPUTE_METRICS, DELTAS, LEGACY_METRICS, legacy_columns, legacy_protocols, ordered
from .records import CELL, FLOOR, SETTING, Records, in_setting, protocol_sort_key
from .robustness import robustness_tables

FLOOR_COLUMNS = SETTING + ["protocol", "seeds", "top1_mean", "top1_ci_low", "top1_ci_high", "floor_seeds"]


def _pretraining(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "pretrain"]


def accuracy_table(records: Records) -> pd.DataFrame:
    """Per (setting, strategy, ratio, protocol): seed statistics, rank among strategies, paired Δ vs the baseline."""
    scores = records.scores
    table = metrics.aggregate_seeds(scores, CELL + ["protocol"], "top1").rename(
        columns={
            "n": "seeds",
            "mean": "top1_mean",
            "std": "top1_std",
            "ci_low": "top1_ci_low",
            "ci_high": "top1_ci_high",
        }
    )
    pretrained = table["strategy"] != FLOOR
    table["rank"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
    if pretrained.any():
        competitors = table[pretrained].groupby(SETTING + ["ratio", "protocol"], dropna=False)
        table.loc[pretrained, "rank"] = competitors["top1_mean"].transform(metrics.rank_descending).astype("Int64")
    deltas = []
    for suite, suite_scores in _pretraining(scores).groupby("suite"):
        suite_deltas = metrics.paired_deltas(suite_scores, SETTING + ["ratio", "protocol"], records.baselines[suite])
        if len(suite_deltas):  # an empty frame has object columns and would turn every merged column into object
            deltas.append(suite_deltas)
    if deltas:
        all_deltas = pd.concat(deltas, ignore_index=True).rename(columns={"delta_n": "delta_pairs"})
        table = table.merge(all_deltas, on=SETTING + ["ratio", "protocol", "strategy"], how="left")
    for column in ("delta_pairs", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high", "outside_noise"):
        if column not in table:
            table[column] = np.nan
    table["delta_pairs"] = table["delta_pairs"].astype("Int64")
    outside = table["outside_noise"].map(lambda value: isinstance(value, (bool, np.bool_)) and bool(value))
    table["outside_noise"] = outside.astype(bool)
    table["interpretation"] = table["strategy"].map(lambda s: bool(records.interp.get(s)) if s != FLOOR else False)
    return ordered(table, COLUMNS["accuracy"], records.baselines)


def noise_floor_table(records: Records) -> pd.DataFrame:
    """Per (suite, protocol): pooled seed std, pooled std of paired differences, seeds needed per Δ."""
    rows = []
    for (suite, protocol), group in _pretraining(records.scores).groupby(["suite", "protocol"], sort=True):
        cells = [cell["top1"].to_numpy() for _, cell in group.groupby(CELL, dropna=False)]
        seed_std, seed_dof = metrics.pooled_std(cells)
        baseline = group[group["strategy"] == records.baselines[suite]]
        paired = group[group["strategy"] != records.baselines[suite]].merge(
            baseline[SETTING + ["ratio", "seed", "top1"]].rename(columns={"top1": "baseline_top1"}),
            on=SETTING + ["ratio", "seed"],
        )
        paired["difference"] = paired["top1"] - paired["baseline_top1"]
        differences = [cell["difference"].to_numpy() for _, cell in paired.groupby(CELL, dropna=False)]
        diff_std, diff_dof = metrics.pooled_std(differences)
        source = "paired"
        if not diff_dof and math.isfinite(seed_std):  # no pairs: two independent runs' difference
            diff_std, source = math.sqrt(2) * seed_std, "sqrt2_seed_std"
        elif not diff_dof:
            source = ""
        sizes = [len(x) for x in differences] if diff_dof else [len(x) for x in cells]
        typical = float(np.median(sizes)) if sizes else math.nan
        row = {
            "suite": suite,
            "protocol": protocol,
            "cells": sum(len(x) >= 2 for x in cells),
            "seed_std": seed_std,
            "seed_std_dof": seed_dof,
            "diff_std": diff_std,
            "diff_std_dof": diff_dof,
            "diff_std_source": source,
            "typical_pairs": typical,
            "min_detectable_delta": metrics.min_detectable_delta(diff_std, typical),
        }
        for delta in DELTAS:
            row[f"seeds_for_delta_{delta:g}"] = metrics.seeds_needed(delta, diff_std)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS["noise_floor"])
    for delta in DELTAS:
        table[f"seeds_for_delta_{delta:g}"] = table[f"seeds_for_delta_{delta:g}"].astype("Int64")
    return ordered(table, COLUMNS["noise_floor"], records.baselines)


def seed_curves(records: Records) -> pd.DataFrame:
    """Per-seed curves (CELL, seed, protocol, epoch, top1) with the untrained encoder of the same seed at epoch 0."""
    curves = records.curves
    floor = records.scores[records.scores["kind"] == FLOOR]
    if len(curves) and len(floor):
        floor_top1 = (
            floor[["floor_key", "seed", "protocol", "top1"]]
            .groupby(["floor_key", "seed", "protocol"], as_index=False)
            .mean()
        )
        starts = curves.drop_duplicates(CELL + ["seed", "protocol"]).drop(columns=["epoch", "top1"])
        starts = starts.merge(floor_top1, on=["floor_key", "seed", "protocol"])
        starts["epoch"] = 0.0
        curves = pd.concat([curves[~(curves["epoch"] == 0)], starts[curves.columns]], ignore_index=True)
    return curves


def convergence_table(records: Records, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, strategy, ratio, protocol): epochs to 95/99/100 % of the baseline's final top-1, RAUC."""
    if curves.empty:
        return pd.DataFrame(columns=COLUMNS["convergence"])
    keys = CELL + ["protocol"]
    groups = dict(iter(curves.groupby(keys, sort=True)))
    mean_curves = {key: metrics.mean_curve(group) for key, group in groups.items()}
    finals = _pretraining(records.scores).groupby(keys)["top1"].mean()
    rows = []
    for key, curve in mean_curves.items():
        cell = dict(zip(keys, key, strict=True))
        baseline_label = records.baselines[cell["suite"]]
        baseline_key = tuple(cell[k] if k != "strategy" else baseline_label for k in keys)
        baseline_final = finals.get(baseline_key, math.nan)
        baseline_curve = mean_curves.get(baseline_key)
        full_epochs = float(cell["epochs"])
        notes = []
        row = {
            **cell,
            "seeds": int(groups[key]["seed"].nunique()),
            "eval_epochs": " ".join(f"{epoch:g}" for epoch in curve["epoch"]),
            "final_top1": finals.get(key, math.nan),
            "baseline_final_top1": baseline_final,
        }
        for percent in (95, 99, 100):
            reached = math.nan
            if math.isfinite(baseline_final):
                reached = metrics.epochs_to_reach(curve["epoch"], curve["top1"], percent / 100 * baseline_final)
            row[f"epochs_to_{percent}"] = reached
            row[f"reduction_{percent}"] = metrics.epoch_reduction(reached, full_epochs)
            if math.isfinite(baseline_final) and not math.isfinite(reached):
                notes.append(f"{percent}% not reached")
        if baseline_curve is None or not len(baseline_curve):
            notes.insert(0, f"no {baseline_label} baseline")
            row["rauc"] = row["rauc_norm"] = math.nan
        else:
            both = (curve["epoch"], curve["top1"], baseline_curve["epoch"], baseline_curve["top1"])
            row["rauc"] = metrics.rauc(*both)
            row["rauc_norm"] = metrics.rauc_norm(*both)
            if len(curve) < 2:
                notes.append("single evaluation epoch")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return ordered(pd.DataFrame(rows, columns=COLUMNS["convergence"]), COLUMNS["convergence"], records.baselines)


def compute_table(records: Records) -> pd.DataFrame:
    """Per (setting, strategy, ratio): mean and sample std over seeds of the cost columns."""
    table = metrics.aggregate_columns(records.runs, CELL, COMPUTE_METRICS).rename(columns={"n": "seeds"})
    params = records.runs.groupby(CELL, dropna=False)["params_encoder"].max().reset_index()
    table = table.merge(params, on=CELL, how="left")
    table["params_encoder"] = table["params_encoder"].round().astype("Int64")
    return ordered(table, COLUMNS["compute"], records.baselines)


def legacy_leaderboard(records: Records) -> pd.DataFrame:
    """``leaderboard.csv``: mean/std per protocol (probe and knn always, others when present) + cost."""
    values = [f"{protocol}_top1" for protocol in legacy_protocols(records.protocols)] + list(LEGACY_METRICS)
    table = metrics.aggregate_columns(records.runs, CELL, values).rename(columns={"n": "seeds"})
    return ordered(table, legacy_columns(records.protocols), records.baselines)


# ------------------------------------------------------------------- for the plots and report.md


def pretraining_settings(accuracy: pd.DataFrame) -> list[tuple]:
    """The settings (tuples of the SETTING columns) that have pre-training results, sorted."""
    pretrained = accuracy[accuracy["strategy"] != FLOOR]
    return sorted({tuple(row) for row in pretrained[SETTING].itertuples(index=False)})


def floor_by_setting_table(records: Records) -> pd.DataFrame:
    """Per pre-training setting and protocol: the top-1 of its untrained encoder (FLOOR_COLUMNS).

    The floor runs of a setting are the ``random_init`` runs with its runs' floor key (same method,
    model, data and evaluation; any suite). ``seeds`` counts the floor values of the protocol,
    ``floor_seeds`` the distinct seeds of those runs over all protocols.
    """
    pretraining_runs = _pretraining(records.runs)
    floor_scores = records.scores[records.scores["kind"] == FLOOR]
    rows = []
    for setting, runs in pretraining_runs.groupby(SETTING, sort=True):
        scores = floor_scores[floor_scores["floor_key"].isin(set(runs["floor_key"]))]
        for protocol in records.protocols:
            stats = metrics.t_interval(scores.loc[scores["protocol"] == protocol, "top1"])
            if stats.n:
                rows.append(
                    [*setting, protocol, stats.n, stats.mean, stats.ci_low, stats.ci_high, scores["seed"].nunique()]
                )
    return pd.DataFrame(rows, columns=FLOOR_COLUMNS)


def best_cells_table(accuracy: pd.DataFrame, settings: list[tuple]) -> pd.DataFrame:
    """Per setting and protocol: the accuracy row with the highest mean top-1 (ties: strategy, then ratio)."""
    best = []
    for setting in settings:
        rows = in_setting(accuracy[accuracy["strategy"] != FLOOR], setting)
        for protocol in sorted(rows["protocol"].unique(), key=protocol_sort_key):
            candidates = rows[rows["protocol"] == protocol].dropna(subset=["top1_mean"])
            if len(candidates):
                ranking = candidates.sort_values(["top1_mean", "strategy", "ratio"], ascending=[False, True, True])
                best.append(ranking.index[0])
    return accuracy.loc[best]


def delta_tests_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """The accuracy rows whose paired Δ vs the baseline could be tested (≥ 2 shared seeds)."""
    pretrained = accuracy[accuracy["strategy"] != FLOOR]
    return pretrained[pretrained["delta_pairs"].fillna(0) >= 2]


def accuracy_cells_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per pre-training cell, in the accuracy table's order: ``seeds`` = the most seeds of any protocol."""
    pretrained = accuracy[accuracy["strategy"] != FLOOR]
    return pretrained.groupby(CELL, sort=False)["seeds"].max().reset_index()


@dataclass
class Tables:
    """Every table of one report: the CSV files and what the plots and ``report.md`` draw from."""

    accuracy: pd.DataFrame
    noise_floor: pd.DataFrame
    ratio_robustness: pd.DataFrame
    pimr_by_ratio: pd.DataFrame
    robustness_seeds: pd.DataFrame  # per seed: Global PIMR (the dots of the PIMR plot)
    seed_curves: pd.DataFrame  # per seed: top-1 over epochs, starting at the untrained encoder
    convergence: pd.DataFrame
    budget_gap: pd.DataFrame  # per cell, protocol and evaluated epoch: trained minus untrained, paired by seed
    budget_ranks: pd.DataFrame  # per setting, ratio, protocol and epoch: each strategy's rank
    ranking_stability: pd.DataFrame  # Kendall's tau of each epoch's ranking against the last epoch's
    verdicts: pd.DataFrame  # per claim of the three papers, setting and protocol: paired delta and verdict
    compute: pd.DataFrame
    legacy_leaderboard: pd.DataFrame
    settings: list[tuple]  # pre-training settings, sorted: one block per setting in plots and report.md
    floor_by_setting: pd.DataFrame
    best_cells: pd.DataFrame
    delta_tests: pd.DataFrame
    accuracy_cells: pd.DataFrame

    def csv_files(self) -> dict[str, pd.DataFrame]:
        """Path under the output folder -> table, for every CSV file of the report."""
        files = {f"leaderboards/{name}.csv": getattr(self, name) for name in COLUMNS}
        files["leaderboard.csv"] = self.legacy_leaderboard
        return files


def build_tables(records: Records) -> Tables:
    accuracy = accuracy_table(records)
    ratio_robustness, pimr_by_ratio, robustness_seeds = robustness_tables(records)
    curves = seed_curves(records)
    settings = pretraining_settings(accuracy)
    budget_ranks, ranking_stability = ranking_tables(curves, records.baselines)
    return Tables(
        accuracy=accuracy,
        noise_floor=noise_floor_table(records),
        ratio_robustness=ratio_robustness,
        pimr_by_ratio=pimr_by_ratio,
        robustness_seeds=robustness_seeds,
        seed_curves=curves,
        convergence=convergence_table(records, curves),
        budget_gap=gap_table(curves, records.baselines),
        budget_ranks=budget_ranks,
        ranking_stability=ranking_stability,
        verdicts=verdict_table(records, curves, settings),
        compute=compute_table(records),
        legacy_leaderboard=legacy_leaderboard(records),
        settings=settings,
        floor_by_setting=floor_by_setting_table(records),
        best_cells=best_cells_table(accuracy, settings),
        delta_tests=delta_tests_table(accuracy),
        accuracy_cells=accuracy_cells_table(accuracy),
    )
