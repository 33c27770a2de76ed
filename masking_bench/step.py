"""The trainer's one optimizer step, used by the pre-training loop (:mod:`masking_bench.train`) and timed
by ``bench``: the learning-rate schedule, the mask seed of each step, the data-parallel process group,
the masking plan on the global batch and each process's share of the loss, in micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunSpec
from .errors import BenchError, NonFiniteLossError, StrategyError
from .masking import MaskingStrategy, MaskPlan, PlanContext
from .models import MIMViT, explicit_attention


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
                # the share's loss is the mean of its equal micro-batches' (exact for a single one)
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
