"""Datasets decoded once into a content-addressed, memory-mappable folder shared by every run and job.

One prepared folder, ``<cache>/<dataset>-<S>px-<digest>/``::

    manifest.json        written last; a folder without a complete manifest is never read
    train/images.npy     uint8 (N, C, S, S), NumPy .npy: np.load(path, mmap_mode="r")
    train/labels.npy     int64 (N,)
    val/images.npy       the ImageFolder val/ (or test/) split; Fashion-MNIST's / CIFAR's test split
    val/labels.npy

``<digest>`` hashes the source identity (sorted relative paths + sizes + mtimes of an ImageFolder
tree; the decoded bytes of Fashion-MNIST / CIFAR-10), the storage resolution and
:data:`FORMAT_VERSION`. The cache is ``$MASKING_BENCH_PREPARED``, else ``<results>/prepared``.
Preparation runs under an exclusive ``fcntl.flock`` on ``<cache>/.<folder>.lock``, writes into
``<cache>/.tmp-<folder>-<host>-<pid>`` and renames it into place, so concurrent preparers (processes,
SLURM array jobs on a shared file system with working flock) prepare once and never read a half-written folder.

ImageFolder images are decoded exactly as :func:`masking_bench.data.load_imagefolder` does (PIL ->
RGB -> tensor -> ``v2.Resize(S, antialias=True)`` -> ``v2.CenterCrop(S)``), in parallel processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BenchError, DataMissingError
from .prepared_loader import FORMAT_VERSION, Prepared, PreparedSplit, is_complete, open_prepared

__all__ = ["FORMAT_VERSION", "Prepared", "PreparedSplit", "cache_root", "decode", "is_complete", "open_prepared"]
__all__ += ["prepare", "prepare_suite", "describe"]

PREPARED_ENV = "MASKING_BENCH_PREPARED"
PREPARABLE = ("imagefolder", "fashion_mnist", "cifar10")
SPLITS = ("train", "val")
CHUNK = 64  # images per worker task: one contiguous pwrite of CHUNK * C * S * S bytes


def cache_root(results: str | Path | None = None) -> Path:
    """Where prepared folders live: ``$MASKING_BENCH_PREPARED``, else ``<results>/prepared`` (results/ by default)."""
    env = os.environ.get(PREPARED_ENV)
    return Path(env) if env else Path(results or "results") / "prepared"


# ------------------------------------------------------------------------------------ sources


@dataclass
class _Source:
    """What to prepare: per split the (path, label) samples or the decoded arrays, plus the identity."""

    name: str
    root: str
    size: int
    mode: str
    classes: list[str]
    identity: str  # sha256 hex of what makes the prepared bytes what they are
    samples: dict[str, list[tuple[str, int]]] | None = None  # imagefolder
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # fashion_mnist / cifar10
    stats: tuple[list[float], list[float]] | None = None


def _imagefolder_source(root: str | None, image_size: int | None) -> _Source:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    from .data import resolve_data_dir

    base = resolve_data_dir(root, "")
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
    accepted = "data.root must hold train/<class>/ and val/<class>/ (or test/<class>/) folders of images"
    if not root and not os.environ.get("MASKING_BENCH_DATA_DIR"):
        raise DataMissingError(f"ImageFolder dataset has no data.root: {accepted} ({', '.join(IMG_EXTENSIONS)})")
    if not (base / "train").is_dir() or test_dir is None:
        raise DataMissingError(f"ImageFolder dataset not found at '{base}': {accepted}")
    samples = {}
    try:  # sorted classes, sorted files within a class: the order of torchvision's ImageFolder
        classes, class_to_idx = find_classes(str(base / "train"))
        for split, folder in (("train", base / "train"), ("val", test_dir)):
            if split == "val" and find_classes(str(folder))[0] != classes:
                raise BenchError(f"class folders of {folder} differ from those of {base / 'train'}")
            samples[split] = make_dataset(str(folder), class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DataMissingError(
            f"ImageFolder dataset at '{base}' is empty ({exc}): {accepted} ({', '.join(IMG_EXTENSIONS)})"
        ) from None
    size = image_size or 224
    h = hashlib.sha256(f"imagefolder\nformat={FORMAT_VERSION}\nsize={size}\nmode=RGB\n".encode())
    for split, items in samples.items():
        folder = base / "train" if split == "train" else test_dir
        for path, label in items:
            st = os.stat(path)
            h.update(f"{split}\t{os.path.relpath(path, folder)}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
    return _Source("imagefolder", str(base), size, "RGB", classes, h.hexdigest(), samples=samples)


def _array_source(name: str, root: str | None) -> _Source:
    """Fashion-MNIST / CIFAR-10: small, decoded by masking_bench.data itself; identity = a hash of the bytes."""
    from .data import load_cifar10, load_fashion_mnist, resolve_data_dir

    ds = load_fashion_mnist(root) if name == "fashion_mnist" else load_cifar10(root)
    h = hashlib.sha256(f"{name}\nformat={FORMAT_VERSION}\n".encode())
    arrays = {}
    for split, part in (("train", ds.train), ("val", ds.test)):
        x, y = part.images.numpy(), part.labels.numpy()
        h.update(f"{split}{x.shape}".encode())
        h.update(x.tobytes())
        h.update(y.tobytes())
        arrays[split] = (x, y)
    from .data import DEFAULT_FASHION_DIR

    where = resolve_data_dir(root, DEFAULT_FASHION_DIR if name == "fashion_mnist" else "")
    mode = "L" if ds.channels == 1 else "RGB"
    classes = [str(i) for i in range(ds.num_classes)]
    stats = (list(ds.mean), list(ds.std))
    return _Source(name, str(where), ds.image_size, mode, classes, h.hexdigest(), arrays=arrays, stats=stats)


def describe(name: str, root: str | None = None, image_size: int | None = None) -> _Source:
    """The source of a suite's ``data`` block; errors are one line naming what is accepted."""
    if name == "imagefolder":
        return _imagefolder_source(root, image_size)
    if name in ("fashion_mnist", "cifar10"):
        return _array_source(name, root)
    raise BenchError(f"dataset '{name}' cannot be prepared: accepted are {', '.join(PREPARABLE)}")


