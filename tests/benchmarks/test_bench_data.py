"""Figure 4 of docs/performance.md: augmented loader batches/s against the model's consumption (target >= 20x)."""

from __future__ import annotations

from masking_bench import bench, timing
from masking_bench.data import Augment, TensorLoader


def test_data_vs_model(benchmark, setup, record):
    """TensorLoader + Augment (the trainer's pipeline) batches/s / product steps/s, interleaved.

    pytest-benchmark times one augmented batch.
    """
    result = record("data", bench.data_vs_model(setup, rounds=7))
    assert result["ratio"] > 0
    ds = setup.dataset
    loader = TensorLoader(
        ds.train.subset(20_000, seed=0),
        setup.batch_size,
        ds.mean,
        ds.std,
        device=setup.device,
        seed=0,
        augment=Augment(),
    )
    it = iter(loader.batches(0))
    benchmark.pedantic(lambda: (next(it), timing.sync(setup.device)), rounds=30, warmup_rounds=2)
