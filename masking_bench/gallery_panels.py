"""What a ``masks`` gallery draws: its rows (image, encoder input, what the encoder sees, score maps)
and the strategy-specific panels that show what makes a strategy different.

Hidden patches are painted opaque (:data:`HIDDEN_RGB`), never blended: the row "visible to the
encoder" shows nothing of a hidden patch. Every score/attention row has a colour bar.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

HIDDEN_RGB = (242, 142, 43)  # opaque orange of a hidden patch
HIDDEN_HEX = "#{:02x}{:02x}{:02x}".format(*HIDDEN_RGB)
ATTENTION_KEYS = ("attention_from_visible", "attention_from_hidden")

# one line under the title: the rule the gallery makes visible (docs/strategies.md sections)
NOTES = {
    "mto": "masks = random's rule; MTO-interp's attention rule: visible tokens never attend to mask tokens "
    "(docs/strategies.md §7.3)",
    "misalign": "the encoder sees the centre crop of an up-sampled (zoomed-in) view; the decoder "
    "reconstructs the whole view (docs/strategies.md §8.2)",
    "sbam": "hides the most salient tokens first: salience + noise (docs/strategies.md §5)",
    "sbam_amr": "salience-based masking with a ratio adapted to the salient fraction (docs/strategies.md §6)",
}


@dataclass
class Row:
    """One gallery row: ``kind`` is 'image' (pixels), 'masked' (pixels with opaque hidden patches) or
    'map' (one value per token, drawn on the patch grid with a colour bar)."""

    label: str
    kind: str
    key: str
    cbar_label: str = ""
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None


@dataclass
class Gallery:
    """A built figure and what is on it (for saving and for tests)."""

    fig: Any
    rows: list[Row]
    axes: Any  # (rows, n) array of image axes
    colorbars: dict[str, Any]  # row label -> matplotlib Colorbar


# ------------------------------------------------------------------------------------- pixels


def to_rgb(img: np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 (grey images repeated on three channels)."""
    x = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    return np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8)


