"""The validated arguments of one attention call, shared by every backend.

Shape legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (the GQA
group), Tq query length, Tk key length, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionCall:
    """One attention call after validation; backends read their inputs from here.

    Attributes:
        q: (B, Hq, Tq, Dh) queries.
        k: (B, Hkv, Tk, Dh) keys.
        v: (B, Hkv, Tk, Dh) values.
        causal: key j is visible to query i only if j <= i + offset.
        window: sliding-window length, or None for no window.
        key_padding_mask: (B, Tk) bool, True = real token, or None.
        scale: the softmax scale (already resolved; never None).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    window: int | None
    key_padding_mask: Tensor | None
    scale: float

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        """G: query heads per key/value head (1 = plain multi-head attention)."""
        return self.q.shape[1] // self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def offset(self) -> int:
        """Key position of query 0: queries align bottom-right (query i sits at i + Tk - Tq)."""
        return self.k_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def position_free(self) -> bool:
        """True when which keys a query sees does not depend on positions (no causal, no window)."""
        return not self.causal and self.window is None
