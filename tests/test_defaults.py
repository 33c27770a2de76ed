"""Honest defaults: low-label protocols on, the README's suite example generated from the schema,
archiving opt-in per suite, a short `report`, and `list`'s provenance labels."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from masking_bench.config import EvalConfig, Suite, expand, load_suite, parse_suite
from masking_bench.config_sections import LowShotConfig
from masking_bench.precision import Hardware
from masking_bench.schema_doc import COMMENTS, EXAMPLES, example_suite, readme_block, render_default_suite
from masking_bench.status import run_rows
from masking_bench.store import RunRecord, archive_suite

# ------------------------------------------------------------------------------ low_shot


def test_low_shot_is_on_by_default_and_null_turns_it_off():
    assert EvalConfig().low_shot == LowShotConfig()
    suite = parse_suite({"name": "s", "strategies": ["random"], "ratios": [0.75], "eval": {"low_shot": None}})
    assert suite.eval.low_shot is None


def test_the_committed_study_keeps_its_hashes():
    """ratio_sweep sets low_shot itself, and `archive` is not part of any identity: every committed
    record is still one of the suite's runs."""
    records = REPO / "results" / "records" / "ratio_sweep"
    if not records.is_dir():
        pytest.skip("no committed records")
    on_disk = {p.name for p in records.iterdir() if (p / "summary.json").is_file()}
    config = yaml.safe_load(next(records.glob("*/config.yaml")).read_text())
    precision = config.get("precision") or "fp32"
    hw = Hardware("cpu", "test", precision == "bf16", "as the committed records")
    suite = load_suite(REPO / "suites" / "ratio_sweep.yaml")
    assert suite.archive is True
    hashes = {spec.run_hash for spec in expand(suite, hardware=hw)}
    assert hashes == on_disk
    flipped = suite.model_copy(update={"archive": False})
    assert {spec.run_hash for spec in expand(flipped, hardware=hw)} == hashes


# ------------------------------------------------------------------------------ README example


def test_readme_suite_example_is_the_generated_defaults():
    text = (REPO / "README.md").read_text()
    start, end = readme_block(text)
    assert text[start:end] == render_default_suite(), (
        "README's suite example is out of date: python -m masking_bench.schema_doc --write README.md"
    )


def test_generated_example_parses_back_to_the_defaults():
    raw = yaml.safe_load(render_default_suite())
    assert parse_suite(raw) == example_suite()
    defaults = Suite.model_validate(EXAMPLES)
    assert raw["train"]["epochs"] == defaults.train.epochs and raw["eval"]["low_shot"]["draws"] == 5
    assert raw["archive"] is False


def test_every_comment_names_a_field():
    for dotted in COMMENTS:
        model = Suite
        for key in dotted.split("."):
            assert key in model.model_fields, f"COMMENTS names '{dotted}', which is not a suite field"
            annotation = model.model_fields[key].annotation
            model = next(
                (a for a in (annotation, *getattr(annotation, "__args__", ())) if hasattr(a, "model_fields")), None
            )
            if model is None:
                break


# ------------------------------------------------------------------------------ archive opt-in


def _finished(results: Path, suite_raw: dict) -> RunRecord:
    spec = next(s for s in expand(parse_suite(suite_raw)) if s.kind == "pretrain")
    record = RunRecord(results, spec)
    record.write_config()
    record.append_metrics({"epoch": 0, "loss": 1.0})
    record.write_summary({"probe_top1": 70.0, "code": {"parts": record.code}})
    record.set_status("done")
    return record


@pytest.mark.parametrize("archive", [False, True])
def test_archiving_is_opt_in(tiny_suite, results_dir, archive):
    raw = {**tiny_suite, "archive": archive} if archive else tiny_suite
    record = _finished(results_dir, raw)
    assert record.spec.archive is archive and "archive" not in record.spec.identity()
    assert record.archive() is archive
    assert record.archive_dir.is_dir() is archive
    assert record.is_done()
    (row,) = run_rows([record.spec], results_dir)
    assert row["state"] == "done"


