"""Frozen-encoder evaluation with one locked recipe per suite: linear probe and kNN top-1.

Linear probe (MAE's protocol adapted to CPU scale, docs/strategies.md §9.1): features are extracted
once from the unaugmented images and cached; the head is BatchNorm1d without affine (eps 1e-6) +
Linear, trained with AdamW on the cached features. MAE uses LARS at batch 16384, which fails at
small batch: the HPM authors report ~10 % probes (https://github.com/Haochen-Wang409/HPM/issues/5).
kNN: cosine similarity, k neighbours, votes weighted by exp(sim / T) (Wu et al. 2018), a cheap
monitor only (it under-rates MAE features).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EvalConfig
from .data import Dataset, Split
from .errors import BenchError


@torch.inference_mode()
def extract_features(
    model, split: Split, mean, std, pool: str = "mean", batch_size: int = 1024, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N, D) float32 features of the encoder for every image of ``split`` (no augmentation)."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    c = split.images.shape[1]
    m = torch.tensor(mean, device=dev).view(1, c, 1, 1) * 255
    s = torch.tensor(std, device=dev).view(1, c, 1, 1) * 255
    feats = []
    for i in range(0, len(split), batch_size):
        x = (split.take(i, i + batch_size).to(dev).float() - m) / s
        feats.append(model.forward_features(x, pool=pool).float().cpu())
    model.train(was_training)
    return torch.cat(feats)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Top-1 (%) of BatchNorm(affine=False) + Linear trained on cached features (cosine lr, AdamW)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(
            nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6), nn.Linear(train_x.shape[1], num_classes)
        )
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = train_x.shape[0]
    steps = epochs * max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(max(1, n // batch_size)):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        pred = head(test_x).argmax(dim=1)
    return 100.0 * (pred == test_y).float().mean().item()


def knn_top1(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 (%) with cosine similarity."""
    train_n = F.normalize(train_x, dim=1)
    test_n = F.normalize(test_x, dim=1)
    correct = 0
    k = min(k, train_n.shape[0])
    for i in range(0, test_n.shape[0], chunk):
        sim = test_n[i : i + chunk] @ train_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == test_y[i : i + chunk]).sum().item()
    return 100.0 * correct / test_n.shape[0]


def low_shot_indices(labels: torch.Tensor, shots: int, draw: int, num_classes: int) -> torch.Tensor:
    """``shots`` images per class, drawn with a fixed seed per (shots, draw): identical for every run."""
    gen = torch.Generator().manual_seed(10_000 * shots + draw)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < shots:
            raise BenchError(
                f"eval.low_shot: class {c} has {len(idx)} training images, fewer than the "
                f"{shots} shots asked for; lower eval.low_shot.shots"
            )
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return torch.cat(picks).sort().values


def evaluate_encoder(
    model,
    dataset: Dataset,
    cfg: EvalConfig,
    seed: int,
    device,
    protocols: tuple[str, ...] = ("probe", "knn", "low_shot"),
) -> dict[str, float]:
    """The suite's locked recipe on one encoder -> ``<protocol>_top1`` values and their cost.

    probe / knn: on ``probe.train_subset`` of the train split; low_shot (when configured):
    ``probe_<k>shot`` / ``knn_<k>shot`` = mean over ``draws`` class-balanced label draws of k images
    per class (per-draw values in ``..._top1_draws``). All use the same test images.
    """
    start = time.perf_counter()
    test = dataset.test.subset(cfg.probe.test_subset, seed=54321)

    def feats(split):
        return extract_features(model, split, dataset.mean, dataset.std, cfg.pool, device=device)

    fte = feats(test)
    out: dict[str, float | list] = {}
    if "probe" in protocols or "knn" in protocols:
        train = dataset.train.subset(cfg.probe.train_subset, seed=12345)
        ftr = feats(train)
        if "probe" in protocols:
            out["probe_top1"] = linear_probe(
                ftr,
                train.labels,
                fte,
                test.labels,
                dataset.num_classes,
                cfg.probe.epochs,
                cfg.probe.batch_size,
                cfg.probe.lr,
                cfg.probe.weight_decay,
                seed=seed,
            )
        if "knn" in protocols:
            out["knn_top1"] = knn_top1(
                ftr, train.labels, fte, test.labels, dataset.num_classes, cfg.knn.k, cfg.knn.temperature
            )
        out["eval_train_images"] = len(train)
    if "low_shot" in protocols and cfg.low_shot is not None:
        ls = cfg.low_shot
        for shots in ls.shots:
            probes, knns = [], []
            for draw in range(ls.draws):
                idx = low_shot_indices(dataset.train.labels, shots, draw, dataset.num_classes)
                sub = dataset.train.select(idx)
                fsub = feats(sub)
                batch = min(256, len(sub))
                epochs = max(1, -(-ls.probe_steps // max(1, len(sub) // batch)))
                probes.append(
                    linear_probe(
                        fsub,
                        sub.labels,
                        fte,
                        test.labels,
                        dataset.num_classes,
                        epochs,
                        batch,
                        cfg.probe.lr,
                        cfg.probe.weight_decay,
                        seed=seed + draw,
                    )
                )
                knns.append(
                    knn_top1(
                        fsub,
                        sub.labels,
                        fte,
                        test.labels,
                        dataset.num_classes,
                        min(cfg.knn.k, len(sub)),
                        cfg.knn.temperature,
                    )
                )
            out[f"probe_{shots}shot_top1"] = sum(probes) / len(probes)
            out[f"knn_{shots}shot_top1"] = sum(knns) / len(knns)
            out[f"probe_{shots}shot_top1_draws"] = probes
            out[f"knn_{shots}shot_top1_draws"] = knns
    out["eval_test_images"] = len(test)
    out["eval_seconds"] = time.perf_counter() - start
    return out
