"""The one pre-training loop every strategy runs under.

Per step: augmented batch -> ``strategy.plan`` -> model forward under the plan -> the strategy's
loss terms -> AdamW (β 0.9/0.95, wd 0.05 off biases/norms/tokens) with per-step warm-up + cosine lr
and gradient clipping. Every random choice is a pure function of (seed, epoch, step), so a run
resumed from its last epoch checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunSpec
from .data import Augment, Dataset, TensorLoader, load_dataset
from .errors import BenchError, NonFiniteLossError, StrategyError
from .evaluate import evaluate_encoder
from .fingerprint import code_fingerprint
from .masking import MaskingStrategy, MaskPlan, PlanContext, build_strategy, load_plugin
from .models import MIMViT, build_model, explicit_attention
from .precision import check_on_device
from .store import RunRecord, atomic_write_bytes, warn

_DATASETS: dict[tuple, Dataset] = {}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def get_dataset(spec: RunSpec, results: str | Path | None = None) -> Dataset:
    """Load once per process (Fashion-MNIST takes ~1 s to decode); a prepared dataset is found (or
    made) under :func:`masking_bench.prepared.cache_root` of ``results``."""
    from .prepared import cache_root

    d = spec.data
    cache = cache_root(results)
    key = (d.name, d.root, d.image_size, d.storage, str(cache))
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(d.name, d.root, d.image_size, d.storage, cache)
    return _DATASETS[key]


def make_model(spec: RunSpec, dataset: Dataset) -> MIMViT:
    torch.manual_seed(spec.seed)
    model = build_model(
        spec.model.preset,
        spec.method,
        img_size=dataset.image_size,
        in_chans=dataset.channels,
        norm_pix_loss=spec.train.norm_pix_loss,
        **spec.model.overrides,
    )
    # the loader's normalisation, for strategies whose targets are defined on [0, 1] pixels (misalign)
    model.pixel_mean, model.pixel_std = dataset.mean, dataset.std
    return model


def make_optimizer(model: MIMViT, spec: RunSpec) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=spec.train.betas)


def lr_at(step: int, steps_per_epoch: int, spec: RunSpec) -> float:
    """Linear warm-up then half-cosine to ``min_lr``, evaluated per step (MAE's schedule)."""
    t = spec.train
    peak = t.base_lr * t.batch_size / 256
    epoch = step / steps_per_epoch
    if epoch < t.warmup_epochs:
        return peak * epoch / t.warmup_epochs
    span = max(t.epochs - t.warmup_epochs, 1e-8)
    progress = min(1.0, (epoch - t.warmup_epochs) / span)
    return t.min_lr + (peak - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mask_seed(seed: int, epoch: int, step: int) -> int:
    return ((seed * 7_919 + 17) * 1_000_003 + epoch) * 100_003 + step


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    import timm

    from . import __version__

    return {
        "masking_bench": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }


def _save_checkpoint(record: RunRecord, model, opt, epoch_done: int, code: dict[str, str], wall_seconds: float) -> None:
    import io

    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epochs_done": epoch_done,
            "code": code,
            "wall_seconds": wall_seconds,
        },
        buf,
    )
    atomic_write_bytes(record.checkpoint_path, buf.getvalue())


