"""Prove a per-package environment holds only that package and what it declares.

Usage: ``python tools/check_isolation.py vats-core`` inside the package's own venv.
Fails when the package itself is missing or when another vats package, Hydra or a
test-only peer library (transformers, timm, diffusers) is importable there.
"""

from __future__ import annotations

import importlib.util
import sys

VATS = {
    "vats-core": "vats_core",
    "vats-text": "vats_text",
    "vats-vision": "vats_vision",
    "vats-audio": "vats_audio",
    "vats-diffusion": "vats_diffusion",
    "vats-apps": "vats_apps",
}
# What each package may see besides itself (its declared vats dependencies).
ALLOWED = {"vats-apps": {"vats_core", "vats_text", "vats_vision", "vats_audio", "vats_diffusion"}}
PEERS = ("transformers", "timm", "diffusers")


def main(package: str) -> int:
    if package not in VATS:
        print(f"unknown package {package!r}; expected one of {sorted(VATS)}")
        return 2
    own = VATS[package]
    errors = []
    if importlib.util.find_spec(own) is None:
        errors.append(f"{own} is not importable in its own environment")
    allowed = {own} | ALLOWED.get(package, {"vats_core"})
    for name in VATS.values():
        if name not in allowed and importlib.util.find_spec(name) is not None:
            errors.append(f"{name} is importable but {package} does not depend on it")
    for name in PEERS + (() if package == "vats-apps" else ("hydra", "omegaconf")):
        if importlib.util.find_spec(name) is not None:
            errors.append(f"{name} is importable but {package} does not declare it")
    for e in errors:
        print(f"isolation check failed: {e}")
    if not errors:
        print(f"{package}: environment holds only the package and its declared dependencies")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
