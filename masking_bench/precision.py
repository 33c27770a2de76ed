"""Which floating-point precision a run trains in, decided from the hardware that runs it.

``train.amp`` is ``auto`` (default), ``bf16`` or ``none`` (fp32). ``auto`` trains in bf16 only where
the hardware runs bf16 natively — CUDA devices with bf16 support, CPUs with AVX512-BF16 or AMX that
torch dispatches to AVX-512 kernels — and in fp32 everywhere else. On a CPU without native bf16 a
bf16 matmul is emulated and runs ~40-100x slower than fp32 (2.4 vs 85 GFLOP/s measured on one host
with oneDNN limited to AVX2), so an explicit ``amp: bf16`` there is refused in one line instead of
training for hours.

On a CPU the capability query is confirmed by a short matmul race (a few ms, once per process):
environment limits such as ``ONEDNN_MAX_CPU_ISA`` or a hypervisor that hides instructions can make
bf16 slow although the flags say otherwise. The ratio between the two cases is ~40-170x, so the
race cannot flip on a busy machine. The precision actually used is part of a run's identity (bf16
and fp32 give different numbers) and is recorded, with the reason, in ``summary.json``.

Planning (``status``, ``plan``, ``run`` before training) asks :func:`resolve` without a ``Hardware``;
in a process that has not imported torch, the CPU's answer then comes from a per-host file in the
catalog cache (:mod:`masking_bench.catalog`), keyed by host name, the CPU's model and flags
(``/proc/cpuinfo``), the torch version and the environment variables that limit its kernels, so
the planning commands start without torch. Training always asks the hardware itself
(:func:`check_on_device`), so a wrong cached answer is one line, never a mislabelled run. Whether
CUDA is available is likewise answered without torch when torch is a CPU-only build or the host
has no GPU device nodes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import BenchError

PRECISIONS = ("bf16", "fp32")
# bf16 counts as native when a bf16 matmul runs at least this fraction of the fp32 rate
NATIVE_RACE_FRACTION = 0.5


@dataclass(frozen=True)
class Hardware:
    """What a device offers for bf16 (recorded with every run)."""

    device: str  # "cpu" or "cuda"
    isa: str  # torch's CPU capability (AVX2, AVX512, ...) or the CUDA device name
    native_bf16: bool
    why: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matmul_gflops(dtype, size: int = 256, reps: int = 3) -> float:
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / max(best, 1e-9) / 1e9


@functools.cache
def cpu_hardware() -> Hardware:
    """This CPU's bf16 support: torch's capability level and flags, confirmed by a matmul race."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    flags = {
        name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()) for name in ("avx512_bf16", "amx_tile")
    }
    have = [name for name, ok in flags.items() if ok]
    if not isa.startswith("AVX512") or not have:
        why = f"torch dispatches {isa} kernels" if have else "the CPU has neither AVX512-BF16 nor AMX"
        return Hardware("cpu", isa, False, why)
    fp32 = _matmul_gflops(torch.float32)
    bf16 = _matmul_gflops(torch.bfloat16)
    native = bf16 >= NATIVE_RACE_FRACTION * fp32
    why = f"{'+'.join(have)}; bf16 matmul {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s" + (
        "" if native else " (slower than fp32: bf16 is emulated here)"
    )
    return Hardware("cpu", isa, native, why)


@functools.cache
def cuda_hardware(index: int = 0) -> Hardware:
    import torch

    name = torch.cuda.get_device_name(index)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag
        native = torch.cuda.is_bf16_supported()
    cap = ".".join(map(str, torch.cuda.get_device_capability(index)))
    return Hardware("cuda", name, native, f"compute capability {cap}")


def hardware(device_type: str) -> Hardware:
    return cuda_hardware() if device_type == "cuda" else cpu_hardware()


# environment variables that change which kernels torch / oneDNN run
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")


