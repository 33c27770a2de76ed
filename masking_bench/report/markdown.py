"""Step 4 of the report: ``report.md``, written from the tables alone.

Nothing here computes a statistic: every number comes from a table of :mod:`.tables` (or is a count
of records or table rows) and is only formatted. The columns are explained in docs/report_columns.md.
"""

from __future__ import annotations

import math

import pandas as pd

from .budget_markdown import budget_sections, verdict_section
from .columns import DELTAS
from .formatting import code_list, interval, md_table, number, ratio_text
from .plots import PLOTS
from .records import BASELINE, FLOOR, SETTING, Records, in_setting, setting_label
from .tables import Tables

ACCURACY_NOTE = "mean [95 % CI] over seeds; Δ = paired difference to the baseline, * = outside seed noise."
ROBUSTNESS_NOTE = (
    "Global PIMR in top-1 points per +10 % masking (slope reading; ref = mean of A(r) − A(r_min)); "
    "AUC = mean top-1 over the ratio range."
)
NOISE_NOTE = (
    "Pooled seed-to-seed std of one run, std of paired differences vs the baseline, and the seeds "
    "needed to detect a Δ at 95 % confidence with 80 % power (normal approximation)."
)
CONVERGENCE_NOTE = (
    f"Epochs to reach 95 / 99 / 100 % of `{BASELINE}`'s final top-1 at the same ratio (linear "
    "interpolation between evaluations; – = not reached), reduction = 1 − E/E_full, RAUC vs "
    f"`{BASELINE}`."
)
ROBUSTNESS_HEADERS = [
    "strategy",
    "protocol",
    "ratios",
    "Global PIMR",
    "Global PIMR (ref)",
    "AUC over ratio",
    "peak ratio",
    "worst drop",
    "drop after peak",
]
CONVERGENCE_HEADERS = [
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
]
COMPUTE_HEADERS = [
    "strategy",
    "ratio",
    "s / epoch",
    "img / s",
    "peak MB",
    "GFLOPs / img",
    "plan share",
    "realised ratio",
]


# ------------------------------------------------------------------------------------ sections


def _header(records: Records) -> list[str]:
    lines = [
        "# masking_bench report",
        "",
        f"Generated from {records.count()} finished run(s) in suite(s) {', '.join(records.suites())} "
        f"({records.count('pretrain')} pre-training, {records.count(FLOOR)} untrained-encoder floor). "
        "Top-1 in %, mean over seeds with a 95 % Student-t interval; Δ = paired by seed against the "
        f"`{BASELINE}` strategy of the same suite, method, ratio and epochs. "
        "Column definitions: docs/report_columns.md.",
        "",
    ]
    if records.skipped:
        lines += [
            f"Skipped {records.skipped} run folder(s) whose config.yaml no longer hashes to the folder name "
            "(edited by hand or written by an older schema).",
            "",
        ]
    if records.damaged:
        lines += [f"Skipped {len(records.damaged)} damaged record(s): " + code_list(records.damaged) + ".", ""]
    if records.stale:
        reasons = "; ".join(f"`{label}`: {', '.join(why)}" for label, why in sorted(records.stale.items()))
        lines += [
            "**Stale rows** ([STALE]): these strategies' runs were made by code that has changed since "
            "(`python -m masking_bench status` names the runs; `run` retrains them, `certify` re-stamps them "
            f"when a rerun proves the numbers unchanged): {reasons}.",
            "",
        ]
    return lines


def _delta(row: pd.Series) -> str:
    """``+1.23 [0.45, 2.01]``: a row's paired Δ vs the baseline with its interval."""
    return number(row["delta_mean"], signed=True) + interval(row["delta_ci_low"], row["delta_ci_high"])


