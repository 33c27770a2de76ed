"""Inspect a strategy's masks on real images: a PNG gallery and an .npz dump (the ``masks`` command).

Images are the first N of a dataset's test split (Fashion-MNIST unless told or a suite / checkpoint
names another), unaugmented. The model whose embeddings a
salience strategy reads is a run's checkpoint when given, else a freshly initialised one (seeded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .data import DATASET_NAMES, load_dataset
from .errors import BenchError
from .gallery_panels import NOTES, attention_maps, build_figure, target_label, view_label
from .masking import PlanContext, build_strategy
from .models import build_model

AFTER_WARMUP = 10**9  # default planning epoch: past any strategy warm-up
MAX_IMAGES = 64  # --n: a gallery of more images is unreadable (and planning 10 000 of them takes minutes)
MAX_SEED = 2**63 - 1
WHERE_CHECKPOINTS = "runs keep results/runs/<suite>/<hash>/checkpoint.pt"
DEFAULT_DATA = "fashion_mnist"
NATIVE_SIZES = {"fashion_mnist": 28, "cifar10": 32}  # --image-size resizes imagefolder / synthetic only
MAX_IMAGE_SIZE = 512
# parameters the committed study (suites/ratio_sweep.yaml) trains a strategy with, when they differ
# from the class defaults: a gallery shows that variant unless told otherwise (docs/strategies.md §6.3)
STUDY_SUITE = "suites/ratio_sweep.yaml"
STUDY_PARAMS: dict[str, dict[str, Any]] = {"sbam_amr": {"mode": "sample"}}


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


def load_model(
    checkpoint: str | None,
    method: str,
    preset: str,
    seed: int,
    img_size: int,
    channels: int,
    overrides: dict[str, Any] | None = None,
):
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
    return build_model(preset, method, img_size, channels, **(overrides or {})), method


def check_data(name: str, image_size: int | None = None) -> None:
    """One-line errors for a dataset request (before any file is read; nothing is ever downloaded)."""
    if name not in DATASET_NAMES:
        raise BenchError(f"masks: unknown dataset '{name}': accepted are {', '.join(DATASET_NAMES)}")
    if image_size is None:
        return
    if not _is_int(image_size) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise BenchError(f"masks: --image-size {image_size} is out of range: give 1..{MAX_IMAGE_SIZE} pixels")
    if name in NATIVE_SIZES and image_size != NATIVE_SIZES[name]:
        raise BenchError(
            f"masks: --image-size applies to imagefolder and synthetic only; {name} images are "
            f"{NATIVE_SIZES[name]}x{NATIVE_SIZES[name]}"
        )


def checkpoint_data(checkpoint: str | None) -> tuple[str, str | None, int | None] | None:
    """(name, root, image_size) of the dataset a checkpoint's run trained on, from the ``config.yaml``
    next to it; None without a checkpoint, a config or a readable ``data`` block."""
    if not checkpoint:
        return None
    try:
        data = yaml.safe_load((Path(checkpoint).parent / "config.yaml").read_text()).get("data") or {}
        name = data.get("name")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    size = data.get("image_size") if name not in NATIVE_SIZES else None
    return name, data.get("root"), size


@dataclass
class SuiteSetup:
    """What a gallery takes from a suite: data, model, method and the strategy's entry (if listed)."""

    strategy: str
    label: str
    params: dict[str, Any] | None  # None: the suite does not list the strategy
    data: str
    root: str | None
    image_size: int | None
    method: str
    preset: str
    overrides: dict[str, Any]
    plugins: list[str]


def suite_setup(path: str | Path, strategy: str) -> SuiteSetup:
    """Read a suite for ``masks --suite``: ``strategy`` is one of its labels or strategy names."""
    from .config import load_suite

    suite = load_suite(path)
    refs = [r for r in suite.strategies if r.display == strategy] or [r for r in suite.strategies if r.name == strategy]
    if len(refs) > 1:
        labels = ", ".join(r.display for r in refs)
        raise BenchError(
            f"suite '{path}' lists strategy '{strategy}' {len(refs)} times: give one of its labels ({labels})"
        )
    ref = refs[0] if refs else None
    size = suite.data.image_size if suite.data.name not in NATIVE_SIZES else None
    return SuiteSetup(
        strategy=ref.name if ref else strategy,
        label=ref.display if ref else strategy,
        params=dict(ref.params) if ref else None,
        data=suite.data.name,
        root=suite.data.root,
        image_size=size,
        method=suite.method,
        preset=suite.model.preset,
        overrides=dict(suite.model.overrides),
        plugins=list(suite.plugins),
    )


