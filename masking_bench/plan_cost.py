"""Cost estimates for ``plan --cost``: FLOPs per image, PFLOP per run, GPU-hours, peak memory per GPU,
the data's size. Nothing is trained and no dataset is read: a fresh model of each run's shape is
measured on synthetic images of that shape.

- FLOPs per image: the trainer's own counter (:func:`masking_bench.train.training_flops_per_image`,
  ``torch.utils.flop_counter``, one step's forward + backward) on a fresh seed-0 model at a batch of
  ``COUNT_BATCH`` synthetic images of the run's channels and side. Exact for fixed-count strategies
  (the count is linear in the batch); for data-dependent counts (``sbam_amr``) it is the fresh
  model's value on synthetic images, and ragged padding (§1.5 of docs/strategies.md) is that of a
  batch of ``COUNT_BATCH``. A finished run's ``summary.json`` keeps the counter's value at its batch.
- PFLOP per run: pre-training (FLOPs/image × images per epoch × epochs, the loader's ``drop_last``
  counts) + evaluation (one forward per image of every feature extraction: final and ``eval.every``
  evaluations, low-shot draws) + fine-tuning when enabled (3 × forward per image per epoch: the
  usual forward + backward ≈ 3 forwards; its head and the loss are not counted).
- GPU-hours: PFLOP / (``gpu_tflops`` × ``mfu``); default an A100's bf16 dense peak, 312 TFLOP/s, at
  40 % model-FLOPs utilisation. GPU-hours do not depend on how many GPUs share a run.
- Peak memory per GPU: 16 B per parameter (fp32 weights, gradients, AdamW's two moments) + the
  tensors autograd saves for backward, measured in fp32 in the counting step and scaled linearly
  to the per-GPU micro-batch (``train.batch_size`` / DDP processes / ``train.accum_steps``) + the
  training split when the loader keeps it on the device (≤ 2 GiB, :class:`~masking_bench.data.TensorLoader`).
  fp32 activations bound a bf16 run's from above; the CUDA context, allocator slack and evaluation are not counted.
- Data: images × C × S × S bytes as uint8 (the in-memory copy a run decodes; prepared on-disk data
  has the same size). ImageFolder sizes come from :data:`KNOWN_IMAGEFOLDERS` (by ``data.root``'s
  folder name), else from counting the files under the root (no image is decoded).

Counts are cached per process and on disk (``<cache>/plan-cost.json``, keyed by the code fingerprint).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig, RunSpec

DEFAULT_GPU_TFLOPS = 312.0  # NVIDIA A100 SXM, dense bf16 tensor-core peak
DEFAULT_MFU = 0.40  # model-FLOPs utilisation assumed for a ViT-B MIM step
COUNT_BATCH = 2  # images per counting step (2: ragged masks still pad)
PARAM_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
DEVICE_DATA_BYTES = 2 << 30  # TensorLoader's max_device_bytes default

# (train images, test images, classes) of ImageFolder copies known by their folder name
KNOWN_IMAGEFOLDERS: dict[str, tuple[int, int, int]] = {
    "imagenet1k": (1_281_167, 50_000, 1000),  # ILSVRC-2012 train / val
    "imagenet100": (126_689, 5_000, 100),  # the CMC 100-class subset of ILSVRC-2012
}
_ALIASES = {"imagenet": "imagenet1k", "ilsvrc2012": "imagenet1k", "in1k": "imagenet1k", "in100": "imagenet100"}
_FIXED = {  # name -> (train, test, classes, channels, side)
    "fashion_mnist": (60_000, 10_000, 10, 1, 28),
    "cifar10": (50_000, 10_000, 10, 3, 32),
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class DataInfo:
    """Image counts and shape of a run's dataset; counts None when unknown."""

    train: int | None
    test: int | None
    classes: int | None
    channels: int
    size: int
    source: str  # how the counts are known

    @property
    def bytes(self) -> int | None:
        if self.train is None or self.test is None:
            return None
        return (self.train + self.test) * self.channels * self.size * self.size


