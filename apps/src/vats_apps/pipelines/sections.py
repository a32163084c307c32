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
