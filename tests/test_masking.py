"""Strategy contract and the built-in strategies: random (MAE), block (BEiT), coarse_random (SimMIM)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import blank_images, ctx_for

from masking_bench.errors import BenchError
from masking_bench.masking import (
    MaskPlan,
    PlanContext,
    available,
    build_strategy,
    get_strategy_class,
    hide_lowest_first,
    num_hidden,
)

GRIDS = {49: (7, 7), 196: (14, 14), 64: (8, 8), 16: (4, 4)}
RATIOS = (0.5, 0.6, 0.75, 0.9)


def plan(name, ratio, grid, n=64, seed=0, method="mae", **params):
    strategy = build_strategy(name, ratio, method, params)
    return strategy.plan(blank_images(n), ctx_for(grid, seed, method=method)).mask


def mae_random_masking(noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """Independent re-statement of facebookresearch/mae ``random_masking`` (returns mask, 1 = removed)."""
    n, length = noise.shape
    len_keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore).bool()


def is_filled_rectangle(m2d: torch.Tensor) -> tuple[bool, int, int]:
    rows = torch.nonzero(m2d.any(dim=1)).flatten()
    cols = torch.nonzero(m2d.any(dim=0)).flatten()
    if len(rows) == 0:
        return False, 0, 0
    h = int(rows[-1] - rows[0] + 1)
    w = int(cols[-1] - cols[0] + 1)
    box = m2d[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return bool(box.all()) and int(m2d.sum()) == h * w, h, w


class ConstantContext(PlanContext):
    """Every random draw is the same constant: any strategy re-proposes the same rectangle forever."""

    def __init__(self, grid, value, method="simmim"):
        super().__init__(None, grid, torch.Generator(), method=method)
        self.value = value

    def rand(self, *shape):
        return torch.full(shape, float(self.value))


# ------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "length,ratio,hidden",
    [(196, 0.75, 147), (196, 0.6, 118), (196, 0.9, 177), (49, 0.75, 37), (49, 0.6, 30), (49, 0.5, 25), (16, 0.9, 15)],
)
def test_num_hidden_is_maes_truncation_rule(length, ratio, hidden):
    assert num_hidden(length, ratio) == hidden  # docs/strategies.md §1.2: K = int(L(1-r)) visible


@pytest.mark.parametrize("length", sorted(GRIDS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_masks_are_exactly_maes(length, ratio):
    n, seed = 32, 1234
    mask = plan("random", ratio, GRIDS[length], n=n, seed=seed)
    assert mask.dtype == torch.bool and mask.shape == (n, length)
    expected_hidden = length - int(length * (1 - ratio))
    assert (mask.sum(dim=1) == expected_hidden).all()
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(seed))  # same generator state
    assert torch.equal(mask, mae_random_masking(noise, ratio))


def test_random_hides_every_position_equally_often():
    mask = plan("random", 0.75, (7, 7), n=4000, seed=3)
    freq = mask.float().mean(dim=0)
    assert (freq - 37 / 49).abs().max() < 0.04  # binomial sd ~0.007 at n=4000
    assert len({tuple(r.tolist()) for r in mask[:200]}) == 200  # per-sample masks differ


# --------------------------------------------------------------------------------------- block


@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75, 0.9])
def test_block_never_exceeds_target_without_top_up(grid, ratio):
    target = num_hidden(grid[0] * grid[1], ratio)
    mask = plan("block", ratio, grid, n=256, seed=5, method="simmim")
    counts = mask.sum(dim=1)
    assert counts.max() <= target
    assert counts.float().mean() >= 0.85 * target  # the generator does fill most of its budget


def test_block_simmim_does_not_top_up_and_falls_short_sometimes():
    target = num_hidden(49, 0.75)
    counts = plan("block", 0.75, (7, 7), n=512, seed=6, method="simmim").sum(dim=1)
    assert (counts < target).any()  # BEiT's generator gives up; simmim (top_up auto) keeps that
    assert (counts <= target).all()


@pytest.mark.parametrize(
    "grid,ratio", [((7, 7), 0.75), ((7, 7), 0.6), ((14, 14), 0.75), ((14, 14), 0.9), ((8, 8), 0.5)]
)
def test_block_mae_tops_up_to_exactly_the_target(grid, ratio):
    target = num_hidden(grid[0] * grid[1], ratio)
    mask = plan("block", ratio, grid, n=256, seed=7, method="mae")
    assert (mask.sum(dim=1) == target).all()


def test_block_top_up_only_adds_to_beits_mask():
    raw = plan("block", 0.75, (7, 7), n=512, seed=8, method="mae", top_up=False)
    topped = plan("block", 0.75, (7, 7), n=512, seed=8, method="mae", top_up=True)
    target = num_hidden(49, 0.75)
    assert (raw.sum(dim=1) < target).any()  # top_up=False turns it off even for mae
    assert (topped.sum(dim=1) == target).all()
    assert (raw & ~topped).sum() == 0  # every block cell stays hidden
    full = raw.sum(dim=1) == target
    assert torch.equal(raw[full], topped[full])  # rows already at target are untouched
    forced = plan("block", 0.75, (7, 7), n=256, seed=8, method="simmim", top_up=True)
    assert (forced.sum(dim=1) == target).all()


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
def test_block_single_block_is_a_rectangle_smaller_than_the_grid(value, grid):
    # constant random draws + a budget that stays the same -> the same proposal every time, so at
    # most one block is placed (later proposals add nothing and are rejected)
    strategy = build_strategy("block", 0.75, "simmim", {"min_block": 6, "max_block": 12})
    mask = strategy.plan(blank_images(3), ConstantContext(grid, value)).mask
    gh, gw = grid
    for row in mask:
        rect, h, w = is_filled_rectangle(row.view(gh, gw))
        assert rect, row.view(gh, gw)
        assert 0 < h < gh and 0 < w < gw
        assert h * w <= 12


def test_block_never_spans_the_full_width_or_height():
    # all draws 0: area = 15 at the extreme aspect 0.3 -> a 2x7 (or 7x2) rectangle. On a 7x7 grid it
    # touches a full side, which BEiT's strict test (h < H and w < W) rejects; on 8x8 it is placed.
    params = {"min_block": 15, "max_block": 15}
    on7 = build_strategy("block", 0.75, "simmim", params).plan(blank_images(2), ConstantContext((7, 7), 0.0)).mask
    assert on7.sum() == 0
    on8 = build_strategy("block", 0.75, "simmim", params).plan(blank_images(2), ConstantContext((8, 8), 0.0)).mask
    rect, h, w = is_filled_rectangle(on8[0].view(8, 8))
    assert rect and sorted((h, w)) == [2, 7]


def test_block_masks_are_blocky():
    # with BEiT's min_block (16 on 14x14) most hidden tokens have a hidden 4-neighbour (random masks at the
    # same ratio have far fewer such tokens) and single-rectangle masks respect h < H, w < W
    blocks = plan("block", 0.4, (14, 14), n=256, seed=9, method="simmim").view(-1, 14, 14)
    rand = plan("random", 0.4, (14, 14), n=256, seed=9).view(-1, 14, 14)

    def neighbour_share(m):
        p = torch.nn.functional.pad(m.float(), (1, 1, 1, 1))
        nb = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]) > 0
        return (nb & m).sum().item() / m.sum().item()

    assert neighbour_share(blocks) > 0.95
    assert neighbour_share(blocks) > neighbour_share(rand) + 0.05


# ------------------------------------------------------------------------------- coarse random


@pytest.mark.parametrize("ratio,hidden", [(0.6, 120), (0.75, 148)])
def test_coarse_random_simmim_counts_and_cells(ratio, hidden):
    cells = math.ceil(49 * ratio)  # SimMIM's ceil rule
    assert cells * 4 == hidden
    mask = plan("coarse_random", ratio, (14, 14), n=128, seed=10, method="simmim", cell=2)
    assert (mask.sum(dim=1) == hidden).all()
    blocks = mask.view(-1, 7, 2, 7, 2)
    per_cell = blocks.sum(dim=(2, 4))
    assert ((per_cell == 0) | (per_cell == 4)).all()  # a union of aligned 2x2 cells
    assert ((per_cell == 4).sum(dim=(1, 2)) == cells).all()


def test_coarse_random_mae_has_maes_exact_count():
    for ratio in (0.6, 0.75):
        mask = plan("coarse_random", ratio, (14, 14), n=64, seed=11, method="mae")
        assert (mask.sum(dim=1) == num_hidden(196, ratio)).all()


def test_coarse_random_cells_on_a_grid_not_multiple_of_the_cell():
    mask = plan("coarse_random", 0.6, (7, 7), n=128, seed=12, method="simmim").view(-1, 7, 7)
    padded = torch.zeros(mask.shape[0], 8, 8, dtype=torch.bool)
    padded[:, :7, :7] = mask
    cells = padded.view(-1, 4, 2, 4, 2).any(dim=4).any(dim=2)
    recon = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :7, :7]
    assert torch.equal(recon, mask)  # cropped cells, all-or-nothing
    assert (cells.sum(dim=(1, 2)) == math.ceil(16 * 0.6)).all()


# ------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "name,method",
    [("random", "mae"), ("block", "mae"), ("block", "simmim"), ("coarse_random", "simmim"), ("coarse_random", "mae")],
)
def test_same_seed_same_masks_different_seed_different(name, method):
    a = plan(name, 0.75, (7, 7), n=32, seed=21, method=method)
    b = plan(name, 0.75, (7, 7), n=32, seed=21, method=method)
    c = plan(name, 0.75, (7, 7), n=32, seed=22, method=method)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------ errors


def test_registry_lists_the_builtins():
    names = set(available())
    assert {"random", "block", "coarse_random"} <= names
    assert get_strategy_class("random").name == "random"


def test_unknown_strategy_names_the_accepted_ones():
    with pytest.raises(BenchError) as err:
        build_strategy("randm", 0.75)
    msg = str(err.value)
    assert "randm" in msg and "random" in msg and "block" in msg and "coarse_random" in msg
    assert "\n" not in msg


def test_unknown_parameter_names_the_accepted_ones():
    with pytest.raises(BenchError) as err:
        build_strategy("block", 0.75, "mae", {"cell": 2})
    msg = str(err.value)
    assert "'cell'" in msg
    for accepted in ("min_block", "max_block", "aspect_min", "attempts", "top_up"):
        assert accepted in msg
    with pytest.raises(BenchError, match="accepted are none"):
        build_strategy("random", 0.75, "mae", {"seed": 1})


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
@pytest.mark.parametrize("name", ["random", "block", "coarse_random"])
def test_ratio_out_of_range(name, ratio):
    with pytest.raises(BenchError, match=r"\[0, 1\)"):
        build_strategy(name, ratio)


def test_unknown_method_names_the_accepted_ones():
    with pytest.raises(BenchError, match="accepted are mae, simmim"):
        build_strategy("random", 0.75, "beit")


def test_ratio_zero_hides_nothing():
    assert plan("random", 0.0, (7, 7), n=4).sum() == 0
    assert plan("block", 0.0, (7, 7), n=4, method="mae").sum() == 0


# ---------------------------------------------------------------------------- hide_lowest_first


def test_hide_lowest_first_ragged_counts():
    gen = torch.Generator().manual_seed(30)
    scores = torch.rand(5, 49, generator=gen)
    hidden = torch.tensor([0, 3, 49, 10, 37])
    mask = hide_lowest_first(scores, hidden)
    assert torch.equal(mask.sum(dim=1), hidden)
    for row, k in zip(range(5), hidden.tolist(), strict=True):
        expected = torch.zeros(49, dtype=torch.bool)
        expected[torch.topk(scores[row], k).indices] = True  # the k highest scores are hidden
        assert torch.equal(mask[row], expected)


def test_hide_lowest_first_int_equals_constant_tensor_and_handles_ties():
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(31))
    assert torch.equal(hide_lowest_first(scores, 5), hide_lowest_first(scores, torch.full((4,), 5)))
    ties = torch.zeros(3, 16)  # all equal scores: counts must still be exact
    assert (hide_lowest_first(ties, torch.tensor([1, 8, 15])).sum(dim=1) == torch.tensor([1, 8, 15])).all()


def test_realised_ratio():
    mask = hide_lowest_first(torch.rand(3, 49), torch.tensor([10, 20, 37]))
    assert torch.allclose(MaskPlan(mask=mask).realised_ratio(), torch.tensor([10, 20, 37]) / 49)


# ------------------------------------------------------------------------ parameter validation


def rejected(name, params, method="mae", ratio=0.75) -> str:
    """The one-line error of building ``name`` with ``params`` (it must raise)."""
    with pytest.raises(BenchError) as err:
        build_strategy(name, ratio, method, params)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{name}'" in msg, msg  # names the strategy
    return msg


@pytest.mark.parametrize(
    "params,fragments",
    [
        ({"min_block": -4}, ("min_block", "-4", ">= 1")),
        ({"min_block": 0}, ("min_block", "0", ">= 1")),
        ({"min_block": 2.5}, ("min_block", "2.5", "integer")),
        ({"min_block": "abc"}, ("min_block", "'abc'", "integer")),
        ({"min_block": True}, ("min_block", "True", "integer")),
        ({"max_block": 0}, ("max_block", "0", ">= 1")),
        ({"max_block": False}, ("max_block", "False", "integer")),
        ({"min_block": 8, "max_block": 4}, ("min_block", "8", "max_block", "4")),
        ({"aspect_min": 0}, ("aspect_min", "0", "(0, 1]")),
        ({"aspect_min": 1.5}, ("aspect_min", "1.5", "(0, 1]")),
        ({"aspect_min": -0.3}, ("aspect_min", "-0.3", "(0, 1]")),
        ({"aspect_min": float("nan")}, ("aspect_min", "nan", "(0, 1]")),
        ({"aspect_min": True}, ("aspect_min", "True", "number")),
        ({"aspect_min": "0.3"}, ("aspect_min", "'0.3'", "number")),
        ({"attempts": 0}, ("attempts", "0", ">= 1")),
        ({"attempts": 2.5}, ("attempts", "2.5", "integer")),
        ({"attempts": True}, ("attempts", "True", "integer")),
        ({"top_up": "yes"}, ("top_up", "'yes'", "auto")),
        ({"top_up": 1}, ("top_up", "1", "auto")),
        ({"top_up": None}, ("top_up", "None", "auto")),
    ],
)
def test_block_rejects_invalid_parameters(params, fragments):
    msg = rejected("block", params)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(
    "params,fragments",
    [
        ({"cell": 0}, ("cell", "0", ">= 1")),
        ({"cell": -2}, ("cell", "-2", ">= 1")),
        ({"cell": 2.0}, ("cell", "2.0", "integer")),
        ({"cell": True}, ("cell", "True", "integer")),
        ({"cell": "2"}, ("cell", "'2'", "integer")),
        ({"exact_count": "no"}, ("exact_count", "'no'", "auto")),
        ({"exact_count": 0}, ("exact_count", "0", "auto")),
    ],
)
def test_coarse_random_rejects_invalid_parameters(params, fragments):
    msg = rejected("coarse_random", params, method="simmim")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(
    "name,params",
    [
        ("block", {"min_block": 1}),
        ("block", {"min_block": 4, "max_block": 4}),
        ("block", {"max_block": 12}),
        ("block", {"aspect_min": 1}),
        ("block", {"aspect_min": 1.0}),
        ("block", {"attempts": 1}),
        ("block", {"top_up": True}),
        ("block", {"top_up": False}),
        ("block", {"min_block": None, "max_block": None}),
        ("coarse_random", {"cell": 1}),
        ("coarse_random", {"cell": 3}),
        ("coarse_random", {"exact_count": True}),
        ("coarse_random", {"exact_count": False}),
    ],
)
def test_valid_parameters_are_accepted_and_kept_as_given(name, params):
    strategy = build_strategy(name, 0.75, "simmim", params)
    for key, value in params.items():
        assert getattr(strategy, key) == value and type(getattr(strategy, key)) is type(value)


def test_every_builtin_accepts_its_defaults_and_rejects_wrong_types():
    """Generic sweep over every built-in strategy's parameters: the defaults build; a text value
    ('abc') and, for numeric parameters, a boolean are each rejected with a one-line error naming
    the strategy, the parameter and the value."""
    checked = 0
    for name, cls in available().items():
        if not cls.__module__.startswith("masking_bench.strategies"):
            continue  # plugins registered by other tests
        for method in cls.methods:
            build_strategy(name, 0.75, method, dict(cls.defaults))
        method = cls.methods[0]
        for key, default in cls.defaults.items():
            bad = ["abc"]
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                bad += [True, False]
            if isinstance(default, bool):
                bad += [1, 0, "true"]
            for value in bad:
                msg = rejected(name, {key: value}, method=method)
                assert key in msg and repr(value) in msg, msg
                checked += 1
    assert checked >= 40


# ---------------------------------------------------------------- block: BEiT's default bounds


class ColumnContext(PlanContext):
    """Every draw of BEiT's loop is the same row ``(area, aspect, top, left)`` of uniforms, so each
    proposal is the same rectangle; counts the draws."""

    def __init__(self, grid, columns, method="simmim"):
        super().__init__(None, grid, torch.Generator(), method=method)
        self.columns = torch.tensor(columns, dtype=torch.float32)
        self.calls = 0

    def rand(self, *shape):
        self.calls += 1
        return self.columns.expand(*shape).clone()


def test_block_bounds_follow_beits_rule_scaled_to_the_grid():
    from masking_bench.strategies.block_masking import block_bounds

    # BEiT (unilm/beit/masking_generator.py): min_num_patches=16 on 14x14, max = the target count
    assert block_bounds((14, 14), 118) == (16, 118)
    assert block_bounds((7, 7), 37) == (4, 37)  # round(16 * 49 / 196)
    assert block_bounds((8, 8), 48) == (5, 48)  # round(16 * 64 / 196) = round(5.22)
    assert block_bounds((2, 2), 3) == (1, 3)  # never below 1
    assert block_bounds((7, 7), 37, min_block=6, max_block=12) == (6, 12)


@pytest.mark.parametrize("grid,side", [((7, 7), 2), ((14, 14), 4)])
def test_block_smallest_rectangle_has_the_default_min_area(grid, side):
    # area draw 0 -> area = min_block; aspect draw 0.5 -> aspect 1: a side x side square with
    # side = sqrt(min_block) = 2 on 7x7 (min 4), 4 on 14x14 (min 16). Doubling min_block gives 3x3 / 6x6.
    strategy = build_strategy("block", 0.75, "simmim")
    mask = strategy.plan(blank_images(2), ColumnContext(grid, [0.0, 0.5, 0.0, 0.0])).mask
    for row in mask:
        rect, h, w = is_filled_rectangle(row.view(grid))
        assert rect and (h, w) == (side, side), row.view(grid)


@pytest.mark.parametrize("grid,shape", [((7, 7), (1, 4)), ((14, 14), (2, 7))])
def test_block_aspect_lower_bound_is_beits_0_3(grid, shape):
    # area = min_block, aspect = 0.3: h = round(sqrt(A*0.3)), w = round(sqrt(A/0.3))
    mask = build_strategy("block", 0.75, "simmim").plan(blank_images(1), ColumnContext(grid, [0.0, 0.0, 0.0, 0.0])).mask
    rect, h, w = is_filled_rectangle(mask[0].view(grid))
    assert rect and (h, w) == shape


def test_block_largest_rectangle_is_the_target_count():
    # area draw -> 1: area = max_block = target = 25 at r = 0.5 on 7x7, aspect 1 -> one 5x5 square
    ctx = ColumnContext((7, 7), [0.9999999, 0.5, 0.0, 0.0])
    mask = build_strategy("block", 0.5, "simmim").plan(blank_images(1), ctx).mask
    rect, h, w = is_filled_rectangle(mask[0].view(7, 7))
    assert rect and (h, w) == (5, 5) and num_hidden(49, 0.5) == 25


def test_block_gives_up_after_the_default_ten_attempts():
    # the first proposal is placed, every later one adds nothing: 1 + 10 draws, then the row stops
    ctx = ColumnContext((7, 7), [0.0, 0.5, 0.0, 0.0])
    build_strategy("block", 0.75, "simmim").plan(blank_images(3), ctx)
    assert ctx.calls == 1 + 10
    ctx = ColumnContext((7, 7), [0.0, 0.5, 0.0, 0.0])
    build_strategy("block", 0.75, "simmim", {"attempts": 3}).plan(blank_images(3), ctx)
    assert ctx.calls == 1 + 3


# ------------------------------------------------------------------------------ plan contract


def test_plan_check_accepts_a_valid_plan_and_names_each_broken_rule():
    from masking_bench.errors import StrategyError

    strategy = build_strategy("random", 0.75)
    good = hide_lowest_first(torch.rand(4, 49, generator=torch.Generator().manual_seed(2)), 37)
    MaskPlan(mask=good).check(strategy, 4, 49)
    edge = good.clone()
    edge[0] = False
    edge[0, :1] = True  # one hidden token is enough
    edge[1] = True
    edge[1, 0] = False  # one visible token is enough
    MaskPlan(mask=edge).check(build_strategy("sbam_amr", 0.75), 4, 49)  # adaptive: no ratio rule
    cases = [
        (good.float(), "torch.bool"),
        (good[:, :48], "shape"),
        (good[:3], "shape"),
        (torch.cat([torch.zeros(1, 49, dtype=torch.bool), good[1:]]), "hides no token"),
        (torch.cat([torch.ones(1, 49, dtype=torch.bool), good[1:]]), "hides every token"),
        (hide_lowest_first(torch.rand(4, 49), 20), "from the requested ratio"),
    ]
    for mask, rule in cases:
        with pytest.raises(StrategyError) as err:
            MaskPlan(mask=mask).check(strategy, 4, 49)
        msg = str(err.value)
        assert rule in msg and "strategy 'random'" in msg and "\n" not in msg, msg
    # the ratio tolerance: 0.1 either side of the requested ratio passes, beyond it fails
    MaskPlan(mask=hide_lowest_first(torch.rand(4, 49), 32)).check(strategy, 4, 49)  # 0.653
    with pytest.raises(StrategyError):
        MaskPlan(mask=hide_lowest_first(torch.rand(4, 49), 31)).check(strategy, 4, 49)  # 0.633