def _count_images(folder: Path) -> tuple[int, int]:
    """(image files, class folders) under ``folder``: names only, nothing decoded."""
    files = classes = 0
    for entry in os.scandir(folder):
        if entry.is_dir():
            classes += 1
            for _, _, names in os.walk(entry.path):
                files += sum(n.lower().endswith(IMAGE_SUFFIXES) for n in names)
    return files, classes


def data_info(data: DataConfig) -> DataInfo:
    """Counts and shape of ``data`` without loading it (see the module docstring)."""
    if data.name in _FIXED:
        train, test, classes, c, s = _FIXED[data.name]
        return DataInfo(train, test, classes, c, s, "fixed")
    if data.name == "synthetic":
        return DataInfo(512, 256, 4, 1, data.image_size or 28, "generated")
    size = data.image_size or 224
    key = Path(data.root or "").name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key in KNOWN_IMAGEFOLDERS:
        return DataInfo(*KNOWN_IMAGEFOLDERS[key], 3, size, f"{key} (known size)")
    root = Path(data.root or "")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if data.root and (root / "train").is_dir() and test_dir is not None:
        train, classes = _count_images(root / "train")
        test, _ = _count_images(test_dir)
        return DataInfo(train, test, classes, 3, size, "files counted")
    return DataInfo(None, None, None, 3, size, f"unknown: no train/ under '{root}' and no known folder name")


@dataclass
class StepCost:
    flops_per_image: float
    activation_bytes_per_image: float
    params: int


