"""The one pre-training loop every strategy runs under (its step: :mod:`masking_bench.step`).

Per step: augmented batch -> ``strategy.plan`` -> model forward under the plan -> the strategy's
loss terms -> AdamW (β 0.9/0.95, wd 0.05 off biases/norms/tokens) with per-step warm-up + cosine lr
and gradient clipping. Every random choice is a pure function of (seed, epoch, step), so a run
resumed from its last epoch checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import RunSpec
from .data import Augment, Dataset, TensorLoader, load_dataset
from .errors import BenchError
from .evaluate import evaluate_encoder
from .fingerprint import code_fingerprint
from .masking import MaskingStrategy, PlanContext, build_strategy, load_plugin
from .models import MIMViT, build_model
from .precision import check_on_device
from .step import DistInfo, TrainStep, forward_losses, init_distributed
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
