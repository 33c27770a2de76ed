"""Beyond-Masking zoom-in + masking (strategies/misalign.py; docs/strategies.md §8): geometry, losses, weights,
backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import assert_one_line_error, ctx_for

from masking_bench.errors import BenchError
from masking_bench.masking import build_strategy
from masking_bench.models import patchify, unpatchify
from masking_bench.step import forward_losses
from masking_bench.strategies.misalign import big_size

L = 49
N = 4
S, B, MARGIN = 28, 36, 4


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


def norm(imgs: torch.Tensor, stats=None, p: int = 4) -> torch.Tensor:
    """The reference's target, restated with loops: back to [0, 1] with the dataset (mean, std)
    per channel if given, then each channel of each p×p patch normalised on its own with
    (v − mean)/(std + 1e-6), unbiased std; token layout (row, column, channel), channel fastest."""
    n, c, h, w = imgs.shape
    x = imgs.double()
    if stats is not None:
        x = torch.stack([x[:, k] * stats[1][k] + stats[0][k] for k in range(c)], dim=1)
    out = torch.zeros(n, (h // p) * (w // p), p * p * c, dtype=torch.float64)
    for i in range(h // p):
        for j in range(w // p):
            for k in range(c):
                v = x[:, k, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(n, p * p)
                mu = v.sum(1, keepdim=True) / (p * p)
                sd = torch.sqrt(((v - mu) ** 2).sum(1, keepdim=True) / (p * p - 1))
                out[:, i * (w // p) + j, k::c] = (v - mu) / (sd + 1e-6)
    return out.float()


def joint_norm(imgs: torch.Tensor) -> torch.Tensor:
    """The OLD misalign target (= MIMViT.reconstruction_loss): all p²C values of a patch jointly,
    on the given pixels, (t − mean)/sqrt(var + 1e-6)."""
    t = patchify(imgs, 4)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def reference_losses(pred, view, target, mask, method, c=1, stats=None):
    """The zoomed-in forward_loss written out independently (docs/strategies.md §8.1, step 3)."""
    pred_big = area(unpatchify(pred, 4, c, (7, 7)), B)
    pc = patchify(pred_big[..., MARGIN : MARGIN + S, MARGIN : MARGIN + S], 4)
    if method == "mae":
        vt, tt = norm(view, stats), norm(target, stats)
        per = ((pc - vt) ** 2).mean(-1)
    else:
        vt, tt = patchify(view, 4), patchify(target, 4)
        per = (pc - vt).abs().mean(-1)
    centre = (per * mask).sum() / mask.sum()
    tb = area(unpatchify(tt, 4, c, (7, 7)), B)
    err = (lambda a, b: ((a - b) ** 2).mean()) if method == "mae" else (lambda a, b: (a - b).abs().mean())
    m = MARGIN
    border = (
        err(pred_big[..., :m, :], tb[..., :m, :])
        + err(pred_big[..., -m:, :], tb[..., -m:, :])
        + err(pred_big[..., m:-m, :m], tb[..., m:-m, :m])
        + err(pred_big[..., m:-m, -m:], tb[..., m:-m, -m:])
    )
    return centre, border


# ------------------------------------------------------------------------------------ geometry


def test_big_size():
    assert big_size(28, 9 / 7) == 36 and big_size(224, 9 / 7) == 288 and big_size(32, 9 / 7) == 42
    with pytest.raises(BenchError):
        build_strategy("misalign", 0.75, params={"view_scale": 1.0})


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_view_is_centre_crop_and_masks_are_random(models, smooth_images, method):
    model = models[method]
    for seed in (0, 3):
        plan = build_strategy("misalign", 0.75, method).plan(smooth_images, ctx_for(model, seed))
        whole = TF.resize(smooth_images, [B, B], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert plan.view.shape == smooth_images.shape
        assert torch.allclose(plan.view, whole[..., MARGIN : MARGIN + S, MARGIN : MARGIN + S], atol=1e-6)
        assert torch.allclose(plan.target, area(whole, S), atol=1e-5)
        rnd = build_strategy("random", 0.75, method).plan(smooth_images, ctx_for(model, seed))
        assert torch.equal(plan.mask, rnd.mask)
        assert (plan.mask.sum(dim=1) == L - int(L * 0.25)).all()
    # the zoom is real: the view is not the input, and the target is the input up to resampling
    assert not torch.allclose(plan.view, smooth_images, atol=1e-2)
    assert (plan.target - smooth_images).abs().mean() < 0.5 * (plan.view - smooth_images).abs().mean()


# -------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_losses_match_reference(models, smooth_images, method):
    model = models[method]
    strat = build_strategy("misalign", 0.75, method, {"centre_weight": 1.0, "border_weight": 1.0})
    plan = strat.plan(smooth_images, ctx_for(model, 1))
    pred = torch.randn(N, L, 16, generator=torch.Generator().manual_seed(2))
    centre, border = strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)
    ref_c, ref_b = reference_losses(pred, plan.view, plan.target, plan.mask.float(), method)
    assert centre.item() == pytest.approx(ref_c.item(), rel=1e-5)
    assert border.item() == pytest.approx(ref_b.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_ideal_whole_view_prediction(models, smooth_images, method):
    """pred = (per-patch-normalised, for mae) patches of the whole view at S: the border term is exactly
    0 (prediction and target take the same resize), the centre term is not — area up-sampling of
    the S-px rendering does not reproduce the crop (rank-deficient resize), and for mae the patches are
    normalised on the OUTPUT grid while the centre target is normalised on the INPUT grid."""
    model = models[method]
    strat = build_strategy("misalign", 0.75, method)
    plan = strat.plan(smooth_images, ctx_for(model, 0))
    ideal = norm(plan.target) if method == "mae" else patchify(plan.target, 4)
    centre, border = strat.raw_losses(model, ideal, plan.view, plan.target, plan.mask)
    zero_c, zero_b = strat.raw_losses(model, torch.zeros_like(ideal), plan.view, plan.target, plan.mask)
    assert border.item() == pytest.approx(0.0, abs=1e-6) and zero_b > 0.1
    assert centre.item() > 1e-3
    if method == "simmim":  # raw pixels: only the resampling blur is left, far better than predicting 0
        assert centre < 0.5 * zero_c
    # rank of the centre map (S of the B area rows, columns S): < S, so no prediction fits every crop
    assert torch.linalg.matrix_rank(area_matrix(S, B)[MARGIN : MARGIN + S]) < S


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_centre_reads_hidden_view_patches_only(models, smooth_images, method):
    model = models[method]
    strat = build_strategy("misalign", 0.75, method)
    plan = strat.plan(smooth_images, ctx_for(model, 0))
    pred = torch.randn(N, L, 16, generator=torch.Generator().manual_seed(2))
    base, _ = strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)
    tokens = patchify(plan.view, 4)
    noisy = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(4))
    vis_changed = unpatchify(torch.where(plan.mask[..., None], tokens, noisy), 4, 1, (7, 7))
    hid_changed = unpatchify(torch.where(plan.mask[..., None], noisy, tokens), 4, 1, (7, 7))
    assert strat.raw_losses(model, pred, vis_changed, plan.target, plan.mask)[0].item() == pytest.approx(base.item())
    assert strat.raw_losses(model, pred, hid_changed, plan.target, plan.mask)[0].item() != pytest.approx(base.item())


def test_weights_enter_as_stated(models, smooth_images):
    model = models["mae"]
    default = build_strategy("misalign", 0.75, "mae")
    assert (default.centre_weight, default.border_weight) == (0.8, 0.2)
    with torch.no_grad():
        plan = default.plan(smooth_images, ctx_for(model, 0))
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
def test_step_and_backward(smooth_images, method, fresh_model):
    model = fresh_model(method)
    model.train()
    strat = build_strategy("misalign", 0.75, method)
    loss, terms, plan, _ = forward_losses(model, strat, ctx_for(model, 0), smooth_images, None)
    assert torch.isfinite(loss) and math.isclose(loss.item(), sum(v.item() for v in terms.values()), rel_tol=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert strat.describe()["interpretation"] is (method == "simmim")


# ------------------------------------------- target normalisation: per channel, on [0, 1] pixels

STATS = {1: ((0.286,), (0.353,)), 3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def normalised_batch(c: int) -> torch.Tensor:
    """Smooth [0, 1] images with distinct channels and a low-contrast bottom half (where the epsilon's
    form matters), normalised with the dataset stats as the loader does."""
    g = torch.Generator().manual_seed(11)
    raw = 0.8 * F.interpolate(
        torch.rand(N, c, 7, 7, generator=g), size=(S, S), mode="bilinear", align_corners=False
    ) + 0.2 * torch.rand(N, c, S, S, generator=g)
    raw[..., S // 2 :, :] = 0.5 + 0.02 * (raw[..., S // 2 :, :] - 0.5)
    mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in STATS[c])
    return (raw - mean) / std


def model_with_stats(c: int, method: str = "mae", stats: bool = True):
    from masking_bench.models import build_model

    torch.manual_seed(0)
    model = build_model("cpu-tiny", method, S, c).eval()
    if stats:
        model.pixel_mean, model.pixel_std = STATS[c]
    return model


@pytest.mark.parametrize("c", [1, 3])
def test_normalisation_matches_reference_restatement(c):
    """Centre and border terms equal the restated reference (per channel, [0, 1] pixels, std + 1e-6)
    for a random prediction and for the ideal one (the reference-normalised whole view)."""
    model = model_with_stats(c)
    strat = build_strategy("misalign", 0.75, "mae")
    plan = strat.plan(normalised_batch(c), ctx_for(model, 1))
    random_pred = torch.randn(N, L, 16 * c, generator=torch.Generator().manual_seed(2))
    ideal = norm(plan.target, STATS[c])
    for pred in (random_pred, ideal):
        centre, border = strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)
        ref_c, ref_b = reference_losses(pred, plan.view, plan.target, plan.mask.float(), "mae", c, STATS[c])
        assert centre.item() == pytest.approx(ref_c.item(), rel=1e-5)
        assert border.item() == pytest.approx(ref_b.item(), rel=1e-5, abs=1e-7)
    assert border.item() == pytest.approx(0.0, abs=1e-6)  # the ideal prediction's border term


def test_rgb_target_is_not_the_joint_channel_normalisation():
    """On RGB the old target (all channels of a patch jointly, dataset-normalised pixels,
    sqrt(var + 1e-6)) is far from the reference's: as a prediction it leaves a large border error,
    and its own 'ideal' centre value differs from the reference's."""
    model = model_with_stats(3)
    strat = build_strategy("misalign", 0.75, "mae")
    plan = strat.plan(normalised_batch(3), ctx_for(model, 1))
    ideal_c, ideal_b = strat.raw_losses(model, norm(plan.target, STATS[3]), plan.view, plan.target, plan.mask)
    old_c, old_b = strat.raw_losses(model, joint_norm(plan.target), plan.view, plan.target, plan.mask)
    assert ideal_b.item() == pytest.approx(0.0, abs=1e-6) and old_b.item() > 0.5
    assert abs(old_c.item() - ideal_c.item()) > 0.05
    mask = plan.mask.float()
    old_style_c = (((joint_norm(plan.view) - norm(plan.view, STATS[3])) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert old_style_c.item() > 0.5  # the two centre targets themselves are far apart


@pytest.mark.parametrize("c", [1, 3])
def test_dataset_stats_only_move_the_epsilon(c):
    """Per-channel normalisation is invariant to the loader's per-channel affine map, so a model
    without pixel stats differs only through the epsilon (here < 1e-3 relative, from the low-contrast
    half); with them, the result equals running on the [0, 1] images directly."""
    strat = build_strategy("misalign", 0.75, "mae")
    x = normalised_batch(c)
    mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in STATS[c])
    pred = torch.randn(N, L, 16 * c, generator=torch.Generator().manual_seed(2))
    with_stats, without = model_with_stats(c), model_with_stats(c, stats=False)
    plan = strat.plan(x, ctx_for(with_stats, 1))
    a = strat.raw_losses(with_stats, pred, plan.view, plan.target, plan.mask)
    b = strat.raw_losses(without, pred, plan.view, plan.target, plan.mask)
    c01 = strat.raw_losses(without, pred, plan.view * std + mean, plan.target * std + mean, plan.mask)
    for u, v, w in zip(a, b, c01, strict=True):
        assert u.item() == pytest.approx(v.item(), rel=1e-3) and u.item() != v.item()
        assert u.item() == pytest.approx(w.item(), rel=1e-5)


@pytest.mark.parametrize("method, norm_pix", [("simmim", True), ("mae", False)])
def test_pixel_stats_do_not_touch_unnormalised_losses(method, norm_pix):
    """simmim (L1 on dataset-normalised pixels, unchanged) and mae without norm_pix_loss ignore the pixel stats."""
    c = 3
    model, plain = model_with_stats(c, method), model_with_stats(c, method, stats=False)
    model.norm_pix_loss = plain.norm_pix_loss = norm_pix
    strat = build_strategy("misalign", 0.75, method)
    plan = strat.plan(normalised_batch(c), ctx_for(model, 1))
    pred = torch.randn(N, L, 16 * c, generator=torch.Generator().manual_seed(2))
    got = [t.item() for t in strat.raw_losses(model, pred, plan.view, plan.target, plan.mask)]
    assert got == [t.item() for t in strat.raw_losses(plain, pred, plan.view, plan.target, plan.mask)]
    if method == "simmim":
        ref = reference_losses(pred, plan.view, plan.target, plan.mask.float(), "simmim", c)
        assert got == pytest.approx([t.item() for t in ref], rel=1e-5)


@pytest.mark.parametrize(
    "params,fragments",
    [
        ({"view_scale": 1.0}, ("view_scale", "1.0", "> 1")),
        ({"view_scale": 0.5}, ("view_scale", "0.5", "> 1")),
        ({"view_scale": float("inf")}, ("view_scale", "inf", "> 1")),
        ({"view_scale": float("nan")}, ("view_scale", "nan", "> 1")),
        ({"view_scale": True}, ("view_scale", "True", "number")),
        ({"view_scale": "9/7"}, ("view_scale", "'9/7'", "number")),
        ({"interpolation": "lanczos"}, ("interpolation", "'lanczos'", "bilinear, bicubic, area, nearest")),
        ({"centre_weight": -0.8}, ("centre_weight", "-0.8", ">= 0")),
        ({"border_weight": -1}, ("border_weight", "-1", ">= 0")),
        ({"border_weight": float("nan")}, ("border_weight", "nan", ">= 0")),
        ({"centre_weight": True}, ("centre_weight", "True", "number")),
        ({"border_weight": "0.2"}, ("border_weight", "'0.2'", "number")),
        ({"centre_weight": 0, "border_weight": 0}, ("centre_weight", "border_weight", "0")),
        ({"degradation": "blur"}, ("degradation", "'blur'", "zoom_in")),
    ],
)
def test_invalid_parameters_are_one_line_errors(params, fragments):
    assert_one_line_error("misalign", params, fragments)


@pytest.mark.parametrize(
    "params",
    [
        {"view_scale": 1.5},
        {"view_scale": 2},
        {"interpolation": "area"},
        {"centre_weight": 1, "border_weight": 0},
        {"centre_weight": 0.0},
        {"border_weight": 0},
    ],
)
def test_valid_parameters_are_accepted(params):
    strategy = build_strategy("misalign", 0.75, "mae", params)
    assert strategy.params == {**type(strategy).defaults, **params}
