"""The ``flash`` backend: flash-attn 2 (CUDA fp16/bf16, optional extra).

Shape legend: B batch, Hq / Hkv query / key-value heads, Tq / Tk query / key length,
Dh head dim, Nk real keys in the batch. flash-attn takes (B, T, H, Dh).

flash-attn's conventions match ours, which is why it needs no mask tensor at all:
its causal mask is aligned bottom-right, and ``window_size=(left, right)`` lets
query i see keys ``[i + Tk - Tq - left, i + Tk - Tq + right]``. So a causal window w
is ``causal=True, window_size=(w - 1, 0)`` and a bidirectional one
``window_size=(w - 1, w - 1)``. GQA is native (query head h reads kv head h // G).

Key padding goes through ``flash_attn_varlen_func``: real keys are packed, queries
are not. That is exact for position-free attention whatever the padding, and for
causal / windowed attention when padding is on the left (real keys form a suffix,
the layout of batched decoding with a KV cache): packing a suffix leaves every
query's bottom-right position and every distance unchanged. Other padding with
causal or window is refused (``auto`` then falls back to another backend); checking
the layout costs one device sync, which the varlen path needs anyway for its lengths.
Installed with ``pip install "vats-core[flash-attn]"``; imported only when used.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from vats_core.attention._call import AttentionCall
from vats_core.attention.masks import is_left_padded, rows_with_keys

INSTALL_HINT = 'install it with: pip install "vats-core[flash-attn]"'
MAX_HEAD_DIM = 256


def unavailable_reason(call: AttentionCall) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn is not installed; {INSTALL_HINT}"
    if call.device.type != "cuda":
        return f"flash-attn runs on CUDA tensors only, got device {call.device}"
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, got {call.dtype}"
    if call.head_dim > MAX_HEAD_DIM:
        return f"flash-attn supports head_dim <= {MAX_HEAD_DIM}, got {call.head_dim}"
    if (
        call.key_padding_mask is not None
        and not call.position_free
        and not is_left_padded(call.key_padding_mask)
    ):
        return (
            "flash-attn with causal/window masks takes key_padding_mask only when padding "
            "is on the left (real tokens form a suffix)"
        )
    return None


def _window_size(call: AttentionCall) -> tuple[int, int]:
    if call.window is None:
        return (-1, -1)
    return (call.window - 1, 0 if call.causal else call.window - 1)


def forward(call: AttentionCall) -> Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q = call.q.transpose(1, 2)  # (B, Tq, Hq, Dh)
    k = call.k.transpose(1, 2)  # (B, Tk, Hkv, Dh)
    v = call.v.transpose(1, 2)  # (B, Tk, Hkv, Dh)
    window_size = _window_size(call)
    kpm = call.key_padding_mask
    if kpm is None:
        out = flash_attn_func(
            q,
            k,
            v,
            softmax_scale=call.scale,
            causal=call.causal,
            window_size=window_size,
        )  # (B, Tq, Hq, Dh)
    else:
        b, tq, tk = call.batch, call.q_len, call.k_len
        lengths = kpm.sum(-1, dtype=torch.int32)  # (B,)
        cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=call.device)
        real = kpm.reshape(-1).nonzero().squeeze(-1)  # (Nk,) flat indices of real keys
        k_packed = k.reshape(b * tk, call.kv_heads, call.head_dim)[real]  # (Nk, Hkv, Dh)
        v_packed = v.reshape(b * tk, call.kv_heads, call.head_dim)[real]  # (Nk, Hkv, Dh)
        out = flash_attn_varlen_func(
            q.reshape(b * tq, call.q_heads, call.head_dim),
            k_packed,
            v_packed,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=tq,
            max_seqlen_k=int(lengths.max()),
            softmax_scale=call.scale,
            causal=call.causal,
            window_size=window_size,
        ).reshape(b, tq, call.q_heads, call.head_dim)
    out = out.transpose(1, 2)  # (B, Hq, Tq, Dh)
    has_key = rows_with_keys(
        call.q_len,
        call.k_len,
        causal=call.causal,
        window=call.window,
        key_padding_mask=kpm,
        device=call.device,
    )  # (B or 1, Tq)
    # Rows with no key (a fully padded row, queries before the first key) come back as
    # zeros; ``where`` rather than a product so a kernel's NaN there cannot leak out.
    return torch.where(has_key[:, None, :, None], out, out.new_zeros(()))
