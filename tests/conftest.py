"""Fixtures shared by the cross-package tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole test session (keyed by config hash, like a user's)."""
    return tmp_path_factory.mktemp("vats-cache")
