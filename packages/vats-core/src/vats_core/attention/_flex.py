"""The ``flex`` backend: ``torch.nn.attention.flex_attention`` with a block-sparse mask.

Shape legend: B batch, Hq / Hkv query / key-value heads, Tq / Tk query / key length,
Dh head dim.

The visibility rules of ``masks`` are written once as a ``mask_mod`` and turned into
a ``BlockMask`` by ``create_block_mask``: (query block, key block) tiles with no
visible pair are absent from it, so the compiled kernel never visits blocks outside
the window (:func:`flex_block_count` counts the ones it does). GQA uses
``enable_gqa=True``; fully masked rows come out as zeros.

On CUDA the compiled kernel runs (forward and backward). On CPU flex runs eagerly:
correct and differentiable but dense (compiled flex on CPU has no backward pass), so
CPU training should use ``local``. Block masks without padding are cached per shape.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from vats_core.attention._call import AttentionCall

_BLOCK_SIZE = 128  # flex's default tile; queries and keys are both cut in blocks of this


def unavailable_reason(call: AttentionCall) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"flex_attention needs torch >= 2.5 (found {torch.__version__})"
    if not call.dtype.is_floating_point:
        return f"flex needs a floating dtype, got {call.dtype}"
    if call.device.type == "cuda":
        dh = call.head_dim
        if dh < 16 or dh & (dh - 1):
            return f"compiled flex on CUDA needs a power-of-two head_dim >= 16, got {dh}"
    elif call.device.type != "cpu":
        return f"flex runs on CUDA (compiled) or CPU (eager), got device {call.device}"
    return None


def mask_mod_for(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The ``masks`` visibility rule as a flex ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    The offset and the window are captured as 0-d tensors, not ints: the compiled kernel
    then takes them as inputs. Captured ints change between calls, so torch.compile turns
    them into symbols, which torch 2.11's flex lowering cannot take (an InductorError
    seen on an H200 for a second window size).
    """
    offset = torch.tensor(k_len - q_len, device=device)
    window_t = None if window is None else torch.tensor(window, device=device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dist = q_idx + offset - kv_idx  # how far the key lies before the query
        visible = kv_idx >= 0  # all True; the rules below narrow it
        if causal:
            visible = visible & (dist >= 0)
        if window_t is not None:
            visible = visible & (dist < window_t) & (dist > -window_t)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[b, kv_idx]
        return visible

    return mask_mod


def block_mask_for(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device,
    block_size: int = _BLOCK_SIZE,
):  # -> torch.nn.attention.flex_attention.BlockMask
    """The ``BlockMask`` for one call (cached when there is no padding mask)."""
    if key_padding_mask is None:
        return _cached_block_mask(q_len, k_len, causal, window, str(device), block_size)
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = mask_mod_for(
        q_len, k_len, causal=causal, window=window, key_padding_mask=key_padding_mask, device=device
    )
    batch = key_padding_mask.shape[0]
    return create_block_mask(
        mask_mod, batch, None, q_len, k_len, device=device, BLOCK_SIZE=block_size
    )


@functools.lru_cache(maxsize=32)
def _cached_block_mask(
    q_len: int, k_len: int, causal: bool, window: int | None, device: str, block_size: int
):  # -> BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = mask_mod_for(
        q_len,
        k_len,
        causal=causal,
        window=window,
        key_padding_mask=None,
        device=torch.device(device),
    )
    return create_block_mask(
        mask_mod, None, None, q_len, k_len, device=torch.device(device), BLOCK_SIZE=block_size
    )


def flex_block_count(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None = None,
    block_size: int = _BLOCK_SIZE,
) -> int:
    """(query block, key block) tiles the compiled kernel visits, summed over the batch.

    Counts partial and full blocks of the ``BlockMask``; a dense mask would have
    ``ceil(Tq / block) · ceil(Tk / block)`` per batch row.
    """
    device = torch.device("cpu") if key_padding_mask is None else key_padding_mask.device
    bm = block_mask_for(
        q_len,
        k_len,
        causal=causal,
        window=window,
        key_padding_mask=key_padding_mask,
        device=device,
        block_size=block_size,
    )
    visited = bm.kv_num_blocks.sum()
    if bm.full_kv_num_blocks is not None:
        visited = visited + bm.full_kv_num_blocks.sum()
    return int(visited)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def forward(call: AttentionCall) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = None
    if not call.position_free or call.key_padding_mask is not None:
        block_mask = block_mask_for(
            call.q_len,
            call.k_len,
            causal=call.causal,
            window=call.window,
            key_padding_mask=call.key_padding_mask,
            device=call.device,
        )
    if call.device.type == "cuda":
        return _compiled_flex()(
            call.q,
            call.k,
            call.v,
            block_mask=block_mask,
            scale=call.scale,
            enable_gqa=call.groups > 1,
        )
    with warnings.catch_warnings():
        # Eager on CPU is deliberate (compiled flex has no CPU backward): silence the
        # "called without torch.compile" advice.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(
            call.q,
            call.k,
            call.v,
            block_mask=block_mask,
            scale=call.scale,
            enable_gqa=call.groups > 1,
        )
