"""SBM / SBAM+AMR (strategies/sbam.py; docs/strategies.md §5, §6): counts, reference match, salience, warm-up,
AMR, ragged MAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, blank_images, ctx_for

from masking_bench.data import make_synthetic
from masking_bench.errors import BenchError
from masking_bench.masking import build_strategy
from masking_bench.models import build_model
from masking_bench.strategies.sbam import SalienceAdaptiveRatio, SalienceMasking

L = 49  # cpu-tiny at 28 px: 7x7 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cpu-tiny", "mae", 28, 1)


def with_fixed_salience(cls, salience: torch.Tensor):
    """A subclass of ``cls`` whose salience is the given (N, L) tensor (to craft AMR cases)."""

    class Fixed(cls):
        def salience(self, images, ctx):
            return salience.clone()

    return Fixed


# ------------------------------------------------- independent reference (docs/strategies.md §5.1, §6.1)


def reference_saliency_guided_masking(x, base, var, delta, gen, scaled=False):
    """The official rule written out on its own: affinity softmax -> column sum -> min-max (+1e-6)
    -> + rand/2 -> argsort ascending -> keep the first len_keep. Returns (mask (N, L) bool, ŝ)."""
    n, length, d = x.shape
    aff = torch.matmul(x, x.permute(0, 2, 1))
    if scaled:
        aff = aff / d**0.5
    aff = F.softmax(aff, dim=2)
    aff_sum = torch.sum(aff, dim=1)
    lo = aff_sum.min(dim=1, keepdim=True)[0]
    hi = aff_sum.max(dim=1, keepdim=True)[0]
    sal = (aff_sum - lo) / (hi - lo + 1e-6)
    y = (sal > delta).sum(dim=1)
    y_normalized = y.float().mean() / sal.size(1)
    ratio = base - var + 2 * var * y_normalized
    len_keep = int(length * (1 - ratio))
    noise = torch.rand(n, length, generator=gen) / 2
    ids_shuffle = torch.argsort(sal + noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return mask.bool(), sal


def reference_embeddings(model, images):
    with torch.no_grad():
        return (model.patch_embed(images) + model.pos_embed[:, 1:]).float()


# ------------------------------------------------------------------------------------------- SBM


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.75, 0.9])
def test_sbam_hides_exact_count(model, synthetic_images, ratio):
    plan = build_strategy("sbam", ratio).plan(synthetic_images, ctx_for(model, 3))
    assert plan.mask.dtype == torch.bool and plan.mask.shape == (synthetic_images.shape[0], L)
    assert (plan.mask.sum(dim=1) == L - int(L * (1 - ratio))).all()
    assert plan.diagnostics["base_ratio"] == ratio


@pytest.mark.parametrize("ratio,scaled", [(0.75, False), (0.6, False), (0.9, False), (0.75, True)])
def test_sbam_matches_reference(model, synthetic_images, ratio, scaled):
    for seed in (0, 1, 2):
        plan = build_strategy("sbam", ratio, params={"scaled": scaled}).plan(synthetic_images, ctx_for(model, seed))
        ref_mask, ref_sal = reference_saliency_guided_masking(
            reference_embeddings(model, synthetic_images), ratio, 0.0, 0.5, torch.Generator().manual_seed(seed), scaled
        )
        assert torch.equal(plan.mask, ref_mask)
        assert torch.equal(plan.diagnostics["salience"], ref_sal)


def test_sbam_amr_batch_matches_reference(model, synthetic_images):
    for seed, (var, delta) in enumerate([(0.1, 0.5), (0.1, 0.05), (0.15, 0.2)]):
        strat = build_strategy("sbam_amr", 0.75, params={"delta_ratio": var, "threshold": delta})
        plan = strat.plan(synthetic_images, ctx_for(model, seed))
        ref_mask, _ = reference_saliency_guided_masking(
            reference_embeddings(model, synthetic_images), 0.75, var, delta, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(plan.mask, ref_mask)


def test_noise_zero_hides_top_salience(model, synthetic_images):
    for ratio in (0.5, 0.75):
        plan = build_strategy("sbam", ratio, params={"noise_scale": 0.0}).plan(synthetic_images, ctx_for(model, 0))
        sal, mask = plan.diagnostics["salience"], plan.mask
        assert (mask.sum(dim=1) == L - int(L * (1 - ratio))).all()
        lowest_hidden = sal.masked_fill(~mask, float("inf")).min(dim=1).values
        highest_kept = sal.masked_fill(mask, float("-inf")).max(dim=1).values
        assert (lowest_hidden >= highest_kept).all()  # hidden = a top-(L-K) set (ties allowed)


def test_most_salient_token_always_hidden(model, synthetic_images):
    # natural salience: a token with ŝ = 1 scores >= 1; only tokens with ŝ > 0.5 can outscore it
    hidden_count = L - int(L * 0.25)
    checked = 0
    for seed in range(5):
        plan = build_strategy("sbam", 0.75).plan(synthetic_images, ctx_for(model, seed))
        sal, mask = plan.diagnostics["salience"], plan.mask
        for n in range(synthetic_images.shape[0]):
            if int((sal[n] > 0.5).sum()) <= hidden_count:
                checked += 1
                assert mask[n][sal[n] >= 1 - 1e-5].all()
    assert checked >= 40
    # crafted: one token at 1, the rest in [0, 0.5): hidden even when only one token is hidden
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(8, L, generator=g) * 0.4999
    top = torch.randint(L, (8,), generator=g)
    sal[torch.arange(8), top] = 1.0
    strat = with_fixed_salience(SalienceMasking, sal)(0.02)  # hides L - int(49 * 0.98) = 1 token
    for seed in range(20):
        mask = strat.plan(blank_images(8), ctx_for(model, seed)).mask
        assert (mask.sum(dim=1) == 1).all() and mask[torch.arange(8), top].all()


@pytest.mark.parametrize("source", ["embeddings", "attention"])
def test_salience_normalised(model, synthetic_images, source):
    sal = (
        build_strategy("sbam", 0.75, params={"salience_source": source})
        .plan(synthetic_images, ctx_for(model, 0))
        .diagnostics["salience"]
    )
    assert sal.shape == (synthetic_images.shape[0], L) and sal.dtype == torch.float32
    assert (sal >= 0).all() and (sal <= 1).all()
    assert torch.allclose(sal.min(dim=1).values, torch.zeros(synthetic_images.shape[0]), atol=1e-6)
    assert torch.allclose(sal.max(dim=1).values, torch.ones(synthetic_images.shape[0]), atol=1e-5)


def test_attention_source_is_first_block_attention_with_cls(synthetic_images):
    """Variant (a): equals the column sums (cls query included, cls key dropped) of block 0's
    head-averaged attention as the model itself records it on an unmasked all-token pass."""
    torch.manual_seed(0)
    simmim = build_model("cpu-tiny", "simmim", 28, 1)
    strat = build_strategy("sbam", 0.75, method="simmim", params={"salience_source": "attention"})
    sal = strat.plan(synthetic_images, ctx_for(simmim, 0)).diagnostics["salience"]
    with torch.no_grad():
        out = simmim(
            synthetic_images, torch.zeros(synthetic_images.shape[0], L, dtype=torch.bool), record_attention=(0,)
        )
    received = out.attention[0].mean(dim=1).sum(dim=1)[:, 1:]
    lo, hi = received.min(dim=1, keepdim=True).values, received.max(dim=1, keepdim=True).values
    assert torch.allclose(sal, (received - lo) / (hi - lo + 1e-6), atol=1e-5)


def test_plan_ignores_autocast(model, synthetic_images):
    plain = build_strategy("sbam", 0.75).plan(synthetic_images, ctx_for(model, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = build_strategy("sbam", 0.75).plan(synthetic_images, ctx_for(model, 4))
    assert torch.equal(plain.mask, amp.mask)
    assert torch.equal(plain.diagnostics["salience"], amp.diagnostics["salience"])


@pytest.mark.parametrize("name", ["sbam", "sbam_amr"])
def test_warmup_is_random_masking(model, synthetic_images, name):
    strat = build_strategy(name, 0.75, params={"warmup_epochs": 2})
    random = build_strategy("random", 0.75)
    for epoch in (0, 1):
        plan = strat.plan(synthetic_images, ctx_for(model, 7, epoch))
        assert torch.equal(plan.mask, random.plan(synthetic_images, ctx_for(model, 7, epoch)).mask)
        assert plan.diagnostics["warmup"] is True and "salience" not in plan.diagnostics
    after = strat.plan(synthetic_images, ctx_for(model, 7, 2))
    plain = build_strategy(name, 0.75).plan(synthetic_images, ctx_for(model, 7, 2))
    assert torch.equal(after.mask, plain.mask)
    assert not torch.equal(after.mask, random.plan(synthetic_images, ctx_for(model, 7, 2)).mask)


# ------------------------------------------------------------------------------------------- AMR


@pytest.mark.parametrize("threshold", [0.5, 0.05])
def test_amr_batch_one_count_from_formula(model, synthetic_images, threshold):
    r0, delta = 0.75, 0.1
    plan = build_strategy("sbam_amr", r0, params={"threshold": threshold}).plan(synthetic_images, ctx_for(model, 5))
    sal = plan.diagnostics["salience"]
    counts = plan.mask.sum(dim=1)
    assert (counts == counts[0]).all()
    y = (sal > threshold).sum(dim=1)
    ratio32 = r0 - delta + 2 * delta * (y.float().mean() / L)  # the reference's float32 arithmetic
    assert int(counts[0]) == L - int(L * (1 - ratio32))
    exact = r0 - delta + 2 * delta * y.double().mean().item() / L
    assert abs(int(counts[0]) - (L - int(L * (1 - exact)))) <= 1  # float32 truncation boundary at most
    assert torch.allclose(plan.diagnostics["ratio"], torch.full((synthetic_images.shape[0],), float(ratio32)))
    assert plan.diagnostics["base_ratio"] == r0


def crafted_salience(n_random: int = 1) -> torch.Tensor:
    """Rows with 1, 24 and 48 tokens above 0.5 (then random rows): different AMR counts per sample."""
    one = torch.zeros(L)
    one[10] = 1.0
    spread = torch.linspace(0, 1, L)
    most = torch.ones(L)
    most[3] = 0.0
    rand = torch.rand(n_random, L, generator=torch.Generator().manual_seed(0))
    return torch.cat([one[None], spread[None], most[None], rand])


def test_amr_sample_per_sample_counts(model, synthetic_images):
    r0, delta, thr = 0.75, 0.1, 0.5
    plan = build_strategy("sbam_amr", r0, params={"mode": "sample"}).plan(synthetic_images, ctx_for(model, 6))
    sal = plan.diagnostics["salience"]
    y = (sal > thr).sum(dim=1)
    for n in range(synthetic_images.shape[0]):
        r_n = r0 - delta + 2 * delta * int(y[n]) / L
        assert int(plan.mask[n].sum()) == L - int(L * (1 - r_n))
    ratio = plan.diagnostics["ratio"]
    assert ((ratio >= r0 - delta - 1e-6) & (ratio <= r0 + delta + 1e-6)).all()
    # crafted salience: y = 1, 24, 48 -> r = 0.654, 0.748, 0.846 -> hidden 33, 37, 42
    sal = crafted_salience()
    strat = with_fixed_salience(SalienceAdaptiveRatio, sal)(r0, mode="sample")
    plan = strat.plan(blank_images(4), ctx_for(model, 0))
    y = (sal > thr).sum(dim=1)
    expected = [L - int(L * (1 - (r0 - delta + 2 * delta * int(k) / L))) for k in y]
    assert expected[:3] == [33, 37, 42]
    assert plan.mask.sum(dim=1).tolist() == expected
    assert torch.allclose(plan.diagnostics["ratio"], r0 - delta + 2 * delta * y.float() / L)
    # batch mode on the same salience: one shared count from the mean fraction
    batch = with_fixed_salience(SalienceAdaptiveRatio, sal)(r0).plan(blank_images(4), ctx_for(model, 0))
    shared = L - int(L * (1 - (r0 - delta + 2 * delta * y.float().mean() / L)))
    assert batch.mask.sum(dim=1).tolist() == [shared] * 4


def test_amr_ratio_clamped():
    sal = crafted_salience()
    gen = ctx_for((7, 7))  # no model: the salience is fixed; only the generator is used
    high = with_fixed_salience(SalienceAdaptiveRatio, sal)(0.95, delta_ratio=0.5, mode="sample")
    mask = high.plan(blank_images(4), gen).mask
    assert (mask.sum(dim=1) <= L - 1).all() and (mask.sum(dim=1) == L - 1).any()  # K >= 1
    low = with_fixed_salience(SalienceAdaptiveRatio, sal)(0.05, delta_ratio=0.5, mode="sample")
    plan = low.plan(blank_images(4), gen)
    assert (plan.diagnostics["ratio"] >= 0).all() and (plan.mask.sum(dim=1) == 0).any()


def test_ragged_mae_forward_backward_no_leak(model, synthetic_images):
    x = synthetic_images[:4].clone()
    strat = with_fixed_salience(SalienceAdaptiveRatio, crafted_salience())(0.75, mode="sample")
    plan = strat.plan(x, ctx_for(model, 0))
    mask = plan.mask
    assert len(set(mask.sum(dim=1).tolist())) >= 3  # ragged
    model.zero_grad(set_to_none=True)
    out = model(x, mask)
    loss = model.reconstruction_loss(out.pred, x, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    # perturb the hidden patches of the sample with the fewest visible tokens (its padded slots hold
    # hidden tokens): no prediction of any sample may change
    n = int(mask.sum(dim=1).argmax())
    p = model.patch_size
    pixel_mask = mask[n].view(7, 7).repeat_interleave(p, 0).repeat_interleave(p, 1)
    perturbed = x.clone()
    perturbed[n, :, pixel_mask] += 5 * torch.randn(perturbed[n, :, pixel_mask].shape)
    with torch.no_grad():
        before = model(x, mask).pred
        after = model(perturbed, mask).pred
    assert torch.allclose(before, after, atol=1e-5)
    # sanity: perturbing a visible patch does change that sample's prediction
    visible = perturbed.clone()
    visible[n, :, ~pixel_mask] += 5.0
    with torch.no_grad():
        changed = model(visible, mask).pred
    assert not torch.allclose(before[n], changed[n], atol=1e-3)


def test_ragged_batch_gives_each_image_the_loss_it_has_alone(model, synthetic_images):
    """Padding to the batch's largest visible set changes nothing: every image of a ragged AMR batch
    gets the predictions, hence the per-sample loss, it gets when run alone with its own mask."""
    x = synthetic_images[:4].clone()
    strat = with_fixed_salience(SalienceAdaptiveRatio, crafted_salience())(0.75, mode="sample")
    mask = strat.plan(x, ctx_for(model, 0)).mask
    assert len(set(mask.sum(dim=1).tolist())) >= 3  # ragged: 33, 37, 42 hidden
    model.eval()
    with torch.no_grad():
        batch_pred = model(x, mask).pred
        for n in range(x.shape[0]):
            alone = model(x[n : n + 1], mask[n : n + 1]).pred
            torch.testing.assert_close(batch_pred[n : n + 1], alone, atol=2e-5, rtol=1e-4)
            in_batch = model.reconstruction_loss(batch_pred[n : n + 1], x[n : n + 1], mask[n : n + 1])
            by_itself = model.reconstruction_loss(alone, x[n : n + 1], mask[n : n + 1])
            assert abs(in_batch.item() - by_itself.item()) < 1e-5


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_sbam_hides_more_salient_tokens_than_random(ratio):
    """On real-looking images, SBAM's hidden tokens carry more salience than random masking's."""
    torch.manual_seed(3)
    net = build_model("cpu-tiny", "mae", 28, 1)
    ds = make_synthetic(n_train=256, n_test=8, seed=2)
    x = (ds.train.images.float() / 255.0 - ds.mean[0]) / ds.std[0]
    sb = build_strategy("sbam", ratio).plan(x, ctx_for(net, 11))
    sal = sb.diagnostics["salience"]
    rnd = build_strategy("random", ratio).plan(x, ctx_for(net, 11)).mask
    per_image_sbam = (sal * sb.mask).sum(dim=1) / sb.mask.sum(dim=1)
    per_image_random = (sal * rnd).sum(dim=1) / rnd.sum(dim=1)
    # image by image (a sign test over 256 images), not only on average
    wins = (per_image_sbam > per_image_random).float().mean().item()
    assert wins > 0.9, wins
    assert per_image_sbam.mean() > 1.15 * per_image_random.mean(), (per_image_sbam.mean(), per_image_random.mean())
    visible_sbam = (sal * ~sb.mask).sum() / (~sb.mask).sum()
    assert per_image_sbam.mean() > visible_sbam


# -------------------------------------------------------------------------------- contract / report


def test_describe_and_validation():
    base = build_strategy("sbam", 0.75).describe()
    assert base["interpretation"] is False and base["needs"] == ["embeddings"] and base["deviations"] == []
    attn = build_strategy("sbam", 0.75, params={"salience_source": "attention"}).describe()
    assert attn["interpretation"] is True and attn["needs"] == ["attention"]
    assert attn["variant"] == "SBM-attn-variant"
    assert build_strategy("sbam", 0.75, params={"warmup_epochs": 3}).describe()["interpretation"] is True
    amr = build_strategy("sbam_amr", 0.75, params={"mode": "sample"}).describe()
    assert amr["interpretation"] is True and amr["variant"] == "SBAM-AMR-sample"
    assert SalienceMasking.interpretation is False and SalienceAdaptiveRatio.interpretation is True
    for name, params in [
        ("sbam", {"salience_source": "decoder"}),
        ("sbam", {"noise_scale": -1}),
        ("sbam", {"warmup_epochs": 1.5}),
        ("sbam_amr", {"mode": "image"}),
        ("sbam", {"salience_source": "attention", "scaled": True}),
        ("sbam", {"mode": "batch"}),
    ]:
        with pytest.raises(BenchError):
            build_strategy(name, 0.75, params=params)


@pytest.mark.parametrize(
    "name,params,fragments",
    [
        ("sbam", {"noise_scale": -0.1}, ("noise_scale", "-0.1", ">= 0")),
        ("sbam", {"noise_scale": float("inf")}, ("noise_scale", "inf", ">= 0")),
        ("sbam", {"noise_scale": float("nan")}, ("noise_scale", "nan", ">= 0")),
        ("sbam", {"noise_scale": True}, ("noise_scale", "True", "number")),
        ("sbam", {"noise_scale": "0.5"}, ("noise_scale", "'0.5'", "number")),
        ("sbam", {"scaled": 1}, ("scaled", "1", "true or false")),
        ("sbam", {"scaled": "yes"}, ("scaled", "'yes'", "true or false")),
        ("sbam", {"salience_source": "decoder"}, ("salience_source", "'decoder'", "embeddings, attention")),
        ("sbam", {"salience_source": None}, ("salience_source", "None", "embeddings, attention")),
        ("sbam", {"warmup_epochs": -1}, ("warmup_epochs", "-1", ">= 0")),
        ("sbam", {"warmup_epochs": 1.5}, ("warmup_epochs", "1.5", "integer")),
        ("sbam", {"warmup_epochs": True}, ("warmup_epochs", "True", "integer")),
        ("sbam", {"warmup_epochs": "2"}, ("warmup_epochs", "'2'", "integer")),
        ("sbam_amr", {"noise_scale": -1}, ("noise_scale", "-1", ">= 0")),
        ("sbam_amr", {"warmup_epochs": -2}, ("warmup_epochs", "-2", ">= 0")),
        ("sbam_amr", {"delta_ratio": -0.1}, ("delta_ratio", "-0.1", "[0, 1]")),
        ("sbam_amr", {"delta_ratio": 1.5}, ("delta_ratio", "1.5", "[0, 1]")),
        ("sbam_amr", {"delta_ratio": True}, ("delta_ratio", "True", "number")),
        ("sbam_amr", {"delta_ratio": "0.1"}, ("delta_ratio", "'0.1'", "number")),
        ("sbam_amr", {"threshold": -0.5}, ("threshold", "-0.5", "[0, 1]")),
        ("sbam_amr", {"threshold": 1.5}, ("threshold", "1.5", "[0, 1]")),
        ("sbam_amr", {"threshold": float("nan")}, ("threshold", "nan", "[0, 1]")),
        ("sbam_amr", {"threshold": False}, ("threshold", "False", "number")),
        ("sbam_amr", {"mode": "image"}, ("mode", "'image'", "batch, sample")),
    ],
)
def test_invalid_parameters_are_one_line_errors(name, params, fragments):
    assert_one_line_error(name, params, fragments)


@pytest.mark.parametrize(
    "name,params",
    [
        ("sbam", {"noise_scale": 0}),
        ("sbam", {"noise_scale": 1}),
        ("sbam", {"noise_scale": 0.25}),
        ("sbam", {"warmup_epochs": 2}),
        ("sbam", {"warmup_epochs": 2.0}),
        ("sbam", {"scaled": True}),
        ("sbam_amr", {"delta_ratio": 0}),
        ("sbam_amr", {"delta_ratio": 0.2}),
        ("sbam_amr", {"threshold": 0}),
        ("sbam_amr", {"threshold": 1}),
        ("sbam_amr", {"threshold": 0.3}),
        ("sbam_amr", {"mode": "sample"}),
    ],
)
def test_valid_parameters_are_accepted(name, params):
    strategy = build_strategy(name, 0.75, params=params)
    assert strategy.params == {**type(strategy).defaults, **params}  # the record keeps them as given