class Estimator:
    """Measures each distinct (model, method, shape, strategy, ratio) once; see the module docstring."""

    def __init__(self, cache_file: Path | None = None, log=None):
        from .catalog import cache_dir

        self.cache_file = cache_file or cache_dir() / "plan-cost.json"
        self.log = log  # called with a line before each (slow) measurement
        self._models: dict[str, Any] = {}
        self._memo: dict[str, Any] | None = None
        self._dirty = False

    # ------------------------------------------------------------------ cache
    def _disk(self) -> dict[str, Any]:
        if self._memo is None:
            try:
                memo = json.loads(self.cache_file.read_text())
            except (OSError, ValueError):
                memo = {}
            self._memo = memo if isinstance(memo, dict) else {}
        return self._memo

    def save(self) -> None:
        """Write the counts measured by this process to the disk cache (best effort)."""
        if not self._dirty:
            return
        from .store import atomic_write_text

        try:
            atomic_write_text(self.cache_file, json.dumps(self._disk(), sort_keys=True))
            self._dirty = False
        except OSError:
            pass

    def _remember(self, key: str, value: Any) -> Any:
        self._disk()[key] = value
        self._dirty = True
        return value

    # ------------------------------------------------------------------ models
    @staticmethod
    def _model_key(spec: RunSpec, info: DataInfo) -> dict[str, Any]:
        return {
            "preset": spec.model.preset,
            "overrides": spec.model.overrides,
            "method": spec.method,
            "channels": info.channels,
            "size": info.size,
            "norm_pix_loss": spec.train.norm_pix_loss,
        }

    def _standin(self, info: DataInfo):
        from .data import make_synthetic

        return make_synthetic(n_train=COUNT_BATCH, n_test=1, size=info.size, channels=info.channels)

    def _model(self, spec: RunSpec, info: DataInfo):
        """A fresh seed-0 model of the run's shape, built once per process and key."""
        from .train import make_model

        key = json.dumps(self._model_key(spec, info), sort_keys=True)
        if key not in self._models:
            self._models[key] = make_model(spec.model_copy(update={"seed": 0}), self._standin(info))
        return self._models[key]

    @staticmethod
    def _code(spec: RunSpec) -> dict[str, str]:
        from .fingerprint import code_fingerprint

        return code_fingerprint(spec)

    # ------------------------------------------------------------------ counts
    def step_cost(self, spec: RunSpec, info: DataInfo) -> StepCost:
        """FLOPs and fp32 saved activations per image of one training step, and the parameter count."""
        key = json.dumps(
            {
                "step": self._model_key(spec, info),
                "strategy": spec.strategy.name,
                "params": spec.strategy.params,
                "ratio": spec.ratio,
                "epochs": spec.train.epochs,
                "batch": min(COUNT_BATCH, spec.train.batch_size),
                "code": self._code(spec),
            },
            sort_keys=True,
            default=str,
        )
        known = self._disk().get(key)
        if isinstance(known, list) and len(known) == 3:
            return StepCost(*known)
        return StepCost(*self._remember(key, list(self._measure_step(spec, info))))

    def _measure_step(self, spec: RunSpec, info: DataInfo) -> tuple[float, float, int]:
        import torch

        from .masking import build_strategy, load_plugin
        from .train import training_flops_per_image

        for plugin in spec.plugins:
            load_plugin(plugin)
        if self.log:
            self.log(
                f"cost: counting {spec.label} r={spec.ratio:g} on a fresh {spec.model.preset} "
                f"({spec.method}, {info.channels}x{info.size}x{info.size}) on CPU; cached in {self.cache_file}"
            )
        model = self._model(spec, info)
        batch = min(COUNT_BATCH, spec.train.batch_size)
        strategy = build_strategy(spec.strategy.name, spec.ratio, spec.method, spec.strategy.params)
        counted = spec.model_copy(update={"seed": 0, "train": spec.train.model_copy(update={"batch_size": batch})})
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            flops = training_flops_per_image(model, strategy, counted, self._standin(info), torch.device("cpu"))
        return float(flops), sum(saved.values()) / batch, sum(p.numel() for p in model.parameters())

    def forward_flops(self, spec: RunSpec, info: DataInfo) -> float:
        """FLOPs of one image through the encoder's feature function (what every evaluation runs)."""
        mkey = self._model_key(spec, info)
        mkey.pop("norm_pix_loss")
        code = self._code(spec)
        key = json.dumps({"forward": mkey, "code": code.get("model")}, sort_keys=True, default=str)
        known = self._disk().get(key)
        if isinstance(known, (int, float)):
            return float(known)
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        model = self._model(spec, info)
        x = torch.zeros(1, info.channels, info.size, info.size)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.forward_features(x, pool=spec.eval.pool)
        return self._remember(key, float(counter.get_total_flops()))

    # ------------------------------------------------------------------ a run
    def run_cost(self, spec: RunSpec, world: int = 1, gpu_tflops: float = DEFAULT_GPU_TFLOPS, mfu: float = DEFAULT_MFU):
        """The cost columns of one run (gflops per image of a pre-training step, pflop, gpu_h, mem_gb)
        as text, and the raw numbers behind them under ``_``-prefixed keys (FLOPs, hours, bytes)."""
        info = data_info(spec.data)
        out: dict[str, Any] = {"gflops": "-", "mem_gb": "-"}
        if info.train is None or info.test is None:
            return {**out, "pflop": "?", "gpu_h": "?", "mem_gb": "?"}
        fwd = self.forward_flops(spec, info)
        train_n = min(info.train, spec.data.train_subset or info.train)
        out["_eval"] = eval_flops(spec, info, fwd)
        out["_pretrain"] = 0.0
        if spec.kind == "pretrain" and spec.train.epochs > 0:
            step = self.step_cost(spec, info)
            per_epoch = (train_n // spec.train.batch_size) * spec.train.batch_size
            out["_pretrain"] = step.flops_per_image * per_epoch * spec.train.epochs
            out["_flops_per_image"] = step.flops_per_image
            out["_activation_bytes_per_image"] = step.activation_bytes_per_image
            per_gpu = -(-spec.train.batch_size // max(1, world * spec.train.accum_steps))  # the micro-batch
            resident = train_n * info.channels * info.size**2
            out["_mem"] = (
                step.params * PARAM_BYTES
                + step.activation_bytes_per_image * per_gpu
                + (resident if resident <= DEVICE_DATA_BYTES else 0)
            )
            out["gflops"] = _figure(step.flops_per_image / 1e9)
            out["mem_gb"] = f"{out['_mem'] / 1e9:.1f} GB"
        out["_flop"] = out["_pretrain"] + out["_eval"]
        out["_gpu_h"] = out["_flop"] / (gpu_tflops * 1e12 * mfu) / 3600
        out["pflop"] = _figure(out["_flop"] / 1e15)
        out["gpu_h"] = _figure(out["_gpu_h"])
        return out


def _figure(x: float) -> str:
    """Three significant digits below 100, whole numbers with thousands separators above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def eval_flops(spec: RunSpec, info: DataInfo, fwd: float) -> float:
    """Forward FLOPs of every feature extraction of the run, plus fine-tuning (3 × forward) when enabled."""
    ev = spec.eval
    test = min(info.test, ev.probe.test_subset or info.test)
    train = min(info.train, ev.probe.train_subset or info.train)
    low = sum(ev.low_shot.shots) * (info.classes or 0) * ev.low_shot.draws if ev.low_shot else 0

    def images(protocols) -> int:
        return test + (train if {"probe", "knn"} & set(protocols) else 0) + (low if "low_shot" in protocols else 0)

    epochs = spec.train.epochs if spec.kind == "pretrain" else 0
    middle = (epochs - 1) // ev.every if ev.every and epochs > 1 else 0
    n = images(("probe", "knn", "low_shot")) + middle * images(ev.every_protocols)
    total = n * fwd
    ft = ev.finetune
    if ft.enabled:
        ft_train = min(info.train, ft.train_subset or info.train)
        total += (3 * ft.epochs * (ft_train // ft.batch_size) * ft.batch_size + test) * fwd
    return total


def cost_footer(
    rows: list[dict[str, Any]], specs: list[RunSpec], world: int, gpu_tflops: float, mfu: float
) -> list[str]:
    """The lines under the plan: totals, the device assumption, what each column counts, the data sizes."""
    train = [r for r in rows if r.get("to_train") and "_flop" in r]
    pflop = sum(r["_flop"] for r in train) / 1e15
    hours = sum(r["_gpu_h"] for r in train)
    every = sum(r.get("_gpu_h", 0.0) for r in rows)
    unknown = sum("_flop" not in r for r in rows)
    longest = max((r.get("_gpu_h", 0.0) for r in rows), default=0.0) / max(1, world)
    default = gpu_tflops == DEFAULT_GPU_TFLOPS and mfu == DEFAULT_MFU
    lines = [
        f"cost of the {len(train)} runs to train: {_figure(pflop)} PFLOP = {_figure(hours)} GPU-hours "
        f"(all {len(rows)} runs: {_figure(every)}{f'; {unknown} unknown' if unknown else ''})",
        f"  GPU: {gpu_tflops:g} TFLOP/s x {mfu:.0%} MFU = {gpu_tflops * mfu:g} TFLOP/s sustained"
        + (" (default: an A100's bf16 dense peak at an assumed 40% MFU; --gpu-tflops, --mfu)" if default else ""),
        f"  wall: GPU-h / {world} GPU{'s' if world > 1 else ''} per run = at most {_figure(longest)} h per run",
        "  GFLOP/img: one pre-training step's forward + backward per image (the trainer's "
        "training_flops_per_image) on a "
        f"fresh model, batch {COUNT_BATCH} of synthetic images of the run's shape (adaptive ratios: the fresh "
        "model's)",
        "  PFLOP: GFLOP/img x images per epoch x epochs + one forward per evaluated image (final and eval.every "
        "evaluations) + fine-tuning as 3 forwards per image per epoch",
        f"  mem/GPU: 16 B/parameter (fp32 weights, grads, AdamW) + fp32 activations saved for backward scaled "
        f"to the per-GPU micro-batch (train.batch_size / {world} process{'es' if world > 1 else ''} / "
        "train.accum_steps) + device-resident "
        "data; no CUDA context, no evaluation",
    ]
    seen = set()
    for spec in specs:
        info = data_info(spec.data)
        key = (spec.data.name, spec.data.root, info.size)
        if key in seen:
            continue
        seen.add(key)
        what = spec.data.name + (f" at {spec.data.root}" if spec.data.root else "")
        if info.bytes is None:
            lines.append(f"  data: {what}: size unknown ({info.source})")
        else:
            lines.append(
                f"  data: {what} [{info.source}]: {info.train:,} train + {info.test:,} test images x "
                f"{info.channels}x{info.size}x{info.size} B = {info.bytes / 1e9:,.2f} GB as uint8"
            )
    return lines
