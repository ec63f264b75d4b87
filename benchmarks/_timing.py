"""Timing utilities shared by the benchmarks: warm-up, median of repeats, device copy bandwidth.

On CUDA a repeat is timed with a pair of ``torch.cuda.Event`` recorded on the current stream and the device is
synchronized before each repeat, so the time is the device's (launch overhead included when the host cannot keep
the device busy). On CPU a repeat is timed with ``time.perf_counter``.
"""

from __future__ import annotations

import glob
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

GB = 1e9  # bandwidth figures use decimal gigabytes (1 GB = 10^9 bytes)


@dataclass
class Timing:
    """Milliseconds per call: the median over repeats, and every repeat's figure."""

    median_ms: float
    repeat_ms: list[float] = field(default_factory=list)
    calls_per_repeat: int = 1


@dataclass
class CopyBandwidth:
    """Bandwidth of ``dst.copy_(src)`` for a ``nbytes`` buffer; ``bytes_moved`` counts the read and the write."""

    nbytes: int
    bytes_moved: int
    median_ms: float
    gb_per_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls_ms(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall (CPU) or device (CUDA) milliseconds for ``calls`` back-to-back calls of ``fn``."""
    synchronize(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events go on that device's current stream
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    start_s = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start_s) * 1e3


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_repeat_ms: float = 0.0,
) -> Timing:
    """Median milliseconds per call of ``fn`` after ``warmup`` untimed calls.

    A call that takes less than ``min_repeat_ms`` is repeated back to back within one timed repeat (the count is
    calibrated from the last warm-up call), so that timer resolution and event overhead do not dominate.
    """
    return time_interleaved_ms({"fn": fn}, device, warmup=warmup, repeats=repeats, min_repeat_ms=min_repeat_ms)["fn"]


def time_interleaved_ms(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_repeat_ms: float = 0.0,
) -> dict[str, Timing]:
    """Like :func:`time_ms` for several functions, whose repeats are taken in turn (rotating which goes first).

    Interleaving spreads a passing disturbance (another process, a descheduled virtual CPU, clock changes) over
    every function instead of letting it fall on whichever one was being timed at that moment.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(fns)
    calls = {}
    for name in names:
        last_ms = 0.0
        for _ in range(max(warmup, 1)):
            last_ms = _time_calls_ms(fns[name], device, 1)
        calls[name] = 1
        if min_repeat_ms > 0.0 and last_ms < min_repeat_ms:
            calls[name] = min(1000, math.ceil(min_repeat_ms / max(last_ms, 1e-3)))
    repeat_ms: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            repeat_ms[name].append(_time_calls_ms(fns[name], device, calls[name]) / calls[name])
    return {
        name: Timing(median_ms=statistics.median(times), repeat_ms=times, calls_per_repeat=calls[name])
        for name, times in repeat_ms.items()
    }


def measure_copy_bandwidth(
    device: torch.device | str, nbytes: int, *, warmup: int = 5, repeats: int = 15
) -> CopyBandwidth:
    """Time ``dst.copy_(src)`` between two ``nbytes`` buffers on ``device``: the memory roof for streaming kernels.

    The buffers should be much larger than the last-level cache, or the figure is the cache's bandwidth.
    """
    device = torch.device(device)
    numel = max(nbytes // 4, 1)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    bytes_moved = 2 * numel * 4
    del src, dst
    return CopyBandwidth(
        nbytes=numel * 4,
        bytes_moved=bytes_moved,
        median_ms=timing.median_ms,
        gb_per_s=bytes_moved / (timing.median_ms * 1e-3) / GB,
    )


def _proc_stat_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot, from Linux ``/proc/stat``."""
    with open("/proc/stat", encoding="utf-8") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # guest time is already counted in user time
    counted = fields[:8]
    idle = counted[3] + counted[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(counted) - idle) / ticks, sum(counted) / ticks


class OtherProcessesLoad:
    """Measures how busy other processes keep the CPUs while a block runs (Linux; None elsewhere).

    Multi-threaded CPU kernels slow down many times over when one of their threads has to share a core, so a
    timing taken while something else runs is not the machine's. ``fraction`` is the CPU time used by everything
    but this process over the block, as a fraction of all CPUs' time.
    """

    def __init__(self) -> None:
        self.fraction: float | None = None

    def __enter__(self) -> "OtherProcessesLoad":
        try:
            self._start = (_proc_stat_seconds(), _own_cpu_seconds())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._start is None:
            return
        try:
            (busy_after, total_after), own_after = _proc_stat_seconds(), _own_cpu_seconds()
        except (OSError, ValueError, IndexError):
            return
        (busy_before, total_before), own_before = self._start
        total = total_after - total_before
        if total > 0:
            others = (busy_after - busy_before) - (own_after - own_before)
            self.fraction = min(max(others / total, 0.0), 1.0)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def busy_cpu_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs' time used by other processes over ``seconds`` while this one sleeps."""
    with OtherProcessesLoad() as load:
        time.sleep(seconds)
    return load.fraction


def cpu_last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for size_file in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(size_file, encoding="utf-8") as file:
                text = file.read().strip().upper()
        except OSError:
            continue
        multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * multiplier)
    return max(sizes) if sizes else None


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
