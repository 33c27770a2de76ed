"""Performance measurements: the trainer's step, FLOP/s, mask planning, data, evaluation.

Every figure is a RATIO of two things measured side by side in the same process: the contenders are
interleaved round by round (order alternating), each round is timed on its own and the medians are
compared, so a machine that is busy with something else slows both sides alike. The figures:

1. ``step_vs_reference``: the product's training step (the trainer's own ``step.TrainStep``: lr,
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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DataConfig, EvalConfig, ModelConfig, RunSpec, StrategyRef, TrainConfig
from .data import Augment, Dataset, TensorLoader, load_dataset, make_synthetic
from .errors import DataMissingError
from .masking import build_strategy
from .reference_mae import ReferenceStep
from .step import TrainStep, mask_seed
from .timing import interleaved, machine_info, native_bf16
from .train import make_model, make_optimizer, pick_device, training_flops_per_image

# The strategies whose planning share is measured (label -> (registry name, params)).
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

# Speed targets the project set itself (reported, never asserted; docs/performance.md).
TARGETS = {"step_vs_reference": 1.25, "flops_fraction": 0.50, "plan_share": 0.03, "data_vs_model": 20.0}


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
    """One optimizer step of the product's trainer: its own :class:`~masking_bench.step.TrainStep`.

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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every figure, for ``python -m masking_bench bench``; ``quick`` halves the rounds. (The shipped
    suites' projected wall times are :func:`masking_bench.bench_table.project_suite` of these.)"""
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
    results["machine"]["loadavg_1m_end"] = machine_info(setup.device).get("loadavg_1m")
    return results
