"""Step 3 of the report: the four figures, drawn from the tables, each as PNG and PDF.

Every figure is a seaborn figure-level grid (``catplot`` / ``relplot``) with one panel per
evaluation protocol (and setting, or ratio), wrapped to at most :data:`PANELS_PER_ROW` per row.
Strategies keep one colour and marker in every figure (:mod:`.palette`). Top-1 is drawn as the
mean over seeds with its 95 % Student-t interval (the interval of the CSV tables, from
:func:`masking_bench.metrics.t_interval`; clipped to 0–100 for drawing), strategies dodged
sideways. The files are byte-identical for the same tables: fixed size and dpi, no date, software
or version in the PNG or PDF (:data:`SAVE_METADATA`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .. import metrics
from ..store import atomic_write_bytes, remove_file
from .labels import place_labels
from .palette import FLOOR_COLOR, strategy_order, strategy_styles
from .records import CELL, FLOOR, SETTING, Records, in_setting, setting_label
from .tables import Tables

DPI = 150
PANELS_PER_ROW = 3
FORMATS = ("png", "pdf")  # every plot is written as plots/<name>.<format>, PDF for papers (vector)
# file stem (plots/<name>.png, .pdf) -> the heading report.md shows it under
PLOTS = {
    "accuracy_vs_ratio": "Top-1 vs masking ratio",
    "convergence": "Convergence",
    "pimr": "Global PIMR",
    "pareto": "Accuracy vs compute",
}
# no date, creator or library version in the files: the same tables give the same bytes
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}
TOP1_LABEL = "top-1 accuracy (%)"
FLOOR_LEGEND = "random init (untrained encoder)"
FRONT_LEGEND = "Pareto front"
CI_NOTE = "mean over seeds ± 95 % t-CI"
# a protocol's convergence panel needs more evaluations than the untrained start and the final one
MIN_CONVERGENCE_EPOCHS = 3
PARETO_DODGE = 0.016  # sideways shift between strategies in the Pareto plot, as a fraction of the cost range


def _style() -> dict[str, Any]:
    import seaborn as sns

    return {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("paper"),
        "font.family": "DejaVu Sans",
        "svg.hashsalt": "masking_bench",
        "path.simplify": True,
        "pdf.fonttype": 42,  # TrueType in the PDF: text stays text (editable, searchable)
        "figure.dpi": DPI,
    }


def _clip(values) -> np.ndarray:
    """CI ends for drawing only: top-1 cannot leave [0, 100] (the CSVs keep the unclipped t interval)."""
    return np.clip(np.asarray(values, dtype=float), 0.0, 100.0)


def _top1_ci(values) -> tuple[float, float]:
    """seaborn ``errorbar=``: the 95 % t interval of the seeds (as in the tables), clipped to 0–100."""
    stats = metrics.t_interval(values)
    low, high = _clip([stats.ci_low, stats.ci_high])
    return float(low), float(high)


def _t_ci(values) -> tuple[float, float]:
    """seaborn ``errorbar=``: the 95 % t interval of the seeds, unclipped (Global PIMR)."""
    stats = metrics.t_interval(values)
    return stats.ci_low, stats.ci_high


def _drop_missing_points(grid) -> None:
    """Remove the empty markers seaborn leaves for a strategy that a facet lacks (masked offsets,
    which a categorical axis cannot draw): e.g. a suite whose strategies do not all sweep the ratio."""
    for ax in grid.axes.flat:
        for collection in ax.collections:
            offsets = collection.get_offsets()
            if np.ma.isMaskedArray(offsets) and np.ma.getmaskarray(offsets).any():
                keep = ~np.ma.getmaskarray(offsets).any(axis=1)
                collection.set_offsets(np.asarray(offsets[keep]))


def _dodge(strategies: Sequence[str]) -> float | bool:
    """seaborn ``dodge=``: strategies spread over half the gap between x values (one strategy: none)."""
    return 0.5 if len(strategies) > 1 else False


class Panel(NamedTuple):
    """What one panel shows: its setting and protocol (and ratio for the convergence plot)."""

    setting: tuple
    protocol: str
    ratio: float | None = None


def _panel_name(panel: Panel, many_settings: bool) -> str:
    name = panel.protocol + ("" if panel.ratio is None else f" · ratio {panel.ratio:g}")
    return name + (f"\n{setting_label(panel.setting)}" if many_settings else "")


class _Plotter:
    """Builds each figure as a seaborn grid (``make_<name>``: a FacetGrid, or why it is skipped)."""

    def __init__(self, records: Records, tables: Tables) -> None:
        self.records, self.tables = records, tables
        pretrained = tables.accuracy[tables.accuracy["strategy"] != FLOOR]
        # every strategy of the report, so a strategy keeps its colour when a figure lacks it
        self.styles = strategy_styles(pretrained["strategy"])
        self.many_settings = len(tables.settings) > 1
        floor = tables.floor_by_setting
        self.floor_top1 = {
            (tuple(row[:-1]), row[-1]): top1
            for row, top1 in zip(floor[SETTING + ["protocol"]].itertuples(index=False), floor["top1_mean"], strict=True)
        }

    # ---- shared grid and legend
    def _panels(self, data: pd.DataFrame, panels: Sequence[Panel]) -> tuple[pd.DataFrame, dict[str, Panel]]:
        """``data`` with a ``panel`` column naming each row's panel; the panels by name, in order."""
        names = {_panel_name(panel, self.many_settings): panel for panel in panels}
        data = data.copy()
        columns = SETTING + ["protocol"] + (["ratio"] if panels[0].ratio is not None else [])
        data["panel"] = [
            _panel_name(Panel(tuple(row[:5]), *row[5:]), self.many_settings)
            for row in data[columns].itertuples(index=False)
        ]
        return data[data["panel"].isin(names)], names

    def _grid_args(self, names: Sequence[str], strategies: Sequence[str]) -> dict[str, Any]:
        return {
            "col": "panel",
            "col_order": list(names),
            "col_wrap": min(PANELS_PER_ROW, len(names)),
            "hue": "strategy",
            "hue_order": list(strategies),
            "palette": {s: self.styles[s].color for s in strategies},
            "legend": False,
        }

    def _finish(
        self, grid, *, xlabel: str, ylabel: str, title: str, strategies: Sequence[str], extra=(), lines: bool = True
    ) -> None:
        """Panel titles, axis labels, a one-line title and one legend under the panels."""
        from matplotlib.lines import Line2D

        grid.set_titles("{col_name}", size=8.5)
        grid.set_axis_labels(xlabel, ylabel)
        fig = grid.figure
        fig.suptitle(title, fontsize=9.5)
        handles = [
            Line2D([], [], color=self.styles[s].color, marker=self.styles[s].marker, ms=5, lw=1.2 if lines else 0)
            for s in strategies
        ]
        labels = list(strategies)
        for label, handle in extra:
            handles.append(handle)
            labels.append(label)
        fig.set_layout_engine("constrained", h_pad=0.04, w_pad=0.04)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8), frameon=False)

    def _top1_points(self, data: pd.DataFrame, names: dict, strategies: list[str], x: str, **size):
        """Seed-mean top-1 against ``x`` per strategy: dodged points with the 95 % t interval as error bars."""
        import seaborn as sns

        return sns.catplot(
            data=data,
            kind="point",
            x=x,
            y="top1",
            native_scale=True,
            dodge=_dodge(strategies),
            errorbar=_top1_ci,
            capsize=0.08,
            markers=[self.styles[s].marker for s in strategies],
            linewidth=1.1,
            err_kws={"linewidth": 0.9},
            sharey=False,
            **size,
            **self._grid_args(names, strategies),
        )

    def _present(self, data: pd.DataFrame) -> list[str]:
        return strategy_order(s for s in data["strategy"].unique() if s in self.styles)

    # ---- top-1 vs masking ratio: a panel per protocol, a line per strategy, the untrained floor dashed
    def make_accuracy_vs_ratio(self):
        from matplotlib.lines import Line2D

        scores = self.records.scores
        scores = scores[(scores["kind"] == "pretrain") & scores["strategy"].isin(self.styles)]
        panels = [
            Panel(setting, protocol)
            for setting in self.tables.settings
            for protocol in self.records.protocols
            if (in_setting(scores, setting)["protocol"] == protocol).any()
        ]
        if not panels:
            return "no pre-training runs with an evaluation"
        data, names = self._panels(scores, panels)
        strategies = self._present(data)
        grid = self._top1_points(data, names, strategies, x="ratio", markersize=4.5, height=2.3, aspect=1.3)
        floor_seen = False
        for name, ax in grid.axes_dict.items():
            panel = names[name]
            floor = self.floor_top1.get((panel.setting, panel.protocol))
            if floor is not None:
                ax.axhline(floor, color=FLOOR_COLOR, ls="--", lw=0.9, zorder=0)
                floor_seen = True
            ratios = sorted(data["ratio"].unique())
            ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        floor_handle = [(FLOOR_LEGEND, Line2D([], [], color=FLOOR_COLOR, ls="--", lw=0.9))] if floor_seen else []
        self._finish(
            grid,
            xlabel="masking ratio",
            ylabel=TOP1_LABEL,
            title=f"Top-1 vs masking ratio ({CI_NOTE})",
            strategies=strategies,
            extra=floor_handle,
        )
        return grid

    # ---- top-1 over pre-training epochs: a panel per protocol evaluated at > 2 epochs and ratio
    def make_convergence(self):
        from matplotlib.ticker import MaxNLocator

        curves = self.tables.seed_curves
        curves = curves[curves["strategy"].isin(self.styles)] if len(curves) else curves
        if curves.empty:
            return "no evaluation curves in metrics.jsonl"
        # the epochs every seed of a curve was evaluated at (as metrics.mean_curve)
        keys = CELL + ["protocol"]
        at_epoch = curves.groupby(keys + ["epoch"], dropna=False)["seed"].transform("nunique")
        curves = curves[at_epoch == curves.groupby(keys, dropna=False)["seed"].transform("nunique")]
        panels = []
        for setting in self.tables.settings:
            rows = in_setting(curves, setting)
            for protocol in self.records.protocols:
                protocol_rows = rows[rows["protocol"] == protocol]
                if protocol_rows["epoch"].nunique() >= MIN_CONVERGENCE_EPOCHS:
                    panels += [Panel(setting, protocol, ratio) for ratio in sorted(protocol_rows["ratio"].unique())]
        if not panels:
            return f"no protocol evaluated at {MIN_CONVERGENCE_EPOCHS} or more epochs (including the untrained start)"
        data, names = self._panels(curves, panels)
        strategies = self._present(data)
        grid = self._top1_points(data, names, strategies, x="epoch", markersize=4, height=2.2, aspect=1.35)
        for ax in grid.axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self._finish(
            grid,
            xlabel="pre-training epochs (0 = untrained)",
            ylabel=TOP1_LABEL,
            title=f"Top-1 during pre-training ({CI_NOTE})",
            strategies=strategies,
        )
        return grid

    # ---- Global PIMR: a panel per protocol, a point per strategy with its CI, a dot per seed
    def make_pimr(self):
        import seaborn as sns

        robustness = self.tables.ratio_robustness
        robustness = robustness[
            np.isfinite(robustness["global_pimr_mean"].to_numpy(float)) & robustness["strategy"].isin(self.styles)
        ]
        if robustness.empty:
            return "Global PIMR needs at least two masking ratios per strategy"
        panels = [
            Panel(setting, protocol)
            for setting in self.tables.settings
            for protocol in self.records.protocols
            if (in_setting(robustness, setting)["protocol"] == protocol).any()
        ]
        table, names = self._panels(robustness, panels)
        seeds, _ = self._panels(self.tables.robustness_seeds, panels)
        strategies = self._present(table)
        grid = sns.catplot(
            data=seeds,
            kind="point",
            x="global_pimr",
            y="strategy",
            order=strategies,
            orient="h",
            errorbar=_t_ci,
            capsize=0.25,
            markers=[self.styles[s].marker for s in strategies],
            markersize=5,
            linestyle="none",
            err_kws={"linewidth": 1.1},
            height=0.28 * len(strategies) + 1.0,
            aspect=max(1.2, 3.0 / (0.28 * len(strategies) + 1.0)),
            sharex=False,
            **self._grid_args(names, strategies),
        )
        position = {s: i for i, s in enumerate(strategies)}
        for name, ax in grid.axes_dict.items():
            ax.axvline(0, color="0.3", lw=0.8, zorder=0)
            panel_seeds = seeds[(seeds["panel"] == name) & seeds["strategy"].isin(position)]
            for strategy, rows in panel_seeds.groupby("strategy", sort=False):
                values = rows.sort_values("seed")["global_pimr"].to_numpy(float)
                spread = np.linspace(-0.22, 0.22, len(values)) if len(values) > 1 else np.zeros(1)
                ax.scatter(values, position[strategy] + spread, s=7, color="0.25", lw=0, zorder=1)
            # a strategy without a seed at every ratio: the value of its mean curve, hollow
            no_seeds = table[(table["panel"] == name) & (table["complete_seeds"] == 0)]
            for _, row in no_seeds.iterrows():
                style = self.styles[row["strategy"]]
                ax.scatter(
                    row["global_pimr_mean"], position[row["strategy"]], marker=style.marker, fc="none", ec=style.color
                )
        self._finish(
            grid,
            xlabel="Global PIMR (top-1 points per +10 % mask)",
            ylabel="",
            title=f"Global PIMR, slope reading [INTERP] ({CI_NOTE}; dots = seeds)",
            strategies=strategies,
            lines=False,
        )
        return grid

    # ---- top-1 vs compute: a point per (strategy, ratio) with its CI, the Pareto front, ratio labels
    def make_pareto(self):
        import seaborn as sns
        from matplotlib.lines import Line2D

        pretrained = self.tables.accuracy[self.tables.accuracy["strategy"].isin(self.styles)]
        if pretrained.empty:
            return "no pre-training runs with an evaluation"
        compute = self.tables.compute[self.tables.compute["strategy"] != FLOOR]
        cells = pretrained.merge(compute[CELL + ["gflops_per_image_mean", "train_seconds_mean"]], on=CELL, how="left")
        use_flops = bool(len(cells)) and np.isfinite(cells["gflops_per_image_mean"].to_numpy(float)).all()
        cost = "gflops_per_image_mean" if use_flops else "train_seconds_mean"
        cells = cells[np.isfinite(cells[cost].to_numpy(float)) & np.isfinite(cells["top1_mean"].to_numpy(float))]
        if cells.empty:
            return "no compute measurements (flops_per_image or train_seconds) in the summaries"
        panels = [
            Panel(setting, protocol)
            for setting in self.tables.settings
            for protocol in self.records.protocols
            if (in_setting(cells, setting)["protocol"] == protocol).any()
        ]
        data, names = self._panels(cells, panels)
        strategies = self._present(data)
        # strategies side by side at equal cost: a shift of PARETO_DODGE of the cost range each
        costs = data[cost].to_numpy(float)
        span = float(costs.max() - costs.min()) or abs(float(costs.max())) or 1.0
        shift = {s: (i - (len(strategies) - 1) / 2) * PARETO_DODGE * span for i, s in enumerate(strategies)}
        data["x"] = costs + data["strategy"].map(shift).to_numpy(float)
        grid = sns.relplot(
            data=data,
            kind="scatter",
            x="x",
            y="top1_mean",
            style="strategy",
            markers={s: self.styles[s].marker for s in strategies},
            s=28,
            linewidth=0.4,
            edgecolor="white",
            zorder=3,
            height=2.5,
            aspect=1.3,
            facet_kws={"sharey": False, "sharex": True},
            **self._grid_args(names, strategies),
        )
        labelled = []
        for name, ax in grid.axes_dict.items():
            rows = data[data["panel"] == name].sort_values([cost, "top1_mean"], ascending=[True, False])
            low, high = _clip(rows["top1_ci_low"]), _clip(rows["top1_ci_high"])
            known = np.isfinite(low) & np.isfinite(high)
            for strategy in strategies:
                bar = known & (rows["strategy"] == strategy).to_numpy()
                if bar.any():
                    mean = rows["top1_mean"].to_numpy(float)[bar]
                    ax.errorbar(
                        rows["x"].to_numpy(float)[bar],
                        mean,
                        yerr=np.vstack([mean - low[bar], high[bar] - mean]),
                        fmt="none",
                        ecolor=self.styles[strategy].color,
                        lw=0.8,
                        capsize=2,
                    )
            front = rows[metrics.pareto_front(rows[cost], rows["top1_mean"])].sort_values(cost)
            if len(front):
                ax.plot(front["x"], front["top1_mean"], color="0.3", lw=0.9, ls=":", drawstyle="steps-post", zorder=2)
                ax.scatter(front["x"], front["top1_mean"], s=90, facecolor="none", edgecolor="0.3", lw=0.8, zorder=2)
            ax.margins(x=0.1, y=0.1)
            x = rows["x"].to_numpy(float)
            bars = [(x[i], low[i], x[i], high[i]) for i in np.flatnonzero(known)]
            labelled.append((ax, x, rows["top1_mean"].to_numpy(float), rows["ratio"], bars))
        front_handle = Line2D([], [], color="0.3", lw=0.9, ls=":", marker="o", ms=8, mfc="none", mec="0.3")
        self._finish(
            grid,
            xlabel="training GFLOPs per image (fwd + bwd)" if use_flops else "pre-training time per run (s)",
            ylabel=TOP1_LABEL,
            title=f"Accuracy vs compute ({CI_NOTE}; labels = masking ratio; strategies shifted sideways)",
            strategies=strategies,
            extra=[(FRONT_LEGEND, front_handle)],
        )
        grid.figure.draw_without_rendering()  # the final layout: labels are placed in display space
        for ax, x, y, ratios, bars in labelled:
            place_labels(ax, x, y, [f"{r:g}" for r in ratios], obstacles=bars, fontsize=6, color="0.2")
        return grid


