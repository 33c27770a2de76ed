"""Datasets held in memory as uint8 tensors, and a tensor-resident loader with on-device augmentation.

Sources: Fashion-MNIST from its original IDX files (the embedded default, Debian package
``dataset-fashion-mnist``), an ImageFolder tree or a CIFAR-10 python-pickle folder for users'
own data (never downloaded), and a small generated synthetic set for fast tests.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import BenchError, DataMissingError

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "MASKING_BENCH_DATA_DIR"
DATASET_NAMES = ("fashion_mnist", "imagefolder", "cifar10", "synthetic")


@dataclass
class Split:
    """One split: images uint8 (N, C, H, W), labels int64 (N,).

    In memory, or *mapped* (``mapped=True``): ``images`` then views a prepared file
    (:mod:`masking_bench.prepared`) and ``rows`` names the images of it that belong to the split
    (None: all), so a subset never copies images and memory does not grow with the dataset.
    """

    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor | None = None
    mapped: bool = False

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, lo: int, hi: int) -> torch.Tensor:
        """Images of positions ``lo..hi`` (a copy for a mapped split, else a view)."""
        return self.images[lo:hi] if self.rows is None else self.images[self.rows[lo:hi]]

    def select(self, idx: torch.Tensor) -> Split:
        """The split made of positions ``idx`` (mapped: rows of the same file, no image copied)."""
        if not self.mapped:
            return Split(self.images[idx], self.labels[idx])
        return Split(self.images, self.labels[idx], idx if self.rows is None else self.rows[idx], True)

    def subset(self, n: int | None, seed: int = 0) -> Split:
        """A fixed, seeded, class-agnostic subset of ``n`` images (all of them when n is None)."""
        if n is None or n >= len(self):
            return self
        return self.select(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


@dataclass
class Dataset:
    """A train and a test split plus the per-channel normalisation statistics of the train split."""

    name: str
    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    prepared: str | None = None  # the prepared folder the splits are mapped from (masking_bench/prepared.py)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ----------------------------------------------------------------------------------------- sources


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise BenchError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(dims)


def resolve_data_dir(configured: str | None, default: str) -> Path:
    """Suite field wins, then $MASKING_BENCH_DATA_DIR, then the built-in default."""
    return Path(configured or os.environ.get(DATA_DIR_ENV) or default)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(root: str | None = None) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from the original IDX files."""
    path = resolve_data_dir(root, DEFAULT_FASHION_DIR)
    stems = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    files = {key: _find_idx(path, stem) for key, stem in stems.items()}
    missing = [stems[k] for k, f in files.items() if f is None]
    if missing:
        raise DataMissingError(
            f"Fashion-MNIST not found in {path} (missing {missing[0]}[.gz]): install the Debian package "
            f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or point ${DATA_DIR_ENV} "
            f"or the suite field data.root at a folder holding the four IDX files"
        )
    train = Split(_read_idx(files["train_x"]).unsqueeze(1), _read_idx(files["train_y"]).long())
    test = Split(_read_idx(files["test_x"]).unsqueeze(1), _read_idx(files["test_y"]).long())
    return _with_stats("fashion_mnist", train, test, num_classes=10)


