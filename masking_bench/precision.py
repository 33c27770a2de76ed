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
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
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
        hw = hardware(device_type)
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
    import torch

    return torch.cuda.is_available()


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
