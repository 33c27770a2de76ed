"""MIMViT: shapes, patch layout, the masked loss, ragged MAE batches, mask-token isolation, attention."""

from __future__ import annotations

import pytest
import torch

from masking_bench.errors import BenchError
from masking_bench.masking import hide_lowest_first
from masking_bench.models import PRESETS, build_model, patchify, sincos_pos_embed_2d, unpatchify

N, L, P = 6, 49, 4


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return build_model("cpu-tiny", "mae", 28, 1).eval()


@pytest.fixture(scope="module")
def simmim():
    torch.manual_seed(0)
    return build_model("cpu-tiny", "simmim", 28, 1).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def masks_with_counts(counts, seed=2):
    scores = torch.rand(len(counts), L, generator=torch.Generator().manual_seed(seed))
    return hide_lowest_first(scores, torch.tensor(counts))


def perturb_tokens(imgs, which, amount=3.0):
    """Add ``amount`` to every pixel of the patches where ``which`` (N, L) is True."""
    tokens = patchify(imgs.clone(), P)
    tokens[which] += amount
    return unpatchify(tokens, P, 1, (7, 7))


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_forward_shapes(method, mae, simmim, batch):
    model = mae if method == "mae" else simmim
    mask = masks_with_counts([37] * N)
    with torch.no_grad():
        out = model(batch, mask)
    assert model.grid == (7, 7) and model.num_patches == L
    assert out.pred.shape == (N, L, P * P) and out.pred.dtype == torch.float32
    assert out.mask is mask and out.attention == {}
    assert torch.isfinite(out.pred).all()
    with torch.no_grad():
        assert model.forward_features(batch, pool="mean").shape == (N, 128)
        assert model.forward_features(batch, pool="cls").shape == (N, 128)