def _load_checkpoint(record: RunRecord, device, code: dict[str, str]) -> dict[str, Any] | None:
    """The run's last epoch checkpoint, or None when there is none, it is damaged (set aside as
    ``checkpoint.pt.damaged`` and named on stderr) or other code wrote it (a resume must never
    continue another code's training)."""
    path = record.checkpoint_path
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "epochs_done"} <= set(state):
            raise ValueError("not a masking_bench checkpoint")
    except Exception as exc:  # truncated, random bytes, another program's file
        path.replace(path.with_name(path.name + ".damaged"))
        warn(
            f"{path} is damaged ({type(exc).__name__}); set aside as {path.name}.damaged, the run starts "
            "from its first epoch"
        )
        return None
    return state if state.get("code") == code else None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel run (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    submitit tasks get them from ``submitit.helpers.TorchDistributedEnvironment().export()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def _call_strategy(strategy: MaskingStrategy, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a strategy's ``plan``/``losses``; its exceptions come back naming the strategy (one line)."""
    try:
        return fn(*args)
    except BenchError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise StrategyError(
            f"strategy '{strategy.name}' (ratio {strategy.ratio:g}) failed in {what}(): {type(exc).__name__}: {first}"
        ) from exc


def plan_batch(
    model: MIMViT, strategy: MaskingStrategy, ctx: PlanContext, x: torch.Tensor, amp_dtype: torch.dtype | None
) -> tuple[MaskPlan, float]:
    """The strategy's plan for the whole (global) batch ``x``, checked against the contract; (plan, seconds)."""
    with _numerics(model, x.device, amp_dtype):
        t0 = time.perf_counter()
        plan = _call_strategy(strategy, "plan", strategy.plan, x, ctx)
        t_plan = time.perf_counter() - t0
    if not isinstance(plan, MaskPlan):
        raise StrategyError(f"strategy '{strategy.name}': plan() must return a MaskPlan, got {type(plan).__name__}")
    plan.check(strategy, x.shape[0], ctx.num_tokens)
    return plan, t_plan


def share_losses(
    model: MIMViT,
    strategy: MaskingStrategy,
    plan: MaskPlan,
    x: torch.Tensor,
    start: int,
    length: int,
    amp_dtype: torch.dtype | None,
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and named loss terms of the images ``start..start+length`` of the global batch under ``plan``."""
    local = plan
    if length != x.shape[0]:
        local = plan.narrow(start, length)
        x = x.narrow(0, start, length)
    with _numerics(model, x.device, amp_dtype):
        view = local.view if local.view is not None else x
        out = (forward or model)(
            view, local.mask, isolate_mask_tokens=local.isolate_mask_tokens, record_attention=local.record_attention
        )
        terms = _call_strategy(strategy, "losses", strategy.losses, model, out, local, view)
    return sum(terms.values()), terms


def _numerics(model: MIMViT, device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.ExitStack:
    """Autocast to ``amp_dtype`` (none: fp32) plus explicit attention where SDPA's CPU bf16 backward is slow."""
    stack = contextlib.ExitStack()
    stack.enter_context(
        torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    )
    stack.enter_context(explicit_attention(model, device.type == "cpu" and amp_dtype == torch.bfloat16))
    return stack


def forward_losses(
    model: MIMViT,
    strategy: MaskingStrategy,
    ctx: PlanContext,
    x: torch.Tensor,
    amp_dtype: torch.dtype | None,
    dist_info: DistInfo = DistInfo(),
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], MaskPlan, float]:
    """Plan on the whole (global) batch, check the plan, then compute this rank's share of the loss.

    Returns (loss, named loss terms, the global plan, seconds spent planning). Every rank plans the
    identical global plan (same generator state, same weights), so a DDP run sees exactly the masks
    of a single-process run with the same global batch.
    """
    plan, t_plan = plan_batch(model, strategy, ctx, x, amp_dtype)
    share = x.shape[0] // dist_info.world
    loss, terms = share_losses(model, strategy, plan, x, dist_info.rank * share, share, amp_dtype, forward)
    return loss, terms, plan, t_plan


@dataclass
class StepResult:
    """What one optimizer step reports to the loop (plain numbers, plus the realised ratios)."""

    loss: float
    terms: dict[str, float]
    lr: float
    plan_seconds: float
    realised_ratio: torch.Tensor  # (N,) per sample of the global batch


class TrainStep:
    """One optimizer step of the trainer, the only one: the pre-training loop and ``bench`` call it.

    Per call: the learning rate of this step (warm-up + cosine), the mask generator seeded from
    (seed, epoch, step), plan on the global batch → check (:func:`plan_batch`), then per micro-batch of
    this rank's share (``train.accum_steps``) forward → loss terms (:func:`share_losses`) → a
    finite-loss check → backward; then gradient clipping and AdamW. The logged loss is the mean over
    the global batch.
    """

    def __init__(
        self,
        spec: RunSpec,
        model: MIMViT,
        strategy: MaskingStrategy,
        opt: torch.optim.Optimizer,
        device: torch.device,
        steps_per_epoch: int,
        dist_info: DistInfo = DistInfo(),
        forward: Callable[..., Any] | None = None,
        where: str = "",
    ):
        self.spec, self.model, self.strategy, self.opt = spec, model, strategy, opt
        self.steps_per_epoch = steps_per_epoch
        self.dist_info = dist_info
        self.forward = forward
        self.where = where  # appended to a non-finite-loss error (where finished work is kept)
        self.amp_dtype = torch.bfloat16 if spec.precision == "bf16" else None
        self.gen = torch.Generator(device=device)
        self.ctx = PlanContext(model, model.grid, self.gen, total_epochs=spec.train.epochs, method=spec.method)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, x: torch.Tensor, epoch: int, step: int) -> StepResult:
        spec, t = self.spec, self.spec.train
        global_step = epoch * self.steps_per_epoch + step
        lr = lr_at(global_step, self.steps_per_epoch, spec)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.gen.manual_seed(mask_seed(spec.seed, epoch, step))
        self.ctx.epoch = epoch
        self.ctx.step = global_step
        plan, t_plan = plan_batch(self.model, self.strategy, self.ctx, x, self.amp_dtype)
        self.opt.zero_grad(set_to_none=True)
        share = x.shape[0] // self.dist_info.world
        micro = share // t.accum_steps
        loss = torch.zeros((), device=x.device)
        terms: dict[str, torch.Tensor] = {}
        for k in range(t.accum_steps):  # accumulate gradients over micro-batches of this rank's share
            last = k == t.accum_steps - 1
            sync = contextlib.nullcontext() if last or self.forward is None else self.forward.no_sync()
            with sync:
                start = self.dist_info.rank * share + k * micro
                part, part_terms = share_losses(
                    self.model, self.strategy, plan, x, start, micro, self.amp_dtype, self.forward
                )
                if not torch.isfinite(part):
                    advice = "lower train.base_lr" + (" or set train.amp: none" if self.amp_dtype is not None else "")
                    raise NonFiniteLossError(
                        f"run {spec.run_hash} ({spec.short()}): loss became {part.item()} at epoch "
                        f"{epoch} step {step}{self.where} — {advice}"
                    )
                if t.accum_steps == 1:
                    part.backward()
                    loss, terms = part.detach(), {name: v.detach() for name, v in part_terms.items()}
                else:
                    (part / t.accum_steps).backward()
                    loss = loss + part.detach() / t.accum_steps
                    for name, v in part_terms.items():
                        terms[name] = terms.get(name, 0.0) + v.detach() / t.accum_steps
        if t.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad)
        self.opt.step()
        if self.dist_info.world > 1:  # log the global-batch loss (mean of the ranks' equal shares)
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss /= self.dist_info.world
        return StepResult(
            loss.item(), {k: float(v.detach()) for k, v in terms.items()}, lr, t_plan, plan.realised_ratio().detach()
        )


