"""The ``xformers`` backend: ``xformers.ops.memory_efficient_attention`` (CUDA, optional extra).

Shape legend: B batch, Hkv key/value heads, G query heads per kv head, Tq / Tk query /
key length, Dh head dim. xformers takes (B, T, H, Dh) ("BMHK"), or (B, T, Hkv, G, Dh)
("BMGHK") for GQA, where K/V are broadcast over G with stride 0 (never copied).

Masks: xformers' structured biases are used where they say exactly what ``masks``
says, so the kernel skips masked tiles:

* causal -> ``LowerTriangularFromBottomRightMask`` (bottom-right, as ours);
* causal window w -> ``LowerTriangularFromBottomRightLocalAttentionMask(w)``
  (key visible iff 0 <= p - j < w);
* bidirectional window w -> ``LocalAttentionFromBottomRightMask(w - 1, w - 1)``
  (visible iff p - (w - 1) <= j <= p + (w - 1)).

With a key padding mask (or Tq > Tk, where some rows see nothing) a dense additive
bias is built instead: O(Tq·Tk) memory per batch row, broadcast over heads.
Installed with ``pip install "vats-core[xformers]"``; imported only when used.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from vats_core.attention._call import AttentionCall
from vats_core.attention.masks import full_mask, rows_with_keys

INSTALL_HINT = 'install it with: pip install "vats-core[xformers]"'


def unavailable_reason(call: AttentionCall) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return f"xformers is not installed; {INSTALL_HINT}"
    if call.device.type != "cuda":
        return f"xformers runs on CUDA tensors only, got device {call.device}"
    if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers needs float16, bfloat16 or float32, got {call.dtype}"
    return _operator_reason(call)


# Verdicts of xformers' dispatcher by call signature, filled by eager calls. Under
# torch.compile the dispatcher is not traced: a compiled call uses xformers only where an
# eager call of the same signature found a kernel (else SDPA or the next backend serves it).
_VERDICTS: dict[tuple, str | None] = {}
_NOT_PROBED = "not probed in eager mode, so not used under torch.compile"


def _operator_reason(call: AttentionCall) -> str | None:
    """Why no xformers kernel takes this call, in xformers' words, or None if one does.

    xformers installs without its CUDA kernels when its build does not match torch (or
    leaves out kernels for a head dim or dtype); it then imports fine and fails inside
    ``memory_efficient_attention``. Its dispatcher is asked first, with the call's
    layout and the bias kind it would get (a dense bias by a stride-0 stand-in).
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))
    key = (
        tuple(call.q.shape),
        tuple(call.k.shape),
        call.dtype,
        str(call.device),
        call.causal,
        call.window,
        call.key_padding_mask is None,
        grad,
    )
    if torch.compiler.is_compiling():
        return _VERDICTS.get(key, _NOT_PROBED)
    if key not in _VERDICTS:
        if len(_VERDICTS) > 4096:
            _VERDICTS.clear()
        _VERDICTS[key] = _ask_dispatcher(call, grad)
    return _VERDICTS[key]


def _ask_dispatcher(call: AttentionCall, grad: bool) -> str | None:
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw
    except ImportError as err:  # a broken install, or the dispatcher moved
        return f"xformers cannot be imported or probed ({err}); {INSTALL_HINT}"
    q, k, v = _layout(call)
    bias = _bias(call, fmha, dense=_proxy_dense_bias)[0]
    inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias, scale=call.scale)
    try:
        inp.validate_inputs()
        inp.normalize_bmhk()
        _dispatch_fw(inp, grad)
        if grad:
            _dispatch_bw(inp, varlen_lse_packed=None)
    except (NotImplementedError, ValueError) as err:
        return f"no xformers kernel serves this call ({_short_reasons(str(err))})"
    return None


def _short_reasons(message: str) -> str:
    """xformers' "`op` is not supported because:" blocks, each on one line."""
    out, op = [], None
    for line in message.splitlines():
        if line.rstrip().endswith("is not supported because:"):
            op = line.strip().split("`")[1] if "`" in line else line.strip()
            out.append(f"{op}: ")
        elif op is not None and line.startswith(" "):
            out[-1] += ("" if out[-1].endswith(": ") else ", ") + line.strip()
    return "; ".join(out) if out else message.strip().splitlines()[0]


