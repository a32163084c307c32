"""``make test-gpu`` on a machine without CUDA: it says why it skipped and exits 0, and
``bench_gpu.py``'s sections still run (at toy sizes on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU from torch


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=NO_CUDA, capture_output=True, text=True, timeout=300
    )


def test_the_gpu_check_without_cuda_says_why_and_exits_zero() -> None:
    done = _run("tools/test_gpu.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test-gpu: skipped: no CUDA device is visible" in done.stdout
    assert "passed" not in done.stdout  # no test ran
    bench = _run("tests/benchmarks/bench_gpu.py")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert bench.stdout.startswith("bench_gpu: skipped: no CUDA device is visible")


@pytest.mark.slow  # ~20 s: the LM and decode sections at toy sizes
def test_the_gpu_benchmark_runs_every_section_at_toy_sizes_on_cpu() -> None:
    done = _run("tests/benchmarks/bench_gpu.py", "--cpu-smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for section in (
        "device: cpu",
        "versions: torch",
        "peaks:",
        "attention forward + backward",
        "LM training: preset tiny",
        "eager",
        "decode: greedy",
        "batch  2:",
    ):
        assert section in out, (section, out)
    # sdpa ran at every (T, window); flash is absent here and says why
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("64", "128"))]
    assert len(rows) == 4 and all(row[-1] != "-" for row in rows), out
    assert "flash: - where it could not run: flash-attn is not installed" in out
