"""Block-wise masking: BEiT's rectangle generator and SimMIM's coarse cells (docs/strategies.md §3, §4)."""

from __future__ import annotations

import math
from typing import Any

import torch

from masking_bench.masking import (
    MaskingStrategy,
    MaskPlan,
    PlanContext,
    hide_lowest_first,
    is_int,
    is_number,
    num_hidden,
    param_error,
    register,
)


def _check_switch(strategy: str, key: str, value: Any) -> None:
    """``auto``, true or false (a number or other text is refused, not read as truthy)."""
    if not (isinstance(value, bool) or value == "auto" and isinstance(value, str)):
        raise param_error(strategy, key, value, "expected auto, true or false")


def block_bounds(
    grid: tuple[int, int], target: int, min_block: int | None = None, max_block: int | None = None
) -> tuple[int, int]:
    """The (smallest, largest) rectangle area BEiT's generator draws from on ``grid`` for a ``target``
    hidden count: ``min_block`` defaults to BEiT's 16 patches of a 14x14 grid scaled to this grid,
    ``max(1, round(16·L/196))`` (4 on 7x7), ``max_block`` to the target (``unilm/beit/masking_generator.py``:
    ``min_num_patches=16``, ``max_num_patches=num_masking_patches``)."""
    gh, gw = grid
    return min_block or max(1, round(16 * gh * gw / 196)), max_block or target


def top_up_or_trim(mask: torch.Tensor, target: int, ctx: PlanContext) -> torch.Tensor:
    """Make every row hide exactly ``target`` tokens: hide extra random visible tokens where a row is
    short (BEiT top-up, [INTERP], docs/strategies.md §3.3) and reveal random hidden ones where it is
    over (coarse cells, §4.3)."""
    noise = ctx.rand(*mask.shape)
    # hidden tokens score in [1, 2), visible in [0, 1): the ``target`` highest stay/become hidden
    return hide_lowest_first(noise + mask.float(), target)


@register
class BlockMasking(MaskingStrategy):
    """BEiT block-wise masking (Bao et al. 2021, §2.3; ``unilm/beit/masking_generator.py`` [CODE]).

    Rectangles of area ~ U(min_block, budget) and log-uniform aspect in [aspect_min, 1/aspect_min]
    are added while the hidden count stays <= the target ``L - int(L·(1−r))``; a placement gives up
    after ``attempts`` consecutive rejected rectangles, so a mask may fall short, never over.
    ``min_block`` defaults to BEiT's 16 patches of a 14x14 grid scaled to this grid (4 for 7x7).
    The loop runs for the whole batch at once (one lockstep attempt per sample per iteration); the
    per-sample distribution is the reference one, the random stream is not.

    ``top_up`` (``auto`` = on for ``mae``, off for ``simmim``): add uniformly random hidden tokens
    until the count equals the target, so every sample hides MAE's count [INTERP].
    Reference, batching and deviations: docs/strategies.md §3.
    """

    name = "block"
    summary = "BEiT rectangles of tokens, never above the target count (top-up to it for mae)"
    source = "BEiT (arXiv 2106.08254) §2.3; docs/strategies.md §3"
    defaults = {"min_block": None, "max_block": None, "aspect_min": 0.3, "attempts": 10, "top_up": "auto"}

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        super().__init__(ratio, method=method, **params)
        for key in ("min_block", "max_block"):
            value = getattr(self, key)
            if value is not None and not (is_int(value) and value >= 1):
                raise param_error(self.name, key, value, "expected null (the default) or an integer >= 1")
        if self.min_block is not None and self.max_block is not None and self.min_block > self.max_block:
            raise param_error(
                self.name, "min_block", self.min_block, f"expected min_block <= max_block={self.max_block}"
            )
        if not is_number(self.aspect_min):
            raise param_error(self.name, "aspect_min", self.aspect_min, "expected a number in (0, 1]")
        if not 0 < self.aspect_min <= 1:
            raise param_error(self.name, "aspect_min", self.aspect_min, "expected a number in (0, 1]")
        if not (is_int(self.attempts) and self.attempts >= 1):
            raise param_error(self.name, "attempts", self.attempts, "expected an integer >= 1")
        _check_switch(self.name, "top_up", self.top_up)

    def plan(self, images, ctx: PlanContext) -> MaskPlan:
        n = images.shape[0]
        gh, gw = ctx.grid
        target = num_hidden(ctx.num_tokens, self.ratio)
        mask = self.beit_masks(n, gh, gw, target, ctx)
        top_up = self.top_up if self.top_up != "auto" else self.method == "mae"
        flat = mask.view(n, -1)
        if top_up:
            short = flat.sum(dim=1) < target
            flat = torch.where(short[:, None], top_up_or_trim(flat, target, ctx), flat)
        return MaskPlan(mask=flat)

    def beit_masks(self, n: int, gh: int, gw: int, target: int, ctx: PlanContext) -> torch.Tensor:
        dev = ctx.device
        min_block, max_block = block_bounds((gh, gw), target, self.min_block, self.max_block)
        mask = torch.zeros(n, gh, gw, dtype=torch.bool, device=dev)
        count = torch.zeros(n, dtype=torch.long, device=dev)
        fails = torch.zeros(n, dtype=torch.long, device=dev)
        active = torch.full((n,), target > 0, dtype=torch.bool, device=dev)
        rows = torch.arange(gh, device=dev).view(1, gh, 1)
        cols = torch.arange(gw, device=dev).view(1, 1, gw)
        log_lo, log_hi = math.log(self.aspect_min), math.log(1 / self.aspect_min)
        while bool(active.any()):
            budget = (target - count).clamp(max=max_block).float()
            u = ctx.rand(n, 4)
            lo = budget.clamp(max=min_block)
            hi = budget.clamp(min=min_block)
            area = lo + (hi - lo) * u[:, 0]
            aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
            h = torch.sqrt(area * aspect).round().long()
            w = torch.sqrt(area / aspect).round().long()
            fits = (h < gh) & (w < gw)  # strict, as in the reference: never the full width/height
            top = (u[:, 2] * (gh - h + 1).clamp(min=1)).floor().long().view(-1, 1, 1)
            left = (u[:, 3] * (gw - w + 1).clamp(min=1)).floor().long().view(-1, 1, 1)
            rect = (rows >= top) & (rows < top + h.view(-1, 1, 1)) & (cols >= left) & (cols < left + w.view(-1, 1, 1))
            new = (rect & ~mask).sum(dim=(1, 2))
            ok = active & fits & (new > 0) & (new <= budget.long())
            mask |= rect & ok.view(-1, 1, 1)
            count += new * ok
            fails = torch.where(ok, torch.zeros_like(fails), fails + active.long())
            active &= (fails < self.attempts) & (count < target)
        return mask


