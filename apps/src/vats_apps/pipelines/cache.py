"""The trained-model cache the pipelines share: entries keyed by a hash of their settings,
written in a temporary sibling and renamed into place, so an interrupted run leaves no half
entry and a retrain replaces the old one whole.

Layout: ``<cache_dir>/<pipeline>/[<task>/]<settings hash>/`` holding ``report.json`` (what
the run measured) beside whatever the pipeline saves (``model/``, a tokenizer, ...).

Held-out scores are a deterministic function of the weights, so a pipeline keeps them in
the entry's report with the settings they were taken under (its ``eval``) and a cached run
prints them without scoring again; a report whose scores are missing, malformed or taken
under other settings is scored anew, and the new scores replace the report whole
(:func:`write_report`).

A key (:func:`entry_key`) hashes what the pipeline says shapes the weights (the *resolved*
model config, i.e. the dataclass after its preset and overrides, the training and data
settings, the seed) together with the code that trains them (:func:`code_fingerprint`):
the versions of Python, torch and the vats packages involved, and a digest of every source
file of those packages. A preset that changes in code, or any edit to a training loop or a
data generator, therefore never loads a model trained by the old code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from vats_core.checkpoint import atomic_write_text

REPORT_NAME = "report.json"  # present only in a complete entry (written last)


def settings_hash(spec: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``spec`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def source_digest(directory: Path) -> str:
    """SHA-256 over every file under ``directory`` (bytecode caches left out), each with its
    relative path, in sorted order: any edit, added, removed or renamed file changes it."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _package_version(module_name: str) -> str:
    """The installed distribution's version (``vats_text`` -> ``vats-text``)."""
    try:
        return version(module_name.replace("_", "-"))
    except PackageNotFoundError:  # run from a source tree that is not installed
        return str(getattr(importlib.import_module(module_name), "__version__", "unknown"))


def code_fingerprint(packages: Iterable[str]) -> dict[str, Any]:
    """Versions of Python and torch, and version + source digest of each named package.

    Args:
        packages: import names of the packages whose code trains the weights
            (e.g. ``["vats_core", "vats_text", "vats_apps"]``).
    """
    found: dict[str, Any] = {}
    for name in sorted(packages):
        module = importlib.import_module(name)
        assert module.__file__ is not None, f"{name} is not a regular package"
        found[name] = {
            "version": _package_version(name),
            "source": source_digest(Path(module.__file__).parent),
        }
    # Python too: its version changes the stdlib (the text corpus) and float formatting.
    return {"python": platform.python_version(), "torch": torch.__version__, "packages": found}


def entry_key(spec: dict[str, Any], packages: Iterable[str]) -> str:
    """The entry name for ``spec`` (settings that shape the weights, resolved configs as
    plain dicts) trained by ``packages``' current code; see the module docstring."""
    return settings_hash({"settings": spec, "code": code_fingerprint(packages)})


def reusable(path: Path, retrain: bool) -> bool:
    """A complete entry at ``path`` that a run may load (one not asked to retrain)."""
    return (path / REPORT_NAME).is_file() and not retrain


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def scores_reusable(scored: Any, settings: dict[str, Any], scores: Iterable[Any]) -> bool:
    """Whether held-out scores read from an entry's report may be printed again: taken
    under ``settings`` (``scored``: the settings stored with them, e.g. the report's
    ``eval``), and ``scores``, their stored values, each a fraction in [0, 1] (none missing
    or malformed)."""
    return scored == settings and all(_fraction(v) for v in scores)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Replace the report of the complete entry at ``path`` (scored anew on a cached run):
    written in a temporary sibling and renamed over the old one, so a reader or an
    interrupted run finds the old report or the new one, never half of one."""
    atomic_write_text(path / REPORT_NAME, json.dumps(report, indent=2))


@contextlib.contextmanager
def staged_entry(path: Path) -> Iterator[Path]:
    """A fresh directory beside ``path`` to build an entry in; renamed to ``path`` when the
    block ends normally (replacing an older entry), removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
