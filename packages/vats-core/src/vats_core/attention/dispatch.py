"""The one attention entry point: validate, pick a backend, run it.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Tq query
length, Tk key length, Dh head dim.

Backends form a ``str`` Enum registry (the diffusers ``attention_dispatch`` shape):
each has a constraint check that returns why it cannot serve a call (device, dtype,
head dim, mask kind, not installed) and a forward. Which backend runs:

1. ``backend=`` given explicitly (anything but ``"auto"``) always wins;
2. otherwise the innermost :func:`attention_backend` context manager, if any;
3. otherwise ``auto``: on CUDA flash-attn, then xformers, then SDPA, the first that
   can serve the call; on CPU ``local`` for windowed calls where the window is much
   shorter than the keys (it then does a fraction of SDPA's work), else SDPA.

So a context manager can redirect every layer left on ``"auto"`` (the default) for a
test or a benchmark, but never overrides a backend a caller pinned on purpose.
An explicitly requested backend that cannot serve the call raises ``ValueError`` with
the reason (and, for missing optional kernels, the ``pip install`` line); it never
silently falls back.
"""

from __future__ import annotations

import contextlib
import enum
import math
import numbers
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from vats_core.attention import _flash, _flex, _local, _math, _sdpa, _xformers
from vats_core.attention._call import AttentionCall


class AttentionBackend(enum.StrEnum):
    """Attention implementations; all compute the same function (see ``masks``)."""

    AUTO = "auto"  # the fastest backend that can serve the call
    MATH = "math"  # explicit masked softmax; the reference, works in float64
    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention
    FLEX = "flex"  # torch flex_attention with a block mask that skips blocks outside the window
    LOCAL = "local"  # blocked sliding window, O(T·window), differentiable; for CPU training
    XFORMERS = "xformers"  # xformers.ops.memory_efficient_attention (CUDA; extra "xformers")
    FLASH = "flash"  # flash-attn 2 (CUDA fp16/bf16; extra "flash-attn")


class _Backend(NamedTuple):
    unavailable_reason: Callable[[AttentionCall], str | None]
    forward: Callable[[AttentionCall], Tensor]


def _entry(module: ModuleType) -> _Backend:
    return _Backend(module.unavailable_reason, module.forward)


_REGISTRY: dict[AttentionBackend, _Backend] = {
    AttentionBackend.MATH: _entry(_math),
    AttentionBackend.SDPA: _entry(_sdpa),
    AttentionBackend.FLEX: _entry(_flex),
    AttentionBackend.LOCAL: _entry(_local),
    AttentionBackend.XFORMERS: _entry(_xformers),
    AttentionBackend.FLASH: _entry(_flash),
}

# Tried in this order by ``auto`` on CUDA; the first that can serve the call runs.
_CUDA_PREFERENCE = (AttentionBackend.FLASH, AttentionBackend.XFORMERS, AttentionBackend.SDPA)
# On CPU ``local`` runs when its blocked work is at most this fraction of the dense
# Tq·Tk scores SDPA computes (at T=2k, window 512 it does 0.37 of them and already runs
# ~1.5x faster than masked SDPA); closer to 1 the tiling overhead is not worth it.
_LOCAL_WORK_FRACTION = 0.5

# The backend set by :func:`attention_backend`, per thread. A ``threading.local`` rather than
# a ``ContextVar``: torch.compile traces attribute reads on it (and guards on the value), where
# ``ContextVar.get`` breaks the graph.
_CONTEXT = threading.local()


def _context_backend() -> AttentionBackend:
    return getattr(_CONTEXT, "backend", AttentionBackend.AUTO)


def _parse_backend(backend: str | AttentionBackend) -> AttentionBackend:
    try:
        return AttentionBackend(backend)
    except ValueError:
        allowed = [b.value for b in AttentionBackend]
        raise ValueError(
            f"unknown attention backend {backend!r}: expected one of {allowed}"
        ) from None


