"""Inspect a strategy's masks on real images: a PNG gallery and an .npz dump (the ``masks`` command).

Images are the first N of the Fashion-MNIST test split, unaugmented. The model whose embeddings a
salience strategy reads is a run's checkpoint when given, else a freshly initialised one (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .data import load_dataset
from .errors import BenchError
from .masking import PlanContext, build_strategy
from .models import build_model

AFTER_WARMUP = 10**9  # default planning epoch: past any strategy warm-up


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, values parsed as YAML scalars (0.5, true, null, text)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise BenchError(f"--param '{pair}' must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_model(checkpoint: str | None, method: str, preset: str, seed: int, img_size: int, channels: int):
    """A run's checkpoint (preset/method read from its config.yaml) or a seeded fresh model."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise BenchError(f"checkpoint '{path}' does not exist (runs keep results/runs/<suite>/<hash>/checkpoint.pt)")
        cfg_path = path.parent / "config.yaml"
        if cfg_path.is_file():
            cfg = yaml.safe_load(cfg_path.read_text())
            method, preset = cfg["method"], cfg["model"]["preset"]
            overrides = cfg["model"].get("overrides", {})
        else:
            overrides = {}
        model = build_model(preset, method, img_size, channels, **overrides)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        return model, method
    torch.manual_seed(seed)
    return build_model(preset, method, img_size, channels), method


def plan_masks(strategy_name: str, ratio: float, seed: int = 0, n: int = 8, params: dict | None = None,
               checkpoint: str | None = None, method: str = "mae", preset: str = "cpu-tiny",
               epoch: int = AFTER_WARMUP, data_root: str | None = None) -> dict[str, Any]:
    """Plan masks for the first ``n`` test images; returns arrays ready for :func:`dump` / :func:`render`."""
    dataset = load_dataset("fashion_mnist", data_root)
    model, method = load_model(checkpoint, method, preset, seed, dataset.image_size, dataset.channels)
    model.eval()
    strategy = build_strategy(strategy_name, ratio, method, params)
    c = dataset.channels
    raw = dataset.test.images[:n].float() / 255.0
    mean = torch.tensor(dataset.mean).view(1, c, 1, 1)
    std = torch.tensor(dataset.std).view(1, c, 1, 1)
    x = (raw - mean) / std
    ctx = PlanContext(model, model.grid, torch.Generator().manual_seed(seed), epoch=epoch, method=method)
    with torch.no_grad():
        plan = strategy.plan(x, ctx)
    view = plan.view if plan.view is not None else x
    out = {
        "strategy": strategy_name,
        "images": (view * std + mean).clamp(0, 1).numpy().astype(np.float32),
        "mask": plan.mask.cpu().numpy().astype(bool),
        "ratio": plan.realised_ratio().cpu().numpy().astype(np.float32),
        "grid": np.array(model.grid),
        "params": json.dumps(strategy.describe()["params"], sort_keys=True, default=str),
        "base_ratio": np.float32(ratio),
    }
    for key, value in plan.diagnostics.items():
        key = "target_ratio" if key == "ratio" else key  # the realised ratio keeps the name 'ratio'
        if key in out and key != "base_ratio":
            continue
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().float().cpu().numpy()
        elif isinstance(value, (int, float)):
            out[key] = np.float32(value)
    if "base_ratio" in plan.diagnostics:
        out["base_ratio"] = np.float32(plan.diagnostics["base_ratio"])
    return out


def dump(masks: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **masks)
    return path


def render(masks: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """PNG grid: one column per image; rows: the image, what the encoder sees, the salience if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hide_cmap = matplotlib.colors.ListedColormap(["#f28e2b"])
    images, mask, grid = masks["images"], masks["mask"], tuple(int(g) for g in masks["grid"])
    rows = ["image", "visible to the encoder"] + (["salience"] if "salience" in masks else [])
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 0.9, 1.3 * len(rows) + 0.4), squeeze=False)
    h, w = images.shape[-2:]
    ph, pw = h // grid[0], w // grid[1]
    for i in range(n):
        img = images[i].transpose(1, 2, 0)
        img = img[..., 0] if img.shape[-1] == 1 else img
        hidden = np.kron(mask[i].reshape(grid), np.ones((ph, pw)))[:h, :w]
        axes[0, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(np.ma.masked_where(hidden == 0, hidden), cmap=hide_cmap, alpha=0.9, vmin=0, vmax=1)
        axes[1, i].set_xlabel(f"{masks['ratio'][i]:.0%} hidden", fontsize=7)
        if "salience" in masks:
            axes[2, i].imshow(masks["salience"][i].reshape(grid), cmap="viridis", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for r, name in enumerate(rows):
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title or f"{masks['strategy']} (r={float(masks['base_ratio']):g}; hidden patches in orange)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
