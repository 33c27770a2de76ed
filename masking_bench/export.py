"""Export a run's pre-trained encoder as a timm VisionTransformer (``python -m masking_bench export``).

The encoder (:class:`masking_bench.models.MIMViT`: timm blocks, a cls token, fixed 2-D sin-cos
positions with a zero row for cls, a final LayerNorm on every token) maps onto timm's
``VisionTransformer`` key for key; the sin-cos table, a buffer that checkpoints do not keep, is written
as timm's ``pos_embed``. The features our evaluation uses (masking_bench/evaluate.py) are the final
norm applied to every token, then the mean of the patch tokens (``eval.pool: mean``) or the cls token
(``cls``): timm's ``global_pool='avg'`` / ``'token'`` with ``fc_norm=False`` (timm's default for
``avg`` would move the norm after pooling, which is a different function).

Written: the state dict (``torch.save``) and beside it ``<name>.json`` with the exact
``timm.create_model`` name and keyword arguments, the input normalisation and where the weights
came from. Every export is checked before it is written: timm loads it with ``strict=True`` and gives
the same features as our encoder on a random batch.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import RunSpec, spec_from_dict
from .errors import BenchError

# timm's standard ViTs by (patch, width, depth, heads); other shapes use vit_base_patch16_224 + overrides
STANDARD_VITS = {
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
}
GENERIC_VIT = "vit_base_patch16_224"
FIXED_IMAGE_SIZE = {"fashion_mnist": 28, "cifar10": 32}  # these loaders ignore data.image_size
DEFAULT_IMAGE_SIZE = {"imagefolder": 224, "synthetic": 28}  # as masking_bench.data.load_dataset
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")
TIMM_POOL = {"mean": "avg", "cls": "token"}


def image_size(spec: RunSpec) -> int:
    """The image size the run's model was built for (the dataset's, as the trainer built it)."""
    name = spec.data.name
    return FIXED_IMAGE_SIZE.get(name) or spec.data.image_size or DEFAULT_IMAGE_SIZE[name]


def _read_spec(run_dir: Path) -> RunSpec:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise BenchError(
            f"'{run_dir}' is not a run folder (no config.yaml): give results/runs/<suite>/<hash>/, "
            "a run folder holding checkpoint.pt"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data.pop("run_hash", None)
        return spec_from_dict(data)
    except Exception as exc:
        raise BenchError(
            f"{path} cannot be read as a run ({type(exc).__name__}); export needs an intact run folder"
        ) from None


def _missing_checkpoint(run_dir: Path, spec: RunSpec) -> BenchError:
    if spec.kind == "random_init":
        return BenchError(f"run {spec.run_hash} in '{run_dir}' is the untrained-encoder floor: it has no weights")
    if run_dir.resolve().parent.parent.name == "records":
        live = run_dir.resolve().parent.parent.parent / "runs" / spec.suite / spec.run_hash
        where = (
            f"export {live} instead"
            if (live / "checkpoint.pt").is_file()
            else f"the checkpoint stays in results/runs/{spec.suite}/{spec.run_hash}/ on the machine that trained "
            f"it; to make one here, train the suite into a scratch folder (python -m masking_bench run SUITE.yaml "
            f"--results SCRATCH) and export SCRATCH/runs/{spec.suite}/{spec.run_hash}"
        )
        return BenchError(f"'{run_dir}' is a compact record: records keep no checkpoint.pt; {where}")
    return BenchError(
        f"no checkpoint.pt in '{run_dir}': the run has not finished an epoch yet (python -m masking_bench run "
        "SUITE.yaml trains it)"
    )


def load_run(run_dir: str | Path):
    """(spec, our model with the checkpoint's weights in eval mode, the checkpoint's epochs_done)."""
    from .models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BenchError(f"run folder '{run_dir}' does not exist: give results/runs/<suite>/<hash>/")
    spec = _read_spec(run_dir)
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise _missing_checkpoint(run_dir, spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state["model"]
        in_chans = int(weights["patch_embed.proj.weight"].shape[1])
    except Exception as exc:
        raise BenchError(f"{path} is not a readable masking_bench checkpoint ({type(exc).__name__})") from None
    model = build_model(spec.model.preset, spec.method, image_size(spec), in_chans, **spec.model.overrides)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BenchError(f"{path} does not fit the model its config.yaml describes: {first}") from None
    return spec, model.eval(), int(state.get("epochs_done", 0))


def timm_model_config(model, pool: str) -> tuple[str, dict[str, Any]]:
    """The ``timm.create_model`` name and keyword arguments that rebuild ``model``'s encoder."""
    patch = model.patch_size
    depth, width = len(model.blocks), model.embed_dim
    heads = model.blocks[0].attn.num_heads
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / width
    name = STANDARD_VITS.get((patch, width, depth, heads), GENERIC_VIT) if mlp_ratio == 4 else GENERIC_VIT
    kwargs = dict(
        img_size=model.grid[0] * patch,
        patch_size=patch,
        in_chans=model.in_chans,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool=TIMM_POOL[pool],
        fc_norm=False,
        num_classes=0,
    )
    return name, kwargs


