"""MTO-interp (strategies/mto.py, docs/strategies.md §7): masking unchanged, isolation, hand-checked terms, wiring."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_one_line_error, ctx_for

from masking_bench.errors import BenchError
from masking_bench.masking import build_strategy
from masking_bench.models import patchify, unpatchify
from masking_bench.step import forward_losses
from masking_bench.strategies.mto import depth_weights, mto_terms

L = 49  # cpu-tiny at 28 px: 7x7 tokens
N = 4


# ------------------------------------------------------------------------------------ masking


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_masks_equal_random(models, noise_images, method):
    model = models[method]
    for seed in (0, 1, 7):
        for ratio in (0.5, 0.75):
            mto = build_strategy("mto", ratio, method).plan(noise_images, ctx_for(model, seed))
            rnd = build_strategy("random", ratio, method).plan(noise_images, ctx_for(model, seed))
            assert torch.equal(mto.mask, rnd.mask)
            assert (mto.mask.sum(dim=1) == L - int(L * (1 - ratio))).all()
            assert mto.view is None and mto.target is None


def test_plan_flags_and_depth_schedule(models, noise_images):
    mae, simmim = models["mae"], models["simmim"]
    plan = build_strategy("mto", 0.75, "mae").plan(noise_images, ctx_for(mae, 0))
    assert plan.isolate_mask_tokens and plan.record_attention == (0,)  # 1-block decoder -> that block
    plan = build_strategy("mto", 0.75, "simmim").plan(noise_images, ctx_for(simmim, 0))
    assert plan.isolate_mask_tokens and plan.record_attention == (0, 1)  # first half of 4 encoder blocks
    plan = build_strategy("mto", 0.75, "simmim", {"depth_schedule": "linear"}).plan(noise_images, ctx_for(simmim, 0))
    assert plan.record_attention == (0, 1, 2, 3)
    plan = build_strategy("mto", 0.75, "simmim", {"recalibrate": False}).plan(noise_images, ctx_for(simmim, 0))
    assert not plan.isolate_mask_tokens
    off = {"lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 0.0}
    assert build_strategy("mto", 0.75, "simmim", off).plan(noise_images, ctx_for(simmim, 0)).record_attention == ()
    assert depth_weights(1, "first_half") == [1.0]
    assert depth_weights(3, "first_half") == [1.0, 1.0, 0.0]
    assert depth_weights(8, "first_half") == [1.0] * 4 + [0.0] * 4
    assert depth_weights(4, "linear") == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(BenchError):
        build_strategy("mto", 0.75, "mae", {"depth_schedule": "last"})
    assert build_strategy("mto", 0.75).describe()["interpretation"] is True


# ---------------------------------------------------------------------------------- isolation


def _perturb_hidden(images, mask, p=4):
    tokens = patchify(images, p)
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9)) * 3
    tokens = torch.where(mask[..., None], noise, tokens)
    return unpatchify(tokens, p, images.shape[1], (7, 7))


def _preds_with_shifted_mask_token(model, images, mask):
    """The isolated and the non-isolated predictions while seeded noise is added to the model's mask
    token (restored afterwards)."""
    saved = model.mask_token.data.clone()
    try:
        model.mask_token.data += torch.randn(saved.shape, generator=torch.Generator().manual_seed(3))
        return model(images, mask, isolate_mask_tokens=True).pred, model(images, mask, isolate_mask_tokens=False).pred
    finally:
        model.mask_token.data.copy_(saved)


@torch.no_grad()
def test_simmim_isolation_makes_visible_outputs_independent_of_mask_tokens(models, noise_images, fresh_model):
    model = fresh_model("simmim")
    mask = build_strategy("mto", 0.75, "simmim").plan(noise_images, ctx_for(model, 0)).mask
    vis = ~mask
    other = _perturb_hidden(noise_images, mask)
    base_iso = model(noise_images, mask, isolate_mask_tokens=True).pred
    base_free = model(noise_images, mask, isolate_mask_tokens=False).pred
    # hidden content never reaches a SimMIM encoder (its embeddings are replaced), isolated or not
    assert torch.allclose(model(other, mask, isolate_mask_tokens=True).pred[vis], base_iso[vis], atol=1e-5)
    iso, free = _preds_with_shifted_mask_token(model, other, mask)
    assert torch.allclose(iso[vis], base_iso[vis], atol=1e-5)  # visible tokens never aggregate mask tokens
    assert not torch.allclose(free[vis], base_free[vis], atol=1e-3)  # ... while without isolation they do
    assert not torch.allclose(iso[mask], base_iso[mask], atol=1e-3)  # hidden queries still see them


@torch.no_grad()
def test_mae_isolation_in_decoder(models, noise_images, fresh_model):
    model = fresh_model("mae")
    mask = build_strategy("mto", 0.75, "mae").plan(noise_images, ctx_for(model, 1)).mask
    vis = ~mask
    base_iso = model(noise_images, mask, isolate_mask_tokens=True).pred
    base_free = model(noise_images, mask, isolate_mask_tokens=False).pred
    assert torch.allclose(model(_perturb_hidden(noise_images, mask), mask, True).pred[vis], base_iso[vis], atol=1e-5)
    iso, free = _preds_with_shifted_mask_token(model, noise_images, mask)
    assert torch.allclose(iso[vis], base_iso[vis], atol=1e-5)
    assert not torch.allclose(free[vis], base_free[vis], atol=1e-3)


# ------------------------------------------------------------------------------ the three terms


def tiny_example():
    """N=1, 2 heads, L=2 tokens, token 1 (T-index 1) hidden, token 2 (T-index 2) visible; T-index 0 = cls."""
    mask = torch.tensor([[True, False]])
    P = torch.tensor(
        [
            [
                [
                    [0.5, 0.2, 0.3],  # cls (visible)
                    [0.1, 0.6, 0.3],  # hidden query
                    [0.2, 0.4, 0.4],
                ],  # visible query
                [[1 / 3, 1 / 3, 1 / 3]] * 3,
            ]
        ]
    )
    A = torch.tensor(
        [
            [
                [
                    [0.625, 0.0, 0.375],  # visible rows: no weight on the hidden key
                    [0.25, 0.5, 0.25],
                    [1 / 3, 0.0, 2 / 3],
                ],
                [
                    [0.5, 0.0, 0.5],
                    [0.5, 0.5, 0.0],  # a hidden row with an exact zero: 0·log 0 = 0
                    [0.5, 0.0, 0.5],
                ],
            ]
        ]
    )
    return P, A, mask


def test_terms_hand_computed():
    P, A, mask = tiny_example()
    spa, ent, rec = mto_terms(P, A, mask)
    # L_spa: visible queries incl. cls, mass on hidden keys: head 1 (0.2, 0.4), head 2 (1/3, 1/3)
    assert spa.item() == pytest.approx((0.2 + 0.4 + 1 / 3 + 1 / 3) / 4, abs=1e-6)
    # L_e: the hidden query's row entropy: head 1 -(2·0.25 ln 0.25 + 0.5 ln 0.5) = 1.5 ln 2, head 2 ln 2
    assert ent.item() == pytest.approx((1.5 * math.log(2) + math.log(2)) / 2, abs=1e-6)
    # L_r: the hidden query's mass on hidden keys: 0.5 and 0.5
    assert rec.item() == pytest.approx(0.5, abs=1e-6)
    spa_no_cls, _, _ = mto_terms(P, A, mask, include_cls=False)
    assert spa_no_cls.item() == pytest.approx((0.4 + 1 / 3) / 2, abs=1e-6)


def test_terms_pool_over_samples_and_finite_gradient():
    P, A, mask = tiny_example()
    # a second sample with both tokens hidden: its only visible query is cls
    P2, A2 = torch.cat([P, P]), torch.cat([A, A])
    mask2 = torch.tensor([[True, False], [True, True]])
    logits = torch.log(A2).requires_grad_(True)  # -inf where A = 0, as a recalibrated row
    probs = logits.softmax(dim=-1)
    assert (probs == 0).any()
    spa, ent, rec = mto_terms(P2, probs, mask2)
    (spa + ent + rec).backward()
    assert torch.isfinite(spa + ent + rec) and torch.isfinite(logits.grad).all()
    # pooled over samples and heads: sample 1 gives 4 (query, head) values, sample 2 (cls only) 2
    assert spa.item() == pytest.approx((0.2 + 0.4 + 1 / 3 + 1 / 3 + 0.5 + 2 / 3) / 6, abs=1e-5)
    # L_r: sample 1's hidden query: 0.5 (head 1), 0.5 (head 2); sample 2's rows 1, 2 on keys {1, 2}:
    # head 1 0.75, 2/3; head 2 0.5, 0.5
    want_r = (0.5 + 0.5 + 0.75 + 2 / 3 + 0.5 + 0.5) / 6
    assert rec.item() == pytest.approx(want_r, abs=1e-5)


# ------------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("method,schedule", [("mae", "first_half"), ("simmim", "first_half"), ("simmim", "linear")])
def test_losses_wiring(models, noise_images, method, schedule):
    model = models[method]
    strat = build_strategy(
        "mto", 0.75, method, {"depth_schedule": schedule, "lambda_spa": 0.3, "lambda_e": 0.2, "lambda_r": 0.5}
    )
    with torch.no_grad():
        plan = strat.plan(noise_images, ctx_for(model, 2))
        out = model(noise_images, plan.mask, plan.isolate_mask_tokens, plan.record_attention)
        terms = strat.losses(model, out, plan, noise_images)
    assert set(terms) == {"recon", "mto_spa", "mto_e", "mto_r"}
    assert set(out.attention) == set(plan.record_attention)
    weights = depth_weights(len(model.decoder_blocks if method == "mae" else model.blocks), schedule)
    want = torch.zeros(3)
    hidden = torch.cat([torch.zeros(N, 1, dtype=torch.bool), plan.mask], dim=1)
    for layer in plan.record_attention:
        A = out.attention[layer]
        # the recorded forward attention is the recalibrated one: visible (and cls) rows ignore hidden keys
        assert (A * (~hidden)[:, None, :, None] * hidden[:, None, None, :]).abs().max() == 0
        P = out.attention_logits[layer].softmax(dim=-1)
        want += weights[layer] * torch.stack(mto_terms(P, A, plan.mask))
    assert want[0] > 0  # L_spa reads the un-recalibrated P, which does put mass on mask tokens
    assert terms["mto_spa"].item() == pytest.approx(0.3 * want[0].item(), rel=1e-5)
    assert terms["mto_e"].item() == pytest.approx(0.2 * want[1].item(), rel=1e-5)
    assert terms["mto_r"].item() == pytest.approx(0.5 * want[2].item(), rel=1e-5)
    assert terms["recon"].item() == pytest.approx(model.reconstruction_loss(out.pred, noise_images, plan.mask).item())


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("recalibrate", [True, False])
def test_step_finite_and_backward(method, recalibrate, noise_images, fresh_model):
    model = fresh_model(method)
    model.train()
    strat = build_strategy("mto", 0.75, method, {"recalibrate": recalibrate})
    loss, terms, plan, _ = forward_losses(model, strat, ctx_for(model, 0), noise_images, None)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert terms["mto_e"] > 0 and terms["mto_spa"] > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_zero_lambdas_give_plain_recon(models, noise_images, method):
    model = models[method]
    strat = build_strategy("mto", 0.75, method, {"lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 0.0})
    with torch.no_grad():
        loss, terms, plan, _ = forward_losses(model, strat, ctx_for(model, 4), noise_images, None)
        out = model(noise_images, plan.mask, isolate_mask_tokens=True)
    assert plan.record_attention == ()
    assert loss.item() == terms["recon"].item()
    assert terms["mto_spa"] == 0 and terms["mto_e"] == 0 and terms["mto_r"] == 0
    assert loss.item() == pytest.approx(model.reconstruction_loss(out.pred, noise_images, plan.mask).item(), abs=1e-6)


@pytest.mark.parametrize(
    "params,fragments",
    [
        ({"recalibrate": 1}, ("recalibrate", "1", "true or false")),
        ({"recalibrate": "no"}, ("recalibrate", "'no'", "true or false")),
        ({"depth_schedule": "last"}, ("depth_schedule", "'last'", "first_half, linear")),
        ({"lambda_spa": -0.1}, ("lambda_spa", "-0.1", ">= 0")),
        ({"lambda_e": float("inf")}, ("lambda_e", "inf", ">= 0")),
        ({"lambda_r": float("nan")}, ("lambda_r", "nan", ">= 0")),
        ({"lambda_r": True}, ("lambda_r", "True", "number")),
        ({"lambda_spa": "abc"}, ("lambda_spa", "'abc'", "number")),
        ({"spa_include_cls": 0}, ("spa_include_cls", "0", "true or false")),
    ],
)
def test_invalid_parameters_are_one_line_errors(params, fragments):
    assert_one_line_error("mto", params, fragments)


@pytest.mark.parametrize(
    "params",
    [
        {"lambda_spa": 0},
        {"lambda_e": 1},
        {"lambda_r": 0.01},
        {"recalibrate": False},
        {"spa_include_cls": False},
        {"depth_schedule": "linear"},
    ],
)
def test_valid_parameters_are_accepted(params):
    assert build_strategy("mto", 0.75, "mae", params).params == {**build_strategy("mto", 0.75).params, **params}
