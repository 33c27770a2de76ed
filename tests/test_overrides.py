"""``--set PATH=VALUE`` overrides (masking_bench/overrides.py) and the ``plan`` command / ``run --dry-run``.

Overrides are validated like the file and enter the run identity; errors are one line naming the
override; ``plan`` lists every run with its state and trains and writes nothing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from conftest import TINY_SUITE, write_suite

from masking_bench.cli import main
from masking_bench.config import expand, load_suite
from masking_bench.errors import BenchError


def hashes(suite) -> list[str]:
    return [spec.run_hash for spec in expand(suite)]


@pytest.fixture
def suite_file(tmp_path) -> Path:
    return write_suite(tmp_path, TINY_SUITE)


# ------------------------------------------------------------------------------ values and paths


def test_overrides_set_fields_with_yaml_values(suite_file):
    suite = load_suite(
        suite_file,
        [
            "train.epochs=2",
            "ratios=[0.6,0.9]",
            "train.clip_grad=null",
            "train.norm_pix_loss=false",
            "model.overrides.depth=2",
            "eval.low_shot.draws=2",
            "grid.train.base_lr=[0.001, 0.002]",
            "description=a=b",  # only the first '=' splits
        ],
    )
    assert suite.description == "a=b"
    assert suite.train.epochs == 2 and suite.ratios == [0.6, 0.9]
    assert suite.train.clip_grad is None and suite.train.norm_pix_loss is False
    assert suite.model.preset == "cpu-tiny" and suite.model.overrides == {"depth": 2}  # `model: cpu-tiny` shorthand
    assert suite.eval.low_shot is not None and suite.eval.low_shot.draws == 2  # an absent block is created
    assert suite.grid == {"train.base_lr": [0.001, 0.002]}  # the rest of a grid path is one axis name
    assert suite.train.batch_size == TINY_SUITE["train"]["batch_size"]  # the fields beside it are kept


def test_the_last_override_wins_and_the_file_is_untouched(suite_file):
    before = suite_file.read_text()
    assert load_suite(suite_file, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4
    assert load_suite(suite_file, {"train.epochs": 5, "seeds": [3]}).seeds == [3]  # a mapping: values as given
    assert suite_file.read_text() == before
    assert load_suite(suite_file).train.epochs == TINY_SUITE["train"]["epochs"]


def test_overrides_enter_the_run_identity(tmp_path, suite_file):
    """--set train.epochs=2 gives other hashes than the file (epochs: 1), the same as a file saying epochs: 2."""
    two = copy.deepcopy(TINY_SUITE)
    two["train"]["epochs"] = 2
    file_two = write_suite(tmp_path / "two", two)
    overridden = hashes(load_suite(suite_file, ["train.epochs=2"]))
    assert overridden == hashes(load_suite(file_two))
    assert not set(overridden[2:]) & set(hashes(load_suite(suite_file)))  # every pretrain run differs
    assert overridden[:2] == hashes(load_suite(suite_file))[:2]  # the untrained floors ignore the recipe


def test_name_override_lifts_the_file_name_rule(tmp_path):
    path = write_suite(tmp_path, {k: v for k, v in TINY_SUITE.items() if k != "name"}, "my suite")
    with pytest.raises(BenchError, match="add a line 'name: my_suite'"):
        load_suite(path)
    assert load_suite(path, ["name=renamed"]).name == "renamed"


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "item,needles",
    [
        (
            "train.epochz=2",
            ("--set train.epochz=2: unknown field 'epochz' in train; accepted: epochs, batch_size, accum_steps",),
        ),
        ("epochz=2", ("--set epochz=2: unknown field 'epochz' in the suite; accepted: name, description",)),
        ("train.epochs", ("--set train.epochs: expected PATH=VALUE",)),
        ("=2", ("--set =2: the path must be dotted field names",)),
        ("train..epochs=2", ("--set train..epochs=2: the path must be dotted field names",)),
        ("train.epochs=-1", ("--set train.epochs=-1: field 'train.epochs'", "greater than or equal to 0", "got -1")),
        ("ratios=[0.6,1.5]", ("--set ratios=[0.6,1.5]: field 'ratios.1'", "strictly between 0 and 1")),
        ("train={epochz: 1}", ("--set train={epochz: 1}: field 'train.epochz': unknown field",)),
        ("ratios.0=0.5", ("--set ratios.0=0.5: 'ratios' is a list", "set it whole")),
        ("train.epochs.x=1", ("--set train.epochs.x=1: 'train.epochs' is a single value",)),
        ("eval.probe.lr=[1", ("--set eval.probe.lr=[1: the value is not valid YAML",)),
        ("train.amp=fp16", ("--set train.amp=fp16: field 'train.amp'", "'auto', 'none' or 'bf16'")),
    ],
)
def test_override_errors_are_one_line_naming_the_override(suite_file, item, needles):
    with pytest.raises(BenchError) as err:
        load_suite(suite_file, [item])
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_an_error_in_the_file_still_names_the_file(tmp_path):
    bad = {**TINY_SUITE, "train": {"epochs": -1}}
    path = write_suite(tmp_path, bad)
    with pytest.raises(BenchError, match=r"tiny.yaml with --set seeds=\[3\]: field 'train.epochs'"):
        load_suite(path, ["seeds=[3]"])
    assert load_suite(path, ["train.epochs=1"]).train.epochs == 1  # an override may repair the file


def test_unknown_preset_from_an_override_names_it(suite_file, tmp_path, capsys):
    code = main(["plan", str(suite_file), "--results", str(tmp_path / "r"), "--set", "model.preset=huge"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "--set model.preset=huge: unknown model preset 'huge'" in err


@pytest.mark.parametrize("command", ["run", "plan", "status"])
@pytest.mark.parametrize("item", ["train.epochs", "=3", "train.epochz=2"])
def test_cli_malformed_set_is_one_line(suite_file, tmp_path, capsys, command, item):
    results = tmp_path / "results"
    code = main([command, str(suite_file), "--results", str(results), f"--set={item}"])
    out = capsys.readouterr()
    assert code == 2, out
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --set {item}"), out.err
    assert not results.exists()


# ---------------------------------------------------------------------------------------- plan


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time (ns)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.stat()
            out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def one_done(tmp_path_factory):
    """A results folder with one finished tiny run (synthetic data, one epoch, small probe)."""
    tmp = tmp_path_factory.mktemp("plan")
    tiny = {
        "name": "plan_tiny",
        "data": {"name": "synthetic"},
        "strategies": ["random"],
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 128},
        "eval": {"random_init": False, "probe": {"epochs": 1, "train_subset": 128, "test_subset": 64}},
    }
    path = write_suite(tmp, tiny)
    results = tmp / "results"
    from masking_bench.launch import run_local

    outcome = run_local(expand(load_suite(path)), results, show_progress=False)
    assert len(outcome.done) == 1, outcome
    return path, results


def test_plan_lists_every_run_with_its_state_and_writes_nothing(one_done, capsys):
    path, results = one_done
    before = snapshot(results)
    capsys.readouterr()
    assert main(["plan", str(path), "--results", str(results), "--set", "seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    suite = load_suite(path, ["seeds=[0,1]"])
    specs = expand(suite)
    lines = out.splitlines()
    assert lines[0].startswith("plan for suite 'plan_tiny': 2 runs")
    assert lines[1].split() == ["run", "hash", "strategy", "ratio", "seed", "state", "epochs", "run", "would"]
    assert lines[2].split() == [specs[0].run_hash, "random", "0.75", "0", "done", "1/1", "skip"]
    assert lines[3].split() == [specs[1].run_hash, "random", "0.75", "1", "pending", "0/1", "train"]
    assert lines[-1] == "total: 1 to train (1 pending), 1 done"
    assert snapshot(results) == before


def test_run_dry_run_prints_the_plan(one_done, capsys):
    path, results = one_done
    before = snapshot(results)
    capsys.readouterr()
    assert main(["plan", str(path), "--results", str(results), "--set", "train.epochs=2"]) == 0
    plan = capsys.readouterr().out
    assert main(["run", str(path), "--results", str(results), "--set", "train.epochs=2", "--dry-run"]) == 0
    assert capsys.readouterr().out == plan
    assert plan.splitlines()[-1] == "total: 1 to train (1 pending), 0 done"  # another recipe: another run
    assert snapshot(results) == before


def test_plan_of_a_fresh_folder_creates_nothing(suite_file, tmp_path, capsys):
    results = tmp_path / "fresh"
    assert main(["plan", str(suite_file), "--results", str(results), "--set", "ratios=[0.5]"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "total: 6 to train (6 pending), 0 done"  # 2 strategies x 2 seeds + 2 floors
    assert out.count("evaluate (untrained)") == 2
    assert not results.exists()


def test_plan_shows_grid_values(suite_file, tmp_path, capsys):
    args = ["plan", str(suite_file), "--results", str(tmp_path / "r"), "--set", "grid.train.base_lr=[0.001,0.002]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grid" in out.splitlines()[1]
    assert out.count("train.base_lr=0.001") == 8 and out.count("train.base_lr=0.002") == 8


def test_status_takes_overrides(one_done, capsys):
    path, results = one_done
    capsys.readouterr()
    assert main(["status", str(path), "--results", str(results), "--no-slurm"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert main(["status", str(path), "--results", str(results), "--no-slurm", "--set", "train.epochs=2"]) == 0
    assert "0 done, 0 stale, 0 running, 1 pending" in capsys.readouterr().out