def encoder_state_dict(model) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys: patch embedding, cls token, sin-cos ``pos_embed``, blocks, norm."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    state["pos_embed"] = model.pos_embed.detach().clone()
    return state


def build_timm(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]):
    """The timm model, randomly initialised (never downloads), then loaded with ``strict=True``."""
    import timm

    net = timm.create_model(name, pretrained=False, **kwargs)
    result = net.load_state_dict(state, strict=True)
    return net.eval(), result


def _input_stats(spec: RunSpec) -> dict[str, Any]:
    """The loader's normalisation (x/255 - mean) / std, when the dataset is quick to read here."""
    if spec.data.name == "imagefolder":
        return {}
    try:
        from .data import load_dataset

        ds = load_dataset(spec.data.name, spec.data.root, spec.data.image_size)
    except Exception:
        return {}
    return {"mean": list(ds.mean), "std": list(ds.std)}


def export_run(run_dir: str | Path, out: str | Path | None = None, pool: str | None = None) -> dict[str, Any]:
    """Write the run's encoder for timm to ``out`` (default ``<run>/encoder.pth``) and its recipe to
    ``out`` with ``.json``; returns the recipe. Raises :class:`BenchError` on a bad folder or pool."""
    from .store import atomic_write_bytes, atomic_write_text

    spec, model, epochs_done = load_run(run_dir)
    pool = pool or spec.eval.pool
    if pool not in TIMM_POOL:
        raise BenchError(f"unknown pool '{pool}': accepted are {', '.join(TIMM_POOL)}")
    out = Path(out) if out is not None else Path(run_dir) / "encoder.pth"
    if out.suffix == ".json":
        raise BenchError(f"--out '{out}' ends in .json: give the weights file (e.g. encoder.pth)")
    name, kwargs = timm_model_config(model, pool)
    size = kwargs["img_size"]
    stats = _input_stats(spec)
    if stats:  # timm.data.resolve_data_config then normalises as our loader does
        kwargs["pretrained_cfg_overlay"] = {**stats, "input_size": [model.in_chans, size, size]}
    state = encoder_state_dict(model)
    net, result = build_timm(name, kwargs, state)
    x = torch.randn(2, model.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = model.forward_features(x, pool=pool), net(x)
    diff = float((ours - theirs).abs().max())
    if result.missing_keys or result.unexpected_keys or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise BenchError(f"export check failed for run {spec.run_hash}: timm features differ by {diff:.3g}")
    recipe = {
        "timm_model": name,
        "kwargs": kwargs,
        "weights": out.name,
        "load": f"timm.create_model('{name}', pretrained=False, **kwargs).load_state_dict(torch.load('{out.name}'))",
        "features": f"model(x): {pool} pooling of the final norm's tokens, as masking_bench's evaluation",
        "input": {
            "image_size": kwargs["img_size"],
            "channels": model.in_chans,
            "normalisation": "(x / 255 - mean) / std per channel, the training split's statistics",
            **stats,
        },
        "run": {
            "run_hash": spec.run_hash,
            "suite": spec.suite,
            "strategy": spec.label,
            "ratio": spec.ratio,
            "seed": spec.seed,
            "method": spec.method,
            "preset": spec.model.preset,
            "epochs_done": epochs_done,
            "epochs": spec.train.epochs,
        },
        "check": {"max_abs_diff": diff, "batch": list(x.shape)},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_text(out.with_suffix(".json"), json.dumps(recipe, indent=2) + "\n")
    recipe["paths"] = [str(out), str(out.with_suffix(".json"))]
    return recipe
