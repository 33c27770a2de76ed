"""Run identity: resolved strategy parameters and precision in the hash, code fingerprints in the
records, stale runs retrained (or certified), never served as done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_suite

from masking_bench.config import expand, parse_suite
from masking_bench.errors import BenchError
from masking_bench.fingerprint import changed_parts, normalised_source
from masking_bench.precision import Hardware, resolve

NATIVE = Hardware("cpu", "AVX512", True, "test: native bf16")
EMULATED = Hardware("cpu", "AVX2", False, "test: no AVX512-BF16")

PLUGIN = '''
import torch
from masking_bench.masking import MaskingStrategy, MaskPlan, hide_lowest_first, num_hidden, register


@register
class JitterFirst(MaskingStrategy):
    """Hide tokens by index plus jitter (a test strategy)."""
    name = "jitter_first"
    defaults = {"jitter": 0.5}

    def plan(self, images, ctx):
        n, length = images.shape[0], ctx.num_tokens
        score = torch.arange(length, device=ctx.device).float() / length + self.jitter * ctx.rand(n, length)
        return MaskPlan(mask=hide_lowest_first(score, num_hidden(length, self.ratio)))
'''


def tiny(name: str, strategies, **extra) -> dict:
    suite = {
        "name": name,
        "data": {"name": "synthetic", "train_subset": 128},
        "strategies": strategies,
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
        "eval": {
            "probe": {"epochs": 1, "train_subset": 256, "test_subset": 128},
            "low_shot": None,  # fast: the low-label protocols are not what these tests check
            "random_init": False,
        },
        "archive": True,  # certify re-stamps the compact records
    }
    suite.update(extra)
    return suite


# ------------------------------------------------------------------------------ what the hash covers


def test_hash_covers_resolved_parameters(tiny_suite):
    from masking_bench.masking import get_strategy_class

    default = get_strategy_class("block").defaults["attempts"]

    def runs(params):
        return expand(parse_suite({**tiny_suite, "strategies": [{"name": "block", "params": params}]}), hardware=NATIVE)

    implicit, explicit, other = runs({}), runs({"attempts": default}), runs({"attempts": default + 1})
    assert [r.run_hash for r in implicit] == [r.run_hash for r in explicit]
    assert implicit[-1].strategy.params["attempts"] == default  # the record shows every parameter
    assert {r.run_hash for r in other if r.kind == "pretrain"}.isdisjoint(r.run_hash for r in implicit)


def test_hash_covers_the_precision_used_not_the_amp_written(tiny_suite):
    def hashes(amp, hw):
        suite = {**tiny_suite, "train": {**tiny_suite["train"], "amp": amp}}
        return [r.run_hash for r in expand(parse_suite(suite), hardware=hw) if r.kind == "pretrain"]

    assert hashes("auto", NATIVE) == hashes("bf16", NATIVE)
    assert hashes("auto", EMULATED) == hashes("none", NATIVE)
    assert set(hashes("auto", NATIVE)).isdisjoint(hashes("auto", EMULATED))
    floors = {r.run_hash for r in expand(parse_suite(tiny_suite), hardware=EMULATED) if r.kind == "random_init"}
    assert floors == {r.run_hash for r in expand(parse_suite(tiny_suite), hardware=NATIVE) if r.kind == "random_init"}


def test_auto_precision_follows_the_hardware():
    assert resolve("auto", "cpu", NATIVE) == "bf16"
    assert resolve("auto", "cpu", EMULATED) == "fp32"
    assert resolve("none", "cpu", NATIVE) == "fp32"


def test_explicit_bf16_without_native_support_is_refused_in_one_line():
    with pytest.raises(BenchError) as err:
        resolve("bf16", "cpu", EMULATED)
    msg = str(err.value)
    assert "\n" not in msg and "no native bf16" in msg and "AVX2" in msg
    assert "train.amp: auto" in msg and "none" in msg


def test_this_host_decision_is_recorded_with_its_isa():
    import torch

    from masking_bench.precision import check_on_device, cpu_hardware

    hw = cpu_hardware()
    assert hw.isa == torch.backends.cpu.get_cpu_capability()
    used = resolve("auto", "cpu")
    entry = check_on_device(used, "auto", "cpu")
    assert entry["used"] == used and entry["isa"] == hw.isa and entry["why"]
    wrong = "fp32" if used == "bf16" else "bf16"
    with pytest.raises(BenchError, match="planned in"):
        check_on_device(wrong, "auto", "cpu")


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_ignores_comments_docstrings_and_layout_but_not_code():
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    b = "# header\ndef f(x):\n\n    return (x +\n            1)\n"
    c = "def f(x):\n    return x + 2\n"
    assert normalised_source(a) == normalised_source(b) != normalised_source(c)


def test_changed_parts_names_the_parts():
    now = {"strategy": "a", "model": "b", "trainer": "c"}
    assert changed_parts({"parts": now}, now) == []
    assert changed_parts({"parts": {**now, "trainer": "x"}}, now) == ["trainer"]
    assert changed_parts(None, now) == ["(no fingerprint)"]


# ------------------------------------------------------------------------------ end to end (CLI)


def _state(results: Path, suite_path: Path) -> list[tuple[str, str]]:
    proc = run_cli("status", suite_path, "--results", results, "--no-slurm")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    return [(row[1], row[4] if row[2].startswith("r=") else row[3]) for row in rows]


def _run(results: Path, suite_path: Path, *extra: str):
    proc = run_cli("run", suite_path, "--results", results, "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.startswith("done ")][-1]
    return int(last.split()[1].rstrip(",")), proc


@pytest.mark.integration
def test_plugin_edits_retrain_and_untouched_reruns_skip(tmp_path):
    plugin = tmp_path / "jitter_first.py"
    plugin.write_text(PLUGIN)
    results = tmp_path / "results"
    suite_path = write_suite(
        tmp_path, tiny("ident", [{"name": "jitter_first", "label": "jf"}], plugins=["jitter_first.py"])
    )
    assert _run(results, suite_path)[0] == 1
    assert _run(results, suite_path)[0] == 0  # touch nothing: skipped

    # comments and docstrings are not code
    plugin.write_text(
        PLUGIN.replace('"""Hide tokens by index plus jitter (a test strategy)."""', '"""Reworded."""  # and a comment')
    )
    assert _run(results, suite_path)[0] == 0

    # a label is not identity; nor is where the results folder lives
    write_suite(tmp_path, tiny("ident", [{"name": "jitter_first", "label": "renamed"}], plugins=["jitter_first.py"]))
    assert _run(results, suite_path)[0] == 0
    moved = tmp_path / "moved_results"
    shutil.move(results, moved)
    results = moved
    assert _run(results, suite_path)[0] == 0

    # an edited default is a new run
    plugin.write_text(PLUGIN.replace('{"jitter": 0.5}', '{"jitter": 0.0}'))
    assert _state(results, suite_path) == [("renamed", "pending")]
    assert _run(results, suite_path)[0] == 1

    # an edited plan(): same parameters, other code -> stale, named, retrained; old files kept aside
    plugin.write_text(PLUGIN.replace('{"jitter": 0.5}', '{"jitter": 0.0}').replace("/ length +", "/ (2 * length) +"))
    status = run_cli("status", suite_path, "--results", results, "--no-slurm").stdout
    assert "stale" in status and "code changed: strategy 'jitter_first'" in status
    report = run_cli("report", "--results", results, "--out", tmp_path / "lb")
    assert report.returncode == 0, report.stderr
    assert "[STALE]" in (tmp_path / "lb" / "report.md").read_text()
    assert _run(results, suite_path, "--accept-stale")[0] == 0  # explicit acceptance: not retrained
    done, proc = _run(results, suite_path)
    assert done == 1
    assert list((results / "superseded" / "ident").iterdir()), "the stale run's files must be kept aside"
    assert _state(results, suite_path) == [("renamed", "done")]


@pytest.mark.integration
def test_certify_restamps_a_refactor_and_refuses_a_change(tmp_path):
    plugin = tmp_path / "jitter_first.py"
    plugin.write_text(PLUGIN)
    results = tmp_path / "results"
    suite_path = write_suite(tmp_path, tiny("cert", ["jitter_first"], plugins=["jitter_first.py"]))
    _run(results, suite_path)
    summary_path = next((results / "records" / "cert").glob("*/summary.json"))
    before = json.loads(summary_path.read_text())

    # a pure refactor: same numbers, other code
    plugin.write_text(
        PLUGIN.replace(
            "n, length = images.shape[0], ctx.num_tokens", "length = ctx.num_tokens\n        n = images.shape[0]"
        )
    )
    assert _state(results, suite_path) == [("jitter_first", "stale")]
    proc = run_cli("certify", suite_path, "--results", results, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "certified jitter_first" in proc.stdout and "bit-identical" in proc.stdout
    assert _state(results, suite_path) == [("jitter_first", "done")]
    after = json.loads(summary_path.read_text())
    assert after["code"]["certified"]["previous"] == before["code"]["parts"]
    assert after["probe_top1"] == before["probe_top1"]

    # a real change: the rerun differs, nothing is re-stamped
    plugin.write_text(PLUGIN.replace("/ length +", "/ (2 * length) +"))
    proc = run_cli("certify", suite_path, "--results", results, "--no-progress")
    assert proc.returncode == 1
    assert "NOT certified" in proc.stdout
    assert _state(results, suite_path) == [("jitter_first", "stale")]


@pytest.mark.integration
def test_checkpoint_of_other_code_is_not_resumed(tmp_path):
    """A half-trained run whose code then changed restarts from scratch instead of mixing codes."""
    from masking_bench.launch import execute_run
    from masking_bench.store import RunRecord

    suite = tiny("resume", ["random"], train={"epochs": 2, "batch_size": 64, "amp": "none"})
    (spec,) = expand(parse_suite(suite))
    results = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, results, show_progress=False, stop_after_steps=3)  # epoch 0 done (2 steps), then 1
    record = RunRecord(results, spec)
    assert len(record.read_metrics()) == 1
    import torch

    state = torch.load(record.checkpoint_path, weights_only=True)
    state["code"] = {**state["code"], "trainer": "0123456789ab"}
    torch.save(state, record.checkpoint_path)
    summary = execute_run(spec, results, show_progress=False)
    clean = execute_run(spec, tmp_path / "clean", show_progress=False)
    assert summary["final_loss"] == clean["final_loss"]
    assert [r["loss"] for r in record.read_metrics()] == [
        r["loss"] for r in RunRecord(tmp_path / "clean", spec).read_metrics()
    ]


def test_legacy_records_convert_by_what_they_recorded(tmp_path, tiny_suite):
    """A schema-1 record is renamed to its current hash using the parameters its strategy recorded."""
    from masking_bench.certify import legacy_count, upgrade_legacy

    suite = parse_suite(
        {
            **tiny_suite,
            "strategies": ["block"],
            "ratios": [0.75],
            "seeds": [0],
            "train": {**tiny_suite["train"], "amp": "bf16"},
        }
    )
    spec = next(r for r in expand(suite, hardware=NATIVE) if r.kind == "pretrain")
    old = spec.model_dump(mode="json")
    old.pop("precision")
    old["strategy"]["params"] = {}
    folder = tmp_path / "records" / "tiny" / "0123456789ab"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"run_hash": "0123456789ab", **old}))
    (folder / "summary.json").write_text(json.dumps({"strategy_info": {"params": spec.strategy.params}}))
    assert legacy_count(tmp_path, "tiny") == 1
    lines = upgrade_legacy(tmp_path, "tiny")
    assert lines and spec.run_hash in lines[0]
    assert (tmp_path / "records" / "tiny" / spec.run_hash / "config.yaml").is_file()
    assert legacy_count(tmp_path, "tiny") == 0


AVX2_HOST = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # how an AVX2-only CPU looks to torch


def test_an_avx2_host_trains_auto_in_fp32_and_refuses_explicit_bf16(tmp_path):
    """On a CPU limited to AVX2 (emulated through torch's and oneDNN's ISA caps) `auto` picks fp32 and
    an explicit bf16 suite stops before any training with the one-line reason and fix."""
    import subprocess
    import sys

    from conftest import cli_env

    code = (
        "from masking_bench.precision import cpu_hardware, resolve; hw = cpu_hardware(); "
        "print(hw.isa, hw.native_bf16, resolve('auto', 'cpu'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(**AVX2_HOST), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "False", "fp32"]
    suite = tiny("avx2", ["random"], train={"epochs": 1, "batch_size": 64, "amp": "bf16"})
    path = write_suite(tmp_path, suite)
    proc = run_cli("run", path, "--results", tmp_path / "results", env=cli_env(**AVX2_HOST))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "train.amp: auto" in lines[0]
    assert not (tmp_path / "results" / "runs").exists()


def test_bench_names_the_isa_and_measures_only_native_precisions():
    import torch

    from masking_bench import bench, bench_table
    from masking_bench.precision import cpu_hardware

    info = bench.machine_info(torch.device("cpu"))
    assert info["isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["amp_auto"] == ("bf16" if cpu_hardware().native_bf16 else "fp32")
    assert "bf16" not in bench.default_variants(compile=True, bf16=False)
    assert all(v.get("amp") != "bf16" for v in bench.default_variants(compile=True, bf16=False).values())
    assert "bf16" in bench.default_variants(bf16=True)
    table = bench_table.format_table({"machine": info})
    assert f"ISA {info['isa']}: train.amp auto trains in {info['amp_auto']}" in table
