"""Performance measurements: the trainer's step, FLOP/s, mask planning, data, evaluation.

Every figure is a RATIO of two things measured side by side in the same process: the contenders are
interleaved round by round (order alternating), each round is timed on its own and the medians are
compared, so a machine that is busy with something else slows both sides alike. The figures:

1. ``step_vs_reference``: the product's training step (the trainer's own ``train.TrainStep``: lr,
   seeded plan, plan check, forward, loss, backward, clipping, AdamW, loss read-back)
   against a plain MAE step written here (official ``models_mae.py`` structure: timm blocks,
   gather-based random masking, fp32, plain AdamW, no tricks) at the same size, batch and ratio.
2. ``flops_vs_peak``: achieved FLOP/s of the training step (FLOPs from ``torch.utils.flop_counter``)
   against a large square matmul, in fp32 and (where the host runs it natively) under bf16 autocast.
3. ``plan_share``: each strategy's ``plan`` as a share of that strategy's whole training step.
4. ``data_vs_model``: batches per second of the augmented ``TensorLoader`` against the steps per
   second the model consumes.
5. ``eval_features``: ``evaluate.extract_features`` throughput (what the linear probe and kNN cost).

Opt-in speed variants of the product step (``compile``, ``fused_adamw``, ``attention``) are measured
here only; the product's trainer is untouched, so a study's numbers stay comparable.

Device-agnostic: everything takes a ``torch.device``; CUDA is synchronised around every timed call.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import DataConfig, EvalConfig, ModelConfig, RunSpec, StrategyRef, TrainConfig
from .data import Augment, Dataset, TensorLoader, load_dataset, make_synthetic
from .errors import DataMissingError
from .masking import build_strategy
from .models import PRESETS, patchify, sincos_pos_embed_2d
from .train import TrainStep, make_model, make_optimizer, mask_seed, pick_device, training_flops_per_image

# The strategies of issue 6, target 3 (label -> (registry name, params)).
PLAN_STRATEGIES: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "block": ("block", {}),
    "sbam": ("sbam", {}),
    "sbam_amr-batch": ("sbam_amr", {"mode": "batch"}),
    "sbam_amr-sample": ("sbam_amr", {"mode": "sample"}),
    "mto": ("mto", {}),
    "misalign": ("misalign", {}),
}

# The step as the CPU suites run it (train.amp: bf16): autocast, and on CPU the trainer itself swaps
# SDPA for timm's explicit attention (SDPA's CPU bf16 backward made bf16 slower than fp32 here).
FAST_STEP: dict[str, Any] = {"amp": "bf16"}
# Opt-in torch.compile variants (minutes of compilation on a 2-core CPU, hence not in the default run).
COMPILE_VARIANTS: dict[str, dict] = {
    "compiled": {"compile": True},
    "compiled_explicit": {"compile": True, "attention": "explicit"},
    "bf16_compiled": {**FAST_STEP, "compile": True},
}

# The targets (reported, never asserted).
TARGETS = {"step_vs_reference": 1.25, "flops_fraction": 0.50, "plan_share": 0.03, "data_vs_model": 20.0}


# ----------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-call seconds of each contender, one value per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): how many times faster ``fast`` is."""
        return self.median(slow) / self.median(fast)

    def spread(self, name: str) -> float:
        """Half the inter-quartile range relative to the median (a noise indicator)."""
        v = sorted(self.seconds[name])
        if len(v) < 4:
            return float("nan")
        q1, q3 = statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]
        return (q3 - q1) / 2 / statistics.median(v)


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int = 7,
    inner: dict[str, int] | int = 1,
    warmup: int = 1,
) -> Timings:
    """Time each contender ``rounds`` times, interleaved (A B C, C B A, A B C, ...).

    ``inner`` calls per timed round (an int or per contender) amortise very short calls; every
    round records seconds per call. ``warmup`` untimed rounds first (allocator, autotuning, compile).
    """
    names = list(contenders)
    reps = {n: inner if isinstance(inner, int) else inner.get(n, 1) for n in names}
    for _ in range(warmup):
        for n in names:
            for _ in range(reps[n]):
                contenders[n]()
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            fn = contenders[n]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps[n]):
                fn()
            sync(device)
            out[n].append((time.perf_counter() - t0) / reps[n])
    return Timings(out)


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 natively (else only fp32 is measured: emulated bf16 is ~50x slower)."""
    from .precision import hardware

    return hardware(device.type).native_bf16


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including the load (they are ratios, the load still matters),
    the CPU's ISA level and the precision ``train.amp: auto`` picks here."""
    from .precision import hardware, resolve

    hw = hardware(device.type)
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": hw.native_bf16,
        "amp_auto": resolve("auto", device.type, hw),
        "amp_auto_why": hw.why,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ setup


