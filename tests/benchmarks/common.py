"""Shared helpers for the benchmark scripts: machine banner, alternating timing, peak memory.

Timings on shared machines drift by ±15 % run to run, so every script runs ours and
the peer's in one process, alternating, and reports the median of each plus the ratio.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def banner(title: str, threads: int | None = 2) -> None:
    """Fix the thread count and print what the figures were measured on."""
    if threads is not None:
        torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"== {title}")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def time_alternating(
    fns: dict[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_cpu_memory(fn: Callable[[], object]) -> int:
    """Peak bytes held by CPU tensors allocated while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        fn()
    # Replay each op's own allocations (not its children's) in time order to find the
    # high-water mark.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