def _summary(records: Records, tables: Tables) -> list[str]:
    many = len(tables.settings) > 1
    lines = ["## Summary", ""]
    for setting in tables.settings:
        if many:
            lines += [f"**{setting_label(setting)}**", ""]
        for _, best in in_setting(tables.best_cells, setting).iterrows():
            delta = ""
            if math.isfinite(best["delta_mean"]):
                noise = " (outside seed noise)" if best["outside_noise"] else " (within seed noise)"
                delta = f"; Δ vs {BASELINE} {_delta(best)}{noise}"
            lines.append(
                f"- best on **{best['protocol']}**: `{best['strategy']}` at ratio {ratio_text(best['ratio'])}: "
                f"{number(best['top1_mean'])}{interval(best['top1_ci_low'], best['top1_ci_high'])} "
                f"(n={int(best['seeds'])}){delta}"
            )
        lines.append("")
    tested = tables.delta_tests
    outside = tested[tested["outside_noise"]]
    if len(tested) == 0:
        lines += [f"No Δ vs `{BASELINE}` could be tested (needs the `{BASELINE}` strategy and ≥ 2 shared seeds).", ""]
    elif outside.empty:
        lines += [
            f"No Δ vs `{BASELINE}` is outside the seed noise: all {len(tested)} paired 95 % intervals include 0.",
            "",
        ]
    else:
        lines += [
            f"Δ vs `{BASELINE}` outside the seed noise ({len(outside)} of {len(tested)} tested cells; paired "
            "95 % t-interval excludes 0):",
            "",
        ]
        for _, row in outside.iterrows():
            where = f" [{setting_label(tuple(row[SETTING]))}]" if many else ""
            lines.append(
                f"- `{row['strategy']}` ratio {ratio_text(row['ratio'])}, {row['protocol']}: "
                f"{_delta(row)} points over {int(row['delta_pairs'])} seeds{where}"
            )
        lines.append("")
    interpretations = sorted(label for label, flag in records.interp.items() if flag)
    unknown = sorted(label for label, flag in records.interp.items() if flag is None)
    if interpretations:
        lines.append(
            "Strategies that are interpretations ([INTERP]: the source does not fully specify them, "
            f"the benchmark chose a reading — see their `source`): {code_list(interpretations)}."
        )
    else:
        lines.append("No strategy in these results is an interpretation ([INTERP]).")
    if unknown:
        lines.append(f"(No strategy_info recorded for {code_list(unknown)}.)")
    lines += [
        "PIMR, Global PIMR, RAUC and epochs-to-convergence are [INTERP] formulas "
        "(named by SBAM / MTO, not defined there); see docs/report_columns.md.",
        "",
    ]
    return lines


def _noise_floor(tables: Tables) -> list[str]:
    rows = []
    for _, row in tables.noise_floor.iterrows():
        diff = number(row["diff_std"]) + (" (√2·seed std)" if row["diff_std_source"] == "sqrt2_seed_std" else "")
        needed = [row[f"seeds_for_delta_{delta:g}"] for delta in DELTAS]
        rows.append(
            [row["suite"], row["protocol"], number(row["seed_std"]), diff, number(row["min_detectable_delta"])]
            + ["–" if pd.isna(n) else str(int(n)) for n in needed]
        )
    headers = ["suite", "protocol", "seed std", "paired-diff std", "detectable Δ now"]
    headers += [f"seeds for Δ={delta:g}" for delta in DELTAS]
    return ["## Noise floor", "", NOISE_NOTE, "", md_table(headers, rows)]


def _plots(plot_notes: dict[str, str | None]) -> list[str]:
    lines = ["## Plots", ""]
    for name, title in PLOTS.items():
        note = plot_notes.get(name)
        shown = f"_plot skipped: {note}_" if note else f"![{title}](plots/{name}.png)\n\n[PDF](plots/{name}.pdf)"
        lines += [f"### {title}", "", shown, ""]
    return lines


