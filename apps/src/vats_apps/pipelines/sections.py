"""Reading a pipeline's config sections: plain dicts out of the composed Hydra config, and
the ``preset`` + overrides form of the model sections."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def section(cfg: DictConfig, key: str, pipeline: str) -> dict[str, Any]:
    """The resolved section ``key`` (e.g. ``"train.image"``) as a plain dict.

    Raises:
        ValueError: the section is missing (naming ``pipeline``, which needs it).
    """
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ValueError(f"{pipeline} needs the config section `{key}`")
    out = OmegaConf.to_container(node, resolve=True)
    if not isinstance(out, dict):
        raise ValueError(f"{pipeline}: the config section `{key}` must be a mapping, got {out!r}")
    return out


def preset_fields(cfg: DictConfig, key: str, pipeline: str) -> tuple[str, dict[str, Any]]:
    """A model section's ``preset`` name and its other fields (the preset's overrides).

    Raises:
        ValueError: the section is missing or names no ``preset``.
    """
    fields = section(cfg, key, pipeline)
    preset = fields.pop("preset", None)
    if preset is None:
        raise ValueError(f"{key} needs a `preset` (e.g. {key.replace('.', '/')}=<name>)")
    return str(preset), fields


def part_pipeline(cfg: DictConfig, **extra: Any) -> dict[str, Any]:
    """The ``pipeline`` section of a part's config (a model another pipeline trains and
    caches, loaded by a composing pipeline): this run's seed, cache, and progress, never
    retrained or compiled by it (its ``pipeline.retrain`` retrains its own stages only)."""
    return {
        "seed": int(cfg.pipeline.seed),
        "cache_dir": str(cfg.pipeline.cache_dir),
        "retrain": False,
        "compile": False,
        "progress": bool(cfg.pipeline.progress),
        **extra,
    }
