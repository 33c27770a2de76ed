"""Step 3 of the report: the four PNG plots, drawn from the tables.

Every plot is a grid of panels, one column per evaluation protocol and one row per *facet* (a setting,
or for the convergence plot a setting and ratio), drawn by :func:`_facet_figure`; each plot only says
which facets there are and what one panel shows. The files are byte-identical for the same tables:
fixed figure size and dpi, no timestamp or software tag in the PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .. import metrics
from ..store import atomic_write_bytes
from .records import CELL, FLOOR, SETTING, Records, in_setting, setting_label
from .tables import Tables

DPI = 100
# file name (plots/<name>.png) -> the heading report.md shows it under
PLOTS = {
    "accuracy_vs_ratio": "Top-1 vs masking ratio",
    "convergence": "Convergence",
    "pimr": "Global PIMR",
    "pareto": "Accuracy vs compute",
}
TOP1_LABEL = "{protocol} top-1 accuracy (%)"
FLOOR_LEGEND = "random init (untrained encoder)"


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


def _clip(values) -> np.ndarray:
    """CI ends for drawing only: top-1 cannot leave [0, 100] (the CSVs keep the unclipped t interval)."""
    return np.clip(np.asarray(values, dtype=float), 0.0, 100.0)


def _legend(fig, handles: dict[str, Any], first: Sequence[str]) -> None:
    """One legend below the panels: strategies in their fixed order, then the other artists."""
    labels = [label for label in first if label in handles] + [label for label in handles if label not in first]
    if labels:
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="outside lower center",
            ncols=min(len(labels), 6),
            frameon=False,
        )


class Facet(NamedTuple):
    """One row of panels: its setting, its rows of the plotted table, and what its panel titles add."""

    setting: tuple
    rows: pd.DataFrame
    title_suffix: str = ""
    seed_rows: pd.DataFrame | None = None  # per-seed values drawn over the means (PIMR plot)


# draws one panel: (axes, facet, protocol, legend handles by label)
PanelDrawer = Callable[[Any, Facet, str, dict[str, Any]], None]


def _facet_figure(
    path: Path,
    facets: Sequence[Facet],
    protocols: Sequence[str],
    draw_panel: PanelDrawer,
    *,
    many_settings: bool,
    xlabel: str,
    ylabel: str,
    suptitle: str,
    legend_order: Sequence[str] | None,
    panel_width: float = 3.6,
    panel_height: float = 2.8,
) -> None:
    """The shared skeleton: a facet × protocol grid of panels, titled and labelled, one legend, saved as PNG.

    ``ylabel`` may name ``{protocol}``. Panel titles carry the setting when there is more than one.
    """
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_style()):
        size = (panel_width * len(protocols), panel_height * len(facets) + 0.6)
        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        axes = fig.subplots(len(facets), len(protocols), squeeze=False)
        handles: dict[str, Any] = {}
        for i, facet in enumerate(facets):
            for j, protocol in enumerate(protocols):
                ax = axes[i][j]
                draw_panel(ax, facet, protocol, handles)
                title = protocol + facet.title_suffix
                if many_settings:
                    title += f"\n{setting_label(facet.setting)}"
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel.format(protocol=protocol))
        fig.suptitle(suptitle, fontsize=10)
        if legend_order is not None:
            _legend(fig, handles, legend_order)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def _band(ax, x: np.ndarray, low, high, color, alpha: float) -> np.ndarray:
    """Fill the clipped CI band where both ends are known (needs two points); returns where they are."""
    low, high = _clip(low), _clip(high)
    known = np.isfinite(low) & np.isfinite(high)
    if known.sum() >= 2:
        ax.fill_between(x[known], low[known], high[known], color=color, alpha=alpha, lw=0)
    return known


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


@dataclass
class _Plotter:
    records: Records
    tables: Tables

    def __post_init__(self) -> None:
        pretrained = self.tables.accuracy[self.tables.accuracy["strategy"] != FLOOR]
        baselines = self.records.baselines.values()
        self.strategies = sorted(set(pretrained["strategy"]), key=lambda s: (s not in baselines, s))
        self.colors = _palette(self.strategies)
        self.many_settings = len(self.tables.settings) > 1
        floor = self.tables.floor_by_setting
        self.floor_top1 = {
            (tuple(row[:-1]), row[-1]): top1
            for row, top1 in zip(floor[SETTING + ["protocol"]].itertuples(index=False), floor["top1_mean"], strict=True)
        }

    def _figure(self, path: Path, facets, protocols, draw_panel: PanelDrawer, **layout) -> None:
        _facet_figure(path, facets, protocols, draw_panel, many_settings=self.many_settings, **layout)

    # ---- top-1 vs masking ratio, per setting: a line per strategy, the untrained floor dashed
    def accuracy_vs_ratio(self, path: Path) -> str | None:
        protocols = self.records.protocols
        pretrained = self.tables.accuracy[self.tables.accuracy["strategy"] != FLOOR]
        if pretrained.empty or not protocols:
            return "no pre-training runs with an evaluation"

        def draw_panel(ax, facet: Facet, protocol: str, handles: dict[str, Any]) -> None:
            rows = facet.rows[facet.rows["protocol"] == protocol]
            for strategy in self.strategies:
                cells = rows[rows["strategy"] == strategy].sort_values("ratio")
                if cells.empty:
                    continue
                color = self.colors[strategy]
                ratio, mean = cells["ratio"].to_numpy(float), cells["top1_mean"].to_numpy(float)
                (line,) = ax.plot(cells["ratio"], cells["top1_mean"], marker="o", ms=3.5, lw=1.5, color=color)
                handles.setdefault(strategy, line)
                low, high = _clip(cells["top1_ci_low"]), _clip(cells["top1_ci_high"])
                known = _band(ax, ratio, low, high, color, alpha=0.18)
                if known.sum() < 2 and known.any():  # one interval: a whisker instead of a band
                    whisker = np.abs(np.vstack([mean[known] - low[known], high[known] - mean[known]]))
                    ax.errorbar(ratio[known], mean[known], yerr=whisker, fmt="none", ecolor=color, capsize=2)
            floor_top1 = self.floor_top1.get((facet.setting, protocol))
            if floor_top1 is not None and rows.shape[0]:
                handles.setdefault(FLOOR_LEGEND, ax.axhline(floor_top1, color="0.35", ls="--", lw=1))
            if rows.empty:
                _no_data(ax)

        self._figure(
            path,
            [Facet(setting, in_setting(pretrained, setting)) for setting in self.tables.settings],
            protocols,
            draw_panel,
            xlabel="masking ratio (fraction of patches hidden)",
            ylabel=TOP1_LABEL,
            suptitle="Top-1 vs masking ratio: mean over seeds, band = 95 % t-CI (clipped to 0-100)",
            legend_order=self.strategies,
        )
        return None

    # ---- top-1 over pre-training epochs, per setting and ratio: a line per strategy
    def convergence(self, path: Path) -> str | None:
        from matplotlib.ticker import MaxNLocator

        curves = self.tables.seed_curves
        if curves.empty:
            return "no evaluation curves in metrics.jsonl"
        protocols = [p for p in self.records.protocols if (curves["protocol"] == p).any()]
        rows = sorted({(tuple(row[:5]), row[5]) for row in curves[SETTING + ["ratio"]].itertuples(index=False)})
        facets = []
        for setting, ratio in rows:
            setting_curves = in_setting(curves, setting)
            facets.append(Facet(setting, setting_curves[setting_curves["ratio"] == ratio], f", ratio {ratio:g}"))

        def draw_panel(ax, facet: Facet, protocol: str, handles: dict[str, Any]) -> None:
            seed_curves = facet.rows[facet.rows["protocol"] == protocol]
            for strategy in self.strategies:
                strategy_curves = seed_curves[seed_curves["strategy"] == strategy]
                if strategy_curves.empty:
                    continue
                mean = metrics.mean_curve(strategy_curves)
                at_epoch = [
                    metrics.t_interval(strategy_curves.loc[strategy_curves["epoch"] == epoch, "top1"])
                    for epoch in mean["epoch"]
                ]
                color = self.colors[strategy]
                (line,) = ax.plot(mean["epoch"], mean["top1"], marker="o", ms=3, lw=1.4, color=color)
                handles.setdefault(strategy, line)
                low, high = [stats.ci_low for stats in at_epoch], [stats.ci_high for stats in at_epoch]
                _band(ax, mean["epoch"].to_numpy(float), low, high, color, alpha=0.15)
            if seed_curves.empty:
                _no_data(ax)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

        self._figure(
            path,
            facets,
            protocols,
            draw_panel,
            xlabel="pre-training epochs completed (0 = untrained)",
            ylabel=TOP1_LABEL,
            suptitle="Top-1 during pre-training: mean over seeds, band = 95 % t-CI (clipped to 0-100)",
            legend_order=self.strategies,
            panel_height=2.6,
        )
        return None

    # ---- Global PIMR per strategy, per setting: bars with whiskers, a dot per seed
    def pimr(self, path: Path) -> str | None:
        robustness = self.tables.ratio_robustness
        robustness = robustness[np.isfinite(robustness["global_pimr_mean"].to_numpy(float))]
        if robustness.empty:
            return "Global PIMR needs at least two masking ratios per strategy"
        protocols = [p for p in self.records.protocols if (robustness["protocol"] == p).any()]
        facets = [
            Facet(setting, in_setting(robustness, setting), seed_rows=in_setting(self.tables.robustness_seeds, setting))
            for setting in self.tables.settings
            if len(in_setting(robustness, setting))
        ]

        def draw_panel(ax, facet: Facet, protocol: str, handles: dict[str, Any]) -> None:
            rows = facet.rows[facet.rows["protocol"] == protocol]
            names = [s for s in self.strategies if (rows["strategy"] == s).any()]
            for x, strategy in enumerate(names):
                row = rows[rows["strategy"] == strategy].iloc[0]
                mean = row["global_pimr_mean"]
                ax.bar(x, mean, color=self.colors[strategy], width=0.7, alpha=0.85)
                if math.isfinite(row["global_pimr_ci_low"]):
                    whisker = [[mean - row["global_pimr_ci_low"]], [row["global_pimr_ci_high"] - mean]]
                    ax.errorbar(x, mean, yerr=whisker, fmt="none", ecolor="0.15", capsize=3, lw=1)
                seeds = facet.seed_rows
                seeds = seeds[(seeds["strategy"] == strategy) & (seeds["protocol"] == protocol)].sort_values("seed")
                if len(seeds):
                    spread = np.linspace(-0.18, 0.18, len(seeds)) if len(seeds) > 1 else np.zeros(1)
                    ax.scatter(x + spread, seeds["global_pimr"], s=10, color="0.1", zorder=3)
            ax.axhline(0, color="0.3", lw=0.8)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")

        self._figure(
            path,
            facets,
            protocols,
            draw_panel,
            xlabel="strategy",
            ylabel="Global PIMR (top-1 points / +10 % mask)",
            suptitle="Global PIMR, slope reading [INTERP]\nbar = mean, whisker = 95 % t-CI, dots = seeds",
            legend_order=None,
            panel_width=max(3.6, 0.7 * len(self.strategies) + 1.8),
            panel_height=3.2,
        )
        return None

    # ---- top-1 vs compute per cell, per setting: a dot per (strategy, ratio), the Pareto front
    def pareto(self, path: Path) -> str | None:
        pretrained = self.tables.accuracy[self.tables.accuracy["strategy"] != FLOOR]
        if pretrained.empty:
            return "no pre-training runs with an evaluation"
        compute = self.tables.compute[self.tables.compute["strategy"] != FLOOR]
        cost_columns = CELL + ["gflops_per_image_mean", "train_seconds_mean"]
        cells = pretrained.merge(compute[cost_columns], on=CELL, how="left")
        use_flops = bool(len(cells)) and np.isfinite(cells["gflops_per_image_mean"].to_numpy(float)).all()
        cost = "gflops_per_image_mean" if use_flops else "train_seconds_mean"
        cells = cells[np.isfinite(cells[cost].to_numpy(float))]
        if cells.empty:
            return "no compute measurements (flops_per_image or train_seconds) in the summaries"
        protocols = [p for p in self.records.protocols if (cells["protocol"] == p).any()]
        facets = [
            Facet(setting, in_setting(cells, setting))
            for setting in self.tables.settings
            if len(in_setting(cells, setting))
        ]

        def draw_panel(ax, facet: Facet, protocol: str, handles: dict[str, Any]) -> None:
            rows = facet.rows[facet.rows["protocol"] == protocol].sort_values([cost, "top1_mean"])
            for strategy in self.strategies:
                points = rows[rows["strategy"] == strategy]
                if points.empty:
                    continue
                dots = ax.scatter(points[cost], points["top1_mean"], s=22, color=self.colors[strategy], zorder=3)
                handles.setdefault(strategy, dots)
                for _, row in points.iterrows():
                    xy = (row[cost], row["top1_mean"])
                    ax.annotate(
                        f"{row['ratio']:g}", xy, xytext=(3, 3), textcoords="offset points", fontsize=6, color="0.25"
                    )
            front = rows[metrics.pareto_front(rows[cost], rows["top1_mean"])].sort_values(cost)
            if len(front):
                (line,) = ax.plot(
                    front[cost],
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
                handles.setdefault("Pareto front", line)

        self._figure(
            path,
            facets,
            protocols,
            draw_panel,
            xlabel=(
                "training GFLOPs per image (forward + backward)"
                if use_flops
                else "pre-training time per run (s, this machine)"
            ),
            ylabel=TOP1_LABEL,
            suptitle="Accuracy vs compute (mean over seeds; labels = masking ratio)",
            legend_order=self.strategies,
            panel_width=4.0,
            panel_height=3.0,
        )
        return None


def draw_plots(records: Records, tables: Tables, folder: Path) -> dict[str, str | None]:
    """Write ``<folder>/<name>.png`` for every plot; returns name -> why it was skipped (None: drawn).

    A skipped plot's file is not written (the caller removes an earlier copy).
    """
    plotter = _Plotter(records, tables)
    return {name: getattr(plotter, name)(folder / f"{name}.png") for name in PLOTS}
