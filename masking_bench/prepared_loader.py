"""Reading prepared folders (:mod:`masking_bench.prepared`): the split arrays, and a loader of uint8 batches by index.

The order is a pure function of (seed, epoch, step): the epoch's permutation is the one
:class:`masking_bench.data.TensorLoader` draws (:func:`masking_bench.data.epoch_order`), global step
``s`` is ``order[s * B:(s + 1) * B]`` (``B`` the global batch) and DDP rank ``r`` of ``W`` reads the
contiguous share ``[r * B / W, (r + 1) * B / W)`` of it — the rows the trainer's ``forward_losses``
narrows to. Augmentation and normalisation stay with the trainer, on the device.

Memory: with ``io="pread"`` (default) an image is copied from the page cache into the batch buffer by
``os.preadv``; nothing is mapped, so the process's resident memory is the batch plus the O(N) int64
permutation (8 bytes per image) whatever the dataset's size. With ``io="mmap"`` (NumPy fancy indexing
on the memmap) every page read stays mapped and counts as ``RssFile`` until unmapped: shared,
clean and reclaimable, but it shows in VmRSS and grows to the dataset's size over an epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import BatchTransform, epoch_order
from .errors import BenchError

FORMAT_VERSION = 1  # of the prepared folders written by masking_bench.prepared


@dataclass
class PreparedSplit:
    """One prepared split: ``images`` a read-only uint8 memmap (N, C, S, S), ``labels`` int64 memmap (N,)."""

    path: Path
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def data_offset(self) -> int:
        """Byte offset of image 0 in ``images.npy`` (for ``os.pread``)."""
        return int(self.images.offset)


@dataclass
class Prepared:
    """An opened, complete prepared folder."""

    folder: Path
    manifest: dict

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.manifest["splits"].values())

    def split(self, name: str = "train") -> PreparedSplit:
        base = self.folder / name
        return PreparedSplit(
            base, np.load(base / "images.npy", mmap_mode="r"), np.load(base / "labels.npy", mmap_mode="r")
        )

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


def is_complete(folder: str | Path) -> bool:
    """True only for a folder whose manifest says complete and whose arrays have the manifest's shapes."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_VERSION or manifest.get("complete") is not True:
            return False
        for name, info in manifest["splits"].items():
            images = np.load(folder / name / "images.npy", mmap_mode="r")
            labels = np.load(folder / name / "labels.npy", mmap_mode="r")
            expect = info["count"] * int(np.prod(info["shape"][1:]))
            if list(images.shape) != info["shape"] or len(labels) != info["count"] or images.size != expect:
                return False
            if (folder / name / "images.npy").stat().st_size < images.offset + expect:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def open_prepared(folder: str | Path) -> Prepared:
    """Open a complete prepared folder; a partial one (no or incomplete manifest) is refused."""
    folder = Path(folder)
    if not is_complete(folder):
        raise BenchError(
            f"'{folder}' is not a complete prepared dataset (format {FORMAT_VERSION}): run "
            "`python -m masking_bench prepare SUITE.yaml`"
        )
    return Prepared(folder, json.loads((folder / "manifest.json").read_text()))


