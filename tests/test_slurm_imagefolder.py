"""The papers' data path end to end on the local SLURM cluster: a JPEG ImageFolder tree is decoded once
by `prepare` at two storage resolutions (a `data.image_size` grid axis), a second `prepare` reuses both
folders, one SLURM job array pre-trains and evaluates every run on the mapped prepared files (each
summary names the folder of its own size), and `report` turns the records into leaderboards.

Skipped without a usable cluster, unless MASKING_BENCH_REQUIRE_SLURM=1 (see tests/test_slurm.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import test_slurm

from masking_bench import cli
from masking_bench.config import expand, parse_suite
from masking_bench.prepared import PREPARED_ENV, decode, is_complete
from masking_bench.store import RunRecord

pytestmark = pytest.mark.slurm

cluster = test_slurm.cluster  # the module-scoped skip-or-fail check of a usable cluster
in_repo = test_slurm.in_repo  # jobs inherit the working directory: the repo root imports the package

CLASSES = ("diag", "horizontal", "spots", "vertical")  # sorted, as ImageFolder orders class folders
N_TRAIN, N_VAL = 500, 100  # per class: 2000 train + 400 val JPEGs
SIZES = ((40, 40), (56, 48))  # (width, height): square and non-square sources in the same tree
STORE = (16, 24)  # the two storage resolutions of the grid


def _draw(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image whose stripe orientation and tint depend on the class, plus noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    pattern = [
        np.sin((xx + yy) * 0.7 + phase),
        np.sin(yy * 0.9 + phase),
        np.sin(xx * 0.6 + phase) * np.sin(yy * 0.6 + phase),
        np.sin(xx * 0.9 + phase),
    ][label]
    tint = np.array([[1.0, 0.4, 0.4], [0.4, 1.0, 0.4], [0.4, 0.4, 1.0], [1.0, 1.0, 0.3]][label], np.float32)
    img = 0.5 + 0.35 * pattern[..., None] * tint + 0.08 * rng.standard_normal((height, width, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(1234)
    for split, per_class in (("train", N_TRAIN), ("val", N_VAL)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                width, height = SIZES[i % 2]
                Image.fromarray(_draw(rng, label, width, height)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _suite(tree: Path) -> dict:
    return {
        "name": "slurm_imagefolder",
        "data": {"name": "imagefolder", "root": str(tree), "image_size": STORE[0]},
        "grid": {"data.image_size": list(STORE)},
        "model": test_slurm.MICRO,  # cpu-tiny: patch 4 divides 16 and 24
        "strategies": ["random", "block"],
        "ratios": [0.75],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.5},
        "eval": test_slurm.TINY_EVAL,
        "launcher": test_slurm.LAUNCHER,
    }


def _prepared_folders(results: Path) -> dict[int, Path]:
    out = {}
    for size in STORE:
        found = sorted((results / "prepared").glob(f"imagefolder-{size}px-*"))
        assert len(found) == 1, found
        out[size] = found[0]
    return out


def test_imagefolder_suite_prepared_then_one_slurm_array(cluster, in_repo, tree, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PREPARED_ENV, raising=False)  # the cache must be <results>/prepared, for the jobs too
    raw = _suite(tree)
    suite = test_slurm._write_suite(tmp_path / "slurm_imagefolder.yaml", raw)
    results = tmp_path / "results"
    train_jpegs = sorted((tree / "train").glob("*/*.jpg"))
    val_jpegs = sorted((tree / "val").glob("*/*.jpg"))
    assert len(train_jpegs) == 4 * N_TRAIN and len(val_jpegs) == 4 * N_VAL

    # --- prepare: two complete folders, one per storage resolution
    assert cli.main(["prepare", str(suite), "--results", str(results), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    folders = _prepared_folders(results)
    manifests = {}
    for size, folder in folders.items():
        assert is_complete(folder), folder
        assert str(folder) in out and "already prepared" not in out, out
        m = json.loads((folder / "manifest.json").read_text())
        manifests[size] = m
        assert m["dataset"] == "imagefolder" and m["resolution"] == size and m["classes"] == list(CLASSES)
        assert m["splits"]["train"] == {"count": len(train_jpegs), "shape": [len(train_jpegs), 3, size, size]}
        assert m["splits"]["val"] == {"count": len(val_jpegs), "shape": [len(val_jpegs), 3, size, size]}
        images = np.load(folder / "train" / "images.npy", mmap_mode="r")
        labels = np.load(folder / "train" / "labels.npy")
        assert np.bincount(labels).tolist() == [N_TRAIN] * 4
        # rows follow ImageFolder's sorted order and hold each JPEG resized + centre-cropped (both source sizes)
        for row in (0, 1, N_TRAIN + 1, len(train_jpegs) - 2):
            assert labels[row] == CLASSES.index(train_jpegs[row].parent.name)
            np.testing.assert_array_equal(images[row], decode(str(train_jpegs[row]), size))
    assert folders[16].name.split("-")[-1] != folders[24].name.split("-")[-1]  # the size is in the digest
    stamps = {size: (folder / "manifest.json").stat().st_mtime_ns for size, folder in folders.items()}

    # --- prepare again: nothing rewritten
    assert cli.main(["prepare", str(suite), "--results", str(results), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("already prepared") == 2, out
    assert _prepared_folders(results) == folders
    for size, folder in folders.items():
        assert (folder / "manifest.json").stat().st_mtime_ns == stamps[size]
        assert json.loads((folder / "manifest.json").read_text())["created_by"] == manifests[size]["created_by"]

    # --- run: every run in one SLURM job array, each reading the prepared folder of its size
    code = cli.main(["run", str(suite), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "launcher: slurm" in err and "done 4, already finished 0, failed 0" in err, err
    specs = expand(parse_suite(raw))
    assert sorted((s.data.image_size, s.strategy.name) for s in specs) == [
        (16, "block"),
        (16, "random"),
        (24, "block"),
        (24, "random"),
    ]
    arrays = set()
    for spec in specs:
        rec = RunRecord(results, spec)
        st = rec.status()
        assert rec.is_done(), test_slurm._diagnostics(rec)
        assert st["launcher"] == "slurm" and test_slurm.JOB_ID.match(st["job_id"]) and "_" in st["job_id"], st
        arrays.add(st["job_id"].split("_")[0])
        summary = rec.read_summary()
        assert summary["run_hash"] == spec.run_hash
        assert summary["data"] == {"storage": "prepared", "prepared": str(folders[spec.data.image_size])}
        assert math.isfinite(summary["probe_top1"]) and 0 <= summary["probe_top1"] <= 100, summary  # percent
        # class-dependent stripes and tints: labels still line up with the mapped images (chance is 25 %)
        assert summary["knn_top1"] > 60, summary
    assert len(arrays) == 1, arrays  # one job array for the whole suite
    assert len({RunRecord(results, s).status()["job_id"] for s in specs}) == len(specs)
    assert _prepared_folders(results) == folders  # the jobs reused the folders, wrote no other
    for size, folder in folders.items():
        assert (folder / "manifest.json").stat().st_mtime_ns == stamps[size]

    # --- report: leaderboards with both strategies at both storage resolutions
    import pandas as pd

    report = tmp_path / "report"
    assert cli.main(["report", "--results", str(results), "--suite", raw["name"], "--out", str(report)]) == 0
    capsys.readouterr()
    assert (report / "report.md").is_file()
    acc = pd.read_csv(report / "leaderboards" / "accuracy.csv")
    probe = acc[acc["protocol"] == "probe"]
    cells = sorted(zip(probe["variant"], probe["strategy"], strict=True))
    assert cells == [
        ("data.image_size=16", "block"),
        ("data.image_size=16", "random"),
        ("data.image_size=24", "block"),
        ("data.image_size=24", "random"),
    ], acc
    assert (probe["seeds"] == 1).all() and probe["top1_mean"].between(0, 100).all()
    by_cell = {(v, s): t for v, s, t in zip(probe["variant"], probe["strategy"], probe["top1_mean"], strict=True)}
    for spec in specs:
        key = (f"data.image_size={spec.data.image_size}", spec.strategy.name)
        assert by_cell[key] == pytest.approx(RunRecord(results, spec).read_summary()["probe_top1"], abs=1e-6)
    board = pd.read_csv(report / "leaderboard.csv")
    assert sorted(board["strategy"]) == ["block", "block", "random", "random"], board
