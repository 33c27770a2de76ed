"""Figures 1 and 2 of docs/performance.md: the training step against a plain MAE step, and against the matmul peak."""

from __future__ import annotations

import torch

from masking_bench import bench, timing


def test_train_step_vs_reference(benchmark, setup, variants, record):
    """Product step (the trainer's own TrainStep) / plain reference MAE step, same model, batch and ratio.

    Target: >= 1.25x. pytest-benchmark times the product's step as the trainer runs it.
    """
    result = record("step", bench.step_vs_reference(setup, rounds=9, variants=variants))
    assert result["ratio"] > 0
    step = bench.ProductStep(setup)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def test_flops_vs_matmul_peak(benchmark, setup, variants, bf16, record):
    """Achieved FLOP/s of the step (flop_counter FLOPs / time) / FLOP/s of a large matmul, fp32 and bf16.

    Target: >= 50% in the better precision. pytest-benchmark times the fp32 matmul (the peak).
    """
    dtypes = ("fp32", "bf16") if bf16 else ("fp32",)
    result = record("flops", bench.flops_vs_peak(setup, rounds=7, variants=variants, dtypes=dtypes))
    assert result["flops_per_image"] > 0
    mm, _ = bench.matmul_call(setup.device, torch.float32)
    benchmark.pedantic(lambda: (mm(), timing.sync(setup.device)), rounds=3, warmup_rounds=1)
