"""Every built-in strategy at the papers' shapes: ``vit-base`` on 224-px RGB (3×224×224, 14×14 tokens).

For each strategy × MIM method it supports (``methods``; sbam_amr in both ``batch`` and ragged
``sample`` mode), two optimizer steps of the trainer's own step (``step.TrainStep``, fp32, batch 2,
on CPU) from a run built by ``config.parse_suite`` + ``expand``, then the evaluation's feature
function (``evaluate.extract_features``) on a batch. Checked: finite losses (and each named term),
every parameter that received a gradient moved, realised masks with the strategy's token counts
(docs/strategies.md §1.2, §3.3, §4.3, §6), MTO's attention losses (§7.4), misalign's 288-px whole
view (§8.1–8.2) and features of shape (2, 768).

Slow (~vit-base forward + backward per step): marked ``real_shapes``; see the README's test section.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from masking_bench.config import expand, parse_suite
from masking_bench.data import Augment, TensorLoader, make_synthetic
from masking_bench.evaluate import extract_features
from masking_bench.masking import available, build_strategy, num_hidden
from masking_bench.step import TrainStep
from masking_bench.train import make_model, make_optimizer

pytestmark = pytest.mark.real_shapes

SIZE, CHANNELS, BATCH, PATCH = 224, 3, 2, 16
GRID = SIZE // PATCH  # 14
TOKENS = GRID * GRID  # 196
RATIO = 0.75
WIDTH = 768  # vit-base's embedding width

# (strategy, params, label): every built-in strategy once; sbam_amr in both of its modes
CASES = [
    ("random", {}, "random"),
    ("block", {}, "block"),
    ("coarse_random", {}, "coarse_random"),
    ("sbam", {}, "sbam"),
    ("sbam_amr", {"mode": "batch"}, "sbam_amr_batch"),
    ("sbam_amr", {"mode": "sample"}, "sbam_amr_sample"),
    ("mto", {}, "mto"),
    ("misalign", {}, "misalign"),
]
PARAMS = [
    pytest.param(name, params, method, id=f"{label}-{method}")
    for name, params, label in CASES
    for method in ("mae", "simmim")
    if method in available()[name].methods
]


def test_cases_cover_every_builtin_strategy():
    builtin = {n for n, cls in available().items() if cls.__module__.startswith("masking_bench.strategies")}
    assert builtin <= {name for name, _, _ in CASES}


def make_spec(name: str, params: dict, method: str):
    suite = {
        "name": "real_shapes",
        "method": method,
        "model": "vit-base",
        "data": {"name": "synthetic", "image_size": SIZE},
        "strategies": [{"name": name, "params": params}],
        "ratios": [RATIO],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": BATCH, "base_lr": 1.0e-2, "warmup_epochs": 0, "amp": "none"},
        "eval": {"random_init": False},
        "device": "cpu",
    }
    (spec,) = expand(parse_suite(suite))
    return spec


@pytest.fixture(scope="module")
def dataset():
    """Synthetic RGB images at 224 px (the suite's synthetic data is grey; the real shapes are RGB)."""
    return make_synthetic(n_train=BATCH, n_test=BATCH, size=SIZE, channels=CHANNELS)


@pytest.fixture(scope="module")
def base_models(dataset):
    """One freshly initialised vit-base per method, copied by each case (building one takes seconds)."""
    return {m: make_model(make_spec("random", {}, m), dataset) for m in ("mae", "simmim")}


def expected_hidden(name: str, params: dict, method: str, hidden: torch.Tensor) -> None:
    """The realised per-sample hidden counts follow the strategy's counting rule."""
    exact = num_hidden(TOKENS, RATIO)  # MAE's count: 196 - int(196 * 0.25) = 147
    counts = hidden.tolist()
    if name in ("random", "sbam", "mto", "misalign") or (name in ("block", "coarse_random") and method == "mae"):
        assert counts == [exact] * BATCH, counts  # §1.2, §3.3 top-up, §4.3 exact_count
    elif name == "coarse_random":  # SimMIM's own count: ceil(49 cells * r) cells of 2x2 tokens (§4.1)
        assert counts == [4 * math.ceil((GRID // 2) ** 2 * RATIO)] * BATCH, counts
    elif name == "block":  # BEiT's rule under simmim: never above the target, may fall short (§3.1)
        assert all(1 <= c <= exact for c in counts), counts
        assert sum(counts) / BATCH >= exact - 0.1 * TOKENS, counts
    else:  # sbam_amr: r in [r0 - Δ, r0 + Δ] (§6.2); one count per batch in batch mode
        delta = params.get("delta_ratio", 0.10)
        low, high = num_hidden(TOKENS, RATIO - delta), num_hidden(TOKENS, RATIO + delta)
        assert all(low - 1 <= c <= high + 1 for c in counts), (counts, low, high)
        if params.get("mode", "batch") == "batch":
            assert len(set(counts)) == 1, counts


@pytest.mark.parametrize("name,params,method", PARAMS)
def test_two_steps_and_features_at_vit_base_224(name, params, method, dataset, base_models, monkeypatch):
    spec = make_spec(name, params, method)
    assert spec.model.preset == "vit-base" and spec.precision == "fp32"
    model = copy.deepcopy(base_models[method])
    assert model.grid == (GRID, GRID) and model.in_chans == CHANNELS
    strategy = build_strategy(name, spec.ratio, method, spec.strategy.params)
    plans = []
    plan = strategy.plan
    monkeypatch.setattr(strategy, "plan", lambda x, ctx: plans.append(plan(x, ctx)) or plans[-1])
    sizes = []
    if name == "misalign":  # the whole view the strategy renders before cropping the encoder's input
        from masking_bench.strategies import misalign

        resize = misalign.resize
        monkeypatch.setattr(
            misalign, "resize", lambda img, size, mode: sizes.append(tuple(size)) or resize(img, size, mode)
        )
        assert misalign.big_size(SIZE, strategy.params["view_scale"]) == 288  # 224 * 9/7 (§8.1)

    loader = TensorLoader(dataset.train, BATCH, dataset.mean, dataset.std, seed=0, augment=Augment())
    x, _ = next(loader.batches(0))
    assert x.shape == (BATCH, CHANNELS, SIZE, SIZE)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    step = TrainStep(spec, model, strategy, make_optimizer(model, spec), torch.device("cpu"), steps_per_epoch=2)
    model.train()
    results = [step(x, 0, s) for s in range(2)]

    for r in results:
        assert math.isfinite(r.loss), r
        assert all(math.isfinite(v) for v in r.terms.values()), r.terms
        assert r.lr > 0
    moved = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    trained = [k for k, p in model.named_parameters() if p.grad is not None]
    assert trained and set(trained) <= set(moved), sorted(set(trained) - set(moved))
    assert "blocks.0.attn.qkv.weight" in moved and "head.weight" in moved

    assert len(plans) == 2
    for p, r in zip(plans, results, strict=True):
        assert p.mask.shape == (BATCH, TOKENS) and p.mask.dtype == torch.bool
        hidden = p.mask.sum(dim=1)
        assert torch.equal((r.realised_ratio * TOKENS).round().long(), hidden)
        expected_hidden(name, spec.strategy.params, method, hidden)

    if name == "mto":  # the three attention losses, weighted in (§7.4-7.5)
        for r in results:
            assert {"recon", "mto_spa", "mto_e", "mto_r"} <= set(r.terms), r.terms
            assert r.terms["mto_e"] > 0 and r.terms["mto_r"] > 0 and r.terms["mto_spa"] >= 0
        assert plans[0].isolate_mask_tokens and plans[0].record_attention
    if name == "misalign":
        assert (288, 288) in sizes, sizes
        assert plans[0].view.shape == plans[0].target.shape == (BATCH, CHANNELS, SIZE, SIZE)
        assert {"recon_centre", "recon_border"} <= set(results[0].terms)
    if name == "sbam_amr" and params["mode"] == "sample":  # counts differ per image: the mae encoder pads (§1.5)
        assert any(len(set(p.mask.sum(dim=1).tolist())) > 1 for p in plans), [p.mask.sum(dim=1) for p in plans]

    feats = extract_features(model, dataset.test, dataset.mean, dataset.std, spec.eval.pool, device="cpu")
    assert feats.shape == (BATCH, WIDTH) and torch.isfinite(feats).all()
