"""Figure 3 of docs/performance.md: each strategy's mask planning as a share of its own training step (target <= 3%)."""

from __future__ import annotations

import pytest

from masking_bench import bench, bench_table

from .conftest import RESULTS


@pytest.mark.parametrize("label", list(bench.PLAN_STRATEGIES))
def test_plan_share(benchmark, setup, bf16, label):
    """plan() / whole step of the same strategy, interleaved; also against the bf16 step (the CPU suites' setting).

    pytest-benchmark times ``plan`` alone (as the trainer's step calls it).
    """
    one = bench.plan_share(
        setup, {label: bench.PLAN_STRATEGIES[label]}, rounds=5, fast=bench.FAST_STEP if bf16 else None
    )
    merged = RESULTS.setdefault("plan", {"rounds": one["rounds"], "strategies": {}})
    merged["strategies"].update(one["strategies"])
    merged["max_share"] = max(v["share"] for v in merged["strategies"].values())
    benchmark.extra_info.update(bench_table.scalars(one["strategies"][label]))
    step = bench.ProductStep(setup, strategy=bench.PLAN_STRATEGIES[label][0], params=bench.PLAN_STRATEGIES[label][1])
    benchmark.pedantic(step.plan, rounds=20, warmup_rounds=2)
