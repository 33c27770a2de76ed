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
    assert {(r.train.epochs, r.train.base_lr) for r in pretrain} == {
        (e, lr) for e in (1, 2) for lr in (1e-3, 2e-3, 3e-3)
    }
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
    code = (
        "import json,sys; from masking_bench.config import expand, parse_suite; "
        "print(json.dumps([r.run_hash for r in expand(parse_suite(json.loads(sys.argv[1])))]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(tiny_suite)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    "field,value",
    [
        ("data__root", "/somewhere/else"),
        ("device", "cpu"),
        ("name", "another_suite"),
        ("description", "changed"),
        ("launcher__kind", "debug"),
    ],
)
def test_hash_ignores_paths_devices_and_names(tiny_suite, field, value):
    assert one_run(tiny_suite, **{field: value}).run_hash == one_run(tiny_suite).run_hash


def test_hash_ignores_strategy_label(tiny_suite):
    base = one_run(tiny_suite)
    tiny_suite["strategies"] = [{"name": "random", "label": "MAE random"}]
    labelled = one_run(tiny_suite)
    assert labelled.label == "MAE random" and labelled.run_hash == base.run_hash


@pytest.mark.parametrize(
    "field,value",
    [
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
    ],
)
def test_hash_changes_with_what_changes_the_numbers(tiny_suite, field, value):
    assert one_run(tiny_suite, **{field: value}).run_hash != one_run(tiny_suite).run_hash


def test_hash_changes_with_strategy_and_its_params(tiny_suite):
    hashes = set()
    for ref in (
        "random",
        "block",
        {"name": "block", "params": {"min_block": 2}},
        {"name": "block", "params": {"min_block": 3}},
    ):
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


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda s: s.update(strategy=["random"]), ("'strategy'", "unknown field")),
        (lambda s: s["train"].update(epochz=3), ("'train.epochz'", "unknown field")),
        (lambda s: s["eval"]["probe"].update(lr="fast"), ("'eval.probe.lr'", "'fast'")),
        (lambda s: s["train"].update(epochs="ten"), ("'train.epochs'", "integer", "'ten'")),
        (lambda s: s.update(method="beit"), ("'method'", "'mae'", "'simmim'")),
        (lambda s: s.pop("strategies"), ("'strategies'", "required field is missing")),
        (lambda s: s.update(strategies=[]), ("'strategies'",)),
        (lambda s: s.pop("ratios"), ("'ratios'", "missing")),
        (lambda s: s.update(ratios=[0.75, 1.0]), ("'ratios.1'", "strictly between 0 and 1")),
        (lambda s: s["data"].update(name="mnist"), ("'data.name'", "fashion_mnist")),
        (lambda s: s.update(strategies=["random", "random"]), ("random", "label")),
        (lambda s: s.update(data={"dataset": "x"}), ("'data.dataset'", "unknown field")),
    ],
)
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


# ------------------------------------------------------------------------------- hardening


def suite_error(tmp_path, suite: dict, name: str = "broken") -> str:
    """The one-line BenchError of loading and expanding ``suite`` (written as ``<name>.yaml``)."""
    path = write_suite(tmp_path, suite, name=name)
    with pytest.raises(BenchError) as err:
        expand(load_suite(path))
    assert_one_line(err)
    return str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "../../../x",
        "/tmp/elsewhere",
        "a/b",
        "a\\b",
        "..",
        ".",
        "",
        ".hidden",
        "x\x00y",
        "my suite",
        "x" * 101,
        "-dash",
        "tab\tname",
    ],
)
def test_suite_name_must_be_a_safe_folder_name(tiny_suite, name):
    tiny_suite["name"] = name
    with pytest.raises(BenchError) as err:
        parse_suite(tiny_suite, "s.yaml")
    assert_one_line(err, "s.yaml", "'name'", "letters, digits")


def test_unsafe_suite_name_never_reaches_the_results_folder(tmp_path, tiny_suite):
    """Before the fix, ``name: ../../../x`` trained into a run folder outside ``results/``."""
    from masking_bench.store import RunRecord

    root = tmp_path / "results"
    for name in ("../../../x", str(tmp_path / "outside"), "ok_name"):
        tiny_suite["name"] = name
        try:
            runs = expand(load_suite(write_suite(tmp_path / "suites", tiny_suite, name="s")))
        except BenchError:
            continue
        for spec in runs:
            for folder in (RunRecord(root, spec).dir, RunRecord(root, spec).archive_dir):
                assert folder.resolve().is_relative_to(root.resolve()), folder
    assert name == "ok_name" and runs  # the safe name did expand


