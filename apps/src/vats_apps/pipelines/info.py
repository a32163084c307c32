"""``vats pipeline=info``: what this install can run (versions, devices, attention backends)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch
from omegaconf import DictConfig

from vats_core.attention import AttentionBackend, backend_status

PACKAGES = ("vats-core", "vats-text", "vats-vision", "vats-audio", "vats-diffusion", "vats-apps")


def run(cfg: DictConfig) -> dict[str, str]:
    """Print the installed vats packages and which attention backends can run here."""
    report: dict[str, str] = {}
    for name in PACKAGES:
        try:
            report[name] = version(name)
        except PackageNotFoundError:
            report[name] = "not installed"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")
    for name, ver in report.items():
        print(f"  {name:16s} {ver}")
    print(f"attention backends on {device} ({cfg.pipeline.dtype}):")
    dtype = getattr(torch, cfg.pipeline.dtype)
    for backend, reason in backend_status(device=device, dtype=dtype).items():
        state = "available" if reason is None else f"unavailable: {reason}"
        report[f"attention.{backend}"] = state
        print(f"  {backend:9s} {state}")
    del AttentionBackend  # imported to fail early if the attention package is broken
    return report