def hidden_pixels(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(L,) bool token mask -> (H, W) bool pixel mask (True = pixel of a hidden patch)."""
    h, w = size
    ph, pw = h // grid[0], w // grid[1]
    tokens = np.asarray(mask, dtype=bool).reshape(grid)
    return np.kron(tokens, np.ones((ph, pw), dtype=bool)).astype(bool)[:h, :w]


def encoder_rgb(img: np.ndarray, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """What the encoder sees, (H, W, 3) uint8: the image with every hidden patch painted
    :data:`HIDDEN_RGB` exactly (opaque, whatever the image holds there)."""
    rgb = to_rgb(img)
    rgb[hidden_pixels(mask, grid, rgb.shape[:2])] = HIDDEN_RGB
    return rgb


# ----------------------------------------------------------------------------- strategy panels


def view_label(strategy, size: tuple[int, int]) -> str:
    """Row label of a strategy's own encoder input (``MaskPlan.view``)."""
    if strategy.name == "misalign" and hasattr(strategy, "geometry"):
        (bh, bw), _ = strategy.geometry(size)
        return (
            f"encoder input: centre {size[0]}×{size[1]} of the image up-sampled to {bh}×{bw} "
            f"({strategy.params.get('interpolation', '?')}, ×{bh / size[0]:.3g} zoom-in)"
        )
    return "encoder input (the strategy's view of the image)"


def target_label(strategy, size: tuple[int, int]) -> str:
    """Row label of a strategy's reconstruction target (``MaskPlan.target``)."""
    if strategy.name == "misalign" and hasattr(strategy, "geometry"):
        (bh, bw), _ = strategy.geometry(size)
        return f"decoder target: the whole {bh}×{bw} up-sampled view, area-resized to {size[0]}×{size[1]}"
    return "reconstruction target"


def attention_maps(model, x: torch.Tensor, plan, method: str) -> dict[str, Any]:
    """The attention rule of a plan that changes attention (MTO: ``isolate_mask_tokens``,
    ``record_attention``; docs/strategies.md §7.3): one forward of the model under the plan, the
    first mask-token block's probabilities averaged over heads, and for every token the attention
    it receives from visible queries (cls included) and from mask-token queries, (N, L) each.
    Empty for a plan that leaves attention alone."""
    if not plan.isolate_mask_tokens and not plan.record_attention:
        return {}
    block = plan.record_attention[0] if plan.record_attention else 0
    view = plan.view if plan.view is not None else x
    with torch.no_grad():
        out = model(view, plan.mask, isolate_mask_tokens=plan.isolate_mask_tokens, record_attention=(block,))
    probs = out.attention[block].float().mean(dim=1)  # (N, T, T), token 0 = cls
    n = probs.shape[0]
    hidden = torch.cat([torch.zeros(n, 1, dtype=torch.bool), plan.mask.cpu().bool()], dim=1).float()

    def received(queries: torch.Tensor) -> np.ndarray:  # mean over the selected queries, cls key dropped
        total = (probs * queries[:, :, None]).sum(dim=1) / queries.sum(dim=1, keepdim=True).clamp(min=1)
        return total[:, 1:].numpy().astype(np.float32)

    where = f"{'decoder' if method == 'mae' else 'encoder'} block {block}"
    return {
        "attention_from_visible": received(1 - hidden),
        "attention_from_hidden": received(hidden),
        "attention_block": where,
        "attention_isolated": np.bool_(plan.isolate_mask_tokens),
    }


# ------------------------------------------------------------------------------------- layout


def rows_for(masks: dict[str, Any]) -> list[Row]:
    """The rows a plan's arrays call for, top to bottom."""
    rows = [Row("image", "image", "images")]
    if "view" in masks:
        rows.append(Row(str(masks.get("view_label", "encoder input")), "image", "view"))
    rows.append(Row("visible to the encoder (orange = hidden)", "masked", "view" if "view" in masks else "images"))
    if "target" in masks:
        rows.append(Row(str(masks.get("target_label", "reconstruction target")), "image", "target"))
    if "salience" in masks:
        rows.append(
            Row("salience ŝ (1 = most salient, hidden first)", "map", "salience", "salience ŝ", "viridis", 0, 1)
        )
    if "attention_from_visible" in masks:
        block = str(masks.get("attention_block", "block 0"))
        rule = " (mask tokens get 0: the MTO rule)" if bool(masks.get("attention_isolated", False)) else ""
        labels = (
            f"attention each token gets from visible tokens{rule}, {block}",
            f"attention each token gets from mask tokens, {block}",
        )
        for key, text in zip(ATTENTION_KEYS, labels, strict=True):
            top = float(np.max(masks[key])) or 1.0
            rows.append(Row(text, "map", key, "mean attention", "magma", 0, top))
    return rows


def build_figure(masks: dict[str, Any], title: str) -> Gallery:
    """The gallery figure: one column per image, a narrow last column for the colour bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_for(masks)
    mask, grid = masks["mask"], tuple(int(g) for g in masks["grid"])
    n = masks["images"].shape[0]
    fig = plt.figure(figsize=(1.25 * n + 2.3, 1.35 * len(rows) + 0.8), layout="constrained")
    gs = fig.add_gridspec(len(rows), n + 1, width_ratios=[1.0] * n + [0.08])
    axes = np.empty((len(rows), n), dtype=object)
    colorbars = {}
    for r, row in enumerate(rows):
        im = None
        for i in range(n):
            ax = axes[r, i] = fig.add_subplot(gs[r, i])
            if row.kind == "map":
                im = ax.imshow(
                    np.asarray(masks[row.key][i], dtype=np.float32).reshape(grid),
                    cmap=row.cmap,
                    vmin=row.vmin,
                    vmax=row.vmax,
                    interpolation="nearest",
                )
            elif row.kind == "masked":
                ax.imshow(encoder_rgb(masks[row.key][i], mask[i], grid), interpolation="nearest")
                ax.set_xlabel(f"{masks['ratio'][i]:.0%} hidden", fontsize=7)
            else:
                ax.imshow(to_rgb(masks[row.key][i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(row.label, 22, break_on_hyphens=False)), fontsize=6.5)
        if row.kind == "map":
            cbar = fig.colorbar(im, cax=fig.add_subplot(gs[r, n]))
            cbar.set_label(row.cbar_label, fontsize=7)
            cbar.ax.tick_params(labelsize=6)
            colorbars[row.label] = cbar
    fig.suptitle(title, fontsize=9)
    return Gallery(fig, rows, axes, colorbars)
