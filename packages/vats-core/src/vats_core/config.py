"""Config dataclasses: validation helpers and a lossless dict/JSON round trip.

Every vats model is built from a ``@dataclass(frozen=True, kw_only=True)`` config
that subclasses :class:`Config`. Field types stay OmegaConf-safe (primitives,
``str`` Enums, optionals, ``tuple[X, ...]`` for sequences, nested configs) so Hydra YAML
can map onto them, ``config.json`` can store them and every config hashes.

Validation runs in two steps, and every error is a ``ValueError`` that names the config,
the field, the value and what is allowed:

1. Types, from the field annotations, for every config before its own ``__post_init__``
   (:meth:`Config.__init_subclass__` arranges it): an ``int`` field takes an int and
   rejects ``True`` and ``64.0``; a ``float`` field takes an int or a float, not a bool; a
   ``bool`` field only a bool; a ``str`` Enum field its member or its plain value (stored
   as the member); ``X | None`` also None; ``tuple[X, ...]`` any list or tuple of X (YAML
   and JSON give lists), stored as a tuple so configs hash; a nested config its instance
   or a mapping of its fields.
2. Values, in each config's ``__post_init__``, with :func:`check` and the helpers below::

       check(self.n_heads % self.n_kv_heads == 0, self, "n_kv_heads", self.n_kv_heads,
             f"a divisor of n_heads={self.n_heads}")
       check_positive(self, "dim", "n_heads")
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import json
import math
import types
import typing
from typing import Any, Self

__all__ = [
    "Config",
    "check",
    "check_at_least",
    "check_positive",
    "check_probability",
    "coerce_enum",
    "config_error",
    "is_int",
    "is_number",
]


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_error(owner: object, field: str, value: object, allowed: str) -> ValueError:
    """Build the ValueError every config raises: which field, what came, what is allowed."""
    name = owner if isinstance(owner, str) else type(owner).__name__
    return ValueError(f"{name}.{field}={value!r} is invalid: expected {allowed}")


def check(ok: bool, owner: object, field: str, value: object, allowed: str) -> None:
    """Raise :func:`config_error` unless ``ok``."""
    if not ok:
        raise config_error(owner, field, value, allowed)


def check_positive(config: object, *fields: str) -> None:
    """Each field's value is a finite number > 0; None passes (optional fields)."""
    for field in fields:
        value = getattr(config, field)
        if value is not None:
            ok = is_number(value) and math.isfinite(value) and value > 0
            check(ok, config, field, value, f"{_kind(config, field)} > 0")


def check_at_least(config: object, minimum: float, *fields: str) -> None:
    """Each field's value is a finite number >= ``minimum``; None passes."""
    for field in fields:
        value = getattr(config, field)
        if value is not None:
            ok = is_number(value) and math.isfinite(value) and value >= minimum
            check(ok, config, field, value, f"{_kind(config, field)} >= {minimum:g}")


def check_probability(config: object, *fields: str) -> None:
    """Each field's value is in [0, 1) (dropout rates and the like); None passes."""
    for field in fields:
        value = getattr(config, field)
        if value is not None:
            ok = is_number(value) and 0.0 <= value < 1.0
            check(ok, config, field, value, "a probability in [0, 1)")


def _kind(config: object, field: str) -> str:
    """What a numeric field holds, from its annotation: ``"an int"``, ``"a finite number"``,
    with ``"None or "`` before it for an optional field (so the helpers' errors say it)."""
    hints = dict(_field_hints(type(config))) if isinstance(config, Config) else {}
    hint = hints.get(field)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    kind = "an int" if int in args and float not in args else "a finite number"
    return f"None or {kind}" if type(None) in args else kind


def coerce_enum(config: object, field: str, enum_type: type[enum.Enum]) -> None:
    """Validate an Enum field that may hold the plain value (``"gelu"`` from YAML or JSON)
    and store the Enum member, so later code compares members. For frozen configs, in
    ``__post_init__``. A :class:`Config` field annotated with the Enum needs none: the
    type check (step 1) already does this."""
    value = getattr(config, field)
    allowed = [m.value for m in enum_type]
    check(value in allowed, config, field, value, f"one of {allowed}")
    object.__setattr__(config, field, enum_type(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every vats config: type checks, ``to_dict`` / ``from_dict`` / ``replace``.

    Every subclass's fields are checked against their annotations before its own
    ``__post_init__`` runs (module docstring), so that method only checks values.
    ``from_dict`` rejects unknown keys (a typo in a YAML or a config.json from a
    different model must not be silently ignored) and rebuilds nested configs and
    Enums from their plain values, so ``cls.from_dict(c.to_dict()) == c``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The value checks: the class's own __post_init__, else the nearest parent's.
        values = cls.__dict__.get("__post_init__") or getattr(cls, "_check_values", None)
        cls._check_values = values  # type: ignore[attr-defined]

        def __post_init__(self: Config) -> None:
            _check_types(self)
            if values is not None:
                values(self)

        __post_init__.__doc__ = getattr(values, "__doc__", None)
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

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


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _check_types(config: Config) -> None:
    """Step 1 of validation (module docstring): each field against its annotation, with
    Enums, sequences and nested configs normalized in place."""
    name = type(config).__name__
    for field, hint in _field_hints(type(config)):
        value = getattr(config, field)
        fixed = _typed(hint, value, f"{name}.{field}")
        if fixed is not value:
            object.__setattr__(config, field, fixed)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[m.value for m in hint]}"
    if isinstance(hint, type) and issubclass(hint, Config):
        return f"a {hint.__name__}"
    return {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _typed(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and normalized); ValueError naming ``where``."""

    def bad() -> ValueError:
        return ValueError(f"{where}={value!r} is invalid: expected {_describe(hint)}")

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(arg, value, where)
            except ValueError:
                continue
        raise bad()
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, collections.abc.Sequence):
            raise bad()
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = [_typed(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any or not isinstance(hint, type):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if not is_int(value):
            raise bad()
        return value
    if hint is float:
        if not is_number(value):
            raise bad()
        return value
    if issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise bad() from None
    if issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if isinstance(value, collections.abc.Mapping):
            return hint.from_dict(value)
        raise bad()
    if not isinstance(value, hint):
        raise bad()
    return value


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
