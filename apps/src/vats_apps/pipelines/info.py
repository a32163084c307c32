"""``vats pipeline=info``: what this install can run (versions, device, attention backends)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch
from omegaconf import DictConfig

from vats_core.attention import AttentionBackend, backend_unavailable_reason

PACKAGES = ("vats-core", "vats-text", "vats-vision", "vats-audio", "vats-diffusion", "vats-apps")


def run(cfg: DictConfig) -> dict[str, str]:
    """Print the installed vats packages and which attention backends can serve a
    typical causal sliding-window call on this machine's device in ``pipeline.dtype``."""
    report: dict[str, str] = {}
    for name in PACKAGES:
        try:
            report[name] = version(name)
        except PackageNotFoundError:
            report[name] = "not installed"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.pipeline.dtype)
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")
    for name, ver in report.items():
        print(f"  {name:16s} {ver}")
    # A probe call: (B, H, T, Dh) = (1, 8, 256, 64), GQA 8:2, causal, window 64.
    q = torch.zeros(1, 8, 256, 64, device=device, dtype=dtype)
    kv = torch.zeros(1, 2, 256, 64, device=device, dtype=dtype)
    print(f"attention backends for a causal sliding-window call on {device} ({dtype}):")
    for backend in AttentionBackend:
        if backend is AttentionBackend.AUTO:
            continue
        reason = backend_unavailable_reason(backend, q, kv, kv, causal=True, window=64)
        state = "available" if reason is None else f"unavailable: {reason}"
        report[f"attention.{backend.value}"] = state
        print(f"  {backend.value:9s} {state}")
    return report
