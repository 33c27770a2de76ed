"""Beyond-Masking zoom-in + masking (strategies/misalign.py, spec §4.3): geometry, losses, weights, backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from masking_bench.errors import BenchError
from masking_bench.masking import PlanContext, build_strategy
from masking_bench.models import patchify, unpatchify
from masking_bench.strategies.misalign import big_size
from masking_bench.train import _step

L = 49
N = 4
S, B, MARGIN = 28, 36, 4


@pytest.fixture(scope="module")
def images():
    """Smooth-ish images (bilinear up-sampled 7x7 noise plus a little pixel noise)."""
    g = torch.Generator().manual_seed(5)
    coarse = torch.randn(N, 1, 7, 7, generator=g)
    return F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False) + 0.1 * torch.randn(
        N, 1, S, S, generator=g)


def ctx_for(model, seed: int) -> PlanContext:
    return PlanContext(model, model.grid, torch.Generator().manual_seed(seed), method=model.method)


# ------------------------------------------------------------------ independent reference pieces


def area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) averaging matrix of 'area' resizing (adaptive average pooling), written out."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def area(img: torch.Tensor, n_out: int) -> torch.Tensor:
    m = area_matrix(img.shape[-1], n_out)
    return (m @ img.double() @ m.T).float()


def norm(tokens: torch.Tensor) -> torch.Tensor:
    mu = tokens.mean(-1, keepdim=True)
    sd2 = ((tokens - mu) ** 2).sum(-1, keepdim=True) / (tokens.shape[-1] - 1)
    return (tokens - mu) / torch.sqrt(sd2 + 1e-6)


def reference_losses(pred, view, target, mask, method):
    """The zoomed-in forward_loss written out independently (spec §4.3 steps 4-5)."""
    pred_big = area(unpatchify(pred, 4, 1, (7, 7)), B)
    pc = patchify(pred_big[..., MARGIN:MARGIN + S, MARGIN:MARGIN + S], 4)
    vt, tt = patchify(view, 4), patchify(target, 4)
    if method == "mae":
        vt, tt = norm(vt), norm(tt)
        per = ((pc - vt) ** 2).mean(-1)
    else:
        per = (pc - vt).abs().mean(-1)
    centre = (per * mask).sum() / mask.sum()
    tb = area(unpatchify(tt, 4, 1, (7, 7)), B)
    err = (lambda a, b: ((a - b) ** 2).mean()) if method == "mae" else (lambda a, b: (a - b).abs().mean())
    m = MARGIN
    border = (err(pred_big[..., :m, :], tb[..., :m, :]) + err(pred_big[..., -m:, :], tb[..., -m:, :])
              + err(pred_big[..., m:-m, :m], tb[..., m:-m, :m]) + err(pred_big[..., m:-m, -m:], tb[..., m:-m, -m:]))
    return centre, border


# ------------------------------------------------------------------------------------ geometry


def test_big_size():
    assert big_size(28, 9 / 7) == 36 and big_size(224, 9 / 7) == 288 and big_size(32, 9 / 7) == 42
    with pytest.raises(BenchError):
        build_strategy("misalign", 0.75, params={"view_scale": 1.0})


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_view_is_centre_crop_and_masks_are_random(models, images, method):
    model = models[method]
    for seed in (0, 3):
        plan = build_strategy("misalign", 0.75, method).plan(images, ctx_for(model, seed))
        whole = TF.resize(images, [B, B], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert plan.view.shape == images.shape
        assert torch.allclose(plan.view, whole[..., MARGIN:MARGIN + S, MARGIN:MARGIN + S], atol=1e-6)
        assert torch.allclose(plan.target, area(whole, S), atol=1e-5)
        rnd = build_strategy("random", 0.75, method).plan(images, ctx_for(model, seed))
        assert torch.equal(plan.mask, rnd.mask)
        assert (plan.mask.sum(dim=1) == L - int(L * 0.25)).all()
    # the zoom is real: the view is not the input, and the target is the input up to resampling
    assert not torch.allclose(plan.view, images, atol=1e-2)
    assert (plan.target - images).abs().mean() < 0.5 * (plan.view - images).abs().mean()


# -------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_losses_match_reference(models, images, method):
    model = models[method]
    strat = build_strategy("misalign", 0.75, method, {"centre_weight": 1.0, "border_weight": 1.0})
    plan = strat.plan(images, ctx_for(model, 1))
    pred = torch.randn(N, L, 16, generator=torch.Generator().manual_seed(2))
    centre, border = strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)
    ref_c, ref_b = reference_losses(pred, plan.view, plan.target, plan.mask.float(), method)
    assert centre.item() == pytest.approx(ref_c.item(), rel=1e-5)
    assert border.item() == pytest.approx(ref_b.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_ideal_whole_view_prediction(models, images, method):
    """pred = (per-patch-normalised, for mae) patches of the whole view at S: the border term is exactly
    0 (prediction and target take the same resize), the centre term is not — area up-sampling of
    the S-px rendering does not reproduce the crop (rank-deficient resize), and for mae the patches are
    normalised on the OUTPUT grid while the centre target is normalised on the INPUT grid."""
    model = models[method]
    strat = build_strategy("misalign", 0.75, method)
    plan = strat.plan(images, ctx_for(model, 0))
    tokens = patchify(plan.target, 4)
    ideal = norm(tokens) if method == "mae" else tokens
    centre, border = strat.raw_losses(model, ideal, plan.view, plan.target, plan.mask)
    zero_c, zero_b = strat.raw_losses(model, torch.zeros_like(ideal), plan.view, plan.target, plan.mask)
    assert border.item() == pytest.approx(0.0, abs=1e-6) and zero_b > 0.1
    assert centre.item() > 1e-3
    if method == "simmim":  # raw pixels: only the resampling blur is left, far better than predicting 0
        assert centre < 0.5 * zero_c
    # rank of the centre map (S of the B area rows, columns S): < S, so no prediction fits every crop
    assert torch.linalg.matrix_rank(area_matrix(S, B)[MARGIN:MARGIN + S]) < S


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_centre_reads_hidden_view_patches_only(models, images, method):
    model = models[method]
    strat = build_strategy("misalign", 0.75, method)
    plan = strat.plan(images, ctx_for(model, 0))
    pred = torch.randn(N, L, 16, generator=torch.Generator().manual_seed(2))
    base, _ = strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)
    tokens = patchify(plan.view, 4)
    noisy = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(4))
    vis_changed = unpatchify(torch.where(plan.mask[..., None], tokens, noisy), 4, 1, (7, 7))
    hid_changed = unpatchify(torch.where(plan.mask[..., None], noisy, tokens), 4, 1, (7, 7))
    assert strat.raw_losses(model, pred, vis_changed, plan.target, plan.mask)[0].item() == pytest.approx(base.item())
    assert strat.raw_losses(model, pred, hid_changed, plan.target, plan.mask)[0].item() != pytest.approx(base.item())


def test_weights_enter_as_stated(models, images):
    model = models["mae"]
    default = build_strategy("misalign", 0.75, "mae")
    assert (default.centre_weight, default.border_weight) == (0.8, 0.2)
    with torch.no_grad():
        plan = default.plan(images, ctx_for(model, 0))
        out = model(plan.view, plan.mask)
        terms = default.losses(model, out, plan, plan.view)
        only_c = build_strategy("misalign", 0.75, "mae", {"border_weight": 0.0}).losses(model, out, plan, plan.view)
        only_b = build_strategy("misalign", 0.75, "mae", {"centre_weight": 0.0}).losses(model, out, plan, plan.view)
        raw_c, raw_b = default.raw_losses(model, out.pred, plan.view, plan.target, plan.mask)
    assert set(terms) == {"recon_centre", "recon_border"}
    assert only_c["recon_border"] == 0 and only_b["recon_centre"] == 0
    assert terms["recon_centre"].item() == pytest.approx(only_c["recon_centre"].item())
    assert terms["recon_border"].item() == pytest.approx(only_b["recon_border"].item())
    assert terms["recon_centre"].item() == pytest.approx(0.8 * raw_c.item())
    assert terms["recon_border"].item() == pytest.approx(0.2 * raw_b.item())


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_step_and_backward(images, method, fresh_model):
    model = fresh_model(method)
    model.train()
    strat = build_strategy("misalign", 0.75, method)
    loss, terms, plan, _ = _step(model, strat, ctx_for(model, 0), images, None)
    assert torch.isfinite(loss) and math.isclose(loss.item(), sum(v.item() for v in terms.values()), rel_tol=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert strat.describe()["interpretation"] is (method == "simmim")
