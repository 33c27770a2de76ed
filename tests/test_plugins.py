"""A strategy defined outside the package works three ways: a file in strategies/, a file by path,
and an installed distribution's entry point. The plugin used is the README's own example."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_plugin(name: str) -> str:
    """The 'Add a strategy' example of the README, renamed to ``name``."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(# strategies/center_first\.py.*?)```", text, re.S)
    assert block, "README lost its 'add a strategy' example"
    return (
        block.group(1)
        .replace('name = "center_first"', f'name = "{name}"')
        .replace("class CenterFirst", f"class CenterFirst_{name}")
    )


CHECK = textwrap.dedent("""
    import sys, torch
    from masking_bench.masking import PlanContext, available, build_strategy, load_plugin
    from masking_bench.models import build_model
    for path in sys.argv[2:]:
        load_plugin(path)
    name = sys.argv[1]
    assert name in available(), sorted(available())
    s = build_strategy(name, 0.75)
    model = build_model("cpu-tiny", "mae", 28, 1)
    plan = s.plan(torch.zeros(4, 1, 28, 28), PlanContext(model, model.grid, torch.Generator().manual_seed(0)))
    assert plan.mask.shape == (4, 49) and int(plan.mask.sum(1).min()) == 37 == int(plan.mask.sum(1).max())
    centre = 3 * 7 + 3
    assert bool(plan.mask[:, centre].all()), "centre token must be hidden first"
    print("ok", name)
""")


def run_check(name: str, *plugins: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHECK, name, *plugins],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_file_in_strategies_folder(tmp_path):
    """Dropped into a copy of the package, so that tests running beside this one never discover a
    strategy file that is about to disappear."""
    name = f"readme_{uuid.uuid4().hex[:8]}"
    shutil.copytree(REPO / "masking_bench", tmp_path / "masking_bench", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "masking_bench" / "strategies" / f"{name}.py").write_text(readme_plugin(name))
    proc = run_check(name, env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"ok {name}" in proc.stdout
    assert not (REPO / "strategies" / f"{name}.py").exists()


def test_file_by_path(tmp_path):
    name = f"bypath_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "my_strategy.py"
    path.write_text(readme_plugin(name))
    proc = run_check(name, str(path))
    assert proc.returncode == 0, proc.stderr


def test_installed_entry_point(tmp_path):
    """A distribution on sys.path with an entry point in group masking_bench.strategies."""
    name = f"installed_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "site"
    (pkg / "my_masking_pkg").mkdir(parents=True)
    (pkg / "my_masking_pkg" / "__init__.py").write_text(readme_plugin(name).replace("@register\n", ""))
    dist = pkg / "my_masking_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-masking-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[masking_bench.strategies]\n{name} = my_masking_pkg:CenterFirst_{name}\n")
    proc = run_check(name, env={"PYTHONPATH": str(pkg)})
    assert proc.returncode == 0, proc.stderr


def test_broken_entry_point_is_named_and_the_others_still_load(tmp_path):
    """One installed package whose entry point fails to import must not take the other strategies down."""
    pkg = tmp_path / "site"
    (pkg / "broken_masking_pkg").mkdir(parents=True)
    (pkg / "broken_masking_pkg" / "__init__.py").write_text("raise ImportError('a missing dependency')\n")
    dist = pkg / "broken_masking_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-masking-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[masking_bench.strategies]\nbroken = broken_masking_pkg:Broken\n")
    code = "from masking_bench.masking import available; print(' '.join(available()))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(pkg)},
    )
    assert proc.returncode == 0, proc.stderr
    assert {"random", "block", "sbam", "mto", "misalign"} <= set(proc.stdout.split())
    warning = [line for line in proc.stderr.splitlines() if "entry point 'broken'" in line]
    assert len(warning) == 1 and "a missing dependency" in warning[0] and "skipped" in warning[0]


def test_plugin_by_path_in_a_suite_run(tmp_path):
    """`run --plugin FILE` and the suite field `plugins` both reach the trainer."""
    name = f"suite_{uuid.uuid4().hex[:8]}"
    (tmp_path / "mine.py").write_text(readme_plugin(name))
    suite = tmp_path / "s.yaml"
    suite.write_text(
        textwrap.dedent(f"""
        data: {{name: synthetic}}
        strategies: [{name}]
        ratios: [0.75]
        plugins: [mine.py]
        train: {{epochs: 1, batch_size: 64}}
        eval: {{random_init: false, low_shot: null, probe: {{epochs: 2}}}}
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "masking_bench", "run", str(suite), "--results", str(tmp_path / "res"), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = list((tmp_path / "res" / "runs" / "s").glob("*/summary.json"))
    assert len(summaries) == 1
    assert name in summaries[0].read_text()


def test_bad_plugin_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import does_not_exist_anywhere\n")
    proc = subprocess.run(
        [sys.executable, "-m", "masking_bench", "list", "--plugin", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: plugin")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("missing", ["nope.py", "not_python.txt"])
def test_missing_plugin_path(tmp_path, missing):
    proc = subprocess.run(
        [sys.executable, "-m", "masking_bench", "list", "--plugin", str(tmp_path / missing)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "is not a Python file" in proc.stderr
