"""End-to-end fine-tuning of a pre-trained encoder (MAE protocol at the suite's budget; docs/strategies.md §9.2).

Layer-wise lr decay (patch embedding = layer 0, block i = layer i+1, final norm + head = top),
drop path, label smoothing, AdamW with warm-up + cosine per step, RandomResizedCrop + flip; the
top-1 on the test images is reported. The recipe is fixed per suite and stored in every record.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RunSpec
from .config_sections import FinetuneConfig
from .data import Augment, Dataset, TensorLoader
from .models import build_model


def _layer_id(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def finetune_top1(encoder_state: dict, spec: RunSpec, dataset: Dataset, device, seed: int) -> dict[str, float]:
    """Fine-tune a copy of the encoder end to end and return its test top-1. Every random draw (head
    init, drop path, crops, order) comes from ``seed``; the caller's global RNG state is untouched."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _finetune(encoder_state, spec, dataset, device, seed)


def _finetune(encoder_state: dict, spec: RunSpec, dataset: Dataset, device, seed: int) -> dict[str, float]:
    cfg: FinetuneConfig = spec.eval.finetune
    start = time.perf_counter()
    model = build_model(
        spec.model.preset,
        spec.method,
        img_size=dataset.image_size,
        in_chans=dataset.channels,
        drop_path=cfg.drop_path,
        **spec.model.overrides,
    )
    model.load_state_dict(encoder_state)
    head = nn.Linear(model.embed_dim, dataset.num_classes)
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    model.to(device).train()
    head.to(device)
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], list] = {}
    keep = {n for n, _ in model.named_parameters() if n.startswith(("cls_token", "patch_embed", "blocks.", "norm."))}
    named = [(n, p) for n, p in model.named_parameters() if n in keep] + [
        (f"head.{n}", p) for n, p in head.named_parameters()
    ]
    for name, p in named:
        decay = p.ndim >= 2 and not name.endswith("token")
        groups.setdefault((_layer_id(name, depth), decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.layer_decay ** (depth + 1 - layer),
        }
        for (layer, decay), ps in sorted(groups.items())
    ]
    opt = torch.optim.AdamW(param_groups, lr=0.0, betas=(0.9, 0.999))
    train = dataset.train.subset(cfg.train_subset, seed=seed)
    test = dataset.test.subset(spec.eval.probe.test_subset, seed=54321)
    aug = Augment(tuple(cfg.augment.scale), tuple(cfg.augment.ratio), cfg.augment.flip)
    loader = TensorLoader(train, cfg.batch_size, dataset.mean, dataset.std, device=device, seed=seed + 1, augment=aug)
    peak = cfg.base_lr * cfg.batch_size / 256
    steps = len(loader) * cfg.epochs
    warm = cfg.warmup_epochs * len(loader)
    step = 0
    for epoch in range(cfg.epochs):
        for x, y in loader.batches(epoch):
            lr = (
                peak * step / warm
                if step < warm
                else peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))
            )
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss = F.cross_entropy(
                head(model.forward_features(x, pool=spec.eval.pool)), y, label_smoothing=cfg.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    eval_loader = TensorLoader(test, 1024, dataset.mean, dataset.std, device=device, shuffle=False, drop_last=False)
    correct = 0
    with torch.inference_mode():
        for x, y in eval_loader.batches(0):
            correct += (head(model.forward_features(x, pool=spec.eval.pool)).argmax(1) == y).sum().item()
    return {"finetune_top1": 100.0 * correct / len(test), "finetune_seconds": time.perf_counter() - start}
