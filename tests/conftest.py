"""Shared fixtures and helpers: a tiny suite, result folders, the real Fashion-MNIST, a CLI runner,
planning contexts (``ctx_for``) and image batches for strategy tests.

The machine has 2 cores shared with other people. Two OpenMP threads competing with another busy
process make a cpu-tiny training step ~10x slower than one thread (spin-waiting), so the tests run
torch single-threaded in-process and in every CLI subprocess unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

THREADS = os.environ.get("OMP_NUM_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS  # inherited by CLI subprocesses
os.environ.setdefault("MPLBACKEND", "Agg")  # figures render headless, in-process and in CLI subprocesses
# the start-up catalog (masking_bench/catalog.py) of the tests stays out of the user's own cache;
# shared by the test workers, keyed by file contents like any catalog
os.environ.setdefault("MASKING_BENCH_CACHE", str(Path(tempfile.gettempdir()) / f"masking_bench_tests_{os.getuid()}"))


def pytest_configure(config):
    """Torch single-threaded in-process too (imported here, after OMP_NUM_THREADS is set)."""
    import torch

    torch.set_num_threads(int(THREADS))


REPO = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "MASKING_BENCH_DATA_DIR"


def have_fashion_mnist() -> bool:
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file() or (FASHION_DIR / "train-images-idx3-ubyte").is_file()


needs_fashion = pytest.mark.skipif(not have_fashion_mnist(), reason=f"Fashion-MNIST not in {FASHION_DIR}")


@pytest.fixture(autouse=True)
def _no_data_dir_override(monkeypatch, tmp_path):
    """A developer's $MASKING_BENCH_DATA_DIR must not leak into tests that assume the default, and prepared
    datasets go to the test's own folder, never to the repository's results/prepared/ (a test that means
    the default removes $MASKING_BENCH_PREPARED itself)."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("MASKING_BENCH_PREPARED", str(tmp_path / "prepared_cache"))


# A minimal valid suite on generated data (never trained by the unit tests, only parsed/expanded).
TINY_SUITE = {
    "name": "tiny",
    "method": "mae",
    "model": "cpu-tiny",
    "data": {"name": "synthetic"},
    "strategies": ["random", "block"],
    "ratios": [0.6, 0.75],
    "seeds": [0, 1],
    "train": {"epochs": 1, "batch_size": 64},
    "eval": {"probe": {"epochs": 2}},
}


@pytest.fixture
def tiny_suite() -> dict:
    """A fresh copy of :data:`TINY_SUITE` for a test to modify."""
    return copy.deepcopy(TINY_SUITE)


@pytest.fixture
def results_dir(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


def write_suite(folder: Path, suite: dict, name: str | None = None) -> Path:
    """Write ``suite`` as YAML into ``folder``; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or suite.get('name', 'suite')}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    env.update(OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m masking_bench ARGS`` in a subprocess, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "masking_bench", *map(str, args)],
        cwd=cwd or REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "masking_bench", *map(str, args)],
        cwd=cwd or REPO,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session")
def fashion():
    """The real Fashion-MNIST, decoded once per test session."""
    if not have_fashion_mnist():
        pytest.skip(f"Fashion-MNIST not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    from masking_bench.data import load_fashion_mnist

    return load_fashion_mnist(str(FASHION_DIR))


@pytest.fixture
def fresh_model():
    """Factory of seeded, freshly initialised cpu-tiny models in eval mode: ``fresh_model("mae")``."""
    from masking_bench.models import build_model

    def make(method: str = "mae"):
        import torch

        torch.manual_seed(0)
        return build_model("cpu-tiny", method, 28, 1).eval()

    return make


@pytest.fixture(scope="module")
def models():
    """One seeded cpu-tiny model per MIM method, shared by the tests of a module."""
    import torch

    from masking_bench.models import build_model

    out = {}
    for method in ("mae", "simmim"):
        torch.manual_seed(0)
        out[method] = build_model("cpu-tiny", method, 28, 1).eval()
    return out


# ------------------------------------------------------------------ planning contexts and image batches


def ctx_for(model_or_grid, seed: int = 0, epoch: int = 0, *, method: str | None = None):
    """A :class:`~masking_bench.masking.PlanContext` with a fresh generator seeded ``seed``.

    Given a model: its token grid and MIM method. Given a grid ``(h, w)`` instead: no model (for
    strategies that read only the grid) and method ``mae``. ``method`` overrides either.
    """
    import torch

    from masking_bench.masking import PlanContext

    if isinstance(model_or_grid, tuple):
        model, grid, default = None, model_or_grid, "mae"
    else:
        model, grid, default = model_or_grid, model_or_grid.grid, model_or_grid.method
    return PlanContext(model, grid, torch.Generator().manual_seed(seed), epoch=epoch, method=method or default)


def assert_one_line_error(name: str, params: dict, fragments, method: str = "mae") -> None:
    """``build_strategy(name, 0.75, method, params)`` raises a :class:`BenchError` whose message is one
    line, names the strategy (quoted) and contains every one of ``fragments``."""
    from masking_bench.errors import BenchError
    from masking_bench.masking import build_strategy

    with pytest.raises(BenchError) as err:
        build_strategy(name, 0.75, method, params)
    msg = str(err.value)
    assert "\n" not in msg and f"'{name}'" in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def blank_images(n: int):
    """``n`` black 1x28x28 images, for strategies that read only the batch size."""
    import torch

    return torch.zeros(n, 1, 28, 28)


@pytest.fixture(scope="module")
def noise_images():
    """Four seeded standard-normal 1x28x28 images."""
    import torch

    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def smooth_images():
    """Four seeded smooth-ish 1x28x28 images: bilinear up-sampled 7x7 noise plus a little pixel noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    coarse = torch.randn(4, 1, 7, 7, generator=g)
    return F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False) + 0.1 * torch.randn(
        4, 1, 28, 28, generator=g
    )


@pytest.fixture(scope="module")
def synthetic_images():
    """The 16 training images of a seeded synthetic dataset, normalised as the loader normalises them."""
    from masking_bench.data import make_synthetic

    ds = make_synthetic(n_train=16, n_test=8, seed=1)
    x = ds.train.images.float() / 255.0
    return (x - ds.mean[0]) / ds.std[0]


def flaky_plugin(name: str, source: str) -> str:
    """Source of a strategy file registering ``name``: random masking whose plan() raises
    ``RuntimeError("planned failure: <flag text>")`` while a ``flaky.fail`` file sits next to it."""
    cls = "".join(part.title() for part in name.split("_")) + "Masking"
    return f'''
from pathlib import Path

from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden, register

FLAG = Path(__file__).with_name("flaky.fail")


@register
class {cls}(MaskingStrategy):
    name = "{name}"
    source = "{source}"

    def plan(self, images, ctx):
        if FLAG.exists():
            raise RuntimeError("planned failure: " + FLAG.read_text().strip())
        noise = ctx.rand(images.shape[0], ctx.num_tokens)
        return MaskPlan(mask=hide_lowest_first(noise, num_hidden(ctx.num_tokens, self.ratio)))
'''
