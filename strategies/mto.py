"""MTO — Masked Token Optimization, our reading ("MTO-interp") (spec §3).

Choi, Lee, Joung, Park, Kim, Min, "Emerging Property of Masked Token for Effective Pre-training",
arXiv 2404.08330 / ECCV 2024. **The paper's method section and its code (``doihye/MTO``) were not
readable** when the spec was written (spec §0.1, §3): this module is OUR INTERPRETATION of the
sourced outline and must be labelled **MTO-interp** in any benchmark output (``interpretation = True``).

Provenance of each piece (tags as in spec §0.1):

* [DOC abstract, spec §3.1] MTO does not change the masking: MAE random masking is kept, here with
  exactly the rule of ``strategies/random_masking.py`` (``hide_lowest_first(rand(N, L), num_hidden)``,
  same random stream, same masks for the same generator state).
* [DOC author page, spec §3.2, high confidence] "weight recalibration": visible queries (and cls)
  never aggregate mask-token keys, in every block where mask tokens exist (encoder blocks for
  ``simmim``, decoder blocks for ``mae``). Realised by the model through
  ``MaskPlan.isolate_mask_tokens``; ``recalibrate=False`` turns it off (ablation).
* [SNIPPET names only, formulas INTERP, spec §3.3] three auxiliary losses on the attention of the
  mask-token blocks, with P = softmax of the un-recalibrated logits and A = the recalibrated
  probabilities used in the forward pass (M = hidden tokens, V = visible tokens + cls):

  - ``L_spa = mean_{q∈V} Σ_{k∈M} P[q, k]`` — visible→masked attention mass the model would give
    without the hard mask (shapes the q/k geometry so the mask token becomes "singular").
    **cls counts as a visible query** (``spa_include_cls=True``), for the same reason the
    recalibration treats cls as visible (spec §3.2): cls must not aggregate mask tokens either.
  - ``L_e = mean_{q∈M} H(A[q, :])`` — row entropy of masked queries (all keys incl. cls),
    ``0·log 0 := 0`` (rows of A may hold exact zeros; computed with a clamped log so neither the
    value nor the gradient is NaN).
  - ``L_r = mean_{q∈M} Σ_{k∈M} A[q, k]`` — masked→masked attention mass (cls is not in M).

  Means are pooled over samples, heads and the query set (sum / (heads · Σ_n |query set_n|)), the
  global normalisation of spec §0.3 (identical to the mean of per-sample means at fixed counts).
* [INTERP, spec §3.3] depth weighting ``L_MTO = Σ_l w_l (λ_spa L_spa^l + λ_e L_e^l + λ_r L_r^l)``
  over the n mask-token blocks (0-based l): ``depth_schedule='first_half'`` (default) gives
  ``w_l = 1`` for ``l < ceil(n/2)`` and 0 after (a 1-block decoder -> that block; odd n includes
  the middle block), ``'linear'`` gives ``w_l = 1 − l/n``. Only blocks with ``w_l > 0`` are
  recorded (explicit attention is slower than fused SDPA); none when all λ are 0.
* [INTERP, spec §3.3] ``λ_spa = λ_e = λ_r = 0.1`` (sweep {0.01, 0.1, 1}).

``losses`` returns ``recon`` (the method's unchanged loss) and the three WEIGHTED terms
``mto_spa = λ_spa Σ_l w_l L_spa^l`` etc., so the trainer's sum is the total loss. The auxiliary
terms are computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math

import torch

from masking_bench.errors import BenchError
from masking_bench.masking import MaskingStrategy, MaskPlan, PlanContext, hide_lowest_first, num_hidden, register

DEPTH_SCHEDULES = ("first_half", "linear")


def _reject(strategy: str, key: str, value, accepted: str) -> BenchError:
    return BenchError(f"strategy '{strategy}': parameter {key}={value!r} is not accepted: {accepted}")


def _is_number(value) -> bool:
    """A finite int or float, not a bool (YAML ``true`` must not pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def depth_weights(n_layers: int, schedule: str) -> list[float]:
    """Per-block weights ``w_l`` of the ``n_layers`` mask-token blocks (spec §3.3 [INTERP])."""
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
    ``include_cls``: cls is one of L_spa's visible queries.
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
    """MTO-interp: MAE random masking + mask-token isolation + depth-weighted L_spa / L_e / L_r.

    Our reading of Choi et al. (arXiv 2404.08330, ECCV 2024; method section and code unreadable),
    spec §3.2 (recalibration, high confidence) and §3.3 (loss forms, [INTERP], low confidence);
    see the module docstring for the provenance of each piece. Parameters:

    recalibrate: visible queries (incl. cls) never attend to mask-token keys (spec §3.2).
    depth_schedule: ``first_half`` (w=1 on the first ceil(n/2) mask-token blocks) or ``linear``
        (w_l = 1 − l/n), spec §3.3 [INTERP].
    lambda_spa, lambda_e, lambda_r: loss weights, 0.1 each (spec §3.3 [INTERP]).
    spa_include_cls: cls is a visible query of L_spa (default True, consistent with §3.2).
    """

    name = "mto"
    summary = "MAE random masking; visible tokens never attend to mask tokens, plus 3 attention losses"
    interpretation = True
    needs = frozenset({"attention"})
    source = (
        "MTO-interp: Choi et al., arXiv 2404.08330 (ECCV 2024), method unreadable; "
        "spec §3.2 recalibration, §3.3 losses [INTERP]"
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
            raise _reject(
                self.name, "depth_schedule", self.depth_schedule, f"expected one of {', '.join(DEPTH_SCHEDULES)}"
            )
        for key in ("lambda_spa", "lambda_e", "lambda_r"):
            value = getattr(self, key)
            if not (_is_number(value) and value >= 0):
                raise _reject(self.name, key, value, "expected a finite number >= 0 (loss weight)")
        for key in ("recalibrate", "spa_include_cls"):
            if not isinstance(getattr(self, key), bool):
                raise _reject(self.name, key, getattr(self, key), "expected true or false")

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
