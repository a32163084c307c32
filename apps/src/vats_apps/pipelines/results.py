"""What a pipeline run leaves behind for the report: ``<pipeline.out_dir>/result.json``.

``vats pipeline=<name>`` (:func:`vats_apps.cli.run_pipeline`) writes the dict the
pipeline's ``run`` returned, made JSON-safe, wrapped with the pipeline's name:

    {"format": 1, "pipeline": "text_to_image", "finished": "2026-...Z", "result": {...}}

The file is written atomically (temporary file, then rename), so a crash never leaves half
a file; ``vats pipeline=report`` (:mod:`vats_apps.pipelines.report`) reads it back with
:func:`read_result`, which names the file in every error.

JSON-safe means: numbers, strings, booleans and ``None`` as they are (NaN and infinities
become ``None``, which JSON cannot hold); mappings with their keys as strings; lists and
tuples as lists; paths as strings; tensors and NumPy values as numbers (one element) or
nested lists (up to :data:`MAX_ELEMENTS` elements; bigger ones, such as waveforms, are
dropped); dataclasses and enums by their fields and values. Anything else (a model, a
tokenizer, a generator) is dropped: a mapping loses the key, a list holds ``None`` in its
place so that positions still line up.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
from pathlib import Path, PurePath
from typing import Any

import torch

from vats_core.checkpoint import atomic_write_text

__all__ = ["FORMAT", "MAX_ELEMENTS", "RESULT_NAME", "json_safe", "read_result", "write_result"]

RESULT_NAME = "result.json"
FORMAT = 1  # bump when the wrapper changes meaning
MAX_ELEMENTS = 4096  # tensors and arrays larger than this are not written
_DROP = object()  # marks a value json_safe leaves out


def _safe(value: Any, depth: int) -> Any:
    if depth > 64:  # a cycle or an absurd nesting: not something a report reads
        return _DROP
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _safe(value.value, depth + 1)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() > MAX_ELEMENTS:
            return _DROP
        return _safe(value.detach().cpu().tolist(), depth + 1)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # arrays and scalars
        if getattr(value, "size", 1) > MAX_ELEMENTS:
            return _DROP
        return _safe(value.tolist(), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _safe(fields, depth + 1)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            safe = _safe(item, depth + 1)
            if safe is not _DROP:
                out[key if isinstance(key, str) else str(_safe(key, depth + 1))] = safe
        return out
    if isinstance(value, list | tuple):
        items = (_safe(item, depth + 1) for item in value)
        return [None if item is _DROP else item for item in items]
    return _DROP


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data (module docstring); ``None`` if nothing of it can be."""
    out = _safe(value, 0)
    return None if out is _DROP else out


def write_result(out_dir: str | os.PathLike[str], pipeline: str, result: Any) -> Path:
    """Write ``<out_dir>/result.json`` atomically for ``pipeline``'s returned ``result``.

    Returns:
        The file's path.
    """
    path = Path(out_dir) / RESULT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    finished = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {
        "format": FORMAT,
        "pipeline": pipeline,
        "finished": finished.replace("+00:00", "Z"),
        "result": json_safe(result),
    }
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def read_result(path: str | os.PathLike[str], pipeline: str) -> dict[str, Any]:
    """The record :func:`write_result` wrote for ``pipeline`` at ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not JSON, not such a record, or another pipeline's (the
            message names the file and what is wrong with it).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such result file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a valid result file ({err}); run `vats pipeline={pipeline}` "
            "again to rewrite it"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict | list):
        raise ValueError(
            f"{path} is not a vats result file (expected a JSON object with a 'result'); run "
            f"`vats pipeline={pipeline}` again to rewrite it"
        )
    if record.get("pipeline") != pipeline:
        raise ValueError(
            f"{path} holds the result of pipeline {record.get('pipeline')!r}, not {pipeline!r}: "
            "two pipelines share an out_dir; give each its own pipeline.out_dir"
        )
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{path} has result format {record.get('format')!r}, this vats reads {FORMAT}: run "
            f"`vats pipeline={pipeline}` again to rewrite it"
        )
    return record