def load_cifar10(root: str | None) -> Dataset:
    """CIFAR-10 from the python-pickle layout (``data_batch_1..5``, ``test_batch``); never downloads."""
    path = resolve_data_dir(root, "")
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / n).is_file() for n in names + ["test_batch"]):
        raise DataMissingError(
            f"CIFAR-10 not found in '{folder}': set data.root (or ${DATA_DIR_ENV}) to a folder with "
            "data_batch_1..5 and test_batch (the python version); masking_bench never downloads data"
        )

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for name in files:
            with open(folder / name, "rb") as fh:
                blob = pickle.load(fh, encoding="latin1")
            xs.append(torch.as_tensor(blob["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(blob["labels"], dtype=torch.long))
        return Split(torch.cat(xs), torch.cat(ys))

    return _with_stats("cifar10", read(names), read(["test_batch"]), num_classes=10)


def load_imagefolder(root: str | None, image_size: int, cache: str | Path | None = None) -> Dataset:
    """``root/train/<class>/*`` and ``root/val|test/<class>/*`` at ``image_size``, held in memory.

    Decoded once into a prepared folder (:func:`masking_bench.prepared.prepare`, in parallel) and
    read from there, so in memory or mapped, an ImageFolder run sees the same bytes and statistics.
    """
    return load_dataset("imagefolder", root, image_size, storage="memory", cache=cache)


def from_prepared(folder: str | Path, mapped: bool = True) -> Dataset:
    """A dataset read from a complete prepared folder: mapped (images stay in the file, read by index)
    or copied into memory; normalisation statistics and classes from its manifest."""
    import numpy as np

    from .prepared_loader import open_prepared

    prep = open_prepared(folder)

    def split(name: str) -> Split:
        base = prep.folder / name
        labels = torch.from_numpy(np.load(base / "labels.npy"))
        if mapped:  # copy-on-write: a writable view for torch, nothing ever written back
            return Split(torch.from_numpy(np.load(base / "images.npy", mmap_mode="c")), labels, mapped=True)
        return Split(torch.from_numpy(np.load(base / "images.npy")), labels)

    m = prep.manifest
    return Dataset(
        m["dataset"],
        split("train"),
        split("val"),
        tuple(m["mean"]),
        tuple(m["std"]),
        m["num_classes"],
        str(prep.folder),
    )


def make_synthetic(
    n_train: int = 512, n_test: int = 256, size: int = 28, channels: int = 1, num_classes: int = 4, seed: int = 0
) -> Dataset:
    """A generated, learnable dataset: each class is an oriented stripe pattern plus noise and a blob."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> Split:
        labels = torch.randint(num_classes, (n,), generator=g)
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        angle = labels.float()[:, None, None] * (torch.pi / num_classes)
        phase = torch.rand(n, 1, 1, generator=g) * 6.28
        stripes = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.8 + phase)
        cy, cx = torch.rand(2, n, 1, 1, generator=g) * size
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
        img = 0.5 + 0.3 * stripes + 0.3 * blob + 0.05 * torch.randn(n, size, size, generator=g)
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(img[:, None].expand(n, channels, size, size).contiguous(), labels)

    return _with_stats("synthetic", draw(n_train), draw(n_test), num_classes=num_classes)


def _with_stats(name: str, train: Split, test: Split, num_classes: int) -> Dataset:
    x = train.images.float() / 255.0
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).tolist())
    return Dataset(name, train, test, mean, std, num_classes)


STORAGES = ("auto", "memory", "prepared")


def load_dataset(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    storage: str = "auto",
    cache: str | Path | None = None,
) -> Dataset:
    """Load a dataset by its suite name.

    ``storage``: ``memory`` holds the images in RAM; ``prepared`` maps them from a prepared folder
    (made first if missing, under ``cache``: :func:`masking_bench.prepared.cache_root`); ``auto`` is
    ``prepared`` for an ImageFolder tree and ``memory`` for the small built-in sets. The bytes and
    the statistics are the same either way. Synthetic data is generated in memory whatever the storage.
    """
    if name not in DATASET_NAMES:
        raise BenchError(f"unknown dataset '{name}': accepted are {', '.join(DATASET_NAMES)}")
    if storage not in STORAGES:
        raise BenchError(f"unknown data storage '{storage}': accepted are {', '.join(STORAGES)}")
    if name == "synthetic":
        return make_synthetic(size=image_size or 28)
    if storage == "auto":
        storage = "prepared" if name == "imagefolder" else "memory"
    if storage == "memory" and name == "fashion_mnist":
        return load_fashion_mnist(root)
    if storage == "memory" and name == "cifar10":
        return load_cifar10(root)
    from .prepared import prepare

    prepared, _ = prepare(name, root, image_size, cache, progress=sys.stderr.isatty())
    return from_prepared(prepared.folder, mapped=storage == "prepared")


# ------------------------------------------------------------------------------------------ loader


@dataclass(frozen=True)
class Augment:
    """MAE pre-training augmentation: RandomResizedCrop(scale, ratio) + horizontal flip."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def random_resized_crop(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Batched RandomResizedCrop + flip with one affine ``grid_sample`` (bilinear) for the whole batch.

    Per image: area fraction ~ U(scale), log aspect ~ U(log ratio); crops that do not fit are
    shrunk to fit (torchvision retries then falls back to a centre crop; the effect is the same
    family of crops). The crop centre is uniform over the positions where the crop fits.
    """
    n, dev = x.shape[0], x.device
    u = torch.rand(n, 5, generator=generator, device=dev)
    area = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[:, 0]
    log_lo, log_hi = torch.log(torch.tensor(aug.ratio, device=dev))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (w - 1) + (2 - 2 * w) * u[:, 2]  # centre in [-1 + w, 1 - w] (normalised coords)
    cy = (h - 1) + (2 - 2 * h) * u[:, 3]
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if aug.flip else torch.ones_like(w)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TensorLoader:
    """Batches from a split: seeded per-epoch shuffling, normalisation and augmentation on device.

    A small split is moved to the device once; a batch is then one index, one cast and one
    ``grid_sample`` — no per-image Python. A big one (ImageNet-scale) stays in host memory and a
    mapped one in its file; their batches are gathered one at a time. ``drop_last`` keeps every
    step the same size (needed for identical per-step cost and exact resume).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean,
        std,
        device: torch.device | str = "cpu",
        seed: int = 0,
        augment: Augment | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        max_device_bytes: int = 2 << 30,
    ):
        self.device = torch.device(device)
        self.rows = split.rows
        item_bytes = split.images[0].nbytes if len(split.images) else 0
        small = item_bytes * len(split) <= max_device_bytes
        if split.mapped and small:  # a small mapped split: copied once, as an in-memory one
            images = split.take(0, len(split))
            split = Split(images.clone() if split.rows is None else images, split.labels)
            self.rows = None
        self.storage = self.device if small and not split.mapped else torch.device("cpu")
        self.images = split.images.to(self.storage)
        self.labels = split.labels.to(self.storage)
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.transform = BatchTransform(mean, std, self.images.shape[1], self.device, seed, augment)
        if len(split) < batch_size and drop_last:
            raise BenchError(f"batch_size {batch_size} is larger than the {len(split)} training images")

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The image order of ``epoch``: a pure function of (seed, epoch)."""
        return epoch_order(self.labels.shape[0], self.seed, epoch, self.shuffle)

    def batches(self, epoch: int, start_step: int = 0):
        """Yield ``(images float (B,C,H,W) normalised, labels)`` from step ``start_step`` of ``epoch``."""
        order = self.order(epoch).to(self.storage)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            images = self.images[idx if self.rows is None else self.rows[idx.cpu()]]
            x = images.to(self.device, non_blocking=True)
            yield self.transform(x, epoch, step), self.labels[idx].to(self.device, non_blocking=True)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Positions ``0..n-1`` in the order of ``epoch``: a pure function of (n, seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class BatchTransform:
    """uint8 batch on the device -> augmented (crop + flip, seeded per (seed, epoch, step)), normalised float."""

    def __init__(self, mean, std, channels: int, device: torch.device, seed: int, augment: Augment | None):
        self.mean = torch.tensor(mean, device=device).view(1, channels, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, channels, 1, 1) * 255.0)
        self.seed, self.augment = seed, augment
        self.gen = torch.Generator(device=device)

    def __call__(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        x = x.float()
        if self.augment is not None:
            # one generator state per (seed, epoch, step): resuming mid-epoch replays the same crops
            self.gen.manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + step)
            x = random_resized_crop(x, self.augment, self.gen)
        return (x - self.mean) * self.inv_std