def test_explicit_archive_and_old_records_are_still_read(tiny_suite, results_dir):
    """archive_suite is an explicit request; a record in records/ counts as done for any suite."""
    record = _finished(results_dir, tiny_suite)
    assert archive_suite(results_dir, "tiny") == [record.spec.run_hash]
    for item in record.dir.iterdir():
        item.unlink()
    record.dir.rmdir()
    again = RunRecord(results_dir, record.spec)
    assert again.is_done() and again.read_summary()["probe_top1"] == 70.0
    (row,) = run_rows([record.spec], results_dir)
    assert row["state"] == "done" and "archived record" in row["reason"]


def test_a_scratch_suite_run_stays_in_runs_and_is_reported(tmp_path, capsys):
    """A real (tiny) run of a suite without `archive`: nothing in records/, done, in the report."""
    from masking_bench.cli import main
    from masking_bench.launch import run_local

    raw = {
        "name": "scratch",
        "data": {"name": "synthetic", "image_size": 16, "train_subset": 128},
        "model": {"preset": "cpu-tiny", "overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
        "strategies": ["random"],
        "ratios": [0.75],
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
        "eval": {"probe": {"epochs": 1, "train_subset": 128, "test_subset": 64}, "low_shot": None},
    }
    specs = expand(parse_suite(raw))
    outcome = run_local(specs, tmp_path, show_progress=False)
    assert outcome.failed == [] and len(outcome.done) == 2
    assert not (tmp_path / "records").exists()
    assert all(row["state"] == "done" for row in run_rows(specs, tmp_path))
    assert main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Generated from 2 finished run(s) in suite(s) scratch" in out and "(the full report)" in out


# ------------------------------------------------------------------------------ list: provenance


def test_provenance_labels():
    from masking_bench.catalog import provenance
    from masking_bench.masking import MaskingStrategy, available

    builtin = available()
    assert provenance(builtin["random"]) == "faithful" and provenance(builtin["mto"]) == "interpretation"

    class Silent(MaskingStrategy):
        name = "silent"

    class Honest(MaskingStrategy):
        name = "honest"
        interpretation = True

    class FromMto(builtin["mto"]):  # inherits the built-in's label: says nothing about itself
        name = "from_mto"

    class FromHonest(Honest):  # a base outside masking_bench declared it
        name = "from_honest"

    for cls in (Silent, Honest, FromMto, FromHonest):
        cls.__module__ = "someones_plugin"
    assert provenance(Silent) == "unlabelled" and provenance(FromMto) == "unlabelled"
    assert provenance(Honest) == "interpretation" and provenance(FromHonest) == "interpretation"


def test_list_labels_an_undeclared_plugin_unlabelled(tmp_path, capsys):
    from masking_bench.cli import main

    silent, declared = f"silent_{uuid.uuid4().hex[:6]}", f"declared_{uuid.uuid4().hex[:6]}"
    plugin = tmp_path / "mine.py"
    plugin.write_text(
        textwrap.dedent(f"""
        from masking_bench.masking import MaskingStrategy, MaskPlan, register

        @register
        class Silent(MaskingStrategy):
            \"\"\"Hides nothing in particular.\"\"\"
            name = "{silent}"
            def plan(self, images, ctx):
                raise NotImplementedError

        @register
        class Declared(MaskingStrategy):
            \"\"\"Follows its paper.\"\"\"
            name = "{declared}"
            interpretation = False
            def plan(self, images, ctx):
                raise NotImplementedError
        """)
    )
    assert main(["list", "--plugin", str(plugin)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line[:1].strip()}
    assert rows[silent] == "unlabelled" and rows[declared] == "faithful" and rows["random"] == "faithful"


def test_list_shows_cluster_suites(capsys, monkeypatch):
    from masking_bench.cli import main

    monkeypatch.chdir(REPO)
    assert main(["list"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("suites: ") and "suites/cluster/imagenet100_vit_base.yaml" in last
