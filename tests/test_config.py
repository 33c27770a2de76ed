"""Suite schema: expansion into runs, run hashes, and one-line validation errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_suite
from masking_bench.config import expand, load_suite, parse_suite
from masking_bench.errors import BenchError


def runs_of(raw: dict):
    return expand(parse_suite(copy.deepcopy(raw)))


def one_run(raw: dict, **changes):
    """The single pretrain run of ``raw`` reduced to one strategy/ratio/seed, with dotted ``changes``."""
    raw = copy.deepcopy(raw)
    raw.update(strategies=raw["strategies"][:1], ratios=raw["ratios"][:1], seeds=raw["seeds"][:1])
    raw["eval"] = {**raw.get("eval", {}), "random_init": False}
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    (run,) = runs_of(raw)
    return run


# ------------------------------------------------------------------------------------ expansion


def test_expansion_count(tiny_suite):
    runs = runs_of(tiny_suite)
    pretrain = [r for r in runs if r.kind == "pretrain"]
    floors = [r for r in runs if r.kind == "random_init"]
    assert len(pretrain) == 2 * 2 * 2 and len(floors) == 2 and len(runs) == 10
    combos = {(r.strategy.name, r.ratio, r.seed) for r in pretrain}
    assert combos == {(s, r, k) for s in ("random", "block") for r in (0.6, 0.75) for k in (0, 1)}
    assert {r.seed for r in floors} == {0, 1} and all(r.ratio is None and r.label == "random_init" for r in floors)
    assert len({r.run_hash for r in runs}) == len(runs)
    tiny_suite["eval"]["random_init"] = False
    assert len(runs_of(tiny_suite)) == 8


def test_grid_axes_multiply(tiny_suite):
    tiny_suite["grid"] = {"train.epochs": [1, 2], "train.base_lr": [1e-3, 2e-3, 3e-3]}
    runs = runs_of(tiny_suite)
    pretrain = [r for r in runs if r.kind == "pretrain"]
    assert len(pretrain) == 2 * 3 * 8
    assert {(r.train.epochs, r.train.base_lr) for r in pretrain} == {(e, lr) for e in (1, 2) for lr in (1e-3, 2e-3, 3e-3)}
    # the untrained floor ignores the training recipe: one per seed, not one per grid point
    assert len([r for r in runs if r.kind == "random_init"]) == 2
    tiny_suite["grid"] = {"model.preset": ["cpu-tiny", "cpu-small"]}
    runs = runs_of(tiny_suite)
    assert len(runs) == 2 * 10
    assert {r.model.preset for r in runs if r.kind == "random_init"} == {"cpu-tiny", "cpu-small"}


def test_grid_axis_errors(tiny_suite):
    for axis in ("ratios", "seeds", "strategies"):
        tiny_suite["grid"] = {axis: [[0.5]]}
        with pytest.raises(BenchError, match="already an axis"):
            runs_of(tiny_suite)
    tiny_suite["grid"] = {"trian.epochs": [1, 2]}
    with pytest.raises(BenchError, match="trian.epochs"):
        runs_of(tiny_suite)
    tiny_suite["grid"] = {"train.epochz": [1, 2]}
    with pytest.raises(BenchError, match="train.epochz.*unknown field"):
        runs_of(tiny_suite)
    tiny_suite["grid"] = {"train.epochs": [1, -3]}
    with pytest.raises(BenchError, match="train.epochs"):
        runs_of(tiny_suite)


def test_smoke_suite_parses():
    suite = load_suite(REPO / "suites" / "smoke.yaml")
    assert suite.name == "smoke"
    runs = expand(suite)
    assert len(runs) == len(suite.strategies) * len(suite.ratios) * len(suite.seeds) + len(suite.seeds)


@pytest.mark.parametrize("path", sorted((REPO / "suites").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_suite_validates_and_builds_its_strategies(path):
    """Each committed suite parses, expands into distinct runs, and every strategy accepts its parameters."""
    from masking_bench.masking import get_strategy_class

    suite = load_suite(path)
    runs = expand(suite)
    assert len({r.run_hash for r in runs}) == len(runs) > 0
    for ref in suite.strategies:
        for ratio in suite.ratios:
            get_strategy_class(ref.name)(ratio, method=suite.method, **ref.params)


def test_shorthands(tiny_suite):
    suite = parse_suite(tiny_suite)
    assert [s.name for s in suite.strategies] == ["random", "block"]
    assert suite.model.preset == "cpu-tiny"


# ---------------------------------------------------------------------------------------- hashes


def test_hash_is_stable(tiny_suite):
    a = [r.run_hash for r in runs_of(tiny_suite)]
    b = [r.run_hash for r in runs_of(tiny_suite)]
    assert a == b
    assert all(len(h) == 12 and int(h, 16) >= 0 for h in a)


def test_hash_is_stable_across_processes(tiny_suite):
    here = [r.run_hash for r in runs_of(tiny_suite)]
    code = ("import json,sys; from masking_bench.config import expand, parse_suite; "
            "print(json.dumps([r.run_hash for r in expand(parse_suite(json.loads(sys.argv[1])))]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(tiny_suite)], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize("field,value", [
    ("data__root", "/somewhere/else"),
    ("device", "cpu"),
    ("name", "another_suite"),
    ("description", "changed"),
    ("launcher__kind", "debug"),
])
def test_hash_ignores_paths_devices_and_names(tiny_suite, field, value):
    assert one_run(tiny_suite, **{field: value}).run_hash == one_run(tiny_suite).run_hash


def test_hash_ignores_strategy_label(tiny_suite):
    base = one_run(tiny_suite)
    tiny_suite["strategies"] = [{"name": "random", "label": "MAE random"}]
    labelled = one_run(tiny_suite)
    assert labelled.label == "MAE random" and labelled.run_hash == base.run_hash


@pytest.mark.parametrize("field,value", [
    ("ratios", [0.5]),
    ("seeds", [7]),
    ("method", "simmim"),
    ("model", "cpu-small"),
    ("train__base_lr", 3e-3),
    ("train__epochs", 3),
    ("train__augment", {"flip": False}),
    ("data__train_subset", 1000),
    ("eval__probe", {"epochs": 3}),
    ("eval__pool", "cls"),
])
def test_hash_changes_with_what_changes_the_numbers(tiny_suite, field, value):
    assert one_run(tiny_suite, **{field: value}).run_hash != one_run(tiny_suite).run_hash


def test_hash_changes_with_strategy_and_its_params(tiny_suite):
    hashes = set()
    for ref in ("random", "block", {"name": "block", "params": {"min_block": 2}},
                {"name": "block", "params": {"min_block": 3}}):
        tiny_suite["strategies"] = [ref]
        hashes.add(one_run(tiny_suite).run_hash)
    assert len(hashes) == 4


def test_random_init_hash_ignores_the_training_recipe(tiny_suite):
    floor = [r for r in runs_of(tiny_suite) if r.kind == "random_init" and r.seed == 0][0]
    tiny_suite["train"]["base_lr"] = 9e-3
    tiny_suite["strategies"] = ["block"]
    tiny_suite["ratios"] = [0.3]
    other = [r for r in runs_of(tiny_suite) if r.kind == "random_init" and r.seed == 0][0]
    assert other.run_hash == floor.run_hash
    tiny_suite["eval"]["probe"]["epochs"] = 9  # but not the evaluation recipe
    changed = [r for r in runs_of(tiny_suite) if r.kind == "random_init" and r.seed == 0][0]
    assert changed.run_hash != floor.run_hash


# ---------------------------------------------------------------------------------------- errors


def assert_one_line(err: pytest.ExceptionInfo, *needles: str):
    msg = str(err.value)
    assert isinstance(err.value, BenchError)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_suite_file(tmp_path):
    with pytest.raises(BenchError) as err:
        load_suite(tmp_path / "nope.yaml")
    assert_one_line(err, "nope.yaml", "does not exist")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("strategies: [random\nratios: [0.75]\n")
    with pytest.raises(BenchError) as err:
        load_suite(path)
    assert_one_line(err, "bad.yaml", "malformed YAML", "line 2")


def test_yaml_that_is_not_a_mapping(tmp_path):
    for text in ("- random\n- block\n", ""):
        path = tmp_path / "list.yaml"
        path.write_text(text)
        with pytest.raises(BenchError) as err:
            load_suite(path)
        assert_one_line(err, "mapping", "strategies", "ratios")


@pytest.mark.parametrize("edit,needles", [
    (lambda s: s.update(strategy=["random"]), ("'strategy'", "unknown field")),
    (lambda s: s["train"].update(epochz=3), ("'train.epochz'", "unknown field")),
    (lambda s: s["eval"]["probe"].update(lr="fast"), ("'eval.probe.lr'", "'fast'")),
    (lambda s: s["train"].update(epochs="ten"), ("'train.epochs'", "integer", "'ten'")),
    (lambda s: s.update(method="beit"), ("'method'", "'mae'", "'simmim'")),
    (lambda s: s.pop("strategies"), ("'strategies'", "required field is missing")),
    (lambda s: s.update(strategies=[]), ("'strategies'",)),
    (lambda s: s.pop("ratios"), ("'ratios'", "missing")),
    (lambda s: s.update(ratios=[0.75, 1.0]), ("'ratios'", "outside [0, 1)")),
    (lambda s: s["data"].update(name="mnist"), ("'data.name'", "fashion_mnist")),
    (lambda s: s.update(strategies=["random", "random"]), ("random", "label")),
    (lambda s: s.update(data={"dataset": "x"}), ("'data.dataset'", "unknown field")),
])
def test_validation_errors_are_one_line_naming_the_field(tmp_path, tiny_suite, edit, needles):
    edit(tiny_suite)
    path = write_suite(tmp_path, tiny_suite, name="broken")
    with pytest.raises(BenchError) as err:
        load_suite(path)
    assert_one_line(err, "broken.yaml", *needles)


def test_name_defaults_to_the_file_stem_and_plugins_resolve_next_to_it(tmp_path, tiny_suite):
    del tiny_suite["name"]
    tiny_suite["plugins"] = ["my_strategy.py"]
    suite = load_suite(write_suite(tmp_path / "sub", tiny_suite, name="study"))
    assert suite.name == "study"
    assert suite.plugins == [str((tmp_path / "sub" / "my_strategy.py").resolve())]
