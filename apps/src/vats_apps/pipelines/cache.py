"""The trained-model cache the pipelines share: entries keyed by a hash of their settings,
written in a temporary sibling and renamed into place, so an interrupted run leaves no half
entry and a retrain replaces the old one whole.

Layout: ``<cache_dir>/<pipeline>/[<task>/]<settings hash>/`` holding ``report.json`` (what
the run measured) beside whatever the pipeline saves (``model/``, a tokenizer, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPORT_NAME = "report.json"  # present only in a complete entry (written last)


def settings_hash(spec: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``spec`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
