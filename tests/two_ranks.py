"""A pipeline run by 2 ranks under torchrun, and the weights of two runs compared: for the
cross-package ``train.parallel`` tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def torchrun_pipeline(tmp_path: Path, *overrides: str) -> tuple[str, dict[str, Any]]:
    """``torchrun --nproc-per-node 2 -m vats_apps <overrides>``, one thread per rank, the
    cache under ``tmp_path/cache`` and the result under ``tmp_path/runs``.

    Returns:
        ``(stdout, result)``: what the ranks printed, and rank 0's ``result.json``.
    """
    runs = tmp_path / "runs"
    env = {**os.environ, "VATS_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "vats_apps",
        *overrides,
        f"pipeline.out_dir={runs}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((runs / "result.json").read_text())["result"]


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    """The models two pipeline results cached (``<cache>/model``) hold the same weights."""
    wa, wb = (load_file(Path(r["cache"]) / "model" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)