def _cpu_identity() -> str:
    """The CPU as /proc/cpuinfo describes it (model name and flags of the first processor)."""
    try:
        text = Path("/proc/cpuinfo").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    first = text.split("\n\n")[0]
    keep = [line for line in first.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(keep) or first


def _torch_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_cache_path():
    from .catalog import cache_dir

    key = {
        "host": platform.node(),
        "cpu": _cpu_identity(),
        "torch": _torch_version(),
        "env": {name: os.environ.get(name) for name in KERNEL_ENV},
        "race": NATIVE_RACE_FRACTION,
        "python": sys.executable,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"cpu-{digest}.json"


def planning_cpu_hardware() -> Hardware:
    """This CPU's bf16 support for planning: :func:`cpu_hardware` where torch is already imported, else
    its answer stored per host (measured once, with torch, on a miss)."""
    if "torch" in sys.modules:
        return cpu_hardware()
    path = _cpu_cache_path()
    try:
        data = json.loads(path.read_text())
        if set(data) == {f.name for f in fields(Hardware)}:
            return Hardware(**data)
    except (OSError, ValueError, TypeError):
        pass
    hw = cpu_hardware()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hw.as_dict()))
        os.replace(tmp, path)
    except OSError:
        pass  # no cache: the next planning command measures again
    return hw


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch where the answer is certainly no: a torch
    built without CUDA or ROCm, or a Linux host without NVIDIA / AMD / WSL GPU device nodes."""
    if "torch" not in sys.modules:
        if not _torch_gpu_build():
            return False
        nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
        if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in nodes):
            return False
    import torch

    return torch.cuda.is_available()


def _torch_gpu_build() -> bool:
    """False when torch/version.py says ``cuda = None`` and ``hip = None``; True when it says otherwise
    or cannot be read (then torch is asked)."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text(encoding="utf-8")
    except (AttributeError, ImportError, IndexError, OSError, TypeError, ValueError):
        return True
    values = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.+?)\s*$", text, flags=re.M))
    return not (values.get("cuda") == "None" and values.get("hip") == "None")


def resolve(amp: str, device_type: str, hw: Hardware | None = None) -> str:
    """The precision (``bf16`` or ``fp32``) a run with ``train.amp: amp`` trains in on ``device_type``.

    Raises a one-line :class:`BenchError` for an explicit ``bf16`` the hardware only emulates.
    ``hw`` is looked up when not given; an ``auto`` for a device this process cannot see (e.g. the
    GPUs of a SLURM node, seen from a login node) resolves to bf16 for CUDA and is checked again
    where the run executes.
    """
    if amp == "none":
        return "fp32"
    if amp not in ("auto", "bf16"):
        raise BenchError(f"train.amp '{amp}' is not known: accepted are auto, bf16, none")
    if hw is None:
        if device_type == "cuda" and not _cuda_visible():
            return "bf16"  # planned for the cluster's GPUs; verified on the node (check_on_device)
        hw = cuda_hardware() if device_type == "cuda" else planning_cpu_hardware()
    if hw.native_bf16:
        return "bf16"
    if amp == "bf16":
        raise BenchError(
            f"train.amp: bf16 asked, but this {hw.device} ({hw.isa}) has no native bf16 "
            f"({hw.why}), so training would run ~50x slower; set train.amp: auto (bf16 only where "
            "native) or none (fp32)"
        )
    return "fp32"


def _cuda_visible() -> bool:
    return cuda_available()


def check_on_device(planned: str, amp: str, device_type: str) -> dict[str, Any]:
    """Where a run executes: confirm the precision it was planned (and hashed) with; the record's entry.

    A mismatch (e.g. a suite planned for bf16 GPUs that landed on a GPU without bf16) is a one-line
    error rather than numbers filed under the wrong identity.
    """
    hw = hardware(device_type)
    here = resolve(amp, device_type, hw)
    if here != planned:
        raise BenchError(
            f"this run was planned in {planned} (train.amp: {amp}) but this {device_type} "
            f"({hw.isa}) resolves it to {here} ({hw.why}); set train.amp: "
            f"{'none' if here == 'fp32' else 'bf16'} in the suite so plan and node agree"
        )
    return {"used": planned, "requested": amp, **hw.as_dict()}
