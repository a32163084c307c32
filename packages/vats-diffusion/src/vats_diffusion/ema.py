"""EMA: an exponential moving average of a model's weights, for sampling.

Diffusion models sample from the average of their recent weights (Ho et al., 2020; DiT,
Peebles & Xie, 2023, arXiv:2212.09748, keeps decay 0.9999), which is smoother than the
last step's. After each optimizer step::

    shadow <- d·shadow + (1 − d)·param

for every floating-point parameter, with the shadow kept in float32 whatever the model's
dtype (a bf16 model's updates of (1 − d)·Δ would round away in bf16). Buffers (norm
statistics, integer counters) are not averaged: the shadow holds a copy of the model's
latest. With ``warmup=True`` the decay of update n (n = 0, 1, ...) is
``min(decay, (1 + n) / (10 + n))``, so the early average is not dominated by the random
initial weights.

Example::

    ema = EMA(model, decay=0.9999)
    for batch in data:
        ...; optimizer.step()
        ema.update(model)
    with ema.applied_to(model):  # the averaged weights, restored on exit
        images = diffusion.sample(model, shape, steps=50)
    torch.save(ema.state_dict(), "ema.pt")  # ints, floats, bools and tensors: weights_only
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vats_core.config import is_int, is_number

__all__ = ["EMA"]


class EMA:
    """Shadow weights of ``model``, averaged by :meth:`update` (module docstring).

    Args:
        model: the model whose weights are averaged; the shadow starts as a copy of them,
            on the same devices.
        decay: d in [0, 1): the weight of the old average at each update.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update n.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False) -> None:
        if not is_number(decay) or not 0 <= decay < 1:
            raise ValueError(f"EMA: decay={decay!r} is invalid: expected a number in [0, 1)")
        if not isinstance(warmup, bool):
            raise ValueError(f"EMA: warmup={warmup!r} is invalid: expected a bool")
        if not isinstance(model, nn.Module):
            raise ValueError(f"EMA: model must be an nn.Module, got {type(model).__name__}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: _shadow_copy(p) for name, p in model.named_parameters()
            }
            self.buffers: dict[str, Tensor] = {
                name: b.detach().clone() for name, b in model.named_buffers()
            }

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current weights (call after each step)."""
        params, buffers = self._matching(model, "update")
        weight = 1.0 - self.current_decay()
        for name, p in params.items():
            s = self.shadow[name]
            if s.is_floating_point():
                s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), weight)
            else:
                s.copy_(p.detach())
        for name, b in buffers.items():
            self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights (and buffers) into ``model``, in its own dtypes."""
        params, buffers = self._matching(model, "copy_to")
        for name, p in params.items():
            p.copy_(self.shadow[name])
        for name, b in buffers.items():
            b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the shadow weights into ``model`` for the block; its own weights (and
        buffers) come back on exit, also when the block raises."""
        params, buffers = self._matching(model, "applied_to")
        with torch.no_grad():
            saved_p = {name: p.detach().clone() for name, p in params.items()}
            saved_b = {name: b.detach().clone() for name, b in buffers.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved_p[name])
                for name, b in buffers.items():
                    b.copy_(saved_b[name])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow to ``device`` (e.g. CPU to spare accelerator memory); in place."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: decay, warmup, the update count, shadow and buffers."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; names, shapes and dtypes must match this
        EMA's (a shadow of another model is refused, and nothing is changed)."""
        keys = {"decay", "warmup", "num_updates", "shadow", "buffers"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"EMA.load_state_dict: expected keys {sorted(keys)}, got {got}")
        decay, n = state["decay"], state["num_updates"]
        if not is_number(decay) or not 0 <= decay < 1 or not math.isfinite(decay):
            raise ValueError(f"EMA.load_state_dict: decay={decay!r} is not in [0, 1)")
        if not is_int(n) or n < 0:
            raise ValueError(f"EMA.load_state_dict: num_updates={n!r} is not an int >= 0")
        if not isinstance(state["warmup"], bool):
            raise ValueError(f"EMA.load_state_dict: warmup={state['warmup']!r} is not a bool")
        for field, mine in (("shadow", self.shadow), ("buffers", self.buffers)):
            _check_same(mine, state[field], f"EMA.load_state_dict: {field}", dtypes=True)
        self.decay, self.warmup, self.num_updates = float(decay), state["warmup"], n
        for field, mine in (("shadow", self.shadow), ("buffers", self.buffers)):
            for name, value in state[field].items():
                mine[name].copy_(value)

    def _matching(
        self, model: nn.Module, where: str
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        _check_same(self.shadow, params, f"EMA.{where}: parameters", dtypes=False)
        _check_same(self.buffers, buffers, f"EMA.{where}: buffers", dtypes=False)
        return params, buffers


def _shadow_copy(p: Tensor) -> Tensor:
    p = p.detach()
    return p.float().clone() if p.is_floating_point() else p.clone()


def _check_same(mine: Mapping[str, Tensor], other: Any, where: str, *, dtypes: bool) -> None:
    """``other`` has ``mine``'s names and shapes (and dtypes); ValueError naming them."""
    if not isinstance(other, Mapping):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(other).__name__}")
    missing, extra = sorted(set(mine) - set(other)), sorted(set(other) - set(mine))
    if missing or extra:
        raise ValueError(
            f"{where} do not match the EMA's (another model?): missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, t in mine.items():
        o = other[name]
        if not isinstance(o, Tensor) or o.shape != t.shape or (dtypes and o.dtype != t.dtype):
            got = f"{tuple(o.shape)} {o.dtype}" if isinstance(o, Tensor) else type(o).__name__
            raise ValueError(f"{where}: {name!r} is {got}, expected {tuple(t.shape)} {t.dtype}")
