"""Salience-based masking: SBM (``sbam``, fixed ratio) and SBAM with an adaptive masking ratio (``sbam_amr``).

Choi et al., "Salience-Based Adaptive Masking: Revisiting Token Dynamics for Enhanced Pre-training",
arXiv 2404.08327 / ECCV 2024 (method section not readable). Reference code [CODE]: ``doihye/SBAM``
``models_mae.py`` ``MaskedAutoencoderViT.saliency_guided_masking``. What follows the reference, what
fixes it and what is our interpretation: docs/strategies.md §5 (SBM) and §6 (AMR).

Precision: the affinity is computed in float32 with autocast disabled (the embeddings too), so a
``bf16`` training run plans the same masks as a float32 one.
"""

from __future__ import annotations

import math
from typing import Any

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

SALIENCE_SOURCES = ("embeddings", "attention")
AMR_MODES = ("batch", "sample")
MINMAX_EPS = 1e-6


def minmax_normalise(s: torch.Tensor) -> torch.Tensor:
    """Per-row min–max to [0, 1] with ``+1e-6`` in the denominator (the reference has none; docs/strategies.md §5.3)."""
    lo = s.min(dim=1, keepdim=True).values
    hi = s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo + MINMAX_EPS)


def embedding_salience(emb: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    """Raw SBAM salience (N, L) from embeddings (N, L, D): column sums of ``softmax_rows(E Eᵀ)``.

    ``scaled`` divides the logits by ``√D`` (an ablation, not the reference; docs/strategies.md §5.3).
    """
    emb = emb.float()
    logits = emb @ emb.transpose(1, 2)
    if scaled:
        logits = logits / math.sqrt(emb.shape[-1])
    return logits.softmax(dim=2).sum(dim=1)


def first_block_attention_salience(ctx: PlanContext, images: torch.Tensor) -> torch.Tensor:
    """Raw salience (N, L) from the real attention of the model's first encoder block [INTERP, docs/strategies.md §5.3].

    Sequence = cls + all L patch tokens (what every encoder pass of :class:`MIMViT` holds, with
    cls first); probabilities ``softmax(q kᵀ / √d_head)`` of block 0, averaged over heads, summed
    over all L + 1 queries (cls query included); the cls key column is dropped, since cls is never
    masked. Costs one full-token block per step.
    """
    probs = ctx.attention(images, block=0)  # (N, heads, T, T)
    received = probs.mean(dim=1).sum(dim=1)  # (N, T): attention each key receives
    return received[:, 1:].float()


@register
class SalienceMasking(MaskingStrategy):
    """SBM — salience-based masking at a fixed ratio (SBAM paper; docs/strategies.md §5) [CODE].

    Per batch, from the current model (no gradient, float32):
    ``S = E Eᵀ`` on patch + position embeddings ``E`` (N, L, D), row softmax, salience ``s[j] =
    Σ_i softmax(S)[i, j]``, ``ŝ = (s − min) / (max − min + 1e-6)`` per sample; score ``ŝ + u`` with
    ``u = rand · noise_scale`` (reference: ``rand / 2``); keep the ``int(L(1−r))`` lowest scores and
    hide the rest, exactly MAE's argsort rule (``hide_lowest_first``), so every sample hides
    ``L − int(L(1−r))`` tokens and the most salient tokens are hidden first.

    Parameters:
      noise_scale (0.5, [CODE] constant): amplitude of the uniform noise; 0 = pure salience top-k.
      scaled (False): divide the affinity by ``√D``, an ablation [INTERP].
      salience_source ('embeddings'): 'embeddings' is the reference [CODE]; 'attention' [INTERP],
        label "SBM-attn-variant": the first encoder block's real attention on cls + all L tokens
        (:func:`first_block_attention_salience`), one extra attention layer per step; ``scaled``
        does not apply to it (that attention is already scaled by ``1/√d_head``).
      warmup_epochs (0): epochs ``< warmup_epochs`` use plain MAE random masking with the same noise
        draw as ``random`` [INTERP, our reading of the README's warm-up checkpoint]; they count in
        the run's epoch budget.

    The class follows the reference (``interpretation = False``); an instance with the attention
    source, ``scaled=True`` or ``warmup_epochs > 0`` sets ``interpretation=True`` (and the attention
    source ``needs={'attention'}``). ``describe()`` (stored in every run record) reports the instance
    values, plus ``variant`` and ``deviations`` (each non-reference setting).

    Diagnostics: ``salience`` (N, L) = ŝ, ``base_ratio`` (float) = r. During warm-up only
    ``base_ratio`` and ``warmup`` (True) are given (no salience is computed).
    """

    name = "sbam"
    summary = "hide the most salient tokens (embedding affinity column sums + noise)"
    source = (
        "SBAM/SBM (Choi et al., arXiv 2404.08327, ECCV 2024; method section not read); doihye/SBAM models_mae.py "
        "saliency_guided_masking; docs/strategies.md §5"
    )
    needs = frozenset({"embeddings"})
    defaults: dict[str, Any] = {
        "noise_scale": 0.5,
        "scaled": False,
        "salience_source": "embeddings",
        "warmup_epochs": 0,
    }

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        super().__init__(ratio, method=method, **params)
        if not (isinstance(self.salience_source, str) and self.salience_source in SALIENCE_SOURCES):
            raise param_error(
                self.name, "salience_source", self.salience_source, f"expected one of {', '.join(SALIENCE_SOURCES)}"
            )
        if not (is_number(self.noise_scale) and self.noise_scale >= 0):
            raise param_error(self.name, "noise_scale", self.noise_scale, "expected a finite number >= 0")
        warm = self.warmup_epochs
        if not (is_number(warm) and int(warm) == warm and warm >= 0):  # 2.0 was and stays accepted
            raise param_error(self.name, "warmup_epochs", warm, "expected an integer >= 0")
        if not isinstance(self.scaled, bool):
            raise param_error(self.name, "scaled", self.scaled, "expected true or false")
        if self.scaled and self.salience_source == "attention":
            raise BenchError(
                f"strategy '{self.name}': scaled=True applies to salience_source='embeddings' only "
                "(the encoder's attention is already scaled)"
            )
        self.noise_scale = float(self.noise_scale)
        self.warmup_epochs = int(self.warmup_epochs)
        if self.salience_source == "attention":
            self.needs = frozenset({"attention"})  # instance override of the class attribute
        if self.deviations():
            self.interpretation = True  # instance override: describe() reports it

    # ------------------------------------------------------------------------------ reporting
    def deviations(self) -> list[str]:
        """Settings of this instance that depart from the reference code (stored in run records);
        each is explained in docs/strategies.md §5.3 / §6.3."""
        out = []
        if self.salience_source == "attention":
            out.append(
                "salience_source=attention: first-block attention, cls included (docs/strategies.md §5.3) [INTERP]"
            )
        if self.scaled:
            out.append("scaled: affinity divided by sqrt(D) (docs/strategies.md §5.3) [INTERP]")
        if self.warmup_epochs:
            out.append(
                f"warmup_epochs={self.warmup_epochs}: MAE random masking first (docs/strategies.md §5.3) [INTERP]"
            )
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        notes = self.deviations()
        if self.noise_scale != 0.5:
            notes.append(f"noise_scale={self.noise_scale} (reference hard-codes 0.5, docs/strategies.md §5.1)")
        info["variant"] = "SBM-attn-variant" if self.salience_source == "attention" else "SBM"
        info["deviations"] = notes
        return info

    # ------------------------------------------------------------------------------- planning
    def salience(self, images: torch.Tensor, ctx: PlanContext) -> torch.Tensor:
        """Normalised salience ŝ (N, L) in [0, 1], float32, no gradient, autocast off."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            if self.salience_source == "attention":
                raw = first_block_attention_salience(ctx, images.float())
            else:
                raw = embedding_salience(ctx.embeddings(images.float()), self.scaled)
            return minmax_normalise(raw)

    def hidden_counts(self, sal: torch.Tensor, num_tokens: int) -> tuple[int | torch.Tensor, torch.Tensor]:
        """How many tokens each sample hides, and the per-sample target ratio (N,). SBM: fixed."""
        ratio = torch.full((sal.shape[0],), self.ratio, dtype=torch.float32, device=sal.device)
        return num_hidden(num_tokens, self.ratio), ratio

    def warmup_plan(self, images: torch.Tensor, ctx: PlanContext) -> MaskPlan:
        """Plain MAE random masking at the base ratio (identical noise draw to ``random``)."""
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        mask = hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio))
        return MaskPlan(mask=mask, diagnostics={"base_ratio": self.ratio, "warmup": True})

    def plan(self, images: torch.Tensor, ctx: PlanContext) -> MaskPlan:
        if ctx.epoch < self.warmup_epochs:
            return self.warmup_plan(images, ctx)
        n, length = images.shape[0], ctx.num_tokens
        sal = self.salience(images, ctx)
        hidden, ratio = self.hidden_counts(sal, length)
        noise = ctx.rand(n, length) * self.noise_scale  # = the reference's rand / 2 bit for bit at 0.5
        scores = sal.to(noise.device) + noise
        if isinstance(hidden, torch.Tensor):
            hidden = hidden.to(noise.device)
        mask = hide_lowest_first(scores, hidden)
        diagnostics = {"salience": sal, "base_ratio": self.ratio}
        diagnostics.update(self.extra_diagnostics(sal, ratio))
        return MaskPlan(mask=mask, diagnostics=diagnostics)

    def extra_diagnostics(self, sal: torch.Tensor, ratio: torch.Tensor) -> dict[str, Any]:
        return {}


@register
class SalienceAdaptiveRatio(SalienceMasking):
    """SBAM = SBM + Adaptive Masking Ratio (SBAM paper; docs/strategies.md §6).

    Count per sample ``y_n = #{j : ŝ_n[j] > δ}`` (strict), ``r = r0 − Δ + 2Δ·(y / L)``, clamped to
    [0, 1], ``K = int(L(1−r))`` with ``K >= 1`` visible; then the tokens are chosen exactly as SBM
    (:class:`SalienceMasking`). ``r0`` is the run's masking ratio.

    Parameters (besides SBM's noise_scale / scaled / salience_source / warmup_epochs):
      delta_ratio (Δ, 0.10) and threshold (δ, 0.5): NOT from the paper — the official code and the
        readable docs give no default; these are a third-party re-use's defaults [INTERP].
      mode ('batch'): 'batch' is the released code [CODE]: one ratio from the batch-mean fraction
        ``ȳ = mean_n(y_n) / L`` and one ``K`` for the whole batch, in float32 with the reference's
        operation order (so ``K`` matches it bit for bit). 'sample' [INTERP]: each image its own
        ``r_n`` and ``K_n`` (same arithmetic per sample), so counts differ per sample — the ``mae``
        model pads the visible set and blocks padded keys (docs/strategies.md §1.5).

    During warm-up (``epoch < warmup_epochs``) the plan is MAE random masking at ``r0``.
    Class ``interpretation = True``: the defaults of Δ and δ are not the paper's.

    Diagnostics: ``salience`` (N, L), ``base_ratio`` (float r0), ``ratio`` (N,) the target ratio of
    each sample (batch mode: the shared one), ``salient_fraction`` (N,) = ``y_n / L``.
    """

    name = "sbam_amr"
    summary = "SBAM with a masking ratio that adapts to how much of the image is salient"
    interpretation = True
    adaptive_ratio = True  # r = r0 − Δ + 2Δ·(salient fraction): the trainer does not hold it to r0
    source = (
        "SBAM + AMR (Choi et al., arXiv 2404.08327, ECCV 2024; method section not read); doihye/SBAM models_mae.py "
        "saliency_guided_masking; docs/strategies.md §6"
    )
    defaults: dict[str, Any] = {**SalienceMasking.defaults, "delta_ratio": 0.10, "threshold": 0.5, "mode": "batch"}

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        super().__init__(ratio, method=method, **params)
        if not (isinstance(self.mode, str) and self.mode in AMR_MODES):
            raise param_error(self.name, "mode", self.mode, f"expected one of {', '.join(AMR_MODES)}")
        for key, what in (("delta_ratio", "the ratio swing"), ("threshold", "a min-max-normalised salience")):
            value = getattr(self, key)
            if not (is_number(value) and 0 <= value <= 1):
                raise param_error(self.name, key, value, f"expected a number in [0, 1] ({what})")
        self.delta_ratio = float(self.delta_ratio)
        self.threshold = float(self.threshold)

    def deviations(self) -> list[str]:
        out = super().deviations()
        out.append(
            f"delta_ratio={self.delta_ratio}, threshold={self.threshold}: not from the paper "
            "(docs/strategies.md §6.3) [INTERP]"
        )
        if self.mode == "sample":
            out.append("mode=sample: per-sample ratio, ragged counts (docs/strategies.md §6.3) [INTERP]")
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["variant"] = f"SBAM-AMR-{self.mode}" + ("-attn" if self.salience_source == "attention" else "")
        return info

    def salient_fraction(self, sal: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(N,) ``y_n / L`` in float32, as the reference (``y.float() ... / y_max``)."""
        return (sal > self.threshold).sum(dim=1).float() / num_tokens

    def hidden_counts(self, sal: torch.Tensor, num_tokens: int) -> tuple[int | torch.Tensor, torch.Tensor]:
        n = sal.shape[0]
        y = (sal > self.threshold).sum(dim=1)
        if self.mode == "batch":
            frac = y.float().mean() / num_tokens  # 0-d float32, the reference's ``y_normalized``
        else:
            frac = y.float() / num_tokens  # (N,)
        ratio = self.ratio - self.delta_ratio + 2 * self.delta_ratio * frac  # float32, reference op order
        ratio = ratio.clamp(min=0.0, max=1.0)
        keep = (num_tokens * (1 - ratio)).long().clamp(min=1, max=num_tokens)  # int(): truncation
        hidden = num_tokens - keep
        if self.mode == "batch":
            return int(hidden), ratio.expand(n).clone()
        return hidden, ratio

    def extra_diagnostics(self, sal: torch.Tensor, ratio: torch.Tensor) -> dict[str, Any]:
        return {"ratio": ratio, "salient_fraction": self.salient_fraction(sal, sal.shape[1])}

    def warmup_plan(self, images: torch.Tensor, ctx: PlanContext) -> MaskPlan:
        plan = super().warmup_plan(images, ctx)
        plan.diagnostics["ratio"] = torch.full(
            (images.shape[0],), self.ratio, dtype=torch.float32, device=plan.mask.device
        )
        return plan
