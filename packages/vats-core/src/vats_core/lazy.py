"""``computed_once``: a property computed at its first read, then stored on the instance.

What ``functools.cached_property`` does, without the lock it takes on Python 3.11, which
torch.compile cannot trace: a graph break in every compiled step that reads one (the MoE's
router losses, a language model's auxiliary loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["computed_once"]

T = TypeVar("T")


class computed_once(Generic[T]):
    """Decorate a method to make it a property computed at its first read and then stored in
    the instance's ``__dict__`` (later reads, and assignments, skip the method)."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value
        return value
