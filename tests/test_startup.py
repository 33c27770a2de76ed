"""Start-up: `--help`, `list` and `status` answer without importing torch once the catalog cache is
warm (masking_bench/catalog.py), and a cached answer never hides a code change."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest
import yaml
from conftest import REPO, cli_env, run_cli

from masking_bench import catalog, fingerprint
from masking_bench.precision import _torch_gpu_build

PROBE = """
import json, sys
from masking_bench.cli import main
seen = {}
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:  # --help
        pass
    heavy = ("torch", "masking_bench.masking", "masking_bench.models")
    seen[" ".join(argv)] = sorted(m for m in heavy if m in sys.modules)
print("PROBE " + json.dumps(seen))
"""


def probe(commands: list[list[str]], env: dict[str, str]) -> dict[str, list[str]]:
    """Run CLI commands in one fresh process; the heavy modules imported after each."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def write(path, raw: dict):
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_help_list_and_status_do_not_import_torch(tmp_path):
    env = cli_env(MASKING_BENCH_CACHE=str(tmp_path / "cache"))
    suite = write(
        tmp_path / "startup.yaml",
        {"data": {"name": "synthetic"}, "strategies": ["random", "block"], "ratios": [0.75], "train": {"amp": "auto"}},
    )
    status = ["status", str(suite), "--no-slurm", "--results", str(tmp_path / "results")]
    warm = run_cli(*status, env=env)  # fills the catalog (a subprocess) and this host's CPU answer
    assert warm.returncode == 0, warm.stderr
    seen = probe([["--help"], ["list"], status], env)
    assert seen == {"--help": [], "list": [], " ".join(status): []}, seen
    again = run_cli(*status, env=env)
    assert again.stdout == warm.stdout  # the cached answer is the answer


PLUGIN = '''
from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden, register


@register
class Edited(MaskingStrategy):
    """{doc}"""

    name = "{name}"
    defaults = {{"k": {k}}}

    def plan(self, images, ctx):
        n = images.shape[0]
        return MaskPlan(mask=hide_lowest_first(ctx.rand(n, ctx.num_tokens), num_hidden(ctx.num_tokens, self.ratio)))
'''


def _hash_of(status_out: str, label: str) -> str:
    return next(line.split()[0] for line in status_out.splitlines()[2:] if line.split()[1] == label)


def test_editing_a_plugin_reaches_status_and_list(tmp_path):
    """The cache is keyed by the bytes of every source file: an edited plugin's defaults change its
    runs' hashes (its resolved parameters) at once, and the cached answer equals the live one."""
    env = cli_env(MASKING_BENCH_CACHE=str(tmp_path / "cache"))
    name = f"edited_{uuid.uuid4().hex[:6]}"
    plugin = tmp_path / "edited.py"
    plugin.write_text(PLUGIN.format(doc="First wording.", name=name, k=1))
    suite = write(
        tmp_path / "edit.yaml",
        {
            "data": {"name": "synthetic"},
            "strategies": [name],
            "ratios": [0.75],
            "plugins": ["edited.py"],
            "train": {"amp": "none"},
            "eval": {"random_init": False},
        },
    )
    status = ["status", str(suite), "--no-slurm", "--results", str(tmp_path / "results")]
    before = run_cli(*status, env=env)
    assert before.returncode == 0, before.stderr
    plugin.write_text(PLUGIN.format(doc="Second wording.", name=name, k=2))
    after = run_cli(*status, env=env)
    assert after.returncode == 0, after.stderr
    assert _hash_of(after.stdout, name) != _hash_of(before.stdout, name)
    listed = run_cli("list", "--plugin", str(plugin), env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert "Second wording." in row and "unlabelled" in row
    assert "params: k=2" in listed.stdout
    live = subprocess.run(  # the registry itself (masking imported first: no cache involved)
        [
            sys.executable,
            "-c",
            "import masking_bench.masking, sys; from masking_bench.cli import main; main(sys.argv[1:])",
        ]
        + status,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert live.returncode == 0, live.stderr
    assert live.stdout == after.stdout


# ------------------------------------------------------------------------------ in-process pieces


def test_entry_point_group_is_the_registry_s():
    from masking_bench import masking

    assert catalog.ENTRY_POINT_GROUP == masking.ENTRY_POINT_GROUP


def test_a_changed_or_missing_source_file_invalidates_an_entry(tmp_path):
    source = tmp_path / "strategy.py"
    source.write_text("X = 1\n")
    key = {"any": "key"}
    model = {"presets": ["cpu-tiny"], "init_params": ["self"]}
    entry = {"key": key, "files": {str(source): catalog.file_sha(source)}, "strategies": {}, "model": model}
    assert catalog._valid(entry, key)
    assert not catalog._valid(entry, {"other": "key"})
    assert not catalog._valid({**entry, "strategies": {"x": {"name": "x"}}}, key)  # an older format
    source.write_text("X = 1  # a comment is a change too: summaries come from docstrings\n")
    assert not catalog._valid(entry, key)
    source.unlink()
    assert not catalog._valid(entry, key)
    assert not catalog._valid({**entry, "files": {}}, key)


def test_live_catalog_matches_the_registry():
    from masking_bench.masking import available

    infos = catalog.strategies()
    for name, cls in available().items():
        info = infos[name]
        assert info.defaults == cls.defaults and info.summary == cls.one_line()
        assert info.digest == fingerprint.strategy_digest(cls)


def test_remembered_code_digests_equal_computed_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path / "cache"))
    fingerprint._digest_memo.cache_clear()
    try:
        source = tmp_path / "code.py"
        source.write_text(
            textwrap.dedent('''
            def f(x: int) -> int:
                """doc"""
                return x + 1
        ''')
        )
        compute = fingerprint.file_digest.__wrapped__
        first = compute(source)
        assert (tmp_path / "cache" / "code-digests.json").is_file()
        fingerprint._digest_memo.cache_clear()  # a new process: the digest comes from the memo
        assert compute(source) == first
        import hashlib

        assert first == hashlib.sha256(fingerprint.normalised_source(source.read_text()).encode()).hexdigest()[:12]
        source.write_text("def f(x):\n    return x + 2\n")
        assert compute(source) != first
    finally:
        fingerprint._digest_memo.cache_clear()


def test_gpu_build_is_read_from_torch_version_file():
    import torch

    assert _torch_gpu_build() == (torch.version.cuda is not None or torch.version.hip is not None)


@pytest.mark.parametrize("damaged", ["", "{not json", '{"key": 1}'])
def test_a_damaged_catalog_file_is_a_miss(tmp_path, monkeypatch, damaged):
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path))
    key = catalog._key(())
    path = catalog._entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(damaged)
    try:
        entry = json.loads(path.read_text())
    except ValueError:
        entry = None
    assert not catalog._valid(entry, key)
