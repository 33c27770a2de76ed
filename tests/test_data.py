"""Datasets and the tensor loader: IDX files, missing-data errors, shuffling, resume, augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import DATA_ENV, FASHION_DIR

from masking_bench.data import (
    Augment,
    TensorLoader,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_imagefolder,
    make_synthetic,
    random_resized_crop,
)
from masking_bench.errors import BenchError, DataMissingError

# ------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_idx_files(fashion):
    assert fashion.name == "fashion_mnist"
    assert fashion.train.images.shape == (60000, 1, 28, 28)
    assert fashion.test.images.shape == (10000, 1, 28, 28)
    assert fashion.train.images.dtype == torch.uint8 and fashion.test.images.dtype == torch.uint8
    assert fashion.train.labels.shape == (60000,) and fashion.test.labels.shape == (10000,)
    assert fashion.train.labels.dtype == torch.int64
    for split, per_class in ((fashion.train, 6000), (fashion.test, 1000)):
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert torch.equal(torch.bincount(split.labels, minlength=10), torch.full((10,), per_class))
    assert fashion.num_classes == 10 and fashion.channels == 1 and fashion.image_size == 28
    # real images, not zeros: Fashion-MNIST's pixel mean is ~0.286, std ~0.353
    assert 0.27 < fashion.mean[0] < 0.30 and 0.34 < fashion.std[0] < 0.37
    assert fashion.train.images.max() == 255 and fashion.train.images.min() == 0


def test_fashion_mnist_via_env_var_and_default(monkeypatch, fashion):
    monkeypatch.setenv(DATA_ENV, str(FASHION_DIR))
    via_env = load_fashion_mnist()
    assert torch.equal(via_env.test.labels, fashion.test.labels)


@pytest.mark.parametrize("how", ["env", "root"])
def test_missing_fashion_mnist_is_one_helpful_line(tmp_path, monkeypatch, how):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    if how == "env":
        monkeypatch.setenv(DATA_ENV, str(empty))
        call = load_fashion_mnist
    else:

        def call():
            return load_fashion_mnist(str(empty))

    with pytest.raises(DataMissingError) as err:
        call()
    msg = str(err.value)
    assert isinstance(err.value, BenchError)
    assert "dataset-fashion-mnist" in msg and "MASKING_BENCH_DATA_DIR" in msg and str(empty) in msg
    assert "\n" not in msg
    with pytest.raises(DataMissingError):
        load_dataset("fashion_mnist", str(empty) if how == "root" else None)


def test_root_argument_wins_over_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(FASHION_DIR))
    with pytest.raises(DataMissingError, match="nothing"):
        load_fashion_mnist(str(tmp_path / "nothing"))


def test_partial_idx_folder_names_the_missing_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # only presence is checked before reading
    with pytest.raises(DataMissingError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist(str(tmp_path))


def test_missing_data_message_names_the_real_suite_field(tmp_path):
    with pytest.raises(DataMissingError) as err:
        load_fashion_mnist(str(tmp_path))
    assert "data.root" in str(err.value) and "dataset.root" not in str(err.value)


# ---------------------------------------------------------------------------- other sources


def test_cifar10_and_imagefolder_missing_root(tmp_path):
    with pytest.raises(DataMissingError, match="never downloads"):
        load_cifar10(None)
    with pytest.raises(DataMissingError, match="data_batch_1"):
        load_cifar10(str(tmp_path))
    with pytest.raises(DataMissingError, match="train/<class>"):
        load_imagefolder(None, 32)
    with pytest.raises(DataMissingError, match="train/<class>"):
        load_imagefolder(str(tmp_path), 32)
    with pytest.raises(DataMissingError):
        load_dataset("cifar10", str(tmp_path))


def _fake_cifar(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = {"data": rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh)


def test_cifar10_python_layout(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10(str(tmp_path))
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.train.images.dtype == torch.uint8 and len(ds.mean) == 3


def test_cifar10_found_through_the_env_var(tmp_path, monkeypatch):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_cifar10(None).train.images.shape == (20, 3, 32, 32)


def _fake_imagefolder(root):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 36), (i * 50, 100, 200 if cls == "a" else 0)).save(
                    root / split / cls / f"{i}.png"
                )


def test_imagefolder_layout(tmp_path):
    _fake_imagefolder(tmp_path)
    ds = load_imagefolder(str(tmp_path), 16)
    assert ds.train.images.shape == (4, 3, 16, 16) and ds.test.images.shape == (4, 3, 16, 16)
    assert ds.num_classes == 2 and sorted(ds.train.labels.tolist()) == [0, 0, 1, 1]


def test_imagefolder_found_through_the_env_var(tmp_path, monkeypatch):
    _fake_imagefolder(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_imagefolder(None, 16).num_classes == 2


def test_unknown_dataset_names_the_accepted_ones():
    with pytest.raises(BenchError, match="fashion_mnist, imagefolder, cifar10, synthetic"):
        load_dataset("mnist")


def test_synthetic_dataset():
    ds = make_synthetic(n_train=64, n_test=32, size=16, channels=3, num_classes=4, seed=1)
    assert ds.train.images.shape == (64, 3, 16, 16) and ds.test.images.shape == (32, 3, 16, 16)
    assert ds.train.images.dtype == torch.uint8
    assert set(ds.train.labels.tolist()) <= {0, 1, 2, 3} and len(set(ds.train.labels.tolist())) == 4
    again = make_synthetic(n_train=64, n_test=32, size=16, channels=3, num_classes=4, seed=1)
    assert torch.equal(ds.train.images, again.train.images)
    assert not torch.equal(
        ds.train.images, make_synthetic(n_train=64, n_test=32, size=16, channels=3, seed=2).train.images
    )
    assert load_dataset("synthetic", image_size=32).train.images.shape[1:] == (1, 32, 32)


def test_subset_is_seeded_and_fixed(fashion):
    a = fashion.train.subset(500, seed=3)
    b = fashion.train.subset(500, seed=3)
    c = fashion.train.subset(500, seed=4)
    assert len(a) == 500 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert fashion.train.subset(None) is fashion.train


# --------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def small(fashion):
    return fashion.train.subset(1000, seed=0)


def loader(fashion, split, **kw):
    kw.setdefault("batch_size", 64)
    return TensorLoader(split, mean=fashion.mean, std=fashion.std, **kw)


def test_batch_shapes_and_drop_last(fashion, small):
    ld = loader(fashion, small, seed=0, augment=Augment())
    batches = list(ld.batches(0))
    assert len(ld) == 1000 // 64 == len(batches) == 15
    for x, y in batches:
        assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (64,) and y.dtype == torch.int64
        assert torch.isfinite(x).all()
    keep_all = loader(fashion, small, seed=0, drop_last=False, shuffle=False)
    sizes = [x.shape[0] for x, _ in keep_all.batches(0)]
    assert len(keep_all) == 16 and sizes == [64] * 15 + [1000 - 15 * 64]
    with pytest.raises(BenchError, match="batch_size"):
        loader(fashion, small.subset(10), batch_size=64)


def test_normalisation_over_unaugmented_data(fashion):
    ld = loader(fashion, fashion.train, batch_size=10000, shuffle=False)
    x = torch.cat([b for b, _ in ld.batches(0)])
    assert x.shape[0] == 60000
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert -1.0 < x.min().item() < -0.7 and 2.0 < x.max().item() < 2.2  # (0 - .286)/.353, (1 - .286)/.353


def test_unshuffled_unaugmented_batches_are_the_images(fashion, small):
    ld = loader(fashion, small, shuffle=False)
    x, y = next(ld.batches(0))
    raw = small.images[:64].float() / 255
    assert torch.allclose(x, (raw - fashion.mean[0]) / fashion.std[0], atol=1e-5)
    assert torch.equal(y, small.labels[:64])


def test_order_is_seeded_per_epoch(fashion, small):
    a = loader(fashion, small, seed=1, augment=Augment())
    b = loader(fashion, small, seed=1, augment=Augment())
    assert torch.equal(a.order(0), b.order(0))
    assert sorted(a.order(0).tolist()) == list(range(1000))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), loader(fashion, small, seed=2).order(0))
    xa, ya = next(a.batches(3))
    xb, yb = next(b.batches(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same crops too
    xc, yc = next(a.batches(4))
    assert not torch.equal(ya, yc)


def test_resume_mid_epoch_yields_the_tail(fashion, small):
    ld = loader(fashion, small, seed=5, augment=Augment())
    full = list(ld.batches(2))
    for k in (0, 1, 7, 14, 15):
        tail = list(ld.batches(2, start_step=k))
        assert len(tail) == len(full) - k
        for (x, y), (fx, fy) in zip(tail, full[k:], strict=True):
            assert torch.equal(x, fx) and torch.equal(y, fy)


def test_augmentation_changes_images_but_not_labels(fashion, small):
    plain = next(loader(fashion, small, seed=0).batches(0))
    aug = next(loader(fashion, small, seed=0, augment=Augment()).batches(0))
    assert torch.equal(plain[1], aug[1])
    assert not torch.allclose(plain[0], aug[0], atol=1e-3)


# ------------------------------------------------------------------------------- augmentation


def test_random_resized_crop_full_scale_no_flip_is_identity(small):
    x = small.images[:32].float()
    out = random_resized_crop(
        x, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False), torch.Generator().manual_seed(0)
    )
    assert out.shape == x.shape
    assert (out - x).abs().max() < 1e-3


def test_random_resized_crop_flip_only_mirrors(small):
    x = small.images[:256].float()
    out = random_resized_crop(
        x, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True), torch.Generator().manual_seed(1)
    )
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-3
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert (same | mirrored).all()
    assert 0.35 < mirrored.float().mean() < 0.65


def test_random_resized_crop_small_scale_zooms_in(small):
    x = small.images[:64].float()
    out = random_resized_crop(
        x, Augment(scale=(0.2, 0.2), ratio=(1.0, 1.0), flip=False), torch.Generator().manual_seed(2)
    )
    assert out.shape == x.shape
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 1.0  # every image changed
    g = torch.Generator().manual_seed(2)
    again = random_resized_crop(x, Augment(scale=(0.2, 0.2), ratio=(1.0, 1.0), flip=False), g)
    assert torch.equal(out, again)