@contextlib.contextmanager
def attention_backend(backend: str | AttentionBackend) -> Iterator[AttentionBackend]:
    """Use ``backend`` for every :func:`attention` call left on ``"auto"`` inside the block.

    Example::

        with attention_backend("math"):
            reference = model(x)  # every layer on backend="auto" runs the math reference
    """
    chosen = _parse_backend(backend)
    previous = _context_backend()
    _CONTEXT.backend = chosen
    try:
        yield chosen
    finally:
        _CONTEXT.backend = previous


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    backend: str | AttentionBackend = "auto",
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention with GQA, causal / sliding-window masks and padding.

    Args:
        q: (B, Hq, Tq, Dh) queries.
        k: (B, Hkv, Tk, Dh) keys; Hq must be a multiple of Hkv (GQA / MQA).
        v: (B, Hkv, Tk, Dh) values.
        causal: key j visible to query i only if j <= i + Tk - Tq (bottom-right aligned).
        window: sliding window: causal ``i' - window < j <= i'``, bidirectional
            ``|i' - j| < window``, where ``i' = i + Tk - Tq``. None = unlimited.
        key_padding_mask: (B, Tk) bool, True = real token.
        backend: an :class:`AttentionBackend` or its name; see the module docstring.
        scale: softmax scale; defaults to ``1 / sqrt(Dh)``.

    Returns:
        (B, Hq, Tq, Dh). Query rows that see no key are zeros.

    Raises:
        ValueError: bad shapes, dtypes, devices, window, mask or scale, an unknown
            backend, or a backend that cannot serve this call.
    """
    call = _validate(q, k, v, causal, window, key_padding_mask, scale)
    chosen = _resolve(call, _parse_backend(backend))
    return _REGISTRY[chosen].forward(call)


def resolve_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    backend: str | AttentionBackend = "auto",
    scale: float | None = None,
) -> AttentionBackend:
    """The backend :func:`attention` would run for these arguments (raises as it would)."""
    call = _validate(q, k, v, causal, window, key_padding_mask, scale)
    return _resolve(call, _parse_backend(backend))


def backend_unavailable_reason(
    backend: str | AttentionBackend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> str | None:
    """Why ``backend`` cannot serve this call, or None if it can (``auto`` always can)."""
    call = _validate(q, k, v, causal, window, key_padding_mask, scale)
    chosen = _parse_backend(backend)
    if chosen is AttentionBackend.AUTO:
        return None
    return _REGISTRY[chosen].unavailable_reason(call)


def _resolve(call: AttentionCall, requested: AttentionBackend) -> AttentionBackend:
    if requested is AttentionBackend.AUTO:
        requested = _context_backend()
    if requested is AttentionBackend.AUTO:
        return _auto(call)
    reason = _REGISTRY[requested].unavailable_reason(call)
    if reason is not None:
        raise ValueError(f"attention backend {requested.value!r} cannot serve this call: {reason}")
    return requested


def _auto(call: AttentionCall) -> AttentionBackend:
    if call.device.type == "cuda":
        for candidate in _CUDA_PREFERENCE:
            if _REGISTRY[candidate].unavailable_reason(call) is None:
                return candidate
        return AttentionBackend.MATH  # only for dtypes SDPA refuses
    if (
        call.window is not None
        and _local.unavailable_reason(call) is None
        and _local.local_work(call.q_len, call.k_len, window=call.window, causal=call.causal)
        <= _LOCAL_WORK_FRACTION * call.q_len * call.k_len
    ):
        return AttentionBackend.LOCAL
    if _sdpa.unavailable_reason(call) is None:
        return AttentionBackend.SDPA
    return AttentionBackend.MATH


def _validate(
    q: object,
    k: object,
    v: object,
    causal: object,
    window: object,
    key_padding_mask: object,
    scale: object,
) -> AttentionCall:
    """Check every argument before any compute; errors say what was expected and what came."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (B, H, T, Dh), got shape {tuple(t.shape)}"
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape (B, Hkv, Tk, Dh), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    b, hq, _, dh = q.shape
    _, hkv, tk, dk = k.shape
    if k.shape[0] != b:
        raise ValueError(f"attention: batch sizes differ: q has {b}, k/v have {k.shape[0]}")
    if dk != dh:
        raise ValueError(f"attention: head dims differ: q has Dh={dh}, k/v have Dh={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"attention: query heads must be a multiple of key/value heads (GQA), "
            f"got Hq={hq}, Hkv={hkv}"
        )
    if tk == 0 or dh == 0:
        raise ValueError(f"attention: k/v need Tk >= 1 and Dh >= 1, got shape {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not q.dtype.is_floating_point:
        raise ValueError(f"attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"attention: causal must be a bool, got {causal!r}")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1
    ):
        raise ValueError(f"attention: window must be None or an int >= 1, got {window!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise ValueError(
                f"attention: key_padding_mask must be a bool tensor (B, Tk) or None, "
                f"got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"attention: key_padding_mask must be torch.bool (True = real token), "
                f"got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (b, tk):
            raise ValueError(
                f"attention: key_padding_mask must have shape (B, Tk) = {(b, tk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"attention: key_padding_mask is on {key_padding_mask.device}, q/k/v on {q.device}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    elif (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"attention: scale must be a finite number > 0 or None, got {scale!r}")
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        causal=causal,
        window=None if window is None else int(window),
        key_padding_mask=key_padding_mask,
        scale=float(scale),
    )
