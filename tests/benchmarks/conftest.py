"""Fixtures of the performance benchmarks (docs/performance.md) and the summary table printed at the end.

Run with ``pytest tests/benchmarks --benchmark-only`` (plain ``pytest`` skips them: the project's
addopts hold ``--benchmark-skip``, which ``--benchmark-only`` overrides). Every figure is a ratio of
contenders measured side by side, interleaved, in the same process (``masking_bench.bench``);
pytest-benchmark's own table times each figure's subject, the ratios are in ``extra_info``
(``--benchmark-json FILE`` keeps them) and in the summary table printed after the run.

Environment:
  OMP_NUM_THREADS            torch threads (tests/conftest.py defaults to 1; 2 = the whole 2-core machine)
  MASKING_BENCH_DEVICE       auto (default: cuda when present), cpu, cuda, cuda:1 ...
  MASKING_BENCH_BENCH_COMPILE=1  also measure the torch.compile variants (minutes of compilation on CPU)
"""

from __future__ import annotations

import os

import pytest

from masking_bench import bench, bench_table

RESULTS: dict = {}


@pytest.fixture(scope="session")
def setup():
    """Device, Fashion-MNIST (or a generated stand-in) and one augmented batch at the CPU default config."""
    s = bench.make_setup(os.environ.get("MASKING_BENCH_DEVICE", "auto"))
    RESULTS["machine"] = bench.machine_info(s.device)
    return s


@pytest.fixture(scope="session")
def bf16(setup) -> bool:
    """Whether this host runs bf16 natively; where it does not, only fp32 is measured (as `bench` does)."""
    return bench.native_bf16(setup.device)


@pytest.fixture(scope="session")
def variants(bf16) -> dict:
    """Product-step variants (bf16 where native, as `train.amp: auto` trains; compile when asked) measured
    next to the fp32 step."""
    return bench.default_variants(compile=os.environ.get("MASKING_BENCH_BENCH_COMPILE") == "1", bf16=bf16)


@pytest.fixture
def record(benchmark):
    """``record(figure, result)``: keep a figure for the summary table and its scalars in extra_info."""

    def _record(figure: str, result: dict) -> dict:
        RESULTS[figure] = result
        benchmark.extra_info.update(bench_table.scalars(result))
        return result

    return _record


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if len(RESULTS) <= 1:  # nothing measured (skipped / deselected)
        return
    machine = RESULTS.get("machine", {})
    machine["loadavg_1m_end"] = bench.machine_info(bench.pick_device(machine.get("device", "cpu"))).get("loadavg_1m")
    if "plan" in RESULTS and "eval" in RESULTS:  # project the shipped CPU suites from the measured rates
        for suite in ("suites/smoke.yaml", "suites/ratio_sweep.yaml"):
            path = config.rootpath / suite
            if path.is_file():
                RESULTS.setdefault("suites", {})[suite] = bench_table.project_suite(path, RESULTS)
    terminalreporter.write_sep("=", "masking_bench performance: ratios measured side by side")
    terminalreporter.write_line(bench_table.format_table(RESULTS))
    terminalreporter.write_line("targets are reported, not asserted; see docs/performance.md for what the figures mean")
