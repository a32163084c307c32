"""Config dataclasses: validation helpers and a lossless dict/JSON round trip.

Every vats model is built from a ``@dataclass(frozen=True, kw_only=True)`` config
that subclasses :class:`Config`. Field types stay OmegaConf-safe (primitives,
``str`` Enums, optionals, lists, nested configs) so Hydra YAML can map onto them
and ``config.json`` can store them.

Validation lives in each config's ``__post_init__`` and uses :func:`check`, so
every error names the config, the field, the value and what is allowed::

    check(self.n_heads % self.n_kv_heads == 0, self, "n_kv_heads", self.n_kv_heads,
          f"a divisor of n_heads={self.n_heads}")
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, Self


def config_error(owner: object, field: str, value: object, allowed: str) -> ValueError:
    """Build the ValueError every config raises: which field, what came, what is allowed."""
    name = owner if isinstance(owner, str) else type(owner).__name__
    return ValueError(f"{name}.{field}={value!r} is invalid: expected {allowed}")


def check(ok: bool, owner: object, field: str, value: object, allowed: str) -> None:
    """Raise :func:`config_error` unless ``ok``."""
    if not ok:
        raise config_error(owner, field, value, allowed)


def coerce_enum(config: object, field: str, enum_type: type[enum.Enum]) -> None:
    """Validate an Enum field that may hold the plain value (``"gelu"`` from YAML or JSON)
    and store the Enum member, so later code compares members. For frozen configs, in
    ``__post_init__``."""
    value = getattr(config, field)
    allowed = [m.value for m in enum_type]
    check(value in allowed, config, field, value, f"one of {allowed}")
    object.__setattr__(config, field, enum_type(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every vats config: ``to_dict`` / ``from_dict`` / ``replace``.

    ``from_dict`` rejects unknown keys (a typo in a YAML or a config.json from a
    different model must not be silently ignored) and rebuilds nested configs and
    Enums from their plain values, so ``cls.from_dict(c.to_dict()) == c``.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> Self:
        if not isinstance(data, typing.Mapping):
            raise ValueError(
                f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_plain(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed; validation runs again."""
        return dataclasses.replace(self, **changes)


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(hint: Any, value: Any, where: str) -> Any:
    """Rebuild ``value`` as type ``hint`` (nested configs, Enums, lists, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _from_plain(non_none[0], value, where)
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} expects a list, got {value!r}")
        items = [_from_plain(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = [m.value for m in hint]
            raise ValueError(f"{where}={value!r} is invalid: expected one of {allowed}") from None
    return value