class PreparedLoader:
    """Seeded, resumable, rank-sharded uint8 batches from a prepared split.

    ``batch_size`` is the global batch (as ``train.batch_size``); each rank yields ``batch_size //
    world_size`` images per step. ``rows`` restricts the split to those rows (a ``train_subset``).
    """

    def __init__(
        self,
        split: PreparedSplit | str | Path,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        rows: np.ndarray | None = None,
        io: str = "pread",
    ):
        if not isinstance(split, PreparedSplit):
            path = Path(split)
            split = open_prepared(path.parent).split(path.name)
        if batch_size % world_size or not 0 <= rank < world_size:
            raise BenchError(f"batch_size {batch_size} must be a multiple of world_size {world_size} > rank {rank}")
        if io not in ("pread", "mmap"):
            raise BenchError(f"io '{io}' is not one of pread, mmap")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last, self.io = rank, world_size, shuffle, drop_last, io
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = len(split) if self.rows is None else len(self.rows)
        self.item_shape = tuple(split.images.shape[1:])
        self.item_bytes = int(np.prod(self.item_shape))
        self.offset = split.data_offset
        self._fd: int | None = None
        if self.n < batch_size and drop_last:
            raise BenchError(f"batch_size {batch_size} is larger than the {self.n} images")

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def order(self, epoch: int) -> np.ndarray:
        """Row numbers of the split in the order of ``epoch`` (TensorLoader's permutation)."""
        perm = epoch_order(self.n, self.seed, epoch, self.shuffle).numpy()
        return perm if self.rows is None else self.rows[perm]

    def indices(self, epoch: int, step: int, order: np.ndarray | None = None) -> np.ndarray:
        """This rank's row numbers at (epoch, step)."""
        order = self.order(epoch) if order is None else order
        lo = step * self.batch_size
        hi = min(lo + self.batch_size, self.n)
        share = -(-(hi - lo) // self.world_size)
        return order[lo + self.rank * share : min(lo + (self.rank + 1) * share, hi)]

    def read(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (len(idx), C, S, S) and labels int64 of rows ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        labels = torch.from_numpy(np.asarray(self.split.labels[idx], dtype=np.int64))
        if self.io == "mmap":
            return torch.from_numpy(np.ascontiguousarray(self.split.images[idx])), labels
        if self._fd is None:
            self._fd = os.open(self.split.path / "images.npy", os.O_RDONLY)
        out = np.empty((len(idx), *self.item_shape), dtype=np.uint8)
        flat = out.reshape(len(idx), -1)
        for j in np.argsort(idx, kind="stable"):  # ascending file offsets: friendlier to read-ahead
            got = os.preadv(self._fd, [flat[j]], self.offset + int(idx[j]) * self.item_bytes)
            if got != self.item_bytes:
                raise BenchError(f"short read of image {idx[j]} in {self.split.path / 'images.npy'}")
        return torch.from_numpy(out), labels

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(self.indices(epoch, step))

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's ``(uint8 images, labels)`` from step ``start_step`` of ``epoch``."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            yield self.read(self.indices(epoch, step, order))


class PreparedTrainLoader:
    """The trainer's batches from a prepared split, the same as :class:`masking_bench.data.TensorLoader`'s.

    Each DDP rank reads only its share of the global batch from the file (:class:`PreparedLoader`);
    the shares are then gathered, so every rank holds the global uint8 batch (the masking plan is made
    on the global batch, :func:`masking_bench.step.forward_losses`), and the batch is augmented and
    normalised on the device by the loader's own :class:`masking_bench.data.BatchTransform`. Same
    order, same crops, same bytes: the numbers of an in-memory run, at any world size.
    """

    def __init__(
        self,
        split_dir: str | Path,
        rows: torch.Tensor | None,
        batch_size: int,
        mean,
        std,
        device: torch.device,
        seed: int = 0,
        augment=None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.reader = PreparedLoader(
            split_dir, batch_size, seed, rank, world_size, rows=None if rows is None else rows.numpy()
        )
        self.device, self.world_size = device, world_size
        self.transform = BatchTransform(mean, std, self.reader.item_shape[0], device, seed, augment)

    def __len__(self) -> int:
        return len(self.reader)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the global ``(images float (B,C,H,W) normalised, labels)`` from step ``start_step`` of ``epoch``."""
        order = self.reader.order(epoch)
        for step in range(start_step, len(self)):
            x, y = self.reader.read(self.reader.indices(epoch, step, order))
            x = self._gather(x.to(self.device, non_blocking=True))
            y = self._gather(y.to(self.device, non_blocking=True))
            yield self.transform(x, epoch, step), y
