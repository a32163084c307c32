"""The workspace keeps the promises of DESIGN.md: every member is a complete package."""

from __future__ import annotations

import ast
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


# Where torch.distributed may appear: parallelism is applied to models from outside them.
DISTRIBUTED_HOMES = ("vats_core/parallel/", "vats_core/training/")


def _uses_torch_distributed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            a.name.startswith("torch.distributed") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.startswith("torch.distributed"):
                return True
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                return True
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            return True
    return False


def test_model_code_never_uses_torch_distributed():
    sources = sorted((ROOT / "packages").glob("*/src/**/*.py"))
    assert len(sources) > 20
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources
        if not any(home in path.as_posix() for home in DISTRIBUTED_HOMES)
        and _uses_torch_distributed(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert offenders == [], "use vats_core.parallel from outside the model instead"
    parallel = ROOT / "packages/vats-core/src/vats_core/parallel/apply.py"
    assert _uses_torch_distributed(ast.parse(parallel.read_text()))  # the check sees uses
