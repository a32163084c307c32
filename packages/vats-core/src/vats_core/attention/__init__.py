"""Attention for vats: one dispatch point over interchangeable backends.

``attention(q, k, v, *, causal, window, key_padding_mask, backend, scale)`` computes
softmax attention with GQA, bottom-right-aligned causal masks, causal and
bidirectional sliding windows and key padding; every backend (``math``, ``sdpa``,
``flex``, ``local``, ``xformers``, ``flash``) computes the same function, proven
against ``math`` in the tests. See :mod:`vats_core.attention.masks` for the exact
visibility rules and :mod:`vats_core.attention.dispatch` for how a backend is chosen.
"""

from vats_core.attention.dispatch import (
    AttentionBackend,
    attention,
    attention_backend,
    backend_unavailable_reason,
    resolve_backend,
)
from vats_core.attention.layer import Attention, AttentionConfig, check_head_fields

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionConfig",
    "attention",
    "attention_backend",
    "backend_unavailable_reason",
    "check_head_fields",
    "resolve_backend",
]
