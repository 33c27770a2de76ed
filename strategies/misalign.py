"""Beyond Masking: spatial masking + zoom-in misalignment, "(a)+(m)" (strategy ``misalign``).

Tian et al., "Beyond Masking: Demystifying Token-Based Pre-Training for Vision Transformers",
arXiv 2203.14313 (method section not readable). Reference code [CODE]: ``sunsmarterjie/beyond_masking``
folder ``zoomed-in/`` (``datasets.py``, ``modeling_pretrain.py`` ``forward_loss``,
``engine_for_pretraining.py``). The encoder sees the randomly masked centre crop of a 9/7-larger view;
the decoder output is read as the whole view. Geometry, losses, the per-channel target normalisation
and the deviations (an up-sampled view, the SimMIM variant): docs/strategies.md §8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
from masking_bench.models import patchify, unpatchify

INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")
DEGRADATIONS = ("zoom_in",)


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
    [0, 1] with the dataset's per-channel ``stats = (mean, std)`` when given — the reference's
    ``forward_loss`` normalisation [CODE], not the shared norm-pix one (docs/strategies.md §8.4)."""
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
    output read as the whole view ([CODE] ``zoomed-in/``; the view is up-sampled from the S-px
    loader's image [INTERP]; ``method='simmim'`` is [INTERP] too). Details: docs/strategies.md §8.

    Plan: ``view`` = centre S×S crop of ``x`` resized to ``B = 2·round(S·view_scale/2)`` (36 for 28),
    ``target`` = that whole view area-resized back to S, MAE random masking (``random``'s rule).
    Losses (``recon_centre``, ``recon_border``, already weighted): hidden-token MSE of the centre
    crop of the up-scaled prediction against the normalised view, and the mean-MSE of four border
    strips against the normalised whole view.

    view_scale: whole view / input size (reference 288/224 = 9/7); rounded to an even whole-view size.
    interpolation: how ``x`` is enlarged to the whole view (bilinear, antialias) [INTERP].
    centre_weight, border_weight: 0.8 / 0.2 [CODE].
    degradation: ``zoom_in`` only (the paper's best single degradation; the others are not implemented).
    """

    name = "misalign"
    summary = "random masking of the centre crop of a 9/7-larger view; reconstruct the whole view"
    source = (
        "Beyond Masking (arXiv 2203.14313) zoomed-in + masking '(a)+(m)'; "
        "sunsmarterjie/beyond_masking zoomed-in/ [CODE]; docs/strategies.md §8"
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
        if not (is_number(self.view_scale) and self.view_scale > 1):
            raise param_error(self.name, "view_scale", self.view_scale, "expected a finite number > 1 (zoom-in)")
        for key, accepted in (("interpolation", INTERPOLATIONS), ("degradation", DEGRADATIONS)):
            value = getattr(self, key)
            if not (isinstance(value, str) and value in accepted):
                raise param_error(self.name, key, value, f"expected one of {', '.join(accepted)}")
        for key in ("centre_weight", "border_weight"):
            value = getattr(self, key)
            if not (is_number(value) and value >= 0):
                raise param_error(self.name, key, value, "expected a finite number >= 0 (loss weight)")
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
