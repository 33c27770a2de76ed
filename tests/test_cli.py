"""``python -m masking_bench`` in a subprocess: user errors are one line on stderr, never a traceback."""

from __future__ import annotations

import pytest
from conftest import cli_env, popen_cli, write_suite

SUBPROCESS_CASES = ("unknown_strategy", "malformed_yaml", "missing_data")  # each subprocess costs ~5 s of CPU


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Start every error case at once (each pays the torch import), then collect them."""
    tmp = tmp_path_factory.mktemp("cli")
    ok = {"strategies": ["random"], "ratios": [0.75], "train": {"epochs": 1}}
    suites = {
        "unknown_strategy": write_suite(
            tmp, {"strategies": ["random", "rnadom"], "ratios": [0.75]}, "unknown_strategy"
        ),
        "missing_data": write_suite(tmp, ok, "missing_data"),
    }
    malformed = tmp / "malformed_yaml.yaml"
    malformed.write_text("strategies: [random\nratios: [0.75]\n")
    suites["malformed_yaml"] = malformed
    empty = tmp / "empty_data"
    empty.mkdir()
    procs = {}
    for case in SUBPROCESS_CASES:
        env = cli_env(MASKING_BENCH_DATA_DIR=str(empty)) if case == "missing_data" else None
        procs[case] = popen_cli("run", suites[case], "--no-progress", "--results", tmp / f"results_{case}", env=env)
    procs["list"] = popen_cli("list")
    # a tiny evaluation-only run on generated data, started from a folder outside the repository
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    tiny = {
        "strategies": ["random"],
        "ratios": [0.75],
        "data": {"name": "synthetic"},
        "train": {"epochs": 0},
        "eval": {
            "random_init": False,
            "low_shot": None,
            "probe": {"epochs": 1, "train_subset": 128, "test_subset": 64},
        },
    }
    procs["elsewhere"] = popen_cli(
        "run", write_suite(tmp, tiny, "elsewhere"), "--no-progress", "--results", elsewhere / "results", cwd=elsewhere
    )
    out = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[case] = (proc.returncode, stdout, stderr)
    return tmp, out


def check_one_line(code, stdout, stderr, needles):
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "case,needles",
    [
        ("unknown_strategy", ("rnadom", "accepted are", "random", "block")),
        ("malformed_yaml", ("malformed YAML", "line 2")),
        ("missing_data", ("dataset-fashion-mnist", "MASKING_BENCH_DATA_DIR", "empty_data")),
    ],
)
def test_user_errors_are_one_line(outcomes, case, needles):
    tmp, out = outcomes
    check_one_line(*out[case], needles)
    assert not (tmp / f"results_{case}" / "runs").exists()  # nothing was trained or recorded


@pytest.mark.parametrize(
    "case,needles",
    [
        ("unknown_param", ("'cell'", "min_block", "top_up")),
        ("unknown_field", ("'train.epoch'", "unknown field")),
        ("missing_file", ("does_not_exist.yaml", "does not exist")),
        ("bad_ratio", ("'ratios.0'", "strictly between 0 and 1")),
    ],
)
def test_more_user_errors_in_process(tmp_path, capsys, case, needles):
    """The same entry point (``cli.main``) in-process, for the cases that need no fresh interpreter."""
    from masking_bench.cli import main

    suites = {
        "unknown_param": {"strategies": [{"name": "block", "params": {"cell": 2}}], "ratios": [0.75]},
        "unknown_field": {"strategies": ["random"], "ratios": [0.75], "train": {"epoch": 1}},
        "bad_ratio": {"strategies": ["random"], "ratios": [1.25]},
    }
    path = write_suite(tmp_path, suites[case], case) if case in suites else tmp_path / "does_not_exist.yaml"
    code = main(["run", str(path), "--no-progress", "--results", str(tmp_path / "results")])
    captured = capsys.readouterr()
    check_one_line(code, captured.out, captured.err, needles)
    assert not (tmp_path / "results" / "runs").exists()


def test_list_prints_the_strategies(outcomes):
    _, out = outcomes
    code, stdout, stderr = out["list"]
    assert code == 0, stderr
    rows = {
        line.split()[0]: line.split()[1]
        for line in stdout.splitlines()
        if line.strip() and not line.startswith(" ") and not line.startswith("suites:")
    }
    assert {"random", "block", "coarse_random", "sbam", "sbam_amr", "mto", "misalign"} <= set(rows)
    # each line says whether the strategy follows its reference or is our reading of the paper
    assert rows["random"] == "faithful" and rows["mto"] == "interpretation" and rows["sbam_amr"] == "interpretation"
    assert "suites/smoke.yaml" in stdout
    assert "Traceback" not in stderr


def test_run_works_from_another_directory(outcomes):
    _, out = outcomes
    code, stdout, stderr = out["elsewhere"]
    assert code == 0, stderr
    assert "done 1, already finished 0, failed 0" in stderr