def make_figure(name: str, records: Records, tables: Tables):
    """The seaborn grid of plot ``name`` (a key of :data:`PLOTS`), or a string saying why it is skipped.

    The caller closes the figure (``matplotlib.pyplot.close(grid.figure)``).
    """
    import matplotlib

    with matplotlib.rc_context(_style()):
        grid = getattr(_Plotter(records, tables), f"make_{name}")()
    if not isinstance(grid, str):
        _drop_missing_points(grid)
    return grid


def figure_bytes(fig, fmt: str) -> bytes:
    """The figure as ``png`` or ``pdf`` bytes, with nothing in them that changes between runs."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(_style()):
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=SAVE_METADATA[fmt])
    return buffer.getvalue()


def draw_plots(records: Records, tables: Tables, folder: Path) -> dict[str, str | None]:
    """Write ``<folder>/<name>.png`` and ``.pdf`` for every plot; returns name -> why it was skipped (None: drawn).

    A skipped plot's files are not written and an earlier PDF is removed (the caller removes the PNG).
    """
    import matplotlib.pyplot as plt

    notes: dict[str, str | None] = {}
    for name in PLOTS:
        grid = make_figure(name, records, tables)
        if isinstance(grid, str):
            notes[name] = grid
            for fmt in FORMATS:
                remove_file(folder / f"{name}.{fmt}")
            continue
        try:
            for fmt in FORMATS:
                atomic_write_bytes(folder / f"{name}.{fmt}", figure_bytes(grid.figure, fmt))
        finally:
            plt.close(grid.figure)
        notes[name] = None
    return notes


__all__ = ["DPI", "FORMATS", "PANELS_PER_ROW", "PLOTS", "SAVE_METADATA", "draw_plots", "figure_bytes", "make_figure"]
