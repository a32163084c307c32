"""Prove a per-package environment holds only that package and what it declares.

Usage: ``python tools/check_isolation.py packages/vats-core`` inside that package's own
venv (``make test-core`` does this). Fails when the package itself is missing, or when
another vats package, Hydra/OmegaConf or a peer library (transformers, timm, diffusers)
is importable there although the package's pyproject.toml (dependencies and dev group)
does not declare it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

PACKAGES = Path(__file__).resolve().parent.parent / "packages"  # vats-<name>/pyproject.toml
VATS = ("vats-core", "vats-text", "vats-vision", "vats-audio", "vats-diffusion", "vats-apps")
# Distribution name -> import name of the libraries that must not leak in undeclared.
GUARDED = {name: name.replace("-", "_") for name in VATS} | {
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "transformers": "transformers",
    "timm": "timm",
    "diffusers": "diffusers",
}


def declared(meta: dict) -> set[str]:
    """Distribution names the package declares: dependencies plus its dev group."""
    specs = list(meta["project"].get("dependencies", []))
    specs += [s for s in meta.get("dependency-groups", {}).get("dev", []) if isinstance(s, str)]
    return {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower() for s in specs}


def runtime_closure(names: set[str]) -> set[str]:
    """``names`` plus the runtime dependencies of the vats packages among them, recursively
    (vats-apps declares vats-diffusion, which brings diffusers: that is declared too)."""
    out, todo = set(names), [n for n in names if n in VATS]
    while todo:
        meta = tomllib.loads((PACKAGES / todo.pop() / "pyproject.toml").read_text())
        specs = meta["project"].get("dependencies", [])
        for dep in {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower() for s in specs}:
            if dep not in out:
                out.add(dep)
                if dep in VATS:
                    todo.append(dep)
    return out


def main(package_dir: str) -> int:
    meta = tomllib.loads((Path(package_dir) / "pyproject.toml").read_text())
    own = meta["project"]["name"]
    allowed = runtime_closure(declared(meta)) | {own}
    if "hydra-core" in allowed:
        allowed.add("omegaconf")  # hydra-core depends on it
    errors = []
    if importlib.util.find_spec(GUARDED[own]) is None:
        errors.append(f"{GUARDED[own]} is not importable in its own environment")
    for dist, module in GUARDED.items():
        if dist not in allowed and importlib.util.find_spec(module) is not None:
            errors.append(f"{module} is importable but {own} does not declare {dist}")
    for e in errors:
        print(f"isolation check failed: {e}")
    if not errors:
        print(f"{own}: its environment holds only the package and what it declares")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
