"""Timing: the clock (CUDA events on a GPU, a monotonic clock on the CPU), the summary of a row's
runs, the CPU allocator's steady state, and the device's name for the record."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from models.precision import cpu_description


def device_name(device: str) -> str:
    """The GPU's name, or the CPU in a few words (:func:`models.precision.cpu_description`)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


def measure(fn: Callable[[], object], device: str, warmup: int, runs: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def summarise(times: list[float]) -> dict:
    """``{"median_ms", "p10_ms", "p90_ms", "runs"}`` of the times (ms) of one row at one length."""
    # inclusive: deciles within the range of the runs (the default extrapolates beyond it, below 0 for few runs)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "runs": len(times)}


def steady_malloc() -> bool:
    """Make glibc's allocator keep freed large blocks (mmap threshold 32 MiB, trim threshold 1 GiB),
    as jemalloc / tcmalloc do: by default each freed multi-MiB tensor goes back to the system and
    the next one is page-faulted in afresh, and how often depends on the history of earlier
    allocations, which on CPU moves a layer's time from run to run (``recipes/librispeech/RESULTS.md``
    has the measurement). False where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def malloc_setting(malloc: str, device: str) -> str:
    """Applies ``--malloc`` (``steady``: :func:`steady_malloc`, on the CPU) and says what is in force."""
    if malloc == "steady" and not device.startswith("cuda"):
        return (
            "steady (glibc mmap threshold 32 MiB, trim threshold 1 GiB)" if steady_malloc() else "default (not glibc)"
        )
    return "default"
