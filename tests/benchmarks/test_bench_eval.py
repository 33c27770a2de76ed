"""Figure 5 of docs/performance.md: feature-extraction throughput of the frozen-encoder evaluation (no target)."""

from __future__ import annotations

from masking_bench import bench
from masking_bench.data import Split
from masking_bench.evaluate import extract_features


def test_eval_feature_extraction(benchmark, setup, record):
    """extract_features images/s (all 50 tokens, no mask) and its FLOP/s against the fp32 matmul.

    pytest-benchmark times the extraction of 1024 test images.
    """
    result = record("eval", bench.eval_features(setup, images=1024, rounds=3))
    assert result["img_per_s"] > 0
    ds = setup.dataset
    split = Split(ds.test.images[:1024], ds.test.labels[:1024])
    model = bench.make_model(setup.spec(), ds).to(setup.device)
    benchmark.pedantic(
        lambda: extract_features(model, split, ds.mean, ds.std, "mean", 1024, setup.device), rounds=2, warmup_rounds=1
    )
