"""``make test-gpu``: every test marked ``gpu``, then ``tests/benchmarks/bench_gpu.py``.

On a machine without CUDA it prints why it skipped and exits 0, so the target is safe to
run anywhere; on one with CUDA its exit status is pytest's (the benchmark runs either way,
its figures being worth having even when a test fails).

Usage: ``python tools/test_gpu.py [extra pytest arguments]``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_TESTS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("packages/*/tests"))
TEST_DIRS = [*PACKAGE_TESTS, "apps/tests", "tests"]


def why_skipped() -> str | None:
    """None when CUDA can run here, else the reason."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA device is visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def main(pytest_args: list[str]) -> int:
    why = why_skipped()
    if why is not None:
        print(f"test-gpu: skipped: {why}; the gpu tests and bench_gpu.py need an NVIDIA GPU")
        return 0
    dirs = [d for d in TEST_DIRS if (ROOT / d).is_dir()]
    tests = subprocess.call(
        [sys.executable, "-m", "pytest", "-c", "pyproject.toml", "-q", "-m", "gpu", *dirs,
         "--ignore=tests/benchmarks", *pytest_args],
        cwd=ROOT,
    )  # fmt: skip
    bench = subprocess.call([sys.executable, "tests/benchmarks/bench_gpu.py"], cwd=ROOT)
    return tests or bench


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