@pytest.mark.parametrize("name", ["smoke", "ratio_sweep", "v1.2-final", "A", "x" * 100, "imagenet100_vit_base"])
def test_safe_suite_names_are_accepted(tiny_suite, name):
    tiny_suite["name"] = name
    assert parse_suite(tiny_suite).name == name


@pytest.mark.parametrize(
    "label", ["../x", "a/b", "a\\b", "", ".", "..", ".hidden", "x\x00", "line\nbreak", " pad", "x" * 101]
)
def test_strategy_label_must_be_a_safe_file_name(tiny_suite, label):
    tiny_suite["strategies"] = [{"name": "random", "label": label}]
    with pytest.raises(BenchError) as err:
        parse_suite(tiny_suite)
    assert_one_line(err, "strategies.0.label")


def test_readable_strategy_labels_are_accepted(tiny_suite):
    tiny_suite["strategies"] = [{"name": "random", "label": "MAE random"}, {"name": "block", "label": "blöck Δ=0.1"}]
    assert [s.display for s in parse_suite(tiny_suite).strategies] == ["MAE random", "blöck Δ=0.1"]


def test_file_stem_that_is_not_a_safe_name_asks_for_a_name_field(tmp_path, tiny_suite):
    del tiny_suite["name"]
    path = write_suite(tmp_path, tiny_suite, name="my suite")
    with pytest.raises(BenchError) as err:
        load_suite(path)
    assert_one_line(err, "my suite.yaml", "name:")
    tiny_suite["name"] = "my_suite"
    assert load_suite(write_suite(tmp_path, tiny_suite, name="my suite")).name == "my_suite"


@pytest.mark.parametrize(
    "ratios", [[False], [True], [0], [0.0], [1], [1.0], [-0.25], [1.5], [float("nan")], [float("inf")], [0.5, False]]
)
def test_ratios_are_numbers_strictly_between_0_and_1(tmp_path, tiny_suite, ratios):
    tiny_suite["ratios"] = ratios
    msg = suite_error(tmp_path, tiny_suite)
    assert "'ratios." in msg and "between 0 and 1" in msg, msg


@pytest.mark.parametrize("seeds", [[1e23], [1.0], [2.5], [True], [False], [-1], ["3"], [2**31], [10**30]])
def test_seeds_are_non_negative_integers(tmp_path, tiny_suite, seeds):
    from masking_bench.values import MAX_SEED

    tiny_suite["seeds"] = seeds
    msg = suite_error(tmp_path, tiny_suite)
    assert "'seeds." in msg and f"0 to {MAX_SEED}" in msg, msg


def test_largest_seed_keeps_every_generator_seed_valid(tiny_suite):
    """step.mask_seed and the loader's crop seeds grow with the seed; torch takes seeds below 2**64."""
    import torch

    from masking_bench.data import Augment, Split, TensorLoader
    from masking_bench.step import mask_seed
    from masking_bench.values import MAX_SEED

    tiny_suite["seeds"] = [0, 42, 12345, MAX_SEED]
    assert parse_suite(tiny_suite).seeds[-1] == MAX_SEED
    torch.Generator().manual_seed(mask_seed(MAX_SEED, 10**6, 10**7))  # a million epochs of 10M steps
    split = Split(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    loader = TensorLoader(split, 2, [0.5], [0.5], seed=MAX_SEED, augment=Augment())
    assert len(list(loader.batches(epoch=10**6))) == 2


def test_binary_suite_file(tmp_path):
    png = tmp_path / "picture.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\xff\xfe\x80")
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(bytes(range(256)) * 4)
    for path in (png, noise):
        with pytest.raises(BenchError) as err:
            load_suite(path)
        assert_one_line(err, path.name, "UTF-8")


def test_suite_file_with_a_byte_order_mark_or_control_characters(tmp_path, tiny_suite):
    import yaml

    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(tiny_suite).encode())
    assert load_suite(path).name == "tiny"
    path.write_bytes(b"strategies: [random]\x00\nratios: [0.5]\n")
    with pytest.raises(BenchError) as err:
        load_suite(path)
    assert_one_line(err, "bom.yaml")


def test_suite_path_that_is_a_folder(tmp_path):
    folder = tmp_path / "suites.yaml"
    folder.mkdir()
    with pytest.raises(BenchError) as err:
        load_suite(folder)
    assert_one_line(err, "suites.yaml", "folder")


