"""Beyond Masking: spatial masking + zoom-in misalignment, "(a)+(m)" (spec §4.3).

Tian, Xie, Fang, Shi, Peng, Zhang, Jiao, Tian, Ye, "Beyond Masking: Demystifying Token-Based
Pre-Training for Vision Transformers", arXiv 2203.14313 (§3 degradations, "zoomed-in" + masking
integration). The paper's method section was not readable; the primary source is the official code,
``sunsmarterjie/beyond_masking`` folder ``zoomed-in/`` (``datasets.py`` DataAugmentationForMAE,
``modeling_pretrain.py`` ``forward_loss``, ``engine_for_pretraining.py`` loss weights) [CODE].

The reference at 224 px: the loader yields a 288-px view ``I₂₈₈`` and its centre 224 crop; the
encoder sees the crop, randomly masked (MAE, r = 0.75); the decoder output ``P₂₂₄`` is read as the
WHOLE 288 view rendered at 224. Here (provenance as in spec §0.1):

* [INTERP] the benchmark's loader yields the augmented image ``x`` at the input resolution S
  (28 for Fashion-MNIST), so the whole view is ``I_big = resize(x, B)`` with
  ``B = 2·round(S·view_scale/2)`` (rounded to an even size so the border is symmetric; 36 for
  S = 28 and the default ``view_scale = 9/7`` — exactly the reference's 288/224 geometry; the
  border is ``(B − S)/2`` = 4 px = one 4-px patch). The enlargement uses ``interpolation``
  (default bilinear, antialias on — it only matters if a size shrinks). The reference renders its
  288 view directly from the source image with bicubic RandomResizedCrop; we cannot, as the loader
  has already resampled to S, so ``I_big`` carries no detail beyond ``x``.
* [CODE] encoder input (``plan.view``) = centre S×S crop of ``I_big``; MAE random masking of its
  tokens with exactly the rule of ``strategies/random_masking.py`` (same masks for the same
  generator state).
* [CODE] target at S (``plan.target``) = ``I_big`` resized back to S with 'area' interpolation (the
  reference's ``resize_to224``). This is ``x`` only up to resampling (bilinear up then area down);
  we keep the resampled one to stay faithful to the chain.
* [CODE] centre loss: ``P_S`` (pred unpatchified) resized to B ('area', as the reference),
  centre S×S crop, re-patchified, vs the per-patch-normalised patches of the encoder input;
  per-patch MSE averaged over HIDDEN tokens with the batch's global hidden count (spec §0.3).
* [CODE] border loss (all pixels, out-painting): target = ``plan.target`` per-patch normalised,
  unpatchified, resized to B ('area'); prediction = ``P_S`` resized to B ('area'); ``mean``-MSE
  over each of four strips — top, bottom, left and right of the middle band — and the four summed.
* [CODE] total = ``centre_weight``·centre + ``border_weight``·border, 0.8 / 0.2
  (``engine_for_pretraining.py``). ``losses`` returns the two WEIGHTED terms ``recon_centre`` and
  ``recon_border`` so the trainer's sum is the total.
* [CODE] target normalisation (only when ``model.norm_pix_loss``; the reference always
  normalises), for the centre and the border target alike: each channel of each patch separately,
  ``(t − mean)/(std + 1e-6)`` with the unbiased std over the patch's p² pixels, on [0, 1] pixels —
  the loader's dataset normalisation is undone with ``model.pixel_mean`` / ``model.pixel_std``
  (per-channel sequences the trainer attaches to the model). Without them the pixels are taken as
  given: the formula is invariant to a per-channel affine map, so only the 1e-6 then differs (it
  acts in dataset-std units, not [0, 1] units). This is NOT the shared
  ``MIMViT.reconstruction_loss`` normalisation (all p²C values jointly, ``sqrt(var + 1e-6)``), so
  misalign's loss values are not directly comparable with the other strategies' (≈1 % apart on
  Fashion-MNIST, far apart for RGB).
* [INTERP] ``method='simmim'``: not in the paper/code (MAE-only). Same geometry and masks, with
  SimMIM's loss: L1 on raw (dataset-normalised) pixels, no per-patch normalisation, for both terms
  (centre over hidden tokens, border as four summed mean-L1 strips). ``describe()`` marks such a
  run as an interpretation.

With an "ideal" prediction (``pred`` = per-patch-normalised patches of ``plan.target``) the border
term is exactly 0 (prediction and target go through the same resize) but the centre term is NOT:
area-up-sampling a 28-px image normalised per 4-px patch does not give the 36-px view's centre
normalised per patch of the crop (the tests check both facts). The reference has the same property.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from masking_bench.errors import BenchError
from masking_bench.masking import MaskingStrategy, MaskPlan, PlanContext, hide_lowest_first, num_hidden, register
from masking_bench.models import patchify, unpatchify

INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")
DEGRADATIONS = ("zoom_in",)


def _reject(strategy: str, key: str, value: Any, accepted: str) -> BenchError:
    return BenchError(f"strategy '{strategy}': parameter {key}={value!r} is not accepted: {accepted}")


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool (YAML ``true`` must not pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def big_size(size: int, scale: float) -> int:
    """The whole view's side: ``size·scale`` rounded to the nearest even number (symmetric border)."""
    return 2 * int(round(size * scale / 2))


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(img, size=size, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(img, size=size, mode=mode)


def pixel_stats(model) -> tuple[Any, Any] | None:
    """The dataset's per-channel (mean, std) the model's inputs were normalised with, if it carries them."""
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    return None if mean is None or std is None else (mean, std)


def norm_patches(imgs: torch.Tensor, p: int, stats: tuple[Any, Any] | None = None) -> torch.Tensor:
    """(N, C, H, W) -> patches (N, L, p²C) with every channel of every patch normalised on its own:
    ``(t − mean)/(std + 1e-6)``, unbiased std over the p² pixels, after mapping the images back to
    [0, 1] with the dataset's per-channel ``stats = (mean, std)`` when given."""
    x = imgs.float()
    n, c = x.shape[:2]
    if stats is not None:
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(1, c, 1, 1) for v in stats)
        x = x * std + mean
    tokens = patchify(x, p)
    per_channel = tokens.reshape(n, tokens.shape[1], p * p, c)  # patchify puts the channel last
    mu = per_channel.mean(dim=2, keepdim=True)
    sd = per_channel.std(dim=2, keepdim=True)  # unbiased (p² − 1)
    return ((per_channel - mu) / (sd + 1e-6)).reshape(tokens.shape)


