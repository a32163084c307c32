"""Which keys each query may see: the one definition every backend follows.

Shape legend: B batch, Tq query length, Tk key length.

Positions. Query i sits at key position ``p(i) = i + Tk - Tq`` (bottom-right
alignment, the flash-attn convention), so a chunk of new queries scored against a
longer KV cache sees the cache and itself. Key j is visible to query i iff all hold:

* causal: ``j <= p(i)``;
* causal window ``w``: ``p(i) - w < j <= p(i)`` (the Mistral / HF convention: the
  query itself plus the ``w - 1`` keys before it);
* bidirectional window ``w``: ``|p(i) - j| < w``;
* ``key_padding_mask[b, j]`` is True (True = real token).

A query row with no visible key gets zeros from every backend, never NaN.
Because the window and causal rules only bound j from each side, each query sees
one contiguous interval of positions ``[lo(i), hi(i))``; :func:`key_bounds` gives
it, which is what lets the ``local`` backend and :func:`rows_with_keys` run in
O(T) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_bounds(
    q_len: int, k_len: int, *, causal: bool, window: int | None, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """The interval ``[lo, hi)`` of key positions each query may see, before padding.

    Returns:
        lo, hi: (Tq,) long tensors, clipped to ``[0, Tk]``; ``lo >= hi`` means none.
    """
    pos = torch.arange(q_len, device=device) + (k_len - q_len)  # (Tq,) key position p(i)
    lo = torch.zeros_like(pos)
    hi = torch.full_like(pos, k_len)
    if causal:
        hi = torch.minimum(hi, pos + 1)
    if window is not None:
        lo = torch.maximum(lo, pos - window + 1)
        if not causal:
            hi = torch.minimum(hi, pos + window)
    return lo, hi


def visible_mask(
    q_len: int, k_len: int, *, causal: bool, window: int | None, device: torch.device | None = None
) -> Tensor | None:
    """(Tq, Tk) bool, True where query i may see key j by position; None if all may."""
    if not causal and window is None:
        return None
    lo, hi = key_bounds(q_len, k_len, causal=causal, window=window, device=device)
    j = torch.arange(k_len, device=device)
    return (j >= lo[:, None]) & (j < hi[:, None])  # (Tq, Tk)


def full_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device | None = None,
) -> Tensor | None:
    """(B or 1, 1, Tq, Tk) bool: position rules and padding together; None if all visible."""
    mask = visible_mask(q_len, k_len, causal=causal, window=window, device=device)
    if key_padding_mask is None:
        return None if mask is None else mask[None, None]  # (1, 1, Tq, Tk)
    pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
    return pad if mask is None else pad & mask


def rows_with_keys(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device | None = None,
) -> Tensor:
    """(B or 1, Tq) bool: whether query i sees at least one key; O(B·(Tq + Tk)) memory.

    Counts real keys in each query's interval with a prefix sum instead of building
    the (Tq, Tk) mask, so it is cheap even for long windowed sequences.
    """
    lo, hi = key_bounds(q_len, k_len, causal=causal, window=window, device=device)
    hi = torch.maximum(hi, lo)  # empty intervals count zero keys
    if key_padding_mask is None:
        return (hi > lo)[None]  # (1, Tq)
    counts = torch.nn.functional.pad(key_padding_mask.long().cumsum(-1), (1, 0))  # (B, Tk + 1)
    return (counts[:, hi] - counts[:, lo]) > 0  # (B, Tq)


def is_left_padded(key_padding_mask: Tensor) -> bool:
    """True if each row's real tokens form a suffix (pads only on the left). Syncs on CUDA."""
    kpm = key_padding_mask
    return bool((kpm[:, 1:] >= kpm[:, :-1]).all())