def bench_spec(
    preset: str = "cpu-tiny",
    batch_size: int = 256,
    ratio: float = 0.75,
    strategy: str = "random",
    params: dict | None = None,
    amp: str = "none",
    dataset: str = "fashion_mnist",
    seed: int = 0,
    method: str = "mae",
) -> RunSpec:
    """A run spec at the CPU default config (the ratio_sweep's model, batch, optimizer and augmentation)."""
    return RunSpec(
        suite="bench",
        strategy=StrategyRef(name=strategy, params=dict(params or {})),
        ratio=ratio,
        seed=seed,
        method=method,
        model=ModelConfig(preset=preset),
        data=DataConfig(name=dataset),
        train=TrainConfig(batch_size=batch_size, amp=amp, epochs=3, warmup_epochs=0.5),
        eval=EvalConfig(),
        precision="bf16" if amp == "bf16" else "fp32",
    )


@dataclass
class BenchSetup:
    """Device, data and one augmented, normalised batch shared by every contender."""

    device: torch.device
    dataset: Dataset
    preset: str = "cpu-tiny"
    batch_size: int = 256
    ratio: float = 0.75
    batch: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]

    def spec(self, strategy: str = "random", params: dict | None = None, amp: str = "none") -> RunSpec:
        return bench_spec(
            self.preset,
            self.batch_size,
            self.ratio,
            strategy,
            params,
            amp,
            "fashion_mnist" if self.dataset.name == "fashion_mnist" else "synthetic",
        )


_DATA: dict[str, Dataset] = {}


def bench_dataset(name: str = "auto") -> Dataset:
    """Fashion-MNIST when installed ('auto'), else a generated set of the same shape (timings only)."""
    if name not in _DATA:
        if name in ("auto", "fashion_mnist"):
            try:
                _DATA[name] = load_dataset("fashion_mnist")
            except DataMissingError:
                if name == "fashion_mnist":
                    raise
                _DATA[name] = make_synthetic(n_train=20_000, n_test=2_048, size=28)
        else:
            _DATA[name] = load_dataset(name)
    return _DATA[name]


def make_setup(
    device: str | torch.device = "auto",
    preset: str = "cpu-tiny",
    batch_size: int = 256,
    ratio: float = 0.75,
    dataset: str = "auto",
) -> BenchSetup:
    dev = pick_device(device) if isinstance(device, str) else device
    ds = bench_dataset(dataset)
    loader = TensorLoader(
        ds.train.subset(batch_size, seed=0), batch_size, ds.mean, ds.std, device=dev, seed=0, augment=Augment()
    )
    x, _ = next(loader.batches(0))
    return BenchSetup(dev, ds, preset, batch_size, ratio, x)


# ----------------------------------------------------------------------------- the product's step