def test_forward_with_a_gradient(mae, batch):
    model = build_model("cpu-tiny", "mae", 28, 1)
    mask = masks_with_counts([37] * N)
    loss = model.reconstruction_loss(model(batch, mask).pred, batch, mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.patch_embed.proj.weight.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_build_model_errors():
    with pytest.raises(BenchError, match="cpu-tiny"):
        build_model("cpu-huge", "mae", 28, 1)
    with pytest.raises(BenchError, match="accepted are mae, simmim"):
        build_model("cpu-tiny", "beit", 28, 1)
    with pytest.raises(BenchError, match="multiple of patch size"):
        build_model("cpu-tiny", "mae", 30, 1)


def test_cpu_tiny_parameter_count():
    model = build_model("cpu-tiny", "mae", 28, 1)
    total = sum(p.numel() for p in model.parameters())
    assert 800_000 <= total <= 950_000
    enc = sum(p.numel() for p in model.encoder_parameters())
    simmim_enc = sum(p.numel() for p in build_model("cpu-tiny", "simmim", 28, 1).encoder_parameters())
    assert enc == simmim_enc < total
    assert set(PRESETS) >= {"cpu-tiny", "cpu-small", "vit-base"}


# ----------------------------------------------------------------------------------- patches


@pytest.mark.parametrize("c,size,p", [(1, 28, 4), (3, 32, 8), (3, 32, 4)])
def test_patchify_round_trip_and_layout(c, size, p):
    x = torch.randn(2, c, size, size)
    g = size // p
    tokens = patchify(x, p)
    assert tokens.shape == (2, g * g, p * p * c)
    assert torch.equal(unpatchify(tokens, p, c, (g, g)), x)
    h, w = 1, g - 1  # token index is row-major, pixels inside a token are (p, p, C)
    expected = x[1, :, h * p : (h + 1) * p, w * p : (w + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[1, h * g + w], expected)


def test_sincos_table():
    table = sincos_pos_embed_2d(128, 7, 7)
    assert table.shape == (49, 128)
    assert table.abs().max() <= 1.0
    assert torch.cdist(table, table).add(torch.eye(49) * 1e3).min() > 1e-3  # every row distinct
    assert not torch.equal(sincos_pos_embed_2d(128, 7, 7)[1], sincos_pos_embed_2d(128, 7, 7)[7])  # (0,1) != (1,0)
    with pytest.raises(BenchError, match="multiple of 4"):
        sincos_pos_embed_2d(130, 7, 7)


def test_model_positions_are_fixed_with_a_zero_cls_slot(mae):
    assert mae.pos_embed.shape == (1, 1 + L, 128)
    assert torch.equal(mae.pos_embed[0, 0], torch.zeros(128))
    assert torch.equal(mae.pos_embed[0, 1:], sincos_pos_embed_2d(128, 7, 7))
    assert not any(p is mae.pos_embed for p in mae.parameters())


# -------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_loss_counts_only_hidden_patches(method, mae, simmim, batch):
    model = mae if method == "mae" else simmim
    mask = masks_with_counts([37, 37, 30, 20, 40, 37])
    pred = torch.randn(N, L, P * P, generator=torch.Generator().manual_seed(3))
    loss = model.reconstruction_loss(pred, batch, mask)
    at_visible = pred.clone()
    at_visible[~mask] += torch.randn_like(at_visible[~mask]) * 10
    assert model.reconstruction_loss(at_visible, batch, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    at_hidden = pred.clone()
    at_hidden[mask] += 1.0
    assert abs(model.reconstruction_loss(at_hidden, batch, mask).item() - loss.item()) > 1e-3


def test_loss_values_follow_spec(mae, simmim, batch):
    mask = masks_with_counts([37, 37, 30, 20, 40, 37])
    pred = torch.randn(N, L, P * P, generator=torch.Generator().manual_seed(4))
    target = patchify(batch, P)
    # MAE (docs/strategies.md §1.4): per-patch normalised target, unbiased var + 1e-6, mean over all hidden patches
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    per_patch = ((pred - norm) ** 2).mean(-1)
    assert mae.reconstruction_loss(pred, batch, mask).item() == pytest.approx(per_patch[mask].mean().item(), rel=1e-5)
    # SimMIM: L1 on hidden pixels
    l1 = (pred - target).abs().mean(-1)
    assert simmim.reconstruction_loss(pred, batch, mask).item() == pytest.approx(l1[mask].mean().item(), rel=1e-5)
    no_norm = build_model("cpu-tiny", "mae", 28, 1, norm_pix_loss=False)
    mse = ((pred - target) ** 2).mean(-1)
    assert no_norm.reconstruction_loss(pred, batch, mask).item() == pytest.approx(mse[mask].mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------- MAE, ragged batch


def test_mae_hidden_pixels_never_matter(mae, batch):
    mask = masks_with_counts([37] * N)
    with torch.no_grad():
        base = mae(batch, mask).pred
        close(mae(perturb_tokens(batch, mask), mask).pred, base)
        assert (mae(perturb_tokens(batch, ~mask), mask).pred - base).abs().max() > 1e-2  # control


def test_mae_ragged_no_hidden_token_visible_as_a_key(mae, batch):
    counts = [30, 37, 40, 25, 44, 37]  # visible 19, 12, 9, 24, 5, 12 -> padded to 24
    mask = masks_with_counts(counts)
    visible = (~mask).sum(dim=1)
    i = 2
    assert visible[i] < visible.max()  # sample i carries padding: some of its hidden tokens sit in the batch
    only_i = torch.zeros_like(mask)
    only_i[i] = mask[i]
    with torch.no_grad():
        base = mae(batch, mask).pred
        perturbed = mae(perturb_tokens(batch, only_i, amount=5.0), mask).pred
        close(perturbed, base)  # nothing (sample i or others) depends on sample i's hidden pixels
        # and the padded sample gets exactly what it would get alone (no padding at all)
        for j in range(N):
            alone = mae(batch[j : j + 1], mask[j : j + 1]).pred
            close(base[j : j + 1], alone, atol=1e-4)
        # control: sample i's visible pixels do matter, for sample i only
        vis_i = torch.zeros_like(mask)
        vis_i[i] = ~mask[i]
        changed = mae(perturb_tokens(batch, vis_i), mask).pred
    assert (changed[i] - base[i]).abs().max() > 1e-2
    others = [j for j in range(N) if j != i]
    close(changed[others], base[others])


def test_mae_ragged_extreme_counts(mae, batch):
    mask = masks_with_counts([0, 48, 37, 1, 47, 10])  # one sample fully visible, one with a single token
    with torch.no_grad():
        out = mae(batch, mask).pred
        assert torch.isfinite(out).all()
        for j in range(N):
            close(out[j : j + 1], mae(batch[j : j + 1], mask[j : j + 1]).pred, atol=1e-4)


# ---------------------------------------------------------------------------- mask-token isolation


def _preds_before_and_after_mask_token_change(model, batch, mask, value_fn):
    """``{isolate: (pred, pred with the mask token set to value_fn(old token))}`` for isolate True and False;
    the mask token is restored after each change."""
    res = {}
    with torch.no_grad():
        for isolate in (True, False):
            a = model(batch, mask, isolate_mask_tokens=isolate).pred
            old = model.mask_token.data.clone()
            model.mask_token.data.copy_(value_fn(old))
            try:
                b = model(batch, mask, isolate_mask_tokens=isolate).pred
            finally:
                model.mask_token.data.copy_(old)
            res[isolate] = (a, b)
    return res


def test_simmim_isolation_visible_outputs_ignore_mask_token(simmim, batch):
    mask = masks_with_counts([30, 37, 20, 40, 25, 35])
    gen = torch.Generator().manual_seed(5)
    results = _preds_before_and_after_mask_token_change(
        simmim, batch, mask, lambda t: torch.randn(t.shape, generator=gen)
    )
    a, b = results[True]
    close(a[~mask], b[~mask])  # visible queries never attend to a mask-token key
    assert (a[mask] - b[mask]).abs().max() > 1e-2  # hidden positions do read the mask token
    a, b = results[False]
    assert (a[~mask] - b[~mask]).abs().max() > 1e-2  # control: without isolation they mix


def test_simmim_hidden_pixels_never_matter(simmim, batch):
    mask = masks_with_counts([30, 37, 20, 40, 25, 35])
    with torch.no_grad():
        for isolate in (True, False):
            base = simmim(batch, mask, isolate_mask_tokens=isolate).pred
            close(simmim(perturb_tokens(batch, mask), mask, isolate_mask_tokens=isolate).pred, base)


def test_simmim_isolated_visible_outputs_equal_an_encoder_of_visible_tokens_only(simmim, batch):
    # isolation means visible tokens (and cls) see exactly what a drop-style encoder sees: the same
    # blocks run on cls + visible tokens alone must give the same visible predictions
    mask = masks_with_counts([30, 37, 20, 40, 25, 35])
    with torch.no_grad():
        pred = simmim(batch, mask, isolate_mask_tokens=True).pred
        tokens = simmim._with_cls(simmim.embed(batch))
        for j in range(N):
            keep = torch.cat([torch.tensor([0]), torch.nonzero(~mask[j]).flatten() + 1])
            x = tokens[j : j + 1, keep]
            for blk in simmim.blocks:
                x = blk(x)
            alone = simmim.head(simmim.norm(x))[0, 1:]
            close(pred[j][~mask[j]], alone, atol=1e-4)


def test_mae_decoder_isolation(mae, batch):
    mask = masks_with_counts([37, 30, 37, 40, 37, 25])
    # not a constant shift: every block starts with a LayerNorm, which removes one
    res = _preds_before_and_after_mask_token_change(
        mae, batch, mask, lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(6))
    )
    a, b = res[True]
    close(a[~mask], b[~mask])
    assert (a[mask] - b[mask]).abs().max() > 1e-3
    a, b = res[False]
    assert (a[~mask] - b[~mask]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("method,layers", [("simmim", (0, 3)), ("mae", (0,))])
@pytest.mark.parametrize("isolate", [False, True])
def test_record_attention(method, layers, isolate, mae, simmim, batch):
    model = mae if method == "mae" else simmim
    mask = masks_with_counts([37, 30, 37, 40, 37, 25])
    with torch.no_grad():
        plain = model(batch, mask, isolate_mask_tokens=isolate).pred
        out = model(batch, mask, isolate_mask_tokens=isolate, record_attention=layers)
    close(out.pred, plain, atol=1e-5)  # the explicit-attention path computes the same block
    assert set(out.attention) == set(layers) == set(out.attention_logits)
    heads = 4
    for layer in layers:
        probs = out.attention[layer]
        assert probs.shape == (N, heads, 1 + L, 1 + L)
        assert (probs >= 0).all()
        close(probs.sum(dim=-1), torch.ones(N, heads, 1 + L), atol=1e-5)
        assert out.attention_logits[layer].shape == probs.shape
        hidden = torch.cat([torch.zeros(N, 1, dtype=torch.bool), mask], dim=1)
        vis_to_hidden = (~hidden)[:, None, :, None] & hidden[:, None, None, :]
        vis_to_hidden = vis_to_hidden.expand_as(probs)
        if isolate:
            assert probs[vis_to_hidden].abs().max() == 0
        else:
            assert probs[vis_to_hidden].sum() > 0
