"""The trainer's one step (masking_bench.step.TrainStep): mask seeding per (seed, epoch, step) and the
learning-rate schedule it applies. Runs real cpu-tiny steps on 8 random images (fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from masking_bench.config import expand, parse_suite
from masking_bench.masking import PlanContext, build_strategy
from masking_bench.models import build_model
from masking_bench.step import TrainStep, lr_at, mask_seed
from masking_bench.strategies.random_masking import RandomMasking
from masking_bench.train import make_optimizer

STEPS_PER_EPOCH = 4
BASE_LR, BATCH, MIN_LR = 1.0e-3, 64, 1.0e-5
PEAK = BASE_LR * BATCH / 256  # MAE's linear scaling rule


def make_spec(tiny_suite, strategy="random", seed=0, **train):
    suite = {
        **tiny_suite,
        "strategies": [strategy],
        "ratios": [0.75],
        "seeds": [seed],
        "train": {
            **tiny_suite["train"],
            "epochs": 4,
            "warmup_epochs": 1,
            "batch_size": BATCH,
            "base_lr": BASE_LR,
            "min_lr": MIN_LR,
            "amp": "none",
            **train,
        },
        "eval": {**tiny_suite["eval"], "random_init": False},
    }
    (spec,) = [s for s in expand(parse_suite(suite)) if s.kind == "pretrain"]
    return spec


class SpyRandom(RandomMasking):
    """MAE random masking that records every plan with the (epoch, step) of its context (not registered)."""

    name = "spy_random"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def plan(self, images, ctx):
        plan = super().plan(images, ctx)
        self.seen.append((ctx.epoch, ctx.step, plan.mask.clone()))
        return plan


def make_step(spec, strategy=None):
    torch.manual_seed(spec.seed)
    model = build_model("cpu-tiny", spec.method, 28, 1, norm_pix_loss=spec.train.norm_pix_loss)
    strategy = strategy or SpyRandom(spec.ratio, spec.method)
    opt = make_optimizer(model, spec)
    return TrainStep(spec, model, strategy, opt, torch.device("cpu"), STEPS_PER_EPOCH), model, strategy, opt


@pytest.fixture(scope="module")
def batch():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(11))


def fresh_plan(spec, x, epoch, step):
    """The mask planned from a fresh generator seeded with mask_seed(seed, epoch, step)."""
    gen = torch.Generator().manual_seed(mask_seed(spec.seed, epoch, step))
    ctx = PlanContext(None, (7, 7), gen, epoch=epoch, step=epoch * STEPS_PER_EPOCH + step, method=spec.method)
    return build_strategy("random", spec.ratio, spec.method).plan(x, ctx).mask


# -------------------------------------------------------------------------------- mask seeding


def test_mask_seed_differs_across_seed_epoch_and_step():
    seeds = {mask_seed(seed, epoch, step) for seed in range(3) for epoch in range(4) for step in range(100)}
    assert len(seeds) == 3 * 4 * 100
    assert mask_seed(0, 0, 1) != mask_seed(0, 0, 0) != mask_seed(0, 1, 0) != mask_seed(1, 0, 0)
    assert mask_seed(2, 3, 5) == mask_seed(2, 3, 5)  # a pure function: a resumed run replays it


@pytest.mark.parametrize("seed", [0, 3])
def test_each_step_plans_from_its_own_seeded_generator(tiny_suite, batch, seed):
    spec = make_spec(tiny_suite, seed=seed)
    train_step, _, spy, _ = make_step(spec)
    calls = [(0, 0), (0, 1), (0, 2), (1, 0)]
    for epoch, step in calls:
        train_step(batch, epoch, step)
    assert [(e, s) for e, s, _ in spy.seen] == [(e, e * STEPS_PER_EPOCH + s) for e, s in calls]
    masks = [m for _, _, m in spy.seen]
    for (epoch, step), mask in zip(calls, masks, strict=True):
        assert torch.equal(mask, fresh_plan(spec, batch, epoch, step)), (epoch, step)
    # consecutive steps of one epoch on the same batch get different noise, and so does the next epoch
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[0], masks[3])


def test_a_step_replays_identically_in_a_new_trainer(tiny_suite, batch):
    spec = make_spec(tiny_suite, seed=1)
    first, _, spy_a, _ = make_step(spec)
    first(batch, 2, 3)
    second, _, spy_b, _ = make_step(spec)
    second(batch, 0, 0)
    second(batch, 2, 3)  # another step in between does not change what (epoch 2, step 3) plans
    assert torch.equal(spy_a.seen[0][2], spy_b.seen[1][2])


# ------------------------------------------------------------------------------ learning rate


def test_lr_warmup_is_linear_per_step_up_to_the_scaled_peak(tiny_suite):
    spec = make_spec(tiny_suite)
    assert PEAK == pytest.approx(2.5e-4)
    expected = {0: 0.0, 1: PEAK / 4, 2: PEAK / 2, 3: 3 * PEAK / 4, 4: PEAK}
    for step, lr in expected.items():
        assert lr_at(step, STEPS_PER_EPOCH, spec) == pytest.approx(lr, rel=1e-12, abs=1e-15), step


def test_lr_after_warmup_is_a_half_cosine_to_min_lr(tiny_suite):
    spec = make_spec(tiny_suite)  # 4 epochs, 1 of warm-up: the cosine spans 3 epochs = 12 steps
    for step in (4, 5, 7, 10, 13, 15, 16):
        progress = (step - 4) / 12
        lr = MIN_LR + (PEAK - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(step, STEPS_PER_EPOCH, spec) == pytest.approx(lr, rel=1e-12), step
    assert lr_at(10, STEPS_PER_EPOCH, spec) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-12)
    assert lr_at(16, STEPS_PER_EPOCH, spec) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at(40, STEPS_PER_EPOCH, spec) == pytest.approx(MIN_LR, rel=1e-12)  # clamped past the end


def test_lr_fractional_and_zero_warmup(tiny_suite):
    half = make_spec(tiny_suite, warmup_epochs=0.5)
    assert lr_at(1, STEPS_PER_EPOCH, half) == pytest.approx(PEAK / 2, rel=1e-12)
    assert lr_at(2, STEPS_PER_EPOCH, half) == pytest.approx(PEAK, rel=1e-12)
    none = make_spec(tiny_suite, warmup_epochs=0)
    assert lr_at(0, STEPS_PER_EPOCH, none) == pytest.approx(PEAK, rel=1e-12)


@pytest.mark.parametrize("epoch,step", [(0, 1), (0, 3), (1, 2)])
def test_train_step_applies_the_scheduled_lr(tiny_suite, batch, epoch, step):
    spec = make_spec(tiny_suite)
    train_step, model, _, opt = make_step(spec)
    expected = lr_at(epoch * STEPS_PER_EPOCH + step, STEPS_PER_EPOCH, spec)
    assert expected > 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train_step(batch, epoch, step)
    assert result.lr == pytest.approx(expected, rel=1e-12)
    assert all(group["lr"] == pytest.approx(expected, rel=1e-12) for group in opt.param_groups)
    # AdamW's first step moves each parameter by lr * g/(|g| + eps) (+ decay): the largest move of a
    # no-decay parameter (a bias) is the lr that opt.step() actually used
    bias = "blocks.0.attn.qkv.bias"
    moved = (dict(model.named_parameters())[bias].detach() - before[bias]).abs().max().item()
    assert moved == pytest.approx(expected, rel=1e-3)


# -------------------------------------------------------------------------- gradient clipping


def grad_norm(model) -> float:
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def test_train_step_clips_the_gradient_norm(tiny_suite, batch):
    # the gradients stay on the parameters after the step: clipped to train.clip_grad, not without it
    free_step, free_model, _, _ = make_step(make_spec(tiny_suite, clip_grad=None))
    free_step(batch, 0, 1)
    unclipped = grad_norm(free_model)
    clip = unclipped / 10
    step, model, _, _ = make_step(make_spec(tiny_suite, clip_grad=clip))
    step(batch, 0, 1)
    assert grad_norm(model) == pytest.approx(clip, rel=1e-4)