def folder_name(src: _Source) -> str:
    return f"{src.name}-{src.size}px-{src.identity[:16]}"


# ------------------------------------------------------------------------------------ writing

_TRANSFORM = None


def decode(path: str, size: int) -> np.ndarray:
    """One image as data.load_imagefolder decodes it: uint8 (3, size, size)."""
    global _TRANSFORM
    from PIL import Image

    if _TRANSFORM is None or _TRANSFORM[0] != size:
        from torchvision.transforms import v2

        _TRANSFORM = (size, v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]))
    with open(path, "rb") as fh:
        img = Image.open(fh).convert("RGB")
    return _TRANSFORM[1](img).numpy()


def _decodes(path: str, size: int) -> bool:
    try:
        decode(path, size)
        return True
    except Exception:
        return False


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: no OpenMP threads competing inside a worker


def _decode_chunk(npy: str, offset: int, start: int, paths: list[str], size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Decode ``paths`` into images ``start..`` of ``npy`` (one pwrite); returns (count, channel sums, squares)."""
    try:
        block = np.stack([decode(p, size) for p in paths])
    except Exception as exc:  # name the file: one bad JPEG among a million must be findable
        bad = next(p for p in paths if not _decodes(p, size))
        raise BenchError(f"cannot decode image '{bad}': {type(exc).__name__}: {exc}") from None
    flat = block.reshape(len(paths), block.shape[1], -1).astype(np.int64)
    item = block[0].nbytes
    fd = os.open(npy, os.O_WRONLY)
    try:
        data, pos = memoryview(np.ascontiguousarray(block)).cast("B"), offset + start * item
        while data:
            done = os.pwrite(fd, data, pos)
            data, pos = data[done:], pos + done
    finally:
        os.close(fd)
    return len(paths), flat.sum(axis=(0, 2)), (flat * flat).sum(axis=(0, 2))


def _write_imagefolder(tmp: Path, src: _Source, workers: int, progress: bool) -> tuple[list[float], list[float]]:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    tasks = []
    for split, items in src.samples.items():
        (tmp / split).mkdir(parents=True)
        npy = tmp / split / "images.npy"
        mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(items), 3, src.size, src.size))
        offset = int(mm.offset)
        del mm
        np.save(tmp / split / "labels.npy", np.asarray([y for _, y in items], dtype=np.int64))
        for start in range(0, len(items), CHUNK):
            paths = [p for p, _ in items[start : start + CHUNK]]
            tasks.append((split, (str(npy), offset, start, paths, src.size)))
    total = sum(len(v) for v in src.samples.values())
    sums, squares = np.zeros(3, np.int64), np.zeros(3, np.int64)
    bar = tqdm(total=total, desc=f"prepare {src.name} {src.size}px", unit="img", disable=not progress)

    def account(split, result):
        n, s, q = result
        if split == "train":
            sums[:] += s
            squares[:] += q
        bar.update(n)

    try:
        if workers <= 1:  # in this process, its torch thread settings untouched
            for split, args in tasks:
                account(split, _decode_chunk(*args))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver")  # never fork a parent whose OpenMP threads may be running
            ctx.set_forkserver_preload(["masking_bench.prepared", "torchvision.transforms.v2", "PIL.Image"])
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_decode_chunk, *args): split for split, args in tasks}
                try:
                    for fut in as_completed(futures):
                        account(futures[fut], fut.result())
                except BrokenProcessPool:
                    raise BenchError("a decoding worker died (out of memory or killed?); run prepare again") from None
                finally:  # on an error, do not decode the rest before raising it
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    count = len(src.samples["train"]) * src.size * src.size
    mean = sums / count
    var = (squares - sums.astype(np.float64) ** 2 / count) / max(count - 1, 1)  # unbiased, as torch.std
    return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist()


def _write_arrays(tmp: Path, src: _Source) -> tuple[list[float], list[float]]:
    for split, (x, y) in src.arrays.items():
        (tmp / split).mkdir(parents=True)
        np.save(tmp / split / "images.npy", np.ascontiguousarray(x))
        np.save(tmp / split / "labels.npy", y.astype(np.int64))
    return list(src.stats[0]), list(src.stats[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, log: Callable[[str], None]):
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path.name[1:-5]} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (a SLURM job's allocation), capped by
    ``$SLURM_CPUS_PER_TASK`` when set; never every core of a big node a job shares."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(cores, int(slurm)) if slurm.isdigit() else cores)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    cache: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> tuple[Prepared, bool]:
    """Prepare (once) the dataset of a suite's ``data`` block; returns (the opened folder, whether this call wrote it).

    ``cache`` defaults to :func:`cache_root`; ``workers`` (default: :func:`usable_cores`) decoding processes.
    """
    import multiprocessing as mp

    if getattr(mp.current_process(), "_inheriting", False):  # as multiprocessing's own bootstrapping check
        raise BenchError(
            "prepare() ran while a worker process imported the main script: call it under "
            "`if __name__ == '__main__':` (decoding workers are started with forkserver)"
        )
    src = describe(name, root, image_size)
    cache = Path(cache) if cache is not None else cache_root()
    final = cache / folder_name(src)
    if is_complete(final):
        return open_prepared(final), False
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{final.name}.lock", log):
        if is_complete(final):  # another process finished it while we waited
            return open_prepared(final), False
        # only the lock holder writes: any temp or partial folder left now is from a crashed preparer
        for stale in [*cache.glob(f".tmp-{final.name}-*"), *([final] if final.exists() else [])]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
        t0 = time.perf_counter()
        tmp.mkdir()
        if src.samples is not None:
            mean, std = _write_imagefolder(tmp, src, workers or usable_cores(), progress)
        else:
            mean, std = _write_arrays(tmp, src)
        channels = 3 if src.mode == "RGB" else 1
        counts = {s: len(np.load(tmp / s / "labels.npy", mmap_mode="r")) for s in SPLITS}
        manifest = {
            "format": FORMAT_VERSION,
            "dataset": src.name,
            "source": {"root": src.root, "digest": src.identity},
            "resolution": src.size,
            "mode": src.mode,
            "dtype": "uint8",
            "layout": "NCHW",
            "classes": src.classes,
            "num_classes": len(src.classes),
            "splits": {s: {"count": n, "shape": [n, channels, src.size, src.size]} for s, n in counts.items()},
            "mean": mean,
            "std": std,
            "seconds": round(time.perf_counter() - t0, 3),
            "created_by": f"{socket.gethostname()}:{os.getpid()}",
            "complete": True,
        }
        for s in SPLITS:
            _fsync(tmp / s / "images.npy")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        os.rename(tmp, final)
        _fsync(cache)
    return open_prepared(final), True


def prepare_suite(
    suite_path: str | Path,
    results: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> list[tuple[Prepared, bool, float]]:
    """Prepare every distinct preparable ``data`` block of a suite (grid axes included).

    Returns (prepared folder, written now, seconds) per block; synthetic data is generated in memory
    and skipped.
    """
    from .config import expand, load_suite

    suite = load_suite(suite_path)
    blocks = {(suite.data.name, suite.data.root, suite.data.image_size)}
    try:
        blocks |= {(s.data.name, s.data.root, s.data.image_size) for s in expand(suite, str(suite_path))}
    except BenchError:
        pass  # e.g. a plugin strategy not loaded here: the suite's own data block is still prepared
    out = []
    for name, root, size in sorted(blocks, key=str):
        if name not in PREPARABLE:
            log(f"{name}: generated in memory, nothing to prepare")
            continue
        t0 = time.perf_counter()
        prepared, wrote = prepare(name, root, size, cache_root(results), workers, progress, log)
        out.append((prepared, wrote, time.perf_counter() - t0))
    return out
