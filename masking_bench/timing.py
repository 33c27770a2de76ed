"""How ``bench`` times things: contenders interleaved round by round (A B C, C B A, ...), each round a
``torch.utils.benchmark`` timing, medians compared; and what a figure was measured on (CPU, ISA
level, threads, load, the precision ``train.amp: auto`` picks)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-call seconds of each contender, one value per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): how many times faster ``fast`` is."""
        return self.median(slow) / self.median(fast)

    def spread(self, name: str) -> float:
        """Half the inter-quartile range relative to the median (a noise indicator)."""
        v = sorted(self.seconds[name])
        if len(v) < 4:
            return float("nan")
        q1, q3 = statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]
        return (q3 - q1) / 2 / statistics.median(v)


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int = 7,
    inner: dict[str, int] | int = 1,
    warmup: int = 1,
) -> Timings:
    """Time each contender ``rounds`` times, interleaved (A B C, C B A, A B C, ...).

    Each timed round is a ``torch.utils.benchmark.Timer.timeit`` of ``inner`` calls (an int or per
    contender; it synchronises CUDA around the calls), so every round records seconds per call and a
    load that comes and goes hits every contender alike. ``warmup`` untimed rounds first (allocator,
    autotuning, compile).
    """
    from torch.utils.benchmark import Timer

    names = list(contenders)
    reps = {n: inner if isinstance(inner, int) else inner.get(n, 1) for n in names}
    timers = {n: Timer(stmt="fn()", globals={"fn": contenders[n]}, num_threads=torch.get_num_threads()) for n in names}
    for _ in range(warmup):
        for n in names:
            for _ in range(reps[n]):
                contenders[n]()
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(timers[n].timeit(reps[n]).mean)
    return Timings(out)


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 natively (else only fp32 is measured: emulated bf16 is ~50x slower)."""
    from .precision import hardware

    return hardware(device.type).native_bf16


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including the load (they are ratios, the load still matters),
    the CPU's ISA level and the precision ``train.amp: auto`` picks here."""
    from .precision import hardware, resolve

    hw = hardware(device.type)
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": hw.native_bf16,
        "amp_auto": resolve("auto", device.type, hw),
        "amp_auto_why": hw.why,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