def border_strips(img: torch.Tensor, margin: tuple[int, int]) -> list[torch.Tensor]:
    """The ring of width ``margin`` as four strips: top, bottom, left and right of the middle band."""
    mh, mw = margin
    h, w = img.shape[-2:]
    middle = img[..., mh : h - mh, :]
    return [img[..., :mh, :], img[..., h - mh :, :], middle[..., :mw], middle[..., w - mw :]]


@register
class ZoomMisalignMasking(MaskingStrategy):
    """Beyond Masking "(a)+(m)": random masking of the centre crop of a 9/7-enlarged view, decoder
    output read as the whole view (spec §4.3 [CODE zoomed-in/]; adaptation to the S-px loader [INTERP]).

    view_scale: whole view / input size (reference 288/224 = 9/7); rounded to an even whole-view size.
    interpolation: how ``x`` is enlarged to the whole view (bilinear, antialias) [INTERP].
    centre_weight, border_weight: 0.8 / 0.2 [CODE].
    degradation: ``zoom_in`` only (the paper's best; the other §4.2 degradations are not implemented).
    """

    name = "misalign"
    summary = "random masking of the centre crop of a 9/7-larger view; reconstruct the whole view"
    source = (
        "Beyond Masking (arXiv 2203.14313) zoomed-in + masking '(a)+(m)'; "
        "sunsmarterjie/beyond_masking zoomed-in/ [CODE]; spec §4.3"
    )
    defaults = {
        "view_scale": 9 / 7,
        "interpolation": "bilinear",
        "centre_weight": 0.8,
        "border_weight": 0.2,
        "degradation": "zoom_in",
    }

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        super().__init__(ratio, method, **params)
        if not (_is_number(self.view_scale) and self.view_scale > 1):
            raise _reject(self.name, "view_scale", self.view_scale, "expected a finite number > 1 (zoom-in)")
        for key, accepted in (("interpolation", INTERPOLATIONS), ("degradation", DEGRADATIONS)):
            value = getattr(self, key)
            if not (isinstance(value, str) and value in accepted):
                raise _reject(self.name, key, value, f"expected one of {', '.join(accepted)}")
        for key in ("centre_weight", "border_weight"):
            value = getattr(self, key)
            if not (_is_number(value) and value >= 0):
                raise _reject(self.name, key, value, "expected a finite number >= 0 (loss weight)")
        if self.centre_weight == 0 and self.border_weight == 0:
            raise BenchError(
                f"strategy '{self.name}': parameters centre_weight=0 and border_weight=0 are not "
                "accepted together: at least one loss weight must be > 0"
            )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.method == "simmim":  # the SimMIM variant is ours, the reference is MAE-only
            info["interpretation"] = True
        return info

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(whole-view size, border margin) for an input of ``size`` (H, W)."""
        big = tuple(big_size(s, float(self.view_scale)) for s in size)
        margin = tuple((b - s) // 2 for b, s in zip(big, size, strict=True))
        return big, margin

    # ---------------------------------------------------------------------------------- plan
    def plan(self, images, ctx: PlanContext) -> MaskPlan:
        size = tuple(images.shape[-2:])
        (bh, bw), (mh, mw) = self.geometry(size)
        whole = resize(images, (bh, bw), self.interpolation)
        view = whole[..., mh : mh + size[0], mw : mw + size[1]].contiguous()
        target = F.interpolate(whole, size=size, mode="area")
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        mask = hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio))
        return MaskPlan(mask=mask, view=view, target=target)

    # --------------------------------------------------------------------------------- losses
    def raw_losses(
        self, model, pred: torch.Tensor, view: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (centre, border) losses for a prediction (N, L, p²C) of the whole view at S."""
        p, c, grid = model.patch_size, model.in_chans, model.grid
        size = tuple(view.shape[-2:])
        (bh, bw), margin = self.geometry(size)
        mh, mw = margin
        pred = pred.float()
        pred_big = F.interpolate(unpatchify(pred, p, c, grid), size=(bh, bw), mode="area")
        pred_centre = patchify(pred_big[..., mh : mh + size[0], mw : mw + size[1]], p)
        mae = self.method == "mae"
        if mae and model.norm_pix_loss:
            stats = pixel_stats(model)
            view_tok, target_tok = norm_patches(view, p, stats), norm_patches(target, p, stats)
        else:
            view_tok, target_tok = patchify(view.float(), p), patchify(target.float(), p)
        diff = pred_centre - view_tok
        per_patch = (diff**2 if mae else diff.abs()).mean(dim=-1)
        m = mask.to(per_patch.dtype)
        centre = (per_patch * m).sum() / m.sum().clamp(min=1.0)
        if mh == 0 or mw == 0:
            return centre, centre.new_zeros(())
        target_big = F.interpolate(unpatchify(target_tok, p, c, grid), size=(bh, bw), mode="area")
        err = F.mse_loss if mae else F.l1_loss
        border = sum(
            err(a, b) for a, b in zip(border_strips(pred_big, margin), border_strips(target_big, margin), strict=True)
        )
        return centre, border

    def losses(self, model, out, plan: MaskPlan, view: torch.Tensor) -> dict[str, torch.Tensor]:
        target = plan.target if plan.target is not None else view
        centre, border = self.raw_losses(model, out.pred, view, target, plan.mask)
        return {"recon_centre": float(self.centre_weight) * centre, "recon_border": float(self.border_weight) * border}