def test_unreadable_suite_file(tmp_path, tiny_suite, monkeypatch):
    path = write_suite(tmp_path, tiny_suite, name="locked")
    if os.name == "posix" and os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: fail the read as a locked file would

        def denied(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(type(path), "read_bytes", denied)
        monkeypatch.setattr(type(path), "read_text", denied)
    try:
        with pytest.raises(BenchError) as err:
            load_suite(path)
        assert_one_line(err, "locked.yaml", "cannot read", "Permission denied")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda s: s["train"].update(augment={"scale": [0.9, 0.2]}), ("'train.augment.scale'", "low <= high")),
        (lambda s: s["train"].update(augment={"scale": [0.0, 1.0]}), ("'train.augment.scale'", "(0, 1]")),
        (lambda s: s["train"].update(augment={"scale": [0.2, 1.5]}), ("'train.augment.scale'", "(0, 1]")),
        (lambda s: s["train"].update(augment={"ratio": [2.0, 1.0]}), ("'train.augment.ratio'", "low <= high")),
        (lambda s: s["train"].update(augment={"ratio": [0.0, 1.0]}), ("'train.augment.ratio'", "> 0")),
        (lambda s: s["eval"].update(finetune={"augment": {"scale": [1.0, 0.5]}}), ("'eval.finetune.augment.scale'",)),
        (lambda s: s["train"].update(betas=[1.0, 0.95]), ("'train.betas'", "[0, 1)")),
        (lambda s: s["train"].update(betas=[0.9, -0.1]), ("'train.betas'", "[0, 1)")),
        (lambda s: s["train"].update(base_lr=float("nan")), ("'train.base_lr'", "finite")),
        (lambda s: s["train"].update(clip_grad=float("inf")), ("'train.clip_grad'", "finite")),
        (lambda s: s["train"].update(warmup_epochs=float("inf")), ("'train.warmup_epochs'", "finite")),
        (lambda s: s["eval"].update(knn={"temperature": float("nan")}), ("'eval.knn.temperature'", "finite")),
        (lambda s: s.update(launcher={"mem_gb": float("inf")}), ("'launcher.mem_gb'", "finite")),
        (lambda s: s["train"].update(epochs=True), ("'train.epochs'", "boolean")),
        (lambda s: s["train"].update(batch_size=True), ("'train.batch_size'", "boolean")),
        (lambda s: s["eval"].update(low_shot={"shots": []}), ("'eval.low_shot.shots'",)),
        (lambda s: s["eval"].update(low_shot={"shots": [10, 0]}), ("'eval.low_shot.shots.1'",)),
        (lambda s: s["eval"].update(low_shot={"shots": [-5]}), ("'eval.low_shot.shots.0'",)),
        (lambda s: s["eval"].update(every_protocols=[]), ("'eval.every_protocols'",)),
        (lambda s: s.update(grid={"train.epochs": []}), ("'grid.train.epochs'", "at least 1")),
        (lambda s: s.update(grid={"device": ["cpu", "cuda"]}), ("grid axis 'device'",)),
        (lambda s: s.update(grid={"launcher.mem_gb": [1, 2]}), ("grid axis 'launcher.mem_gb'",)),
        (lambda s: s.update(grid={"name": ["a", "b"]}), ("grid axis 'name'",)),
        (lambda s: s.update(device="quantum"), ("'device'", "auto", "cpu", "cuda")),
        (lambda s: s.update(model="cpu-huge"), ("model preset 'cpu-huge'", "cpu-tiny")),
        (
            lambda s: s.update(model={"preset": "cpu-tiny", "overrides": {"depht": 2}}),
            ("'model.overrides'", "depht", "depth"),
        ),
        (
            lambda s: s.update(strategies=[{"name": "random", "params": {"x": float("nan")}}]),
            ("'strategies.0.params'",),
        ),
        (lambda s: s.update(strategies=[{"name": "random", "params": {"x": b"\xff"}}]), ("'strategies.0.params'",)),
    ],
)
def test_values_that_used_to_fail_only_at_run_time(tmp_path, tiny_suite, edit, needles):
    edit(tiny_suite)
    msg = suite_error(tmp_path, tiny_suite)
    for needle in needles:
        assert needle in msg, msg


def test_cyclic_strategy_params_are_refused(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("strategies: [{name: random, params: &p {self: *p}}]\nratios: [0.5]\n")
    with pytest.raises(BenchError) as err:
        expand(load_suite(path))
    assert_one_line(err, "cycle.yaml", "strategies.0.params")


def test_long_values_are_shortened_in_errors(tiny_suite):
    tiny_suite["method"] = "m" * 5000
    with pytest.raises(BenchError) as err:
        parse_suite(tiny_suite)
    assert_one_line(err, "'method'")
    assert len(str(err.value)) < 400


def test_yaml_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.yaml"
    for text in ("[" * 5000, "strategies: " + "{a: " * 3000):
        path.write_text(text)
        with pytest.raises(BenchError) as err:
            load_suite(path)
        assert_one_line(err, "deep.yaml", "nested too deeply")
