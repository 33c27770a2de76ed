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
MAX_IMAGES = 64  # --n: a gallery of more images is unreadable (and planning 10 000 of them takes minutes)
MAX_SEED = 2**63 - 1
WHERE_CHECKPOINTS = "runs keep results/runs/<suite>/<hash>/checkpoint.pt"


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_request(ratio: float, n: int, seed: int = 0, epoch: int = AFTER_WARMUP) -> None:
    """One-line errors for a ``masks`` request out of range (before any data or model is loaded)."""
    if not _is_int(n) or not 1 <= n <= MAX_IMAGES:
        raise BenchError(f"masks: --n {n} is out of range: give 1..{MAX_IMAGES} images (the first N test images)")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise BenchError(f"masks: --ratio {ratio} is out of range: give a masking ratio in (0, 1), e.g. 0.75")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise BenchError(f"masks: --seed {seed} is out of range: give an integer in 0..{MAX_SEED}")
    if not _is_int(epoch) or epoch < 0:
        raise BenchError(f"masks: --epoch {epoch} is out of range: give an integer >= 0")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, values parsed as YAML scalars (0.5, true, null, text)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--param '{pair}' must look like key=value (e.g. --param min_block=4)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or _first_line(exc)
            raise BenchError(
                f"--param '{pair}': the value of {key.strip()} is not a YAML scalar ({problem}); "
                "quote text, e.g. --param key=\"'[text'\""
            ) from None
    return out


def checkpoint_setup(checkpoint: str | None, method: str, preset: str) -> tuple[str, str, dict[str, Any]]:
    """(method, preset, model overrides) a checkpoint was trained with, from the run's ``config.yaml``
    next to it (as given when there is none, or no checkpoint)."""
    if not checkpoint:
        return method, preset, {}
    path = Path(checkpoint)
    if not path.exists():
        raise BenchError(f"checkpoint '{path}' does not exist ({WHERE_CHECKPOINTS})")
    if not path.is_file():
        raise BenchError(f"checkpoint '{path}' is not a file ({WHERE_CHECKPOINTS})")
    cfg_path = path.parent / "config.yaml"
    if not cfg_path.is_file():
        return method, preset, {}
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
        method, preset = cfg["method"], cfg["model"]["preset"]
        overrides = cfg["model"].get("overrides") or {}
        if not isinstance(method, str) or not isinstance(preset, str) or not isinstance(overrides, dict):
            raise TypeError("method, model.preset or model.overrides has the wrong type")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise BenchError(
            f"config '{cfg_path}' next to checkpoint '{path}' is not a run config.yaml "
            f"({_first_line(exc)}); move the checkpoint elsewhere to load it with --model/--method"
        ) from None
    return method, preset, overrides


def load_model(checkpoint: str | None, method: str, preset: str, seed: int, img_size: int, channels: int):
    """A run's checkpoint (preset/method read from its config.yaml) or a seeded fresh model."""
    if checkpoint:
        path = Path(checkpoint)
        method, preset, overrides = checkpoint_setup(checkpoint, method, preset)
        model = build_model(preset, method, img_size, channels, **overrides)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # random bytes, truncated zip, text, pickled objects, ...
            # torch's own messages here mislead (a text file gives "pop from empty list", random bytes
            # advice about weights_only): name the file and the exception kind only
            raise BenchError(
                f"checkpoint '{path}' is not a readable torch checkpoint: corrupt, truncated or another "
                f"kind of file ({type(exc).__name__}); {WHERE_CHECKPOINTS}"
            ) from None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise BenchError(
                f"checkpoint '{path}' holds no 'model' weights: not a masking_bench run checkpoint "
                f"({WHERE_CHECKPOINTS})"
            )
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise BenchError(
                f"checkpoint '{path}' does not fit a {preset} {method} model ({_first_line(exc)}); "
                "is it another model preset or method? give --model / --method, or keep the run's "
                "config.yaml next to it"
            ) from None
        return model, method
    torch.manual_seed(seed)
    return build_model(preset, method, img_size, channels), method


def plan_masks(
    strategy_name: str,
    ratio: float,
    seed: int = 0,
    n: int = 8,
    params: dict | None = None,
    checkpoint: str | None = None,
    method: str = "mae",
    preset: str = "cpu-tiny",
    epoch: int = AFTER_WARMUP,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Plan masks for the first ``n`` test images (1..``MAX_IMAGES``); returns arrays ready for
    :func:`dump` / :func:`render`. Requests and parameters are checked before any data is read."""
    check_request(ratio, n, seed, epoch)
    method = checkpoint_setup(checkpoint, method, preset)[0]
    strategy = build_strategy(strategy_name, ratio, method, params)
    dataset = load_dataset("fashion_mnist", data_root)
    model, method = load_model(checkpoint, method, preset, seed, dataset.image_size, dataset.channels)
    model.eval()
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **masks)
    except OSError as exc:
        raise BenchError(f"cannot write the dump '{path}': {_first_line(exc)}") from None
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
    fig.suptitle(
        title or f"{masks['strategy']} (r={float(masks['base_ratio']):g}; hidden patches in orange)", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # unwritable folder, unknown image format
        raise BenchError(f"cannot write the gallery '{path}': {_first_line(exc)} (e.g. --out gallery.png)") from None
    finally:
        plt.close(fig)
    return path