def train_run(
    spec: RunSpec, record: RunRecord, progress: Callable[..., Any] | None = None, stop_after_steps: int | None = None
) -> dict[str, Any] | None:
    """Pre-train (or, for ``random_init``, only evaluate) one run; resume from its checkpoint if any.
    Returns the run's summary on rank 0, None on the other ranks of a data-parallel run.

    ``stop_after_steps`` (tests): raise KeyboardInterrupt after that many optimizer steps, to
    exercise an interruption mid-epoch.
    """
    wall0 = time.perf_counter()
    for plugin in spec.plugins:
        load_plugin(plugin)
    device = pick_device(spec.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist_info = init_distributed(device)
    dataset = get_dataset(spec, record.root)
    model = make_model(spec, dataset).to(device)
    t = spec.train
    code = code_fingerprint(spec)
    summary: dict[str, Any] = {
        "run_hash": spec.run_hash,
        "suite": spec.suite,
        "kind": spec.kind,
        "strategy": spec.label,
        "strategy_name": spec.strategy.name,
        "ratio": spec.ratio,
        "seed": spec.seed,
        "method": spec.method,
        "model": spec.model.preset,
        "params_encoder": sum(p.numel() for p in model.encoder_parameters()),
        "params_total": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "data": {"storage": "prepared" if dataset.train.mapped else "memory", "prepared": dataset.prepared},
        "parallel": {"world": dist_info.world, "accum_steps": t.accum_steps},
        "versions": versions(),
        "code": {"parts": code},
    }
    train_seconds = wall_before = 0.0
    if spec.kind == "pretrain" and t.epochs > 0:
        if spec.precision is None:
            raise BenchError(f"run {spec.run_hash}: no precision planned; build runs with config.expand")
        summary["precision"] = check_on_device(spec.precision, t.amp, device.type)
        strategy = build_strategy(spec.strategy.name, spec.ratio, spec.method, spec.strategy.params)
        summary["strategy_info"] = strategy.describe()
        train_seconds, wall_before = _pretrain(
            spec,
            record,
            model,
            strategy,
            dataset,
            device,
            progress if dist_info.main else None,
            stop_after_steps,
            dist_info,
            code,
            wall0,
        )
        if not dist_info.main:  # evaluation and records belong to rank 0
            return None
        summary["epochs"] = t.epochs
        rows = record.read_metrics()
        summary["final_loss"] = rows[-1]["loss"] if rows else None
        summary["train_img_per_s"] = sum(r["images"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9)
        summary["plan_share"] = sum(r["plan_share"] for r in rows) / max(len(rows), 1)
        summary["flops_per_image"] = training_flops_per_image(model, strategy, spec, dataset, device)
    else:
        summary["epochs"] = 0
    summary.update(evaluate_encoder(model, dataset, spec.eval, spec.seed, device))
    if spec.eval.finetune.enabled:
        from .finetune import finetune_top1

        summary.update(finetune_top1(model.state_dict(), spec, dataset, device, spec.seed))
    if spec.kind == "pretrain" and t.epochs > 0:  # the final point of the convergence curve
        rows = record.read_metrics()
        final = {k: v for k, v in summary.items() if k.endswith("_top1")}
        record.append_metrics({**rows[-1], "eval": {**rows[-1].get("eval", {}), **final}})
    summary["peak_mem_mb"] = peak_memory_mb(device)
    summary["train_seconds"] = train_seconds
    # every attempt up to its last checkpoint (a resumed run counts the attempts before it too)
    summary["wall_seconds"] = wall_before + time.perf_counter() - wall0
    return summary


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of this process (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def training_flops_per_image(model, strategy, spec: RunSpec, dataset: Dataset, device) -> float:
    """FLOPs of one training step (forward + backward, as counted by torch.utils.flop_counter) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    loader = TensorLoader(
        dataset.train.subset(spec.train.batch_size, seed=0),
        spec.train.batch_size,
        dataset.mean,
        dataset.std,
        device=device,
        seed=spec.seed,
    )
    x, _ = next(loader.batches(0))
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    ctx = PlanContext(
        model, model.grid, gen, epoch=spec.train.epochs, total_epochs=spec.train.epochs, method=spec.method
    )
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _, _ = forward_losses(model, strategy, ctx, x, None)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def _pretrain(
    spec: RunSpec,
    record: RunRecord,
    model: MIMViT,
    strategy: MaskingStrategy,
    dataset: Dataset,
    device: torch.device,
    progress: Callable[..., Any] | None,
    stop_after_steps: int | None,
    dist_info: DistInfo,
    code: dict[str, str],
    wall0: float,
) -> tuple[float, float]:
    """Train ``model`` for the run's epochs, resuming from its checkpoint; returns (training seconds of
    all epochs, wall seconds of earlier attempts)."""
    t = spec.train
    forward = None
    if t.batch_size % (dist_info.world * t.accum_steps):
        raise BenchError(
            f"train.batch_size {t.batch_size} must be a multiple of {dist_info.world} process(es) x "
            f"train.accum_steps {t.accum_steps}"
        )
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writes = dist_info.main
    train_split = dataset.train.subset(spec.data.train_subset, seed=spec.seed)
    aug = Augment(tuple(t.augment.scale), tuple(t.augment.ratio), t.augment.flip)
    if train_split.mapped:  # read by index from the prepared file, each rank its share
        from .prepared_loader import PreparedTrainLoader

        loader = PreparedTrainLoader(
            Path(dataset.prepared) / "train",
            train_split.rows,
            t.batch_size,
            dataset.mean,
            dataset.std,
            device,
            spec.seed,
            aug,
            dist_info.rank,
            dist_info.world,
        )
    else:
        loader = TensorLoader(
            train_split, t.batch_size, dataset.mean, dataset.std, device=device, seed=spec.seed, augment=aug
        )
    opt = make_optimizer(model, spec)
    start_epoch, wall_before = 0, 0.0
    state = _load_checkpoint(record, device, code)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epochs_done"])
        wall_before = float(state.get("wall_seconds", 0.0))
    if writes:
        record.truncate_metrics(start_epoch)
    steps_per_epoch = len(loader)
    train_step = TrainStep(
        spec,
        model,
        strategy,
        opt,
        device,
        steps_per_epoch,
        dist_info,
        forward,
        where=f"; finished epochs are kept in {record.dir}",
    )
    total_seconds = sum(r["seconds"] for r in record.read_metrics())
    bar = progress(total=t.epochs, initial=start_epoch, desc=spec.short(), unit="ep", leave=False) if progress else None
    steps_done = 0
    model.train()
    for epoch in range(start_epoch, t.epochs):
        sums = {"loss": 0.0, "plan_seconds": 0.0}
        term_sums: dict[str, float] = {}
        ratios = []
        t0 = time.perf_counter()
        for step, (x, _) in enumerate(loader.batches(epoch)):
            result = train_step(x, epoch, step)
            lr = result.lr
            sums["loss"] += result.loss
            sums["plan_seconds"] += result.plan_seconds
            for k, v in result.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v
            ratios.append(result.realised_ratio)
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                raise KeyboardInterrupt(f"stopped after {steps_done} steps (test hook)")
        seconds = time.perf_counter() - t0
        total_seconds += seconds
        r = torch.cat(ratios).float().cpu()
        row = {
            "epoch": epoch,
            "loss": sums["loss"] / steps_per_epoch,
            "lr": lr,
            "seconds": seconds,
            "images": steps_per_epoch * t.batch_size,
            "img_per_s": steps_per_epoch * t.batch_size / seconds,
            "mask_ratio_mean": r.mean().item(),
            "mask_ratio_min": r.min().item(),
            "mask_ratio_max": r.max().item(),
            "plan_share": sums["plan_seconds"] / seconds,
        }
        row.update({f"loss_{k}": v / steps_per_epoch for k, v in term_sums.items()} if len(term_sums) > 1 else {})
        ev = spec.eval
        if writes and ev.every and (epoch + 1) % ev.every == 0 and epoch + 1 < t.epochs:
            row["eval"] = {
                k: v
                for k, v in evaluate_encoder(model, dataset, ev, spec.seed, device, tuple(ev.every_protocols)).items()
                if k.endswith("_top1")
            }
            model.train()
        if writes:
            record.append_metrics(row)  # before the checkpoint: a kill in between only redoes this epoch
            _save_checkpoint(record, model, opt, epoch + 1, code, wall_before + time.perf_counter() - wall0)
        if dist_info.world > 1:
            torch.distributed.barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", ips=f"{row['img_per_s']:.0f}")
    if bar is not None:
        bar.close()
    return total_seconds, wall_before
