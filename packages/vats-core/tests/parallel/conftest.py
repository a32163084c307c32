"""The scenarios module (a tiny transformer, its data and loss, the 2-rank job), shared by
the tests here; loaded by path because it also runs as a script on each rank."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).with_name("dp_scenarios.py")
    spec = importlib.util.spec_from_file_location("dp_scenarios", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sc() -> ModuleType:
    return _load()