class ProductStep:
    """One optimizer step of the product's trainer: its own :class:`~masking_bench.train.TrainStep`.

    Variants (opt-in, measured here only — the trainer does not have them):
      compile: ``torch.compile`` the model's forward (passed through the step's ``forward`` hook);
      fused_adamw: ``torch.optim.AdamW(..., fused=True)`` (one kernel for all parameters);
      attention: 'fused' (timm's default, SDPA) or 'explicit' (timm's ``fused_attn = False``).
    """

    def __init__(
        self,
        setup: BenchSetup,
        strategy: str = "random",
        params: dict | None = None,
        amp: str = "none",
        compile: bool = False,
        fused_adamw: bool = False,
        attention: str = "fused",
        compile_options: dict | None = None,
    ):
        self.setup = setup
        self.spec = spec = setup.spec(strategy, params, amp)
        self.device = dev = setup.device
        self.model = make_model(spec, setup.dataset).to(dev)
        if attention == "explicit":
            for blk in self._blocks():
                blk.attn.fused_attn = False
        self.strategy = build_strategy(spec.strategy.name, spec.ratio, spec.method, spec.strategy.params)
        opt = make_optimizer(self.model, spec)
        if fused_adamw:
            opt = torch.optim.AdamW(
                [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in opt.param_groups],
                lr=0.0,
                betas=spec.train.betas,
                fused=True,
            )
        forward = None
        if compile:
            compiled = torch.compile(self.model, **(compile_options or {}))

            def forward(*args, **kwargs):  # a plain function: an OptimizedModule has no bool()
                return compiled(*args, **kwargs)

        self.steps_per_epoch = 78  # ratio_sweep: 20k images / 256
        self.train_step = TrainStep(spec, self.model, self.strategy, opt, dev, self.steps_per_epoch, forward=forward)
        self.global_step = 0

    @property
    def x(self) -> torch.Tensor:
        return self.setup.batch

    def _blocks(self):
        return list(self.model.blocks) + list(getattr(self.model, "decoder_blocks", []))

    def __call__(self) -> float:
        epochs = max(self.spec.train.epochs, 1)
        step = self.global_step % self.steps_per_epoch
        epoch = self.global_step // self.steps_per_epoch % epochs
        result = self.train_step(self.x, epoch, step)
        self.global_step += 1
        return result.loss

    def plan(self):
        """The strategy's ``plan`` alone, as the trainer's step calls it (same autocast, seeded generator)."""
        ts = self.train_step
        ts.gen.manual_seed(mask_seed(self.spec.seed, 0, self.global_step))
        amp = ts.amp_dtype
        with torch.autocast(device_type=self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return self.strategy.plan(self.x, ts.ctx)

    def flops_per_image(self) -> float:
        """The trainer's own FLOP count (``train.training_flops_per_image``: forward + backward)."""
        return training_flops_per_image(self.model, self.strategy, self.spec, self.setup.dataset, self.device)


# ------------------------------------------------------------------------- the plain reference MAE


class ReferenceMAE(nn.Module):
    """The official MAE model (facebookresearch/mae ``models_mae.py``) at a preset's size, written plainly.

    timm ``PatchEmbed`` and ``Block`` (LayerNorm eps 1e-6, qkv bias, timm's default attention), a
    frozen 2-D sin-cos position table, ``random_masking`` by argsort + ``gather``, a decoder that
    restores the token order with ``gather``, MSE on per-patch normalised pixels of hidden patches.
    """

    def __init__(
        self,
        img_size: int = 28,
        in_chans: int = 1,
        patch_size: int = 4,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        from functools import partial

        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed_2d(embed_dim, grid, grid)])[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        dpos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed_2d(decoder_dim, grid, grid)])[None]
        self.decoder_pos_embed = nn.Parameter(dpos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


class ReferenceStep:
    """The plain MAE training step: forward, backward, AdamW (no clipping, no autocast), loss read-back."""

    def __init__(self, setup: BenchSetup, seed: int = 0):
        cfg = {k: v for k, v in PRESETS[setup.preset].items()}
        torch.manual_seed(seed)
        ds = setup.dataset
        self.model = ReferenceMAE(img_size=ds.image_size, in_chans=ds.channels, **cfg).to(setup.device)
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1.5e-4,
            betas=(0.9, 0.95),
        )
        self.ratio = setup.ratio
        self.x = setup.batch
        self.model.train()

    def __call__(self) -> float:
        loss = self.model(self.x, self.ratio)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def flops_per_image(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.model(self.x, self.ratio).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.x.shape[0]


# ------------------------------------------------------------------------------------ matmul peak


def default_matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def matmul_call(device: torch.device, dtype: torch.dtype, n: int | None = None) -> tuple[Callable[[], Any], float]:
    """A square ``n×n @ n×n`` product into a preallocated output, and its FLOPs (2n³)."""
    n = n or default_matmul_size(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


# ------------------------------------------------------------------------------------ the figures


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def step_vs_reference(setup: BenchSetup, rounds: int = 9, variants: dict[str, dict] | None = None) -> dict[str, Any]:
    """Figure 1: ``reference / product`` step-time ratio (> 1: the product's step is faster).

    ``variants``: extra product configurations (name -> ``ProductStep`` keyword arguments), measured
    in the same interleaving, e.g. ``{"compiled": {"compile": True}}``.
    """
    contenders: dict[str, Callable[[], Any]] = {"reference": ReferenceStep(setup), "product": ProductStep(setup)}
    for name, kw in (variants or {}).items():
        contenders[name] = ProductStep(setup, **kw)
    timings = interleaved(contenders, setup.device, rounds=rounds, warmup=2)
    b = setup.batch_size
    out: dict[str, Any] = {
        "batch": b,
        "rounds": rounds,
        "reference_ms": timings.median("reference") * 1e3,
        "reference_img_per_s": b / timings.median("reference"),
    }
    for name in contenders:
        if name == "reference":
            continue
        out[f"{name}_ms"] = timings.median(name) * 1e3
        out[f"{name}_img_per_s"] = b / timings.median(name)
        out[f"{name}_vs_reference"] = timings.ratio("reference", name)
        out[f"{name}_spread"] = timings.spread(name)
    out["ratio"] = out["product_vs_reference"]
    out["timings"] = timings.seconds
    return out


def flops_vs_peak(
    setup: BenchSetup,
    rounds: int = 7,
    matmul_n: int | None = None,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    variants: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Figure 2: achieved FLOP/s of the product's step / FLOP/s of a large matmul, per precision.

    fp32: the step as the trainer runs it (``train.amp: none``) vs an fp32 matmul; bf16: the step
    under ``train.amp: bf16`` (autocast) vs a bf16 matmul. ``variants``: extra product configurations
    (``ProductStep`` keywords), each compared with the matmul of its own precision.
    """
    dev = setup.device
    amp_of = {"fp32": "none", "bf16": "bf16"}
    dtype_of = {"fp32": torch.float32, "bf16": torch.bfloat16}
    steps = {f"step_{d}": ProductStep(setup, amp=amp_of[d]) for d in dtypes}
    for name, kw in (variants or {}).items():
        steps[f"step_{name}"] = ProductStep(setup, **kw)
    flops_img = next(iter(steps.values())).flops_per_image()
    contenders: dict[str, Callable[[], Any]] = dict(steps)
    mm_flops = 0.0
    for d in dtypes:
        contenders[f"matmul_{d}"], mm_flops = matmul_call(dev, dtype_of[d], matmul_n)
    inner = {k: (3 if k.startswith("matmul") else 1) for k in contenders}
    timings = interleaved(contenders, dev, rounds=rounds, inner=inner, warmup=2)
    step_flops = flops_img * setup.batch_size
    out: dict[str, Any] = {
        "flops_per_image": flops_img,
        "matmul_n": matmul_n or default_matmul_size(dev),
        "rounds": rounds,
    }
    for d in dtypes:
        peak = mm_flops / timings.median(f"matmul_{d}")
        out[f"peak_{d}_gflops"] = peak / 1e9
    for name in steps:
        tag = name[len("step_") :]
        kw = (variants or {}).get(tag, {"amp": amp_of.get(tag, "none")})
        peak_tag = "bf16" if kw.get("amp") == "bf16" else "fp32"
        achieved = step_flops / timings.median(name)
        out[f"{tag}_gflops"] = achieved / 1e9
        out[f"{tag}_peak"] = peak_tag
        out[f"{tag}_fraction"] = achieved / (out[f"peak_{peak_tag}_gflops"] * 1e9)
        out[f"{tag}_img_per_s"] = setup.batch_size / timings.median(name)
    best = max((t for t in (n[len("step_") :] for n in steps)), key=lambda t: out[f"{t}_fraction"])
    out["best"] = best
    out["fraction"] = out[f"{best}_fraction"]
    out["timings"] = timings.seconds
    return out


def plan_share(
    setup: BenchSetup,
    strategies: dict[str, tuple[str, dict]] | None = None,
    rounds: int = 5,
    plan_inner: int = 3,
    fast: dict | None = None,
) -> dict[str, Any]:
    """Figure 3: per strategy, median ``plan`` time / median time of that strategy's whole training step.

    ``fast``: ``ProductStep`` keywords of a faster step (e.g. ``FAST_STEP``); its share is
    reported too (``share_fast``), since a faster step makes the same planning a larger share.
    """
    out: dict[str, Any] = {"rounds": rounds, "strategies": {}}
    for label, (name, params) in (strategies or PLAN_STRATEGIES).items():
        step = ProductStep(setup, strategy=name, params=params)
        contenders: dict[str, Callable[[], Any]] = {"plan": step.plan, "step": step}
        if fast is not None:
            contenders["fast"] = ProductStep(setup, strategy=name, params=params, **fast)
        timings = interleaved(contenders, setup.device, rounds=rounds, inner={"plan": plan_inner}, warmup=1)
        row = {
            "plan_ms": timings.median("plan") * 1e3,
            "step_ms": timings.median("step") * 1e3,
            "step_best_ms": min(timings.seconds["step"]) * 1e3,
            "share": timings.median("plan") / timings.median("step"),
        }
        if fast is not None:
            row["fast_step_ms"] = timings.median("fast") * 1e3
            row["fast_step_best_ms"] = min(timings.seconds["fast"]) * 1e3
            row["share_fast"] = timings.median("plan") / timings.median("fast")
        out["strategies"][label] = row
    out["max_share"] = max(v["share"] for v in out["strategies"].values())
    out["worst"] = max(out["strategies"], key=lambda k: out["strategies"][k]["share"])
    if fast is not None:
        out["max_share_fast"] = max(v["share_fast"] for v in out["strategies"].values())
    return out


def data_vs_model(
    setup: BenchSetup, rounds: int = 7, batches_per_round: int = 10, train_subset: int = 20_000
) -> dict[str, Any]:
    """Figure 4: augmented loader batches/s (``TensorLoader`` + ``Augment``, the trainer's) / model steps/s."""
    ds, dev, b = setup.dataset, setup.device, setup.batch_size
    loader = TensorLoader(
        ds.train.subset(train_subset, seed=0), b, ds.mean, ds.std, device=dev, seed=0, augment=Augment()
    )
    state = {"epoch": 0, "it": loader.batches(0)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = loader.batches(state["epoch"])
            return next(state["it"])

    step = ProductStep(setup)
    timings = interleaved(
        {"batch": next_batch, "step": step}, dev, rounds=rounds, inner={"batch": batches_per_round, "step": 1}, warmup=1
    )
    return {
        "loader_batches_per_s": 1 / timings.median("batch"),
        "model_steps_per_s": 1 / timings.median("step"),
        "batch_ms": timings.median("batch") * 1e3,
        "step_ms": timings.median("step") * 1e3,
        "ratio": timings.ratio("step", "batch"),
        "rounds": rounds,
    }


def eval_features(
    setup: BenchSetup, images: int = 1024, rounds: int = 3, batch_size: int = 1024, matmul_n: int | None = None
) -> dict[str, Any]:
    """Figure 5: ``extract_features`` images/s on test images, and its FLOP/s vs an fp32 matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    from .data import Split
    from .evaluate import extract_features

    ds, dev = setup.dataset, setup.device
    test = ds.test if len(ds.test) >= images else ds.train
    split = Split(test.images[:images], test.labels[:images])
    model = make_model(setup.spec(), ds).to(dev)
    with torch.inference_mode():
        probe = (split.images[:8].to(dev).float() - 128) / 64
        counter = FlopCounterMode(display=False)
        with counter:
            model.eval().forward_features(probe)
        model.train()
    flops_img = counter.get_total_flops() / probe.shape[0]
    mm, mm_flops = matmul_call(dev, torch.float32, matmul_n)

    def feats():
        return extract_features(model, split, ds.mean, ds.std, "mean", batch_size, dev)

    timings = interleaved(
        {"features": feats, "matmul": mm}, dev, rounds=rounds, inner={"features": 1, "matmul": 3}, warmup=1
    )
    img_s = images / timings.median("features")
    peak = mm_flops / timings.median("matmul")
    return {
        "images": images,
        "img_per_s": img_s,
        "img_per_s_best": images / min(timings.seconds["features"]),
        "flops_per_image": flops_img,
        "gflops": img_s * flops_img / 1e9,
        "peak_fp32_gflops": peak / 1e9,
        "fraction": img_s * flops_img / peak,
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------------------ profile

_CATEGORIES = (
    ("GEMM (linear, mm, addmm, bmm, conv)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "convolution")),
    ("attention (SDPA kernels)", ("scaled_dot_product", "flash_attention")),
    ("softmax", ("softmax",)),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("optimizer + clipping", ("adamw", "lerp", "addcdiv", "addcmul", "_foreach", "norm", "sqrt", "clamp")),
    (
        "copies, casts, layout",
        (
            "copy_",
            "_to_copy",
            "clone",
            "contiguous",
            "cat",
            "gather",
            "scatter",
            "index",
            "transpose",
            "permute",
            "reshape",
            "view",
            "expand",
        ),
    ),
)


def profile_breakdown(step: Callable[[], Any], steps: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Where a step's time goes (torch.profiler, self CPU time of aten ops, grouped), plus the top ops."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other aten ops")
        groups[cat] = groups.get(cat, 0.0) + e.self_cpu_time_total / 1e6 / steps
    groups["non-aten: Python, autograd, compiled kernels"] = max(wall - total, 0.0)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "step_ms": wall * 1e3,
        "shares": {k: v / wall for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 / steps for e in top},
    }


# ---------------------------------------------------------------------------------------- the table


def default_variants(compile: bool = False, bf16: bool = True) -> dict[str, dict]:
    """Product-step variants measured beside the fp32 step: bf16 (only where native), compiled ones when asked."""
    variants = {"bf16": dict(FAST_STEP)} if bf16 else {}
    if compile:
        variants.update({k: v for k, v in COMPILE_VARIANTS.items() if bf16 or v.get("amp") != "bf16"})
    return variants


def run_all(
    device: str = "auto",
    quick: bool = False,
    compile: bool = False,
    threads: int | None = None,
    suites: tuple[str, ...] = (),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every figure, for ``python -m masking_bench bench``; ``quick`` halves the rounds."""
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda s: None)
    setup = make_setup(device)
    r = (lambda n: max(3, n // 2)) if quick else (lambda n: n)
    bf16 = native_bf16(setup.device)
    variants = default_variants(compile, bf16)
    results: dict[str, Any] = {"machine": machine_info(setup.device)}
    m = results["machine"]
    say(
        f"ISA {m['isa']}: train.amp auto -> {m['amp_auto']} ({m['amp_auto_why']})"
        + ("" if bf16 else "; bf16 figures skipped (emulated here)")
    )
    say("1/5 training step vs the plain reference MAE step ...")
    results["step"] = step_vs_reference(setup, rounds=r(9), variants=variants)
    say("2/5 achieved FLOP/s vs matmul peak ...")
    results["flops"] = flops_vs_peak(
        setup, rounds=r(7), variants=variants, dtypes=("fp32", "bf16") if bf16 else ("fp32",)
    )
    say("3/5 mask planning per strategy ...")
    results["plan"] = plan_share(setup, rounds=r(5), fast=FAST_STEP if bf16 else None)
    say("4/5 data pipeline vs model ...")
    results["data"] = data_vs_model(setup, rounds=r(7))
    say("5/5 evaluation feature extraction ...")
    results["eval"] = eval_features(setup, rounds=r(3))
    for path in suites:
        results.setdefault("suites", {})[str(path)] = project_suite(path, results)
    results["machine"]["loadavg_1m_end"] = machine_info(setup.device).get("loadavg_1m")
    return results


# ------------------------------------------------------------------------------ suite projections


def suite_workload(path, dataset: Dataset | None = None) -> dict[str, Any]:
    """What a suite asks for: optimizer steps per strategy label and feature-extraction images.

    Mirrors ``train._pretrain`` (``len(loader)`` steps per epoch, drop_last) and
    ``evaluate.evaluate_encoder`` (test + probe-train + low-shot images, per evaluation).
    """
    from .config import expand, load_suite

    suite = load_suite(path)
    ds = dataset or bench_dataset("auto")
    n_train, n_test = len(ds.train), len(ds.test)
    steps: dict[str, int] = {}
    images = 0
    runs = 0
    for spec in expand(suite, str(path)):
        runs += 1
        ev = spec.eval

        def eval_images(protocols, ev=ev) -> int:
            n = min(ev.probe.test_subset or n_test, n_test)
            if "probe" in protocols or "knn" in protocols:
                n += min(ev.probe.train_subset or n_train, n_train)
            if "low_shot" in protocols and ev.low_shot is not None:
                n += sum(ev.low_shot.shots) * ds.num_classes * ev.low_shot.draws
            return n

        images += eval_images(("probe", "knn", "low_shot"))
        if spec.kind != "pretrain" or spec.train.epochs == 0:
            continue
        t = spec.train
        per_epoch = min(spec.data.train_subset or n_train, n_train) // t.batch_size
        key = _plan_label(spec.strategy.name, spec.strategy.params)
        steps[key] = steps.get(key, 0) + per_epoch * t.epochs
        if ev.every:
            images += sum(
                eval_images(tuple(ev.every_protocols))
                for e in range(t.epochs)
                if (e + 1) % ev.every == 0 and e + 1 < t.epochs
            )
    return {"runs": runs, "steps": steps, "eval_images": images}


def _plan_label(name: str, params: dict) -> str:
    for label, (n, p) in PLAN_STRATEGIES.items():
        if n == name and all(params.get(k) == v for k, v in p.items()):
            return label
    return name


def project_suite(path, results: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Projected wall time of a suite from measured rates: Σ steps × that strategy's step time +
    feature-extraction images / measured images/s, at the median rounds (the load of the moment)
    and at the best rounds (≈ an idle machine). Not counted: probe-head training, kNN, checkpoints,
    process start-up (seconds per run). ``workers`` processes share the machine evenly."""
    work = suite_workload(path)
    plan = results["plan"]["strategies"]
    fallback = plan.get("random", next(iter(plan.values())))

    def train_seconds(key: str) -> float:
        return sum(n * plan.get(k, fallback).get(key, float("nan")) / 1e3 for k, n in work["steps"].items())

    ev = results["eval"]
    eval_s, eval_best = (
        work["eval_images"] / ev["img_per_s"],
        work["eval_images"] / ev.get("img_per_s_best", ev["img_per_s"]),
    )
    out = {**work, "workers": workers, "train_s": train_seconds("step_ms"), "eval_s": eval_s}
    out["total_min"] = (out["train_s"] + eval_s) / 60 / workers
    out["total_best_min"] = (train_seconds("step_best_ms") + eval_best) / 60 / workers
    out["total_fast_train_min"] = (train_seconds("fast_step_ms") + eval_s) / 60 / workers
    out["total_fast_train_best_min"] = (train_seconds("fast_step_best_ms") + eval_best) / 60 / workers
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of every figure with its target (printed by ``bench`` and the pytest summary)."""
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "" if ok is None else ("meets" if ok else "MISSES")

    if "step" in results:
        s = results["step"]
        rows.append(
            (
                "1. training step / plain reference step",
                f"{s['ratio']:.2f}x ({s['product_img_per_s']:.0f} vs {s['reference_img_per_s']:.0f} img/s)",
                f">= {TARGETS['step_vs_reference']:.2f}x",
                verdict(s["ratio"] >= TARGETS["step_vs_reference"]),
            )
        )
        for k in s:
            if k.endswith("_vs_reference") and k != "product_vs_reference":
                name = k[: -len("_vs_reference")]
                rows.append(
                    (
                        f"   variant '{name}' / reference",
                        f"{s[k]:.2f}x ({s[name + '_img_per_s']:.0f} img/s)",
                        f">= {TARGETS['step_vs_reference']:.2f}x",
                        verdict(s[k] >= TARGETS["step_vs_reference"]),
                    )
                )
    if "flops" in results:
        f = results["flops"]
        rows.append(("2. FLOPs per image (fwd + bwd)", f"{f['flops_per_image'] / 1e6:.1f} MFLOP", "", ""))
        for tag in [k[: -len("_fraction")] for k in f if k.endswith("_fraction")]:
            pk = f[tag + "_peak"]
            rows.append(
                (
                    f"   step {tag}: achieved / {pk} matmul peak",
                    f"{100 * f[tag + '_fraction']:.0f}% "
                    f"({f[tag + '_gflops']:.1f} / {f['peak_' + pk + '_gflops']:.0f} GFLOP/s)",
                    f">= {100 * TARGETS['flops_fraction']:.0f}%",
                    verdict(f[tag + "_fraction"] >= TARGETS["flops_fraction"]),
                )
            )
    if "plan" in results:
        p = results["plan"]
        for label, v in p["strategies"].items():
            fast = f"; {100 * v['share_fast']:.1f}% of the bf16 step" if "share_fast" in v else ""
            rows.append(
                (
                    f"3. mask planning share: {label}",
                    f"{100 * v['share']:.2f}% ({v['plan_ms']:.1f} ms of {v['step_ms']:.0f} ms{fast})",
                    f"<= {100 * TARGETS['plan_share']:.0f}%",
                    verdict(v["share"] <= TARGETS["plan_share"]),
                )
            )
    if "data" in results:
        d = results["data"]
        rows.append(
            (
                "4. data pipeline / model consumption",
                f"{d['ratio']:.0f}x ({d['loader_batches_per_s']:.0f} vs {d['model_steps_per_s']:.2f} batches/s)",
                f">= {TARGETS['data_vs_model']:.0f}x",
                verdict(d["ratio"] >= TARGETS["data_vs_model"]),
            )
        )
    if "eval" in results:
        e = results["eval"]
        rows.append(
            (
                "5. eval feature extraction",
                f"{e['img_per_s']:.0f} img/s ({e['flops_per_image'] / 1e6:.0f} MFLOP/img, "
                f"{100 * e['fraction']:.0f}% of fp32 matmul)",
                "-",
                "",
            )
        )
    m = results.get("machine", {})
    workers = max(1, (m.get("cpu_count") or 1) // max(1, m.get("threads") or 1)) if m.get("device") == "cpu" else 1
    for path, proj in results.get("suites", {}).items():
        line = (
            f"{proj['total_min']:.1f} min (fastest rounds {proj['total_best_min']:.1f}; train "
            f"{proj['train_s'] / 60:.1f} + eval {proj['eval_s'] / 60:.1f})"
        )
        if math.isfinite(proj["total_fast_train_min"]):
            line += f", with bf16 steps {proj['total_fast_train_min']:.1f}"
        if workers > 1:
            line += f"; / {workers} one-process-per-core workers: {proj['total_min'] / workers:.1f}"
        rows.append((f"   projected {path} ({proj['runs']} runs, 1 process)", line, "", ""))
    header = ("figure", "measured", "target", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = []
    m = results.get("machine")
    if m:
        lines.append(
            f"machine: {m.get('cpu')} ({m.get('cpu_count')} logical CPUs), device {m.get('device')}"
            + (f" [{m['gpu']}]" if m.get("gpu") else "")
            + f", torch {m.get('torch')}, "
            f"{m.get('threads')} thread(s), load average {m.get('loadavg_1m')} -> {m.get('loadavg_1m_end', '?')}"
        )
        lines.append(
            f"ISA {m.get('isa')}: train.amp auto trains in {m.get('amp_auto')} here ({m.get('amp_auto_why')})"
            + ("" if m.get("native_bf16", True) else "; bf16 not measured (emulated on this host)")
        )
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths).rstrip())
    for r_ in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r_, widths, strict=True)).rstrip())
    return "\n".join(lines)


def scalars(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a figure's result to JSON scalars (for ``benchmark.extra_info``); raw timings dropped."""
    out: dict[str, Any] = {}
    for k, v in result.items():
        if k == "timings":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[prefix + k] = round(v, 5)
        elif isinstance(v, (int, str, bool)) or v is None:
            out[prefix + k] = v
    return out
