"""report.plots on hand-written run records: PNG + PDF, wrapped facets, the fixed colour-blind-safe
palette, convergence panels only with enough evaluations, byte-identical output, Pareto labels apart."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt  # headless: conftest sets MPLBACKEND=Agg before any import
import pytest
from matplotlib.colors import to_hex
from matplotlib.text import Text
from test_report import PNG_SIGNATURE, _suite, write_records

from masking_bench.report import build_tables, collect, write_report
from masking_bench.report.labels import place_labels
from masking_bench.report.palette import (
    BUILTIN_ORDER,
    MARKERS,
    OKABE_ITO,
    PALETTE,
    strategy_order,
    strategy_styles,
)
from masking_bench.report.plots import FORMATS, PANELS_PER_ROW, PLOTS, draw_plots, make_figure

# Okabe & Ito (2008), "Color Universal Design": the palette docs and palette.py name
DOCUMENTED_OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")


@pytest.fixture(scope="module")
def two_settings(tmp_path_factory):
    """Two settings (a grid over the learning rate) x two protocols: four panels per plot."""
    results = tmp_path_factory.mktemp("results")
    write_records(results, _suite(name="g", seeds=(0, 1, 2), grid={"train.base_lr": [0.001, 0.002]}))
    records = collect(results, "g")
    return records, build_tables(records)


@pytest.fixture(scope="module")
def one_setting(tmp_path_factory):
    """The report tests' suite: knn evaluated after 0, 2 and 4 epochs, probe after 0 and 4 only."""
    results = tmp_path_factory.mktemp("results")
    write_records(results)
    records = collect(results, "fx")
    return records, build_tables(records)


@pytest.fixture
def figure():
    """make_figure(name, records, tables) whose figures are closed after the test."""
    grids = []

    def make(name, records, tables):
        grid = make_figure(name, records, tables)
        if not isinstance(grid, str):
            grids.append(grid)
        return grid

    yield make
    for grid in grids:
        plt.close(grid.figure)


def _rows_of_axes(fig) -> list[list]:
    """The figure's panels grouped by row (same top edge)."""
    rows: dict[float, list] = {}
    for ax in fig.axes:
        if ax.get_visible():
            rows.setdefault(round(ax.get_position().y1, 3), []).append(ax)
    return [rows[y] for y in sorted(rows, reverse=True)]


def _legend_colors(fig) -> dict[str, str]:
    legend = fig.legends[0]
    return {
        text.get_text(): to_hex(handle.get_color()).upper()
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }


def test_png_and_pdf_side_by_side(tmp_path, one_setting):
    records, tables = one_setting
    notes = draw_plots(records, tables, tmp_path)
    assert notes == dict.fromkeys(PLOTS)
    for name in PLOTS:
        png, pdf = (tmp_path / f"{name}.png").read_bytes(), (tmp_path / f"{name}.pdf").read_bytes()
        assert png[:8] == PNG_SIGNATURE and pdf.startswith(b"%PDF")
        assert b"CreationDate" not in pdf and b"matplotlib" not in pdf, name
        assert b"Software" not in png[:4096] and b"matplotlib" not in png
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{f}" for n in PLOTS for f in FORMATS)


def test_rerender_is_byte_identical(tmp_path, one_setting):
    records, tables = one_setting
    draw_plots(records, tables, tmp_path / "a")
    draw_plots(records, tables, tmp_path / "b")
    for name in PLOTS:
        for fmt in FORMATS:
            first, second = (tmp_path / d / f"{name}.{fmt}" for d in "ab")
            assert first.read_bytes() == second.read_bytes(), f"{name}.{fmt}"


@pytest.mark.parametrize("name", ["accuracy_vs_ratio", "pimr", "pareto"])
def test_facets_wrap_at_three_per_row(two_settings, figure, name):
    records, tables = two_settings
    grid = figure(name, records, tables)
    assert len(grid.axes_dict) == 4  # 2 settings x 2 protocols
    rows = _rows_of_axes(grid.figure)
    assert [len(row) for row in rows] == [PANELS_PER_ROW, 1]


def test_palette_is_the_documented_colour_blind_safe_one():
    assert OKABE_ITO == DOCUMENTED_OKABE_ITO and PALETTE[: len(OKABE_ITO)] == OKABE_ITO
    assert len(set(PALETTE)) == len(PALETTE)


def test_builtin_strategies_have_distinct_fixed_styles():
    from masking_bench.masking import available

    builtin = {n for n, cls in available().items() if cls.__module__.startswith("masking_bench.strategies")}
    assert set(BUILTIN_ORDER) == builtin, "a new built-in strategy needs its slot in palette.BUILTIN_ORDER"
    styles = strategy_styles(BUILTIN_ORDER)
    assert len({s.color for s in styles.values()}) == len(BUILTIN_ORDER)
    assert len({s.marker for s in styles.values()}) == len(BUILTIN_ORDER)
    assert all(s.color in OKABE_ITO for s in styles.values())
    # the old palette gave block, mto and sbam_amr the same orange
    assert len({styles[name].color for name in ("block", "mto", "sbam_amr")}) == 3


