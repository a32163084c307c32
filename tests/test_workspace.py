"""The workspace keeps the promises of DESIGN.md: every member is a complete package."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_TOML = tomllib.loads((ROOT / "pyproject.toml").read_text())
MEMBERS = ROOT_TOML["tool"]["uv"]["workspace"]["members"]
VATS_NAMES = {"vats-core", "vats-text", "vats-vision", "vats-audio", "vats-diffusion", "vats-apps"}


@pytest.mark.parametrize("member", MEMBERS)
def test_member_is_a_complete_package(member: str):
    path = ROOT / member
    meta = tomllib.loads((path / "pyproject.toml").read_text())
    name = meta["project"]["name"]
    import_name = name.replace("-", "_")
    assert (path / "README.md").read_text().strip(), f"{member}: README.md is empty"
    assert (path / "src" / import_name / "py.typed").exists(), f"{member}: no py.typed"
    assert (path / "tests").is_dir(), f"{member}: no tests/"
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    assert meta["project"]["requires-python"] == ">=3.11"


@pytest.mark.parametrize("member", [m for m in MEMBERS if m.startswith("packages/")])
def test_modality_packages_depend_only_on_core(member: str):
    meta = tomllib.loads((ROOT / member / "pyproject.toml").read_text())
    deps = {
        d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for d in meta["project"]["dependencies"]
    }
    vats_deps = deps & VATS_NAMES
    if meta["project"]["name"] == "vats-core":
        assert not vats_deps
    else:
        assert vats_deps == {"vats-core"}, f"{member} depends on {vats_deps}"


def test_torch_is_pinned_in_the_lock_only():
    constraints = ROOT_TOML["tool"]["uv"]["constraint-dependencies"]
    assert any(c.startswith("torch>=2.10,<2.11") for c in constraints)
    lock = (ROOT / "uv.lock").read_text()
    torch_block = lock.split('\nname = "torch"\n', 1)[1]
    assert torch_block.startswith('version = "2.10.')
