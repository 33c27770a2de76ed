"""Prepared datasets (decoded once, content-addressed, locked) and the memmap loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FASHION_DIR, have_fashion_mnist, write_suite

from masking_bench.errors import BenchError, DataMissingError
from masking_bench.prepared import (
    FORMAT_VERSION,
    PREPARED_ENV,
    cache_root,
    decode,
    is_complete,
    open_prepared,
    prepare,
)
from masking_bench.prepared_loader import PreparedLoader

SIZE = 32
CLASSES = ("cat", "dog", "emu")


def make_imagefolder(root: Path, n_train: int = 6, n_val: int = 2, seed: int = 0) -> Path:
    """JPEG/PNG images of assorted sizes, modes (RGB, L, RGBA) and aspect ratios under train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(24, 70)), int(rng.integers(24, 70))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., c] = np.linspace(0, 255, w, dtype=np.uint8)  # some structure
                img = Image.fromarray(arr)
                if i % 3 == 1:
                    img.convert("L").save(folder / f"{i:03d}.jpg", quality=90)
                elif i % 3 == 2:
                    img.convert("RGBA").save(folder / f"{i:03d}.png")
                else:
                    img.save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "imgs")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "prepared"


def test_prepared_equals_direct_decode_and_load_imagefolder(folder, cache):
    from PIL import Image
    from torchvision.transforms import v2

    from masking_bench.data import load_imagefolder

    prep, wrote = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=2, progress=False)
    assert wrote and prep.folder.parent == cache and is_complete(prep.folder)
    m = prep.manifest
    assert m["format"] == FORMAT_VERSION and m["classes"] == list(CLASSES) and m["mode"] == "RGB"
    assert m["splits"]["train"]["shape"] == [18, 3, SIZE, SIZE] and m["splits"]["val"]["count"] == 6
    train = prep.split("train")
    assert isinstance(train.images, np.memmap) and train.images.dtype == np.uint8
    # a direct decode of the same files on the same PIL -> tensor path
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE)])
    files = sorted((folder / "train").glob("*/*"))
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            expect = tf(Image.open(fh).convert("RGB")).numpy()
        np.testing.assert_array_equal(train.images[i], expect)
        assert train.labels[i] == CLASSES.index(path.parent.name)
    # the statistics every run normalises with: per-channel mean and unbiased std of the train split
    x = train.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(m["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(m["std"], x.std(axis=(0, 2, 3), ddof=1), rtol=1e-7)
    # the in-memory ImageFolder dataset is a copy of the prepared one: same bytes, labels and statistics
    ds = load_imagefolder(str(folder), SIZE, cache=cache)
    assert not ds.train.mapped and ds.prepared == str(prep.folder)
    np.testing.assert_array_equal(train.images, ds.train.images.numpy())
    np.testing.assert_array_equal(prep.split("val").images, ds.test.images.numpy())
    np.testing.assert_array_equal(train.labels, ds.train.labels.numpy())
    assert (list(ds.mean), list(ds.std)) == (m["mean"], m["std"])


def test_second_prepare_is_a_noop_and_a_changed_file_is_a_new_folder(folder, cache):
    first, wrote = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    stamp = (first.folder / "manifest.json").stat().st_mtime_ns
    again, wrote_again = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    assert wrote and not wrote_again and again.folder == first.folder
    assert (first.folder / "manifest.json").stat().st_mtime_ns == stamp
    other_size, _ = prepare("imagefolder", str(folder), 16, cache=cache, workers=1, progress=False)
    assert other_size.folder != first.folder and other_size.manifest["resolution"] == 16
    target = folder / "train" / "dog" / "000.jpg"
    target.write_bytes(target.read_bytes() + b"\0")  # same image, different bytes: a new source identity
    changed, wrote_changed = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    assert wrote_changed and changed.folder not in (first.folder, other_size.folder)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        p.folder.name for p in (first, other_size, changed)
    )


def _prepare_in_child(barrier, queue, folder, cache):
    barrier.wait()  # both processes call prepare at the same moment
    prep, wrote = prepare("imagefolder", folder, SIZE, cache=cache, workers=1, progress=False)
    queue.put((str(prep.folder), wrote))


def test_concurrent_preparers_write_one_folder(folder, cache):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # torch is already imported here: forked children start in milliseconds
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(barrier, queue, str(folder), str(cache))) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[0][0] == results[1][0]
    assert sorted(w for _, w in results) == [False, True]  # exactly one of them prepared it
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [Path(results[0][0]).name]
    # a preparer finding the lock held waits for it, then takes the finished folder without writing
    import fcntl

    lock = cache / f".{Path(results[0][0]).name}.lock"
    (Path(results[0][0]) / "manifest.json").unlink()  # force the slow path (lock) in the child
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        barrier = ctx.Barrier(1)
        child = ctx.Process(target=_prepare_in_child, args=(barrier, queue, str(folder), str(cache)))
        child.start()
        child.join(timeout=1.0)
        assert child.exitcode is None  # still blocked on the lock
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert queue.get(timeout=120) == (results[0][0], True)
    child.join(timeout=60)
    assert child.exitcode == 0 and is_complete(results[0][0])


