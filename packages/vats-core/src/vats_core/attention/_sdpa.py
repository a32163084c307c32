"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

Shape legend: B batch, Hq / Hkv query / key-value heads, Tq / Tk query / key length,
Dh head dim.

Torch picks its fastest kernel (flash / memory-efficient / cuDNN on CUDA, a fused
flash kernel on CPU). GQA uses ``enable_gqa=True`` so K/V are not repeated where the
kernel supports it. Torch's ``is_causal`` aligns top-left, ours bottom-right, so the
``is_causal`` fast path is taken only when the two agree (Tq == Tk); any other masked
call gets an explicit boolean mask (which costs O(Tq·Tk) memory; long windowed
sequences belong on ``local``, ``flex`` or ``flash``).

On CUDA, calls of fewer queries than keys (decoding and chunked prefill against a KV
cache, whose key length changes every step) leave cuDNN out: its kernel is planned per
shape, and on an H200 (torch 2.11) it spent 6.4 ms of CPU per call in decoding, 76 % of
the step; flash and memory-efficient kernels take those calls.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from vats_core.attention._call import AttentionCall
from vats_core.attention.masks import full_mask


def unavailable_reason(call: AttentionCall) -> str | None:
    if not call.dtype.is_floating_point:
        return f"sdpa needs a floating dtype, got {call.dtype}"
    return None


def forward(call: AttentionCall) -> Tensor:
    gqa = call.groups > 1
    tq, tk = call.q_len, call.k_len
    no_padding = call.key_padding_mask is None
    # A window at least as long as the keys hides none of them (every distance is < Tk), as
    # in decoding while the cache is shorter than the window: no mask to build then.
    window = call.window if call.window is not None and call.window < tk else None
    if no_padding and window is None and (not call.causal or tq == 1):
        # Nothing masked: a lone causal query sits at the last key and sees them all.
        return _sdpa(call, None, is_causal=False, gqa=gqa)
    if no_padding and window is None and tq == tk:
        return _sdpa(call, None, is_causal=True, gqa=gqa)

    mask = full_mask(
        tq,
        tk,
        causal=call.causal,
        window=window,
        key_padding_mask=call.key_padding_mask,
        device=call.device,
    )  # (B or 1, 1, Tq, Tk)
    assert mask is not None  # every branch that reaches here masks something
    has_key = mask.any(-1, keepdim=True)  # (B or 1, 1, Tq, 1)
    # A row with no visible key would softmax over nothing (NaN); let it see every key
    # instead and zero its output, which also keeps its gradient at zero.
    mask = mask | ~has_key
    return _sdpa(call, mask, is_causal=False, gqa=gqa) * has_key


# Every SDPA kernel but cuDNN, for CUDA calls with a changing key length (module docstring).
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(call: AttentionCall, mask: Tensor | None, *, is_causal: bool, gqa: bool) -> Tensor:
    cached = call.device.type == "cuda" and call.q_len < call.k_len
    with sdpa_kernel(_NO_CUDNN) if cached else contextlib.nullcontext():
        return F.scaled_dot_product_attention(
            call.q,
            call.k,
            call.v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=call.scale,
            enable_gqa=gqa,
        )
