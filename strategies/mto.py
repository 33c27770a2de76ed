"""MTO — Masked Token Optimization, our interpretation ("MTO-interp").

Choi et al., "Emerging Property of Masked Token for Effective Pre-training", arXiv 2404.08330 /
ECCV 2024. Neither the paper's method section nor its code could be read, so this module is OUR
INTERPRETATION [INTERP] of the outline that could be read; runs must be labelled "MTO-interp"
(``interpretation = True``). Sources, formulas and every choice: docs/strategies.md §7.
"""

from __future__ import annotations

import math

import torch

from masking_bench.errors import BenchError
from masking_bench.masking import (
    MaskingStrategy,
    MaskPlan,
    PlanContext,
    hide_lowest_first,
    is_number,
    num_hidden,
    param_error,
    register,
)

DEPTH_SCHEDULES = ("first_half", "linear")


def depth_weights(n_layers: int, schedule: str) -> list[float]:
    """Per-block weights ``w_l`` of the ``n_layers`` mask-token blocks ([INTERP], docs/strategies.md §7.5)."""
    if schedule == "first_half":
        cut = math.ceil(n_layers / 2)
        return [1.0 if i < cut else 0.0 for i in range(n_layers)]
    if schedule == "linear":
        return [1.0 - i / n_layers for i in range(n_layers)]
    raise BenchError(f"mto: unknown depth_schedule '{schedule}': accepted are {', '.join(DEPTH_SCHEDULES)}")


def mask_token_blocks(model, method: str) -> int:
    """How many blocks hold mask tokens: the decoder for ``mae``, the encoder for ``simmim``."""
    return len(model.decoder_blocks) if method == "mae" else len(model.blocks)


def _xlogx(a: torch.Tensor) -> torch.Tensor:
    """``a·log a`` with ``0·log 0 = 0`` and a finite gradient everywhere (a >= 0)."""
    return a * torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))


def mto_terms(P: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, include_cls: bool = True):
    """The three MTO-interp terms of one block -> (L_spa, L_e, L_r), float32 scalars.

    P, A: (N, heads, 1+L, 1+L) probabilities, token 0 = cls; P from the un-recalibrated logits,
    A the recalibrated ones used in the forward pass. mask: (N, L) bool, True = hidden.
    ``include_cls``: cls is one of L_spa's visible queries. L_spa = visible→hidden mass of P, L_e =
    row entropy of A over hidden queries (``0·log 0 = 0``), L_r = hidden→hidden mass of A; each a
    mean pooled over samples, heads and queries (docs/strategies.md §7.4).
    """
    P, A = P.float(), A.float()
    n, heads = P.shape[:2]
    hidden = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)  # (N, T)
    vis_q = ~hidden
    if not include_cls:
        vis_q = vis_q.clone()
        vis_q[:, 0] = False
    hk = hidden[:, None, None, :].to(P.dtype)  # hidden keys
    vq = vis_q[:, None, :].to(P.dtype)  # (N, 1, T) query selectors
    hq = hidden[:, None, :].to(P.dtype)

    def pooled(per_query: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:  # (N, h, T), (N, 1, T)
        return (per_query * sel).sum() / (sel.sum() * heads).clamp(min=1.0)

    spa = pooled((P * hk).sum(dim=-1), vq)
    ent = pooled(-_xlogx(A).sum(dim=-1), hq)
    rec = pooled((A * hk).sum(dim=-1), hq)
    return spa, ent, rec


@register
class MaskedTokenOptimization(MaskingStrategy):
    """MTO-interp [INTERP]: MAE random masking + mask-token isolation + depth-weighted L_spa / L_e / L_r.

    Wholly our interpretation (docs/strategies.md §7): the masks are exactly ``random``'s (same rule
    and draw); ``losses`` returns ``recon`` (the method's unchanged loss) and the three WEIGHTED terms
    ``mto_spa = λ_spa Σ_l w_l L_spa^l``, ``mto_e``, ``mto_r`` in float32, so the trainer's sum is the
    total loss. Parameters:

    recalibrate: visible queries (incl. cls) never attend to mask-token keys, in the blocks holding
        mask tokens (decoder for mae, encoder for simmim); False is an ablation (§7.3).
    depth_schedule: ``first_half`` (w=1 on the first ceil(n/2) mask-token blocks) or ``linear``
        (w_l = 1 − l/n) (§7.5).
    lambda_spa, lambda_e, lambda_r: loss weights, 0.1 each (§7.5).
    spa_include_cls: cls is a visible query of L_spa (default True, as the recalibration treats cls
        as visible).
    """

    name = "mto"
    summary = "MAE random masking; visible tokens never attend to mask tokens, plus 3 attention losses"
    interpretation = True
    needs = frozenset({"attention"})
    source = (
        "MTO-interp: Choi et al., arXiv 2404.08330 (ECCV 2024), method unreadable; "
        "docs/strategies.md §7.3 recalibration, §7.4-7.5 losses [INTERP]"
    )
    defaults = {
        "recalibrate": True,
        "depth_schedule": "first_half",
        "lambda_spa": 0.1,
        "lambda_e": 0.1,
        "lambda_r": 0.1,
        "spa_include_cls": True,
    }

    def __init__(self, ratio: float, method: str = "mae", **params):
        super().__init__(ratio, method, **params)
        if not (isinstance(self.depth_schedule, str) and self.depth_schedule in DEPTH_SCHEDULES):
            raise param_error(
                self.name, "depth_schedule", self.depth_schedule, f"expected one of {', '.join(DEPTH_SCHEDULES)}"
            )
        for key in ("lambda_spa", "lambda_e", "lambda_r"):
            value = getattr(self, key)
            if not (is_number(value) and value >= 0):
                raise param_error(self.name, key, value, "expected a finite number >= 0 (loss weight)")
        for key in ("recalibrate", "spa_include_cls"):
            if not isinstance(getattr(self, key), bool):
                raise param_error(self.name, key, getattr(self, key), "expected true or false")

    @property
    def active(self) -> bool:
        return any(float(getattr(self, k)) > 0 for k in ("lambda_spa", "lambda_e", "lambda_r"))

    def weights(self, model) -> list[float]:
        return depth_weights(mask_token_blocks(model, self.method), self.depth_schedule)

    def plan(self, images, ctx: PlanContext) -> MaskPlan:
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        mask = hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio))
        record = ()
        if self.active and ctx.model is not None:
            record = tuple(i for i, w in enumerate(self.weights(ctx.model)) if w > 0)
        return MaskPlan(mask=mask, isolate_mask_tokens=bool(self.recalibrate), record_attention=record)

    def losses(self, model, out, plan: MaskPlan, view: torch.Tensor) -> dict[str, torch.Tensor]:
        target = plan.target if plan.target is not None else view
        recon = model.reconstruction_loss(out.pred, target, plan.mask)
        zero = recon.new_zeros((), dtype=torch.float32)
        spa = ent = rec = zero
        weights = self.weights(model)
        for layer in plan.record_attention:
            w = weights[layer]
            if w == 0:
                continue
            if layer not in out.attention or layer not in out.attention_logits:
                raise BenchError(f"mto: the model did not return the attention of block {layer}")
            P = out.attention_logits[layer].float().softmax(dim=-1)  # un-recalibrated
            s, e, r = mto_terms(P, out.attention[layer], plan.mask, bool(self.spa_include_cls))
            spa, ent, rec = spa + w * s, ent + w * e, rec + w * r
        return {
            "recon": recon,
            "mto_spa": float(self.lambda_spa) * spa,
            "mto_e": float(self.lambda_e) * ent,
            "mto_r": float(self.lambda_r) * rec,
        }