def test_half_written_folders_are_never_accepted(folder, cache):
    prep, _ = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    manifest = json.loads((prep.folder / "manifest.json").read_text())
    # a crashed preparer's temp folder (arrays, no manifest) is not a dataset
    tmp = cache / f".tmp-{prep.folder.name}-host-1"
    tmp.mkdir()
    (tmp / "train").mkdir()
    np.save(tmp / "train" / "images.npy", np.zeros((18, 3, SIZE, SIZE), np.uint8))
    assert not is_complete(tmp)
    with pytest.raises(BenchError, match="not a complete prepared dataset"):
        open_prepared(tmp)
    # the final folder with an incomplete manifest, or truncated arrays, is refused and re-prepared
    for damage in ("manifest", "truncate"):
        if damage == "manifest":
            (prep.folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
        else:
            with open(prep.folder / "train" / "images.npy", "r+b") as fh:
                fh.truncate(1000)
        assert not is_complete(prep.folder)
        redo, wrote = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
        assert wrote and redo.folder == prep.folder and is_complete(redo.folder)
        assert not tmp.exists()  # stale temp folders are removed by the next lock holder


def test_loader_order_is_a_function_of_seed_epoch_step_and_ranks_partition_it(folder, cache):
    from masking_bench.data import Split, TensorLoader

    prep, _ = prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    train = prep.split("train")
    a, b = PreparedLoader(train, 6, seed=3), PreparedLoader(prep.folder / "train", 6, seed=3, io="mmap")
    assert len(a) == 3
    for epoch in (0, 1):
        for step in range(len(a)):
            (xa, ya), (xb, yb) = a.batch(epoch, step), b.batch(epoch, step)
            assert xa.dtype == torch.uint8 and xa.shape == (6, 3, SIZE, SIZE)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert [torch.equal(x, a.batch(epoch, s)[0]) for s, (x, _) in enumerate(a.batches(epoch))] == [True] * 3
        resumed = list(a.batches(epoch, start_step=2))
        assert len(resumed) == 1 and torch.equal(resumed[0][0], a.batch(epoch, 2)[0])
    assert not np.array_equal(a.order(0), a.order(1))
    # the epoch order is TensorLoader's, so a world-1 run reads the images the in-RAM trainer reads
    imgs = torch.from_numpy(np.array(train.images))
    ref = TensorLoader(Split(imgs, torch.from_numpy(np.array(train.labels))), 6, [0.5] * 3, [0.5] * 3, seed=3)
    assert np.array_equal(a.order(1), ref.order(1).numpy())
    # world_size 2: each rank reads its contiguous half of every global batch, the union is the epoch
    ranks = [PreparedLoader(train, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for step in range(len(a)):
        shares = [r.indices(1, step) for r in ranks]
        assert [len(s) for s in shares] == [3, 3] and not set(shares[0]) & set(shares[1])
        assert np.array_equal(np.concatenate(shares), a.indices(1, step))
        assert torch.equal(torch.cat([r.batch(1, step)[0] for r in ranks]), a.batch(1, step)[0])
        seen += [*shares[0], *shares[1]]
    assert sorted(seen) == list(range(18)) and len(seen) == len(set(seen))
    # a train_subset: the rows a mapped Split.subset keeps (what the trainer hands the loader) are the
    # images an in-memory Split.subset keeps
    rows = Split(imgs, torch.arange(18), mapped=True).subset(12, seed=5).rows.numpy()
    sub = PreparedLoader(train, 4, seed=3, rows=rows)
    assert len(sub) == 3 and set(np.concatenate([sub.indices(0, s) for s in range(3)])) == set(rows.tolist())
    assert np.array_equal(rows, Split(imgs, torch.arange(18)).subset(12, seed=5).labels.numpy())
    with pytest.raises(BenchError, match="multiple of world_size"):
        PreparedLoader(train, 5, world_size=2)


def test_missing_or_empty_roots_are_one_line_errors(tmp_path, cache):
    with pytest.raises(DataMissingError, match=r"train/<class>/ and val/<class>/"):
        prepare("imagefolder", str(tmp_path / "nowhere"), SIZE, cache=cache)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataMissingError, match=r"is empty .*\.jpg"):
        prepare("imagefolder", str(tmp_path / "empty"), SIZE, cache=cache)
    with pytest.raises(BenchError, match="accepted are imagefolder, fashion_mnist, cifar10"):
        prepare("synthetic", None, SIZE, cache=cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_corrupt_image_and_unguarded_worker_are_one_line_errors(folder, cache, monkeypatch):
    import multiprocessing as mp

    (folder / "val" / "emu" / "009.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BenchError, match=r"cannot decode image '.*009\.jpg'"):
        prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)
    # a worker re-importing an unguarded main script must fail, not wait on the lock forever
    monkeypatch.setattr(mp.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(BenchError, match="__name__ == '__main__'"):
        prepare("imagefolder", str(folder), SIZE, cache=cache, workers=1, progress=False)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv(PREPARED_ENV, raising=False)
    assert cache_root(tmp_path) == tmp_path / "prepared" and cache_root() == Path("results/prepared")
    monkeypatch.setenv(PREPARED_ENV, str(tmp_path / "shared"))
    assert cache_root(tmp_path) == tmp_path / "shared"


def test_decode_matches_rgb_conversion(folder):
    img = decode(str(folder / "train" / "cat" / "002.png"), SIZE)  # RGBA png -> 3 channels
    assert img.shape == (3, SIZE, SIZE) and img.dtype == np.uint8


@pytest.mark.skipif(not have_fashion_mnist(), reason=f"Fashion-MNIST not in {FASHION_DIR}")
def test_fashion_mnist_prepares_to_load_dataset_tensors(fashion, cache):
    prep, wrote = prepare("fashion_mnist", str(FASHION_DIR), None, cache=cache, progress=False)
    assert wrote and prep.manifest["mode"] == "L" and prep.manifest["splits"]["train"]["count"] == 60000
    train, val = prep.split("train"), prep.split("val")
    assert train.images.shape == (60000, 1, 28, 28) and val.images.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(train.images, fashion.train.images.numpy())
    np.testing.assert_array_equal(train.labels, fashion.train.labels.numpy())
    np.testing.assert_array_equal(val.images, fashion.test.images.numpy())
    assert prep.manifest["mean"] == list(fashion.mean) and prep.manifest["std"] == list(fashion.std)
    again, wrote_again = prepare("fashion_mnist", str(FASHION_DIR), None, cache=cache, progress=False)
    assert not wrote_again and again.folder == prep.folder


def test_cli_prepare(folder, tmp_path, monkeypatch, capsys):
    from masking_bench.cli import main

    suite = {"name": "prep", "data": {"name": "imagefolder", "root": str(folder), "image_size": SIZE},
             "strategies": ["random"], "ratios": [0.75], "seeds": [0]}  # fmt: skip
    monkeypatch.setenv(PREPARED_ENV, str(tmp_path / "shared"))
    assert main(["prepare", str(write_suite(tmp_path, suite)), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "24 images" in out and str(tmp_path / "shared") in out and "img/s" in out
    assert is_complete(Path(out.split()[0]))
    assert main(["prepare", str(write_suite(tmp_path, suite)), "--no-progress"]) == 0
    assert "already prepared" in capsys.readouterr().out
    suite["data"]["root"] = str(tmp_path / "missing")
    assert main(["prepare", str(write_suite(tmp_path, suite, "bad"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ImageFolder") and "val/<class>/" in err