@register
class CoarseRandomMasking(MaskingStrategy):
    """SimMIM random masking of coarse cells (Xie et al. 2021, §3.1; ``SimMIM/data/data_simmim.py`` [CODE]).

    The grid is split into ``cell``x``cell``-token cells (SimMIM: 32-px cells of 16-px patches ->
    2x2); ``ceil(cells·r)`` cells (ceil, as SimMIM) are hidden uniformly at random and up-sampled to
    tokens. When the grid is not a multiple of ``cell`` (7x7 with 2x2 cells) the cells overhang the
    last row/column and are cropped, so the realised count varies; ``exact_count`` (``auto`` = on
    for ``mae``, on any grid) then hides/reveals random tokens to reach ``L - int(L·(1−r))`` [INTERP].
    Reference and deviations: docs/strategies.md §4.
    """

    name = "coarse_random"
    summary = "SimMIM: random 2x2-token cells, ceil(cells*r) of them"
    source = "SimMIM (arXiv 2111.09886) §3.1; docs/strategies.md §4"
    defaults = {"cell": 2, "exact_count": "auto"}

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        super().__init__(ratio, method=method, **params)
        if not (is_int(self.cell) and self.cell >= 1):
            raise param_error(self.name, "cell", self.cell, "expected an integer >= 1 (cell side in tokens)")
        _check_switch(self.name, "exact_count", self.exact_count)

    def plan(self, images, ctx: PlanContext) -> MaskPlan:
        n = images.shape[0]
        gh, gw = ctx.grid
        ch, cw = math.ceil(gh / self.cell), math.ceil(gw / self.cell)
        cells = hide_lowest_first(ctx.rand(n, ch * cw), math.ceil(ch * cw * self.ratio))
        grid = cells.view(n, ch, cw).repeat_interleave(self.cell, 1).repeat_interleave(self.cell, 2)
        mask = grid[:, :gh, :gw].reshape(n, -1)
        exact = self.exact_count if self.exact_count != "auto" else self.method == "mae"
        if exact:
            mask = top_up_or_trim(mask, num_hidden(ctx.num_tokens, self.ratio), ctx)
        return MaskPlan(mask=mask)