def _title(strategy, label: str, shown: dict[str, Any], study: bool, dataset, ratio: float, model_text: str) -> str:
    params = f" [{', '.join(f'{k}={v}' for k, v in shown.items())}]" if shown else ""
    params += f" (as {STUDY_SUITE} trains it)" if study else ""
    size = f"{dataset.channels}x{dataset.image_size}x{dataset.image_size}"
    line = f"{label}{params}: r={ratio:g}, {dataset.name} {size}, {model_text}; hidden patches opaque orange"
    note = NOTES.get(strategy.name)
    return line + (f"\n{note}" if note else "")


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
    data: str | None = None,
    image_size: int | None = None,
    overrides: dict | None = None,
    study_defaults: bool = True,
    label: str | None = None,
) -> dict[str, Any]:
    """Plan masks for the first ``n`` test images (1..``MAX_IMAGES``) of ``data`` (default: the
    checkpoint's dataset, else Fashion-MNIST); returns arrays ready for :func:`dump` / :func:`render`.
    ``params`` go on top of :data:`STUDY_PARAMS` (unless ``study_defaults`` is off, e.g. for a suite's
    own entry). Requests and parameters are checked before any data is read."""
    check_request(ratio, n, seed, epoch)
    method, preset, ck_overrides = checkpoint_setup(checkpoint, method, preset)
    ck = None if data else checkpoint_data(checkpoint)  # an explicit dataset wins over the run's
    name = data or (ck[0] if ck else DEFAULT_DATA)
    root = data_root if data_root is not None else (ck[1] if ck else None)
    size = image_size if image_size is not None else (ck[2] if ck else None)
    check_data(name, size)
    base = STUDY_PARAMS.get(strategy_name, {}) if study_defaults else {}
    strategy = build_strategy(strategy_name, ratio, method, {**base, **(params or {})})
    dataset = load_dataset(name, root, size)
    model, method = load_model(
        checkpoint, method, preset, seed, dataset.image_size, dataset.channels, ck_overrides or overrides
    )
    model.eval()
    c = dataset.channels
    raw = dataset.test.images[:n].float() / 255.0
    mean = torch.tensor(dataset.mean).view(1, c, 1, 1)
    std = torch.tensor(dataset.std).view(1, c, 1, 1)
    x = (raw - mean) / std
    ctx = PlanContext(model, model.grid, torch.Generator().manual_seed(seed), epoch=epoch, method=method)
    with torch.no_grad():
        plan = strategy.plan(x, ctx)

    def pixels(t: torch.Tensor) -> np.ndarray:
        return (t.detach().cpu().float() * std + mean).clamp(0, 1).numpy().astype(np.float32)

    shown = {k: v for k, v in strategy.params.items() if k in base or v != type(strategy).defaults.get(k, object())}
    study = bool(base) and all(strategy.params[k] == v for k, v in base.items())
    model_text = f"checkpoint {checkpoint}" if checkpoint else f"fresh {preset} {method} model (seed {seed})"
    out = {
        "strategy": strategy_name,
        "images": raw.numpy().astype(np.float32),
        "mask": plan.mask.cpu().numpy().astype(bool),
        "ratio": plan.realised_ratio().cpu().numpy().astype(np.float32),
        "grid": np.array(model.grid),
        "params": json.dumps(strategy.describe()["params"], sort_keys=True, default=str),
        "base_ratio": np.float32(ratio),
        "data": dataset.name,
        "title": _title(strategy, label or strategy_name, shown, study, dataset, ratio, model_text),
    }
    size2 = tuple(x.shape[-2:])
    if plan.view is not None:
        out["view"], out["view_label"] = pixels(plan.view), view_label(strategy, size2)
    if isinstance(plan.target, torch.Tensor) and plan.target.shape == x.shape:
        out["target"], out["target_label"] = pixels(plan.target), target_label(strategy, size2)
    with torch.no_grad():
        out.update(attention_maps(model, x, plan, method))
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
    """PNG grid: one column per image; rows: the image, the strategy's own encoder input and target if
    any, what the encoder sees (hidden patches opaque), then score maps with colour bars
    (:mod:`masking_bench.gallery_panels`)."""
    import matplotlib.pyplot as plt

    default = str(masks["title"]) if "title" in masks else f"{masks['strategy']} (r={float(masks['base_ratio']):g})"
    gallery = build_figure(masks, title or default)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        gallery.fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # unwritable folder, unknown image format
        raise BenchError(f"cannot write the gallery '{path}': {_first_line(exc)} (e.g. --out gallery.png)") from None
    finally:
        plt.close(gallery.fig)
    return path
