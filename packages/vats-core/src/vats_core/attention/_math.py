"""The ``math`` backend: explicit masked softmax, the reference every backend is tested against.

Shape legend: B batch, Hkv key/value heads, G query heads per kv head, Tq / Tk query /
key length, Dh head dim.

Works in any floating dtype (float64 for reference checks) on any device. GQA is
done by folding the group into a broadcast axis, so K/V are never repeated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vats_core.attention._call import AttentionCall
from vats_core.attention.masks import full_mask


def unavailable_reason(call: AttentionCall) -> str | None:
    if not call.dtype.is_floating_point:
        return f"math needs a floating dtype, got {call.dtype}"
    return None


def forward(call: AttentionCall) -> Tensor:
    b, hkv, g = call.batch, call.kv_heads, call.groups
    tq, tk, dh = call.q_len, call.k_len, call.head_dim
    q = call.q.reshape(b, hkv, g, tq, dh)  # (B, Hkv, G, Tq, Dh)
    k = call.k[:, :, None]  # (B, Hkv, 1, Tk, Dh)
    v = call.v[:, :, None]  # (B, Hkv, 1, Tk, Dh)
    scores = (q * call.scale) @ k.transpose(-1, -2)  # (B, Hkv, G, Tq, Tk)

    mask = full_mask(
        tq,
        tk,
        causal=call.causal,
        window=call.window,
        key_padding_mask=call.key_padding_mask,
        device=call.device,
    )
    if mask is None:
        return (scores.softmax(-1) @ v).reshape(b, hkv * g, tq, dh)

    mask = mask[:, :, None]  # (B or 1, 1, 1, Tq, Tk)
    # The most negative finite value instead of -inf: a row with no visible key then
    # softmaxes to a uniform row (not NaN), which the row mask below zeroes, so forward
    # and backward stay finite.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    out = scores.softmax(-1) @ v  # (B, Hkv, G, Tq, Dh)
    has_key = mask.any(-1, keepdim=True)  # (B or 1, 1, 1, Tq, 1)
    out = out * has_key
    return out.reshape(b, hkv * g, tq, dh)
