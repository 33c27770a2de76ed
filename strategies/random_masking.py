"""Random masking, exactly as MAE (He et al. 2021, §3 "Masking"); see docs/strategies.md §2."""

from __future__ import annotations

from masking_bench.masking import MaskingStrategy, MaskPlan, PlanContext, hide_lowest_first, num_hidden, register


@register
class RandomMasking(MaskingStrategy):
    """MAE random masking: per sample, keep the ``int(L·(1−r))`` tokens with the lowest uniform noise.

    Reference: ``facebookresearch/mae`` ``models_mae.py::random_masking`` [CODE]. The count is the
    same for every sample (L=49, r=0.75 -> 12 visible, 37 hidden), chosen uniformly over all subsets.
    Reference and provenance: docs/strategies.md §2 (tags defined in §0.1).
    """

    name = "random"
    summary = "MAE: a uniformly random subset of tokens, the same count per image"
    source = "MAE (arXiv 2111.06377) §3; docs/strategies.md §2"

    def plan(self, images, ctx: PlanContext) -> MaskPlan:
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        return MaskPlan(mask=hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio)))
