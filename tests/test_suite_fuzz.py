"""Property-based tests of suite validation: whatever a suite file holds, loading and expanding it either
works or raises a one-line BenchError, and no run of a suite that expands can live outside the results folder.

Deterministic (``derandomize``, no example database) so CI cannot flake; a few seconds in all.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SUITE
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from masking_bench.config import expand, load_suite, parse_suite
from masking_bench.errors import BenchError
from masking_bench.precision import Hardware
from masking_bench.store import RunRecord
from masking_bench.values import MAX_SEED

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# expand() with a stand-in for this host: no bf16 probe, and the same answer on every machine
HOST = Hardware("cpu", "fuzz", False, "stand-in host for the fuzz tests")

BASE = TINY_SUITE  # the conftest's valid suite (hypothesis does not mix with function-scoped fixtures)

# Every field of the schema (and some that are not), as dotted paths into the suite mapping
FIELDS = [
    "name",
    "description",
    "method",
    "model",
    "model.preset",
    "model.overrides",
    "model.overrides.depth",
    "data",
    "data.name",
    "data.root",
    "data.train_subset",
    "data.image_size",
    "strategies",
    "strategies.0",
    "strategies.0.name",
    "strategies.0.label",
    "strategies.1.label",
    "strategies.0.params",
    "strategies.1.params.min_block",
    "ratios",
    "ratios.0",
    "seeds",
    "seeds.1",
    "train",
    "train.epochs",
    "train.batch_size",
    "train.base_lr",
    "train.min_lr",
    "train.warmup_epochs",
    "train.weight_decay",
    "train.betas",
    "train.clip_grad",
    "train.amp",
    "train.norm_pix_loss",
    "train.augment",
    "train.augment.scale",
    "train.augment.ratio",
    "train.augment.flip",
    "eval",
    "eval.pool",
    "eval.probe",
    "eval.probe.epochs",
    "eval.probe.lr",
    "eval.knn.k",
    "eval.knn.temperature",
    "eval.low_shot",
    "eval.low_shot.shots",
    "eval.low_shot.draws",
    "eval.finetune",
    "eval.finetune.enabled",
    "eval.finetune.layer_decay",
    "eval.finetune.augment.scale",
    "eval.every",
    "eval.every_protocols",
    "eval.random_init",
    "grid",
    "grid.train.epochs",
    "grid.model.preset",
    "grid.name",
    "grid.eval.pool",
    "plugins",
    "device",
    "launcher",
    "launcher.kind",
    "launcher.mem_gb",
    "launcher.additional_parameters",
    "launcher.folder",
    "unknown",
    "train.unknown",
    "",
]

NASTY_TEXT = [
    "",
    ".",
    "..",
    "../..",
    "../../../x",
    "/",
    "/tmp/x",
    "/etc",
    "a/b",
    "a\\b",
    "x\x00y",
    "~",
    "~root",
    "-rf",
    " ",
    "\n",
    "tiny",
    "random",
    "cpu-tiny",
    "block",
    "nan",
    ".inf",
    "null",
    "true",
    "1e23",
    "ratio_sweep/../..",
    "ü",
    "Δ",
    "名前",
    "\u202e",
    "a" * 300,
    "CON",
    "*",
    "$HOME",
    "%s",
    "{x}",
]

texts = st.one_of(
    st.sampled_from(NASTY_TEXT),
    st.text(alphabet=string.printable + "/.\\\x00é∆名\u202e", max_size=20),
    st.text(max_size=10),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 0.5, -0.0, 1e-300, 1e300, 1e23, 0.999999, 1.0000001]),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, texts, st.binary(max_size=4))
keys = st.one_of(
    st.sampled_from(
        [
            "name",
            "label",
            "params",
            "scale",
            "ratio",
            "epochs",
            "seeds",
            "ratios",
            "strategies",
            "preset",
            "overrides",
            "depth",
            "train",
            "eval",
        ]
    ),
    texts,
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
# values with the shapes the schema expects, so mutations also get past the type checks
shaped = st.one_of(
    st.lists(numbers, min_size=1, max_size=3),
    st.tuples(numbers, numbers).map(list),
    st.lists(
        st.one_of(
            texts,
            st.fixed_dictionaries(
                {"name": st.sampled_from(["random", "block"])}, optional={"label": texts, "params": values}
            ),
        ),
        min_size=1,
        max_size=3,
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "train.epochs",
                "train.base_lr",
                "model.preset",
                "eval.pool",
                "name",
                "data.name",
                "train.augment.scale",
                "model.overrides.depth",
            ]
        ),
        st.lists(values, max_size=3),
        max_size=2,
    ),
)


# values a field of the schema may plausibly hold, so that some mutated suites still expand
PLAUSIBLE = [
    0,
    1,
    2,
    3,
    0.5,
    0.9,
    1e-3,
    0.0,
    1.0,
    "auto",
    "cpu",
    "cuda",
    "random",
    "block",
    "mean",
    "cls",
    "synthetic",
    "cpu-small",
    "mae",
    "simmim",
    "bf16",
    "none",
    [0.2, 1.0],
    [0.9, 0.95],
    [1, 2],
    [0.5],
    [0],
    ["knn"],
    [10],
    True,
    False,
    None,
    {},
    [],
    {"shots": [5]},
    {"enabled": False},
]
# one new value for a field: mostly scalars and short lists (what fields hold), sometimes any structure
plausible = st.sampled_from(PLAUSIBLE)
mutations = st.one_of(plausible, plausible, plausible, leaves, st.lists(leaves, min_size=1, max_size=3), shaped, values)


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "results"


def set_dotted(tree: dict, dotted: str, value) -> None:
    """Set ``dotted`` in the nested mapping/list ``tree``, creating mappings on the way (lists by index);
    ``grid.<axis>`` sets the grid axis ``<axis>`` (grid keys are dotted field names themselves)."""
    if dotted.startswith("grid."):
        if not isinstance(tree.get("grid"), dict):
            tree["grid"] = {}
        tree["grid"][dotted.removeprefix("grid.")] = value
        return
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                return
            if not isinstance(node[int(key)], dict):
                node[int(key)] = {"name": node[int(key)]} if isinstance(node[int(key)], str) else {}
            node = node[int(key)]
        else:
            if not isinstance(node.get(key), dict):
                node[key] = {"preset": node[key]} if key == "model" and isinstance(node.get(key), str) else {}
            node = node[key]
    if isinstance(node, list):
        if keys[-1].isdigit() and int(keys[-1]) < len(node):
            node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def note(outcome: str) -> None:
    """Count outcomes (``pytest --hypothesis-show-statistics``): most examples should not all fail alike."""
    if currently_in_test_context():
        event(outcome)


def assert_one_line(err: BaseException) -> None:
    msg = str(err)
    assert isinstance(err, BenchError), repr(err)
    assert msg and "\n" not in msg and "\r" not in msg and msg == msg.strip(), repr(msg)


def check(raw, results_root: Path) -> None:
    """The property: parse → Suite or one-line BenchError; expand → runs or one-line BenchError; every run
    has a ratio in (0, 1), a valid seed and finite numbers, and its folders (live and archived) are exactly
    ``<results>/<area>/<suite name>/<hash>``."""
    try:
        suite = parse_suite(raw, "fuzz.yaml")
    except BenchError as err:
        assert_one_line(err)
        note("refused by parse_suite")
        return
    try:
        runs = expand(suite, "fuzz.yaml", hardware=HOST)
    except BenchError as err:
        assert_one_line(err)
        note("refused by expand")
        return
    note("expanded")
    root = results_root.resolve()
    for spec in runs:
        # what a run trains with is sane: a ratio that hides something, a seed torch takes, finite numbers
        assert spec.ratio is None or (type(spec.ratio) is float and 0 < spec.ratio < 1), spec.ratio
        assert type(spec.seed) is int and 0 <= spec.seed <= MAX_SEED, spec.seed
        json.dumps(spec.identity(), allow_nan=False)
        record = RunRecord(results_root, spec)
        for area, folder in (("runs", record.dir), ("records", record.archive_dir)):
            resolved = folder.resolve()
            assert resolved.is_relative_to(root), folder
            assert resolved.parent.parent == root / area, folder


def test_base_suite_expands(results_root):  # the starting point of the mutations is valid
    suite = parse_suite(copy.deepcopy(BASE))
    assert len(expand(suite, hardware=HOST)) == 10
    check(copy.deepcopy(BASE), results_root)


@FUZZ
@given(
    raw=st.dictionaries(
        st.one_of(st.sampled_from(list(BASE) + ["grid", "plugins", "device", "launcher"]), keys), values, max_size=8
    )
)
def test_arbitrary_mappings(raw, results_root):
    check(raw, results_root)


@settings(FUZZ, max_examples=400)
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), mutations), min_size=1, max_size=2))
def test_mutations_of_a_valid_suite(edits, results_root):
    raw = copy.deepcopy(BASE)
    for dotted, value in edits:
        set_dotted(raw, dotted, value)
    check(raw, results_root)


def mostly(usual, odd):
    """``usual`` weighted above ``odd``, so that all four fields are often fine together (and the run folders
    of odd labels get checked)."""
    return st.one_of(usual, usual, usual, odd)


@FUZZ
@given(
    name=mostly(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,7}", fullmatch=True), texts),
    label=mostly(st.text(alphabet=string.ascii_letters + string.digits + " -_.=Δé名", min_size=1, max_size=12), texts),
    ratio=mostly(st.floats(0, 1, exclude_min=True, exclude_max=True), st.one_of(numbers, st.booleans())),
    seed=mostly(st.integers(0, 2 * MAX_SEED), st.one_of(numbers, st.booleans())),
)
def test_names_labels_ratios_and_seeds(name, label, ratio, seed, results_root):
    raw = copy.deepcopy(BASE)
    raw.update(name=name, ratios=[ratio], seeds=[seed], strategies=[{"name": "random", "label": label}])
    check(raw, results_root)


# ------------------------------------------------------------------------------- suite files

stems = st.text(alphabet=string.ascii_letters + string.digits + " _.-é名", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
yaml_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=":-[]{}&*!|>'\"%@`#,? \n\tab01.", max_size=120),
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.lists(st.tuples(st.sampled_from(FIELDS), mutations), max_size=3).map(
        lambda edits: yaml.safe_dump(_edited(edits), allow_unicode=True)
    ),
)


def _edited(edits) -> dict:
    raw = copy.deepcopy(BASE)
    raw.pop("name")  # named after the file stem
    for dotted, value in edits:
        set_dotted(raw, dotted, value)
    return raw


def _load(path: Path, results_root: Path) -> None:
    try:
        suite = load_suite(path)
    except BenchError as err:
        assert_one_line(err)
        return
    assert suite.name  # a suite that loads was named; run folders are checked by check()
    check(suite.model_dump(mode="python"), results_root)


@FUZZ
@given(
    stem=stems,
    data=st.one_of(
        st.binary(max_size=300),
        yaml_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=40).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        yaml_text.map(lambda t: b"\xef\xbb\xbf" + t.encode("utf-8", "surrogatepass")),
    ),
)
def test_suite_files_with_random_content(stem, data, tmp_path_factory, results_root):
    folder = tmp_path_factory.mktemp("files", numbered=True)
    path = folder / f"{stem}.yaml"
    path.write_bytes(data)
    _load(path, results_root)
