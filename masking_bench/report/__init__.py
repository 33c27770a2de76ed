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

It runs in four steps, one module each: :mod:`.records` (the run records as data frames, read through
the store), :mod:`.tables` (every statistic, with :mod:`.robustness`; the CSV schema is in
:mod:`.columns`), :mod:`.plots` and :mod:`.markdown` (both only draw or format the tables).
Every column is documented in docs/report_columns.md; the formulas are in :mod:`masking_bench.metrics`.
The same records always give byte-identical files (fixed row order, float format, figure size, dpi,
no timestamps or software tags in the PNGs).
"""

from __future__ import annotations

from pathlib import Path

from ..store import atomic_write_text, remove_file, remove_temp_files
from .columns import COLUMNS, legacy_columns, to_csv
from .markdown import render
from .plots import PLOTS, draw_plots
from .records import BASELINE, CELL, FLOOR, SETTING, Records, collect
from .tables import (
    Tables,
    accuracy_table,
    build_tables,
    compute_table,
    convergence_table,
    legacy_leaderboard,
    noise_floor_table,
    robustness_tables,
    seed_curves,
)

__all__ = [
    "BASELINE",
    "CELL",
    "COLUMNS",
    "FLOOR",
    "PLOTS",
    "SETTING",
    "Records",
    "Tables",
    "accuracy_table",
    "build_tables",
    "collect",
    "compute_table",
    "convergence_table",
    "legacy_columns",
    "legacy_leaderboard",
    "noise_floor_table",
    "robustness_tables",
    "seed_curves",
    "write_report",
]


def write_report(results: Path, suite: str | None = None, out_dir: Path | None = None) -> Path:
    """Write the leaderboards, plots and ``report.md`` into ``out_dir`` (default ``results``); returns report.md.

    Raises :class:`~masking_bench.errors.BenchError` when there is no finished run to report on.
    Leftovers of an interrupted earlier report (temporary files) are removed first.
    """
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else results
    for folder in (out, out / "leaderboards", out / "plots"):
        remove_temp_files(folder)
    records = collect(results, suite)
    tables = build_tables(records)
    for name, table in tables.csv_files().items():
        atomic_write_text(out / name, to_csv(table))
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_notes = draw_plots(records, tables, out / "plots")
    for name, note in plot_notes.items():
        if note:  # never leave a stale plot from an earlier report
            remove_file(out / "plots" / f"{name}.png")
    report = out / "report.md"
    atomic_write_text(report, render(records, tables, plot_notes))
    return report
