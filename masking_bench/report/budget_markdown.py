"""The ``report.md`` sections on budgets: the verdict on each paper's claim (all studies side by side),
the trained-minus-untrained gap and the ranking stability of each setting. Formatting only: every
number comes from :mod:`.budgets`' tables (columns in docs/report_columns.md, "Budgets and verdicts").
"""

from __future__ import annotations

import math

from .budgets import CLAIMS, MEASURES
from .formatting import interval, md_table, number, ratio_text
from .records import BASELINE, SETTING, in_setting, protocol_sort_key, setting_label
from .tables import Tables

VERDICT_NOTE = (
    "One row per claim of the papers this benchmark was built around, measured as a paired Δ "
    "(strategy − `random`, per seed, 95 % t-interval over seeds) on the protocol named; *reproduced* = "
    "the interval lies above 0, *not reproduced* = below 0, *inside the noise* = it contains 0. "
    "Budget = images seen in pre-training per run. Every other protocol's verdict is in "
    "leaderboards/verdicts.csv."
)
GAP_NOTE = (
    "Top-1 of the pre-trained encoder minus the untrained encoder of the same seed (same model, data "
    "and evaluation), mean [95 % CI] over seeds, at each evaluated epoch; * = the interval excludes 0."
)
STABILITY_NOTE = (
    "Each budget is an evaluation after that epoch of the runs' own schedule, not a separate shorter "
    "run, so its absolute top-1 differs from what a run of that length would reach (by about one probe "
    'point for `random`: README "The ladder study"). Every strategy shares the schedule, the data order '
    "of each seed and the evaluation, so their *order* at a budget is a same-compute comparison. "
    "τ = Kendall's τ between the ranking at that budget and at the last one (95 % bootstrap interval "
    "over seeds, every resample enumerated); P(best) = share of resamples in which the best strategy "
    "at that budget is also best at the last."
)


def _budget(images: float, epochs: float) -> str:
    if math.isnan(images):  # no epoch rows recorded
        return f"{epochs:g} ep"
    return f"{images / 1000:.0f}k images ({epochs:g} ep)"


def verdict_section(tables: Tables) -> list[str]:
    """The verdict table: one row per claim, one column group per setting that measured any claim."""
    headline = tables.verdicts[tables.verdicts["headline"]]
    if headline.empty:
        return []
    images = headline.groupby(SETTING)["images_seen"].max()
    settings = sorted(images.index, key=lambda s: (-images[s], s))  # the longest budget first
    headers = ["paper", "claim", "protocol", "measure"]
    for setting in settings:
        rows = in_setting(headline, setting)
        budget = _budget(float(rows["images_seen"].iloc[0]), float(setting[4]))
        headers += [f"{setting_label(setting)} — {budget}: Δ [95 % CI] (seeds)", "verdict"]
    body = []
    for claim in CLAIMS:
        rows = headline[headline["claim"] == claim.key]
        if rows.empty:
            continue
        line = [claim.paper, f"`{claim.strategy}`: {claim.text}", claim.protocol, MEASURES[claim.measure]]
        for setting in settings:
            cell = in_setting(rows, setting)
            if cell.empty:
                line += ["not measured", "–"]
                continue
            row = cell.iloc[0]
            line += [
                f"{number(row['delta_mean'], signed=True)}{interval(row['delta_ci_low'], row['delta_ci_high'])} "
                f"({row['seeds']})",
                f"**{row['verdict']}**",
            ]
        body.append(line)
    return ["## Verdicts on the papers' claims", "", VERDICT_NOTE, "", md_table(headers, body)]


def gap_section(tables: Tables, setting: tuple, heading: str) -> list[str]:
    """Per protocol (rows) and evaluated epoch (columns): the baseline's trained-minus-untrained gap."""
    gap = in_setting(tables.budget_gap, setting)
    baseline = gap[gap["strategy"] == BASELINE]
    if baseline.empty:
        return []
    rows = []
    epochs = sorted(baseline["epoch"].unique())
    for (ratio, protocol), group in sorted(
        baseline.groupby(["ratio", "protocol"]), key=lambda item: (item[0][0], protocol_sort_key(item[0][1]))
    ):
        by_epoch = {row["epoch"]: row for _, row in group.iterrows()}
        line = [ratio_text(ratio), protocol]
        for epoch in epochs:
            row = by_epoch.get(epoch)
            if row is None:
                line.append("–")
                continue
            star = "*" if row["outside_noise"] else ""
            line.append(
                f"{number(row['gap_mean'], signed=True)}{interval(row['gap_ci_low'], row['gap_ci_high'])}{star}"
            )
        rows.append(line)
    headers = ["ratio", "protocol"] + [f"epoch {epoch:g}" for epoch in epochs]
    text = md_table(headers, rows)
    return [f"## Pre-training gap (`{BASELINE}` − untrained){heading}", "", GAP_NOTE, "", text]


def stability_section(tables: Tables, setting: tuple, heading: str) -> list[str]:
    """Per ratio, protocol and budget: the ranking, τ to the last budget and P(best stays best)."""
    stability = in_setting(tables.ranking_stability, setting)
    if stability.empty:
        return []
    ranks = in_setting(tables.budget_ranks, setting)
    rows = []
    ordered_rows = sorted(
        (row for _, row in stability.iterrows()),
        key=lambda row: (row["ratio"], protocol_sort_key(row["protocol"]), row["epoch"]),
    )
    for row in ordered_rows:
        at = ranks[(ranks["ratio"] == row["ratio"]) & (ranks["protocol"] == row["protocol"])]
        order = at[at["epoch"] == row["epoch"]].sort_values(["rank", "strategy"])
        last = at[at["epoch"] == row["last_epoch"]].sort_values(["rank", "strategy"])
        rows.append(
            [
                ratio_text(row["ratio"]),
                row["protocol"],
                f"{row['epoch']:g} → {row['last_epoch']:g}",
                " > ".join(order["strategy"]),
                " > ".join(last["strategy"]),
                f"{number(row['kendall_tau'])}{interval(row['tau_ci_low'], row['tau_ci_high'])}",
                number(row["p_best_stays_best"]),
            ]
        )
    headers = ["ratio", "protocol", "budget → last", "ranking at budget", "ranking at last", "τ [95 % CI]", "P(best)"]
    return [f"## Ranking stability across budgets{heading}", "", STABILITY_NOTE, "", md_table(headers, rows)]


def budget_sections(tables: Tables, setting: tuple, heading: str) -> list[str]:
    """The gap and the ranking stability of one setting (nothing when it has a single budget)."""
    return gap_section(tables, setting, heading) + stability_section(tables, setting, heading)
