"""The Python API (masking_bench/api.py): each function on real tiny runs, and the quickstart example.

Runs are real: one epoch on generated data (in-process), and the example script on Fashion-MNIST in
a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env, flaky_plugin, needs_fashion, write_suite

import masking_bench as mb
from masking_bench.config import expand
from masking_bench.errors import BenchError

TINY = {
    "name": "api_tiny",
    "data": {"name": "synthetic"},
    "strategies": ["random", "block"],
    "ratios": [0.75],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 128},
    "eval": {"probe": {"epochs": 1, "train_subset": 128, "test_subset": 64}},
}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """(suite, results, records frame) of TINY run through the API."""
    results = tmp_path_factory.mktemp("api") / "results"
    suite = mb.load_suite(TINY)
    frame = mb.run(suite, results=results, progress=False)
    return suite, results, frame


def run_dir(results, frame, strategy: str):
    row = frame[frame["strategy"] == strategy].iloc[0]
    return results / "runs" / row["suite"] / row["run_hash"]


# ---------------------------------------------------------------------------------- package


def test_import_stays_light():
    code = (
        "import sys, masking_bench as mb; print(sorted(m for m in ('torch', 'pandas', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert out.stdout.strip() == "[]", out.stderr
    assert "load_suite" in dir(mb) and mb.load_suite.__module__ == "masking_bench.api"
    with pytest.raises(AttributeError):
        _ = mb.no_such_function


# ----------------------------------------------------------------------------------- suites


def test_load_suite_from_file_dict_and_suite_with_overrides(tmp_path):
    path = write_suite(tmp_path, TINY)
    from_file = mb.load_suite(path, overrides=["train.epochs=2"])
    from_dict = mb.load_suite(TINY, overrides={"train.epochs": 2})
    from_suite = mb.load_suite(mb.load_suite(TINY), overrides=["train.epochs=2"])
    plain = [s.run_hash for s in expand(mb.load_suite(TINY))]
    for suite in (from_file, from_dict, from_suite):
        assert suite.train.epochs == 2
        hashes = [s.run_hash for s in expand(suite)]
        assert hashes == [s.run_hash for s in expand(from_file)] and hashes[1:] != plain[1:]
    assert TINY["train"]["epochs"] == 1  # the caller's mapping is not modified


def test_load_suite_errors_are_one_line():
    with pytest.raises(BenchError, match=r"^override train\.epochz=2: unknown field 'epochz' in train; accepted"):
        mb.load_suite(TINY, overrides=["train.epochz=2"])
    with pytest.raises(BenchError, match=r"unknown strategy 'nope'"):  # strategies are checked when loading
        mb.load_suite(TINY, overrides={"strategies": ["nope"]})
    with pytest.raises(BenchError, match="unknown model preset 'huge'"):
        mb.load_suite(TINY, overrides=["model=huge"])
    with pytest.raises(BenchError, match="give a suite file path or a mapping"):
        mb.load_suite(42)


PLUGIN = """
import torch

from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden


class LastFirstMasking(MaskingStrategy):
    '''Hides the last tokens in row-major order (a test plugin).'''

    name = "api_last_first"
    source = "test"

    def plan(self, images, ctx):
        order = torch.arange(ctx.num_tokens, device=ctx.device).expand(images.shape[0], -1)
        return MaskPlan(mask=hide_lowest_first(order, num_hidden(ctx.num_tokens, self.ratio)))
