"""The ``masks`` command (masking_bench/gallery.py): odd inputs end in one line naming the problem.

Most cases call ``cli.main`` in-process (the checks come before any data is read); the ``--n`` cases
that used to run for minutes go through a subprocess with a timeout, so a regression fails instead
of hanging the suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import needs_fashion, popen_cli

from masking_bench import cli
from masking_bench.errors import BenchError
from masking_bench.gallery import MAX_IMAGES, load_model, parse_params, plan_masks


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A gallery written by mistake (default --out masks_<strategy>.png) lands in a temporary folder."""
    monkeypatch.chdir(tmp_path)


def masks_error(capsys, *args) -> str:
    """Run ``masks ARGS`` in-process; it must fail with exit status 2 and one ``error:`` line."""
    code = cli.main(["masks", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# ------------------------------------------------------------------------------------------ --n


@pytest.fixture(scope="module")
def n_outcomes(tmp_path_factory):
    """``--n`` values that used to traceback (0) or run for 9+ minutes (-3, 100000), started at once."""
    tmp = tmp_path_factory.mktemp("gallery_n")
    procs = {n: popen_cli("masks", "random", "--n", n, "--out", tmp / f"n{n}.png") for n in ("0", "-3", "100000")}
    out = {}
    try:
        for n, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            out[n] = (proc.returncode, stdout, stderr, (tmp / f"n{n}.png").exists())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


@pytest.mark.parametrize("n", ["0", "-3", "100000"])
def test_n_out_of_range_is_one_line_and_fast(n_outcomes, n):
    code, stdout, stderr, wrote = n_outcomes[n]
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert f"--n {n}" in lines[0] and f"1..{MAX_IMAGES}" in lines[0]
    assert not wrote


@pytest.mark.parametrize("n", [0, -1, MAX_IMAGES + 1, True, 2.0])
def test_plan_masks_refuses_n_out_of_range(n):
    with pytest.raises(BenchError, match=f"1..{MAX_IMAGES}"):
        plan_masks("random", 0.75, n=n)


def test_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        cli.main(["masks", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"1..{MAX_IMAGES}" in text and "(0, 1)" in text


# -------------------------------------------------------------------------------------- --ratio


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1", "nan", "inf"])
def test_ratio_outside_0_1_is_one_line(capsys, ratio):
    line = masks_error(capsys, "random", "--ratio", ratio)
    assert "--ratio" in line and "(0, 1)" in line and ratio in line


# --------------------------------------------------------------------- strategy and --param


def test_unknown_strategy_is_the_registry_error(capsys):
    line = masks_error(capsys, "rnadom")
    assert "unknown strategy 'rnadom'" in line and "accepted are" in line and "block" in line


@pytest.mark.parametrize(
    "param,needles",
    [
        ("min_block=abc", ("'block'", "min_block", "'abc'")),
        ("min_block=-4", ("'block'", "min_block", "-4")),
        ("top_up=maybe", ("'block'", "top_up", "'maybe'")),
        ("nope=1", ("'block'", "'nope'", "accepted are")),
        ("min_block", ("min_block", "key=value")),
        ("=4", ("'=4'", "key=value")),
        ("min_block=[", ("'min_block=['", "YAML")),
    ],
)
def test_bad_param_is_one_line(capsys, param, needles):
    line = masks_error(capsys, "block", "--param", param)
    for needle in needles:
        assert needle in line, line


def test_parse_params_reads_yaml_scalars():
    assert parse_params(["a=0.5", "b=true", "c=null", "d=text", "e=4"]) == {
        "a": 0.5,
        "b": True,
        "c": None,
        "d": "text",
        "e": 4,
    }
    with pytest.raises(BenchError, match="'x=: \\['"):
        parse_params(["x=: ["])


# --------------------------------------------------------------------------------- --checkpoint


def _cpu_tiny_checkpoint(folder, method="mae"):
    from masking_bench.models import build_model

    torch.manual_seed(0)
    model = build_model("cpu-tiny", method, 28, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epochs_done": 1}, path)
    return path


def _bad_checkpoints(tmp_path):
    _cpu_tiny_checkpoint(tmp_path / "good")  # the folder must exist for the others
    files = {}
    files["random_bytes"] = tmp_path / "random.pt"
    files["random_bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    data = (tmp_path / "good" / "checkpoint.pt").read_bytes()
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"] = tmp_path / "notes.txt"
    files["text"].write_text("this is not a checkpoint\n")
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["no_model"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), files["no_model"])
    files["missing"] = tmp_path / "missing.pt"
    files["directory"] = tmp_path / "good"
    other = tmp_path / "other_model"  # a checkpoint of another preset next to a config naming cpu-tiny
    other.mkdir()
    from masking_bench.models import build_model

    torch.save({"model": build_model("cpu-small", "mae", 28, 1).state_dict()}, other / "checkpoint.pt")
    (other / "config.yaml").write_text(yaml.safe_dump({"method": "mae", "model": {"preset": "cpu-tiny"}}))
    files["wrong_model"] = other / "checkpoint.pt"
    broken_cfg = tmp_path / "broken_config"
    broken_cfg.mkdir()
    (broken_cfg / "checkpoint.pt").write_bytes(data)
    (broken_cfg / "config.yaml").write_text("method: [mae\n")
    files["broken_config"] = broken_cfg / "checkpoint.pt"
    return files


BAD = ("random_bytes", "truncated", "text", "empty", "no_model", "missing", "directory", "wrong_model", "broken_config")


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_is_one_line_naming_the_file(capsys, bad_checkpoints, case):
    path = bad_checkpoints[case]
    line = masks_error(capsys, "sbam", "--checkpoint", path)
    named = path.parent / "config.yaml" if case == "broken_config" else path
    assert str(named) in line, line


@pytest.mark.parametrize("case", BAD)
def test_load_model_raises_bench_error(bad_checkpoints, case):
    with pytest.raises(BenchError, match="checkpoint|config"):
        load_model(str(bad_checkpoints[case]), "mae", "cpu-tiny", 0, 28, 1)


def test_good_checkpoint_loads(tmp_path):
    path = _cpu_tiny_checkpoint(tmp_path)
    model, method = load_model(str(path), "mae", "cpu-tiny", 0, 28, 1)
    assert method == "mae"
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------- happy paths


@needs_fashion
def test_masks_writes_a_dump_for_valid_inputs(tmp_path, capsys):
    dump = tmp_path / "m.npz"
    code = cli.main(["masks", "block", "--n", "2", "--ratio", "0.6", "--param", "min_block=2", "--dump", str(dump)])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = np.load(dump)
    assert data["mask"].shape == (2, 49) and data["images"].shape == (2, 1, 28, 28)
    assert "hidden ratio mean" in out.out


@needs_fashion
def test_masks_output_errors_are_one_line(tmp_path, capsys):
    line = masks_error(capsys, "random", "--n", "1", "--out", tmp_path / "gallery.notaformat")
    assert "gallery.notaformat" in line