def _accuracy(records: Records, tables: Tables, setting: tuple) -> str:
    """One row per cell (the floor first), a top-1 and a Δ column per protocol."""
    protocols = records.protocols
    rows = []
    floor = in_setting(tables.floor_by_setting, setting)
    if len(floor):
        cells = []
        for protocol in protocols:
            top1 = floor[floor["protocol"] == protocol]
            if top1.empty:
                cells += ["–", ""]
            else:
                top1 = top1.iloc[0]
                cells += [number(top1["top1_mean"]) + interval(top1["top1_ci_low"], top1["top1_ci_high"]), ""]
        rows.append([FLOOR, "–", str(floor["floor_seeds"].iloc[0])] + cells)
    accuracy = in_setting(tables.accuracy[tables.accuracy["strategy"] != FLOOR], setting)
    for _, cell in in_setting(tables.accuracy_cells, setting).iterrows():
        strategy, ratio = cell["strategy"], cell["ratio"]
        cell_rows = accuracy[(accuracy["strategy"] == strategy) & (accuracy["ratio"] == ratio)]
        cells = []
        for protocol in protocols:
            row = cell_rows[cell_rows["protocol"] == protocol]
            if row.empty:
                cells += ["–", "–"]
                continue
            row = row.iloc[0]
            cells.append(number(row["top1_mean"]) + interval(row["top1_ci_low"], row["top1_ci_high"]))
            delta = number(row["delta_mean"], signed=True) + ("*" if row["outside_noise"] else "")
            cells.append(delta if math.isfinite(row["delta_mean"]) else "")
        marks = (" [INTERP]" if records.interp.get(strategy) else "") + (
            " [STALE]" if strategy in records.stale else ""
        )
        rows.append([strategy + marks, ratio_text(ratio), str(int(cell["seeds"]))] + cells)
    headers = ["strategy", "ratio", "seeds"] + [h for p in protocols for h in (p, f"Δ {p}")]
    return md_table(headers, rows)


def _robustness(tables: Tables, setting: tuple) -> str:
    rows = [
        [
            row["strategy"],
            row["protocol"],
            row["ratios"],
            number(row["global_pimr_mean"], signed=True)
            + interval(row["global_pimr_ci_low"], row["global_pimr_ci_high"]),
            number(row["global_pimr_ref_mean"], signed=True),
            number(row["ratio_auc_mean"]),
            ratio_text(row["peak_ratio"]),
            number(row["worst_drop"]),
            number(row["drop_after_peak"]),
        ]
        for _, row in in_setting(tables.ratio_robustness, setting).iterrows()
    ]
    return md_table(ROBUSTNESS_HEADERS, rows)


def _convergence(tables: Tables, setting: tuple) -> str:
    rows = [
        [
            row["strategy"],
            ratio_text(row["ratio"]),
            row["protocol"],
            row["eval_epochs"],
            number(row["final_top1"]),
            number(row["epochs_to_95"], 1),
            number(row["epochs_to_99"], 1),
            number(row["epochs_to_100"], 1),
            number(row["reduction_100"]),
            number(row["rauc"], 3),
            number(row["rauc_norm"], 3),
        ]
        for _, row in in_setting(tables.convergence, setting).iterrows()
    ]
    return md_table(CONVERGENCE_HEADERS, rows)


def _compute(tables: Tables, setting: tuple) -> str:
    rows = [
        [
            row["strategy"],
            ratio_text(row["ratio"]),
            number(row["epoch_seconds_mean"]),
            number(row["train_img_per_s_mean"], 0),
            number(row["peak_mem_mb_mean"], 0),
            number(row["gflops_per_image_mean"], 4),
            number(row["plan_share_mean"], 3),
            number(row["realised_mask_ratio_mean"], 3),
        ]
        for _, row in in_setting(tables.compute[tables.compute["strategy"] != FLOOR], setting).iterrows()
    ]
    return md_table(COMPUTE_HEADERS, rows)


def render(records: Records, tables: Tables, plot_notes: dict[str, str | None]) -> str:
    """The text of ``report.md``: header, summary, noise floor, plots, then the tables of each setting."""
    lines = _header(records) + _summary(records, tables) + verdict_section(tables) + _noise_floor(tables)
    lines += _plots(plot_notes)
    many = len(tables.settings) > 1
    for setting in tables.settings:
        heading = f" — {setting_label(setting)}" if many else ""
        lines += [f"## Accuracy{heading}", "", ACCURACY_NOTE, "", _accuracy(records, tables, setting)]
        lines += [f"## Ratio robustness{heading}", "", ROBUSTNESS_NOTE, "", _robustness(tables, setting)]
        lines += [f"## Convergence{heading}", "", CONVERGENCE_NOTE, "", _convergence(tables, setting)]
        lines += budget_sections(tables, setting, heading)
        lines += [f"## Compute{heading}", "", "Means over seeds.", "", _compute(tables, setting)]
    return "\n".join(lines).rstrip() + "\n"
