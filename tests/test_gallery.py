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


# ------------------------------------------------------------------ what a gallery shows (panels)


def _synthetic(strategy, n=3, **kw):
    return plan_masks(strategy, 0.75, n=n, data="synthetic", **kw)


def _row(gallery, kind_or_key):
    """Index of the first row whose kind or key is ``kind_or_key``."""
    return next(r for r, row in enumerate(gallery.rows) if kind_or_key in (row.kind, row.key))


def _canvas(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def _patch_centre_pixels(fig, ax, grid, size, tokens):
    """Canvas RGB at the centre of each token's patch in ``ax`` (an imshow of an H×W image)."""
    pixels = _canvas(fig)
    (h, w), (gh, gw) = size, grid
    ph, pw = h // gh, w // gw
    out = []
    for t in tokens:
        r, c = divmod(int(t), gw)
        x, y = ax.transData.transform((c * pw + (pw - 1) / 2, r * ph + (ph - 1) / 2))
        out.append(pixels[int(round(pixels.shape[0] - y)), int(round(x))])
    return np.array(out)


def test_hidden_patches_are_opaque_whatever_the_image():
    """Every pixel of a hidden patch in the encoder row is exactly the hidden colour, in the drawn
    image data and on the rendered canvas, for a white image and for noise alike."""
    import matplotlib.pyplot as plt

    from masking_bench.gallery_panels import HIDDEN_RGB, build_figure, hidden_pixels

    masks = _synthetic("random", n=2)
    grid, size = tuple(masks["grid"]), masks["images"].shape[-2:]
    rng = np.random.default_rng(0)
    for images in (np.ones_like(masks["images"]), rng.random(masks["images"].shape).astype(np.float32)):
        gallery = build_figure({**masks, "images": images}, "t")
        try:
            r = _row(gallery, "masked")
            for i in range(2):
                ax = gallery.axes[r, i]
                drawn = np.asarray(ax.get_images()[0].get_array())
                hidden = hidden_pixels(masks["mask"][i], grid, size)
                assert (drawn[hidden] == HIDDEN_RGB).all()
                assert not (drawn[~hidden] == HIDDEN_RGB).all(axis=-1).any()  # visible pixels keep the image
                tokens = np.flatnonzero(masks["mask"][i])
                assert (_patch_centre_pixels(gallery.fig, ax, grid, size, tokens) == HIDDEN_RGB).all()
        finally:
            plt.close(gallery.fig)


def test_salience_row_has_a_colour_bar():
    import matplotlib.pyplot as plt

    from masking_bench.gallery_panels import build_figure

    gallery = build_figure(_synthetic("sbam"), "t")
    try:
        (label, cbar), *_ = [(k, v) for k, v in gallery.colorbars.items() if "salience" in k]
        assert cbar.ax in gallery.fig.axes and "salience" in cbar.ax.get_ylabel()
        assert cbar.mappable.get_clim() == (0, 1)
        assert gallery.axes[_row(gallery, "salience"), 0].get_ylabel().replace("\n", " ") == label
    finally:
        plt.close(gallery.fig)
    plain = build_figure(_synthetic("random"), "t")
    assert plain.colorbars == {} and len(plain.fig.axes) == plain.axes.size
    plt.close(plain.fig)


def test_mto_gallery_shows_its_attention_rule_not_random():
    """Same masks as random, but mto's gallery has attention rows: visible tokens give mask tokens
    exactly 0 (its recalibration), which random's plan (no rule) does not."""
    import matplotlib.pyplot as plt

    from masking_bench.gallery import load_model
    from masking_bench.gallery_panels import ATTENTION_KEYS, attention_maps, build_figure
    from masking_bench.masking import MaskPlan

    mto, rnd = _synthetic("mto"), _synthetic("random")
    assert np.array_equal(mto["mask"], rnd["mask"])
    assert all(k in mto for k in ATTENTION_KEYS) and not any(k in rnd for k in ATTENTION_KEYS)
    hidden = mto["mask"]
    from_visible = mto["attention_from_visible"]
    assert (from_visible[hidden] == 0).all() and (from_visible[~hidden] > 0).all()
    assert (mto["attention_from_hidden"] > 0).all()
    # the same mask under random's plan (no isolation): visible tokens do attend to mask tokens
    model, _ = load_model(None, "mae", "cpu-tiny", 0, 28, 1)
    x = torch.as_tensor(mto["images"])
    plain = attention_maps(model.eval(), x, MaskPlan(mask=torch.as_tensor(hidden), record_attention=(0,)), "mae")
    assert (plain["attention_from_visible"][hidden] > 0).all()
    gallery = build_figure(mto, "t")
    try:
        labels = [gallery.axes[r, 0].get_ylabel().replace("\n", " ") for r in range(len(gallery.rows))]
        assert any("from visible tokens" in t and "MTO rule" in t for t in labels), labels
        assert sum("attention" in k for k in gallery.colorbars) == 2
    finally:
        plt.close(gallery.fig)


def test_misalign_labels_its_upsampled_view():
    import matplotlib.pyplot as plt

    from masking_bench.gallery_panels import build_figure

    masks = _synthetic("misalign")
    assert masks["view"].shape == masks["images"].shape and not np.allclose(masks["view"], masks["images"])
    gallery = build_figure(masks, "t")
    try:
        labels = [" ".join(gallery.axes[r, 0].get_ylabel().split()) for r in range(len(gallery.rows))]
        assert any("encoder input" in t and "up-sampled to 36×36" in t for t in labels), labels
        assert any("decoder target" in t for t in labels), labels
        assert gallery.rows[_row(gallery, "masked")].key == "view"  # the encoder row masks the view
    finally:
        plt.close(gallery.fig)


def test_sbam_amr_gallery_defaults_to_the_studys_mode():
    import json
    from pathlib import Path

    from masking_bench.config import load_suite
    from masking_bench.gallery import STUDY_PARAMS, STUDY_SUITE

    repo = Path(__file__).resolve().parent.parent
    study = {r.name: dict(r.params) for r in load_suite(repo / STUDY_SUITE).strategies}
    assert STUDY_PARAMS["sbam_amr"] == study["sbam_amr"] == {"mode": "sample"}
    masks = _synthetic("sbam_amr")
    assert json.loads(str(masks["params"]))["mode"] == "sample"
    assert "mode=sample" in str(masks["title"]) and STUDY_SUITE in str(masks["title"])
    batch = _synthetic("sbam_amr", params={"mode": "batch"})
    assert "mode=batch" in str(batch["title"]) and STUDY_SUITE not in str(batch["title"])


def test_synthetic_gallery_has_the_datasets_size(capsys, tmp_path):
    code = cli.main(
        ["masks", "sbam", "--data", "synthetic", "--image-size", "32", "--n", "2"]
        + ["--dump", str(tmp_path / "m.npz"), "--out", str(tmp_path / "g.png")]
    )
    assert code == 0, capsys.readouterr().err
    data = np.load(tmp_path / "m.npz")
    assert data["images"].shape == (2, 1, 32, 32) and data["mask"].shape == (2, 64)
    assert list(data["grid"]) == [8, 8] and str(data["data"]) == "synthetic"
    assert "synthetic 1x32x32" in str(data["title"]) and (tmp_path / "g.png").stat().st_size > 0


def test_rgb_imagefolder_gallery_keeps_its_channels(capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{k}.png")
    args = ["--data", "imagefolder", "--root", str(tmp_path), "--image-size", "16", "--n", "2"]
    code = cli.main(["masks", "random", *args, "--dump", str(tmp_path / "m.npz"), "--out", str(tmp_path / "g.png")])
    assert code == 0, capsys.readouterr().err
    data = np.load(tmp_path / "m.npz")
    assert data["images"].shape == (2, 3, 16, 16) and list(data["grid"]) == [4, 4]


@pytest.mark.parametrize(
    "args,needles",
    [
        (("--data", "mnist"), ("unknown dataset 'mnist'", "accepted are", "synthetic", "cifar10")),
        (("--data", "cifar10", "--root", "{tmp}"), ("CIFAR-10 not found", "never downloads")),
        (("--data", "imagefolder", "--root", "{tmp}"), ("ImageFolder dataset not found", "train/<class>")),
        (("--data", "fashion_mnist", "--image-size", "32"), ("imagefolder and synthetic only", "28x28")),
        (("--data", "synthetic", "--image-size", "0"), ("--image-size 0", "1..512")),
        (("--data", "synthetic", "--image-size", "30"), ("image size 30", "patch size 4")),
    ],
)
def test_bad_dataset_is_one_line(capsys, tmp_path, args, needles):
    line = masks_error(capsys, "random", "--n", "1", *(a.format(tmp=tmp_path) for a in args))
    for needle in needles:
        assert needle in line, line


def test_suite_gives_data_model_method_and_params(capsys, tmp_path):
    from conftest import TINY_SUITE, write_suite

    suite = {
        **TINY_SUITE,
        "data": {"name": "synthetic", "image_size": 32},
        "method": "simmim",
        "strategies": [{"name": "sbam_amr", "params": {"mode": "batch"}, "label": "amr_b"}, "random"],
    }
    path = write_suite(tmp_path, suite)
    code = cli.main(["masks", "amr_b", "--suite", str(path), "--n", "2", "--dump", str(tmp_path / "m.npz")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    data = np.load(tmp_path / "m.npz")
    assert data["images"].shape == (2, 1, 32, 32) and str(data["data"]) == "synthetic"
    assert '"mode": "batch"' in str(data["params"])  # the suite's entry, not the study default
    assert "amr_b" in str(data["title"]) and "simmim" in str(data["title"])
    suite["strategies"] = [{"name": "sbam_amr", "label": "a"}, {"name": "sbam_amr", "label": "b"}]
    line = masks_error(capsys, "sbam_amr", "--suite", write_suite(tmp_path, suite), "--n", "1")
    assert "2 times" in line and "(a, b)" in line


def test_checkpoint_run_config_names_the_dataset(capsys, tmp_path):
    path = _cpu_tiny_checkpoint(tmp_path / "run")
    config = {"method": "mae", "model": {"preset": "cpu-tiny"}, "data": {"name": "synthetic", "image_size": 28}}
    (path.parent / "config.yaml").write_text(yaml.safe_dump(config))
    code = cli.main(["masks", "random", "--checkpoint", str(path), "--n", "1", "--dump", str(tmp_path / "m.npz")])
    assert code == 0, capsys.readouterr().err
    assert str(np.load(tmp_path / "m.npz")["data"]) == "synthetic"