"""


def test_load_suite_loads_plugins_passed_or_named(tmp_path):
    plugin = tmp_path / "api_last_first.py"
    plugin.write_text(PLUGIN)
    raw = {**TINY, "strategies": ["api_last_first"]}
    with pytest.raises(BenchError, match="unknown strategy 'api_last_first'"):
        mb.load_suite(raw)
    suite = mb.load_suite(raw, plugins=[plugin])
    assert str(plugin.resolve()) in suite.plugins
    named = write_suite(tmp_path / "named", {**raw, "plugins": [str(plugin)]})
    assert mb.load_suite(named).strategies[0].name == "api_last_first"
    mask, _ = mb.plan_masks(mb.build_strategy("api_last_first", 0.5), torch.zeros(2, 1, 28, 28))
    assert mask[:, -1].all() and not mask[:, 0].any()


# ------------------------------------------------------------------------------ run, records


def test_run_returns_one_row_per_run_with_its_metrics(done):
    suite, _, frame = done
    specs = expand(suite)
    assert list(frame["run_hash"]) == [s.run_hash for s in specs]
    assert list(frame["strategy"]) == ["random_init", "random", "block"]
    assert list(frame.columns[:7]) == ["suite", "kind", "strategy", "strategy_name", "ratio", "seed", "run_hash"]
    for column in ("probe_top1", "knn_top1", "epoch_seconds", "peak_mem_mb"):
        assert column in frame.columns
    assert frame["probe_top1"].between(0, 100).all() and (frame["suite"] == "api_tiny").all()
    assert frame.loc[frame["kind"] == "pretrain", "ratio"].tolist() == [0.75, 0.75]
    assert "floor_key" not in frame.columns


def test_run_again_skips_finished_runs(done):
    suite, results, frame = done
    before = {p: p.stat().st_mtime_ns for p in results.rglob("summary.json")}
    assert mb.run(suite, results=results, progress=False).equals(frame)
    assert {p: p.stat().st_mtime_ns for p in results.rglob("summary.json")} == before


def test_records_reads_the_results_folder(done):
    _, results, frame = done
    table = mb.records(results, suite="api_tiny")
    assert sorted(table["run_hash"]) == sorted(frame["run_hash"])
    with pytest.raises(BenchError, match="no finished runs"):
        mb.records(results, suite="other")


def test_run_raises_on_a_failed_run_and_keeps_the_others(tmp_path):
    plugin = tmp_path / "api_flaky.py"
    plugin.write_text(flaky_plugin("api_flaky", "test"))
    flag = tmp_path / "flaky.fail"
    flag.write_text("flag is up")
    suite = mb.load_suite(TINY, overrides={"strategies": ["random", "api_flaky"]}, plugins=[plugin])
    results = tmp_path / "results"
    with pytest.raises(BenchError, match=r"^1 of 3 runs of suite 'api_tiny' failed \(first: api_flaky r=0.75 seed=0: "):
        mb.run(suite, results=results, progress=False)
    kept = mb.records(results)
    assert sorted(kept["strategy"]) == ["random", "random_init"]
    flag.unlink()
    assert list(mb.run(suite, results=results, progress=False)["strategy"]) == ["random_init", "random", "api_flaky"]


# ------------------------------------------------------------------------------------ masks


def test_build_strategy_checks_parameters():
    strategy = mb.build_strategy("block", 0.6, min_block=4)
    assert strategy.ratio == 0.6 and strategy.params["min_block"] == 4
    with pytest.raises(BenchError, match="has no parameter 'cell'"):
        mb.build_strategy("block", 0.6, cell=2)


def test_plan_masks_returns_the_boolean_mask_and_plan(synthetic_images):
    images = synthetic_images[:6]
    mask, plan = mb.plan_masks(mb.build_strategy("random", 0.75), images, seed=3)
    assert mask.dtype == torch.bool and mask.shape == (6, 49)
    assert (mask.sum(dim=1) == 49 - int(49 * 0.25)).all()  # MAE's count, docs/strategies.md §1.2
    assert plan.mask is mask
    again, _ = mb.plan_masks(mb.build_strategy("random", 0.75), images, seed=3)
    other, _ = mb.plan_masks(mb.build_strategy("random", 0.75), images, seed=4)
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    rng = torch.random.get_rng_state()
    mb.plan_masks(mb.build_strategy("sbam", 0.75), images)  # a salience strategy on a fresh seeded model
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's generator is left alone


def test_plan_masks_errors():
    strategy = mb.build_strategy("random", 0.75)
    with pytest.raises(BenchError, match="give a strategy from build_strategy"):
        mb.plan_masks("random", torch.zeros(2, 1, 28, 28))
    with pytest.raises(BenchError, match="float"):
        mb.plan_masks(strategy, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    from masking_bench.models import build_model

    with pytest.raises(BenchError, match="do not fit the model"):
        mb.plan_masks(strategy, torch.zeros(2, 3, 28, 28), model=build_model("cpu-tiny", "mae", 28, 1))


def test_load_images():
    images, labels = mb.load_images("synthetic", n=5)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32 and labels.shape == (5,)
    assert images.abs().mean() < 3  # normalised, not 0..255
    with pytest.raises(BenchError, match="n=0 is out of range"):
        mb.load_images("synthetic", n=0)


# ---------------------------------------------------------------------------------- encoders


def test_load_encoder_gives_the_trained_weights_in_eval_mode(done):
    _, results, frame = done
    folder = run_dir(results, frame, "random")
    encoder = mb.load_encoder(folder)
    assert not encoder.training and encoder.epochs_done == 1 and encoder.spec.strategy.name == "random"
    saved = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    images, _ = mb.load_images(encoder, n=4)
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (4, encoder.model.embed_dim)
    assert torch.allclose(features, encoder.model.forward_features(images, "mean"))
    assert torch.allclose(mb.load_encoder(folder / "checkpoint.pt")(images), features)
    # plan with the trained encoder, given as a module or as its run folder
    strategy = mb.build_strategy("sbam", 0.75)
    by_module, _ = mb.plan_masks(strategy, images, model=encoder)
    by_folder, _ = mb.plan_masks(strategy, images, model=folder)
    assert torch.equal(by_module, by_folder)


def test_load_encoder_of_the_untrained_floor_rebuilds_its_seeded_weights(done):
    _, results, frame = done
    folder = run_dir(results, frame, "random_init")
    assert not (folder / "checkpoint.pt").exists()
    first, second = mb.load_encoder(folder), mb.load_encoder(folder)
    assert first.epochs_done == 0
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    trained = mb.load_encoder(run_dir(results, frame, "random"))
    assert not torch.equal(first.model.blocks[0].attn.qkv.weight, trained.model.blocks[0].attn.qkv.weight)


def test_load_encoder_errors(done, tmp_path):
    _, results, frame = done
    with pytest.raises(BenchError, match="is not a run folder: no config.yaml"):
        mb.load_encoder(tmp_path)
    compact = tmp_path / "compact"  # what an archived record keeps: config, metrics, summary, no weights
    compact.mkdir()
    (compact / "config.yaml").write_bytes((run_dir(results, frame, "random") / "config.yaml").read_bytes())
    with pytest.raises(BenchError, match="has no checkpoint.pt"):
        mb.load_encoder(compact)
    (compact / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(BenchError, match="cannot be loaded into the run's cpu-tiny mae model"):
        mb.load_encoder(compact)


# ---------------------------------------------------------------------------------- example


@needs_fashion
def test_quickstart_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "api_quickstart.py"), "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "suite smoke: strategies ['random', 'block'], ratios [0.75]" in text
    assert "records: 3 runs in" in text
    first_words = [line.split()[0] for line in text.splitlines() if line.strip()]
    for strategy in ("random_init", "random", "block"):
        assert strategy in first_words, text
    assert "block masks: (8, 49), hidden ratio" in text
    assert "epoch(s), features (8, 128)" in text and "encoder of run" in text
    assert "random masks planned with the trained encoder: hidden ratio 0.612" in text
    assert (tmp_path / "results" / "runs" / "smoke").is_dir()