def test_styles_do_not_depend_on_what_else_is_plotted():
    plugins = [f"plugin_{i:02d}" for i in range(30)]
    everything = strategy_styles(list(BUILTIN_ORDER) + plugins)
    assert strategy_styles(["mto"])["mto"] == everything["mto"]
    assert strategy_styles(["sbam", "zz_mine"])["sbam"] == everything["sbam"]
    assert len(set(everything.values())) == len(everything)  # (colour, marker) pairs stay distinct
    assert strategy_order(["zz", "misalign", "aa", "random"]) == ["random", "misalign", "aa", "zz"]
    assert set(MARKERS) >= {s.marker for s in everything.values()}


def test_every_figure_uses_the_same_strategy_colours(one_setting, figure):
    records, tables = one_setting
    expected = {label: style.color for label, style in strategy_styles(["random", "block", "sbam"]).items()}
    for name in PLOTS:
        colors = _legend_colors(figure(name, records, tables).figure)
        assert {label: colors[label] for label in expected} == expected, name


def test_convergence_only_for_protocols_with_more_than_two_epochs(one_setting, figure):
    records, tables = one_setting
    grid = figure("convergence", records, tables)
    panels = list(grid.axes_dict)
    assert panels == [f"knn · ratio {ratio:g}" for ratio in (0.5, 0.7, 0.9)]  # probe: epochs 0 and 4 only


def test_convergence_skipped_without_intermediate_evaluations(tmp_path, figure):
    write_records(tmp_path, _suite(name="nc", ratios=[0.6, 0.8], seeds=[0, 1]), curves=False)
    records = collect(tmp_path, "nc")
    note = figure("convergence", records, build_tables(records))
    assert isinstance(note, str) and "epochs" in note


def _label_boxes(ax, renderer) -> list:
    labels = [child for child in ax.texts if child.get_gid() == "point-label"]
    return [Text.get_window_extent(label, renderer) for label in labels]  # the text, not its leader line


def _overlapping(boxes) -> list:
    return [
        (a, b)
        for a, b in itertools.combinations(boxes, 2)
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 0 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0
    ]


def test_pareto_labels_do_not_overlap(one_setting, figure):
    records, tables = one_setting
    grid = figure("pareto", records, tables)
    fig = grid.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for name, ax in grid.axes_dict.items():
        boxes = _label_boxes(ax, renderer)
        assert len(boxes) == 9, name  # 3 strategies x 3 ratios
        assert not _overlapping(boxes), name


def test_place_labels_separates_a_dense_cluster():
    fig, ax = plt.subplots(figsize=(3, 2.5), dpi=100)
    try:
        x = [1.0 + 0.001 * (i % 3) for i in range(10)]
        y = [5.0 + 0.01 * i for i in range(10)]
        ax.scatter(x, y)
        ax.set_xlim(0, 2)
        ax.set_ylim(0, 10)
        fig.draw_without_rendering()
        place_labels(ax, x, y, [f"0.{i}5" for i in range(10)], fontsize=6)
        fig.canvas.draw()
        boxes = _label_boxes(ax, fig.canvas.get_renderer())
        assert len(boxes) == 10 and not _overlapping(boxes)
        area = ax.get_window_extent()
        assert all(area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1 for b in boxes)
    finally:
        plt.close(fig)


def test_report_md_links_png_and_pdf():
    from masking_bench.report.markdown import _plots

    text = "\n".join(_plots(dict.fromkeys(PLOTS) | {"pimr": "needs two ratios"}))
    for name in PLOTS:
        assert (f"plots/{name}.png" in text and f"plots/{name}.pdf" in text) == (name != "pimr"), name


def test_a_strategy_at_fewer_ratios_does_not_break_the_plots(tmp_path):
    """As in the ladder study: `block` only at 0.75 while `random` and `sbam` sweep two ratios; every
    plot still renders (seaborn leaves empty markers for a strategy a facet lacks)."""
    suite = _suite(strategies=("random", {"name": "block", "ratios": [0.75]}, "sbam"), ratios=(0.75, 0.9))
    write_records(tmp_path, suite)
    write_report(tmp_path)
    for name in ("accuracy_vs_ratio", "convergence", "pimr", "pareto"):
        for fmt in ("png", "pdf"):
            assert (tmp_path / "plots" / f"{name}.{fmt}").stat().st_size > 1000, (name, fmt)