def _layout(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V as xformers takes them (views, no copies)."""
    b, hkv, g = call.batch, call.kv_heads, call.groups
    tq, tk, dh = call.q_len, call.k_len, call.head_dim
    # (B, Hq, Tq, Dh) -> (B, Tq, Hkv, G, Dh); K/V (B, Hkv, Tk, Dh) -> (B, Tk, Hkv, G, Dh)
    q = call.q.reshape(b, hkv, g, tq, dh).permute(0, 3, 1, 2, 4)
    k = call.k.permute(0, 2, 1, 3)[:, :, :, None].expand(b, tk, hkv, g, dh)
    v = call.v.permute(0, 2, 1, 3)[:, :, :, None].expand(b, tk, hkv, g, dh)
    if g == 1:  # plain multi-head: the 4-D layout every xformers kernel takes
        q, k, v = q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0]
    return q, k, v


def _bias(call: AttentionCall, fmha, *, dense) -> tuple[object, Tensor | None]:
    """xformers' bias for the call, and the rows that see a key (dense bias only)."""
    tq, tk = call.q_len, call.k_len
    structured = call.key_padding_mask is None and tq <= tk
    has_key = None
    if call.position_free and call.key_padding_mask is None:
        bias = None
    elif structured and call.window is None:
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
    elif structured and call.causal:
        bias = fmha.attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(call.window)
    elif structured:
        assert call.window is not None
        bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(
            window_left=call.window - 1, window_right=call.window - 1
        )
    else:
        bias, has_key = dense(call)
    return bias, has_key


def forward(call: AttentionCall) -> Tensor:
    from xformers.ops import fmha

    b, hkv, g, tq, dh = call.batch, call.kv_heads, call.groups, call.q_len, call.head_dim
    q, k, v = _layout(call)
    bias, has_key = _bias(call, fmha, dense=_dense_bias)
    out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias, scale=call.scale)
    if g == 1:
        out = out[:, :, :, None]
    out = out.permute(0, 2, 3, 1, 4).reshape(b, hkv * g, tq, dh)  # (B, Hq, Tq, Dh)
    if has_key is not None:
        out = out * has_key[:, None, :, None]
    return out


def _proxy_dense_bias(call: AttentionCall) -> tuple[Tensor, None]:
    """A stand-in with the dense bias's shape, dtype and row alignment, one row in memory."""
    aligned = -(-call.k_len // 8) * 8
    row = torch.zeros(aligned, dtype=call.dtype, device=call.device)[: call.k_len]
    shape = (call.batch, call.kv_heads, call.q_len, call.k_len)
    if call.groups > 1:
        shape = (call.batch, call.kv_heads, call.groups, call.q_len, call.k_len)
    return row.expand(shape), None


def _dense_bias(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Additive bias (B, [Hkv, G,] Tq, Tk) with -inf where hidden, and rows that see a key.

    xformers wants the bias rows aligned to 8 elements, so it is allocated with Tk
    rounded up and sliced; fully hidden rows are opened (and zeroed after) so no NaN.
    """
    b, hkv, g, tq, tk = call.batch, call.kv_heads, call.groups, call.q_len, call.k_len
    mask = full_mask(
        tq,
        tk,
        causal=call.causal,
        window=call.window,
        key_padding_mask=call.key_padding_mask,
        device=call.device,
    )
    assert mask is not None
    mask = mask[:, 0].expand(b, tq, tk)  # (B, Tq, Tk)
    has_key = rows_with_keys(
        tq,
        tk,
        causal=call.causal,
        window=call.window,
        key_padding_mask=call.key_padding_mask,
        device=call.device,
    ).expand(b, tq)  # (B, Tq)
    mask = mask | ~has_key[:, :, None]
    aligned = -(-tk // 8) * 8
    bias = torch.zeros(b, tq, aligned, dtype=call.dtype, device=call.device)
    bias[:, :, :tk].masked_fill_(~mask, float("-inf"))
    bias = bias[:, :, :tk]  # (B, Tq, Tk), row stride a multiple of 8
    if g == 1:
        bias = bias[:, None].expand(b, hkv, tq, tk)  # (B, H, Tq, Tk)
    else:
        bias = bias[:, None, None].expand(b, hkv, g, tq, tk)  # (B, Hkv, G, Tq, Tk)
    return bias, has_key.to(call.dtype)
