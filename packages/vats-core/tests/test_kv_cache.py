"""KV caches: incremental decoding (static and rolling) equals one full forward, through the
Attention module and through a stack of TransformerBlocks; left padding; reset and crop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vats_core.attention.layer import Attention, AttentionConfig
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.kv_cache import KVCaches, RollingKVCache, StaticKVCache
from vats_core.mlp import MLPConfig
from vats_core.rope import RopeConfig, RotaryEmbedding

F64 = torch.float64
DIM, HEADS, KV_HEADS, DH = 16, 4, 2, 4


def _attn(window: int | None = None) -> Attention:
    torch.manual_seed(0)
    cfg = AttentionConfig(
        dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, causal=True, window=window, qk_norm=True
    )
    return Attention(cfg).double()


ROPE = RotaryEmbedding(RopeConfig(head_dim=DH))


def _rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ROPE(positions, dtype=F64)


def _static(batch: int = 2, max_len: int = 32) -> StaticKVCache:
    return StaticKVCache(
        batch_size=batch, n_kv_heads=KV_HEADS, max_len=max_len, head_dim=DH, dtype=F64
    )


def _rolling(window: int, batch: int = 2) -> RollingKVCache:
    return RollingKVCache(
        batch_size=batch, n_kv_heads=KV_HEADS, window=window, head_dim=DH, dtype=F64
    )


def _run_chunks(layer, x: torch.Tensor, cache, chunks: list[int]) -> torch.Tensor:
    """Feed ``x`` (B, T, D) through ``layer`` chunk by chunk, positions continuing."""
    outs, start = [], 0
    for size in chunks:
        xs = x[:, start : start + size]
        outs.append(layer(xs, rope=_rope(torch.arange(start, start + size)), cache=cache))
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 3, 2], [12]])
def test_static_cache_decoding_equals_full_forward(chunks: list[int]) -> None:
    attn = _attn()
    x = torch.randn(2, 12, DIM, dtype=F64)
    full = attn(x, rope=_rope(torch.arange(12)))
    cache = _static()
    torch.testing.assert_close(_run_chunks(attn, x, cache, chunks), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 12 and cache.seq_lens().tolist() == [12, 12]


@pytest.mark.parametrize("chunks", [[1] * 26, [9, 1, 1, 6, 1, 8], [2, 11, 13]])
def test_rolling_cache_decoding_equals_full_forward(chunks: list[int]) -> None:
    # The sequence is 6.5 windows long; chunks of 9, 11 and 13 are longer than the window.
    window = 4
    attn = _attn(window)
    x = torch.randn(2, 26, DIM, dtype=F64)
    full = attn(x, rope=_rope(torch.arange(26)))
    cache = _rolling(window)
    torch.testing.assert_close(_run_chunks(attn, x, cache, chunks), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 26


@pytest.mark.parametrize("window", [1, 2, 5])
def test_rolling_cache_memory_is_O_window(window: int) -> None:
    torch.manual_seed(1)
    cache = _rolling(window)
    numel = cache.k.numel() + cache.v.numel()
    assert numel == 2 * 2 * KV_HEADS * (window - 1) * DH
    for _ in range(50):
        k = torch.randn(2, KV_HEADS, 1, DH, dtype=F64)
        k_all, _, mask = cache.update(k, k)
        # Attention sees at most window keys per decode step, in chronological order.
        assert k_all.shape[2] == min(cache.length, window) and mask is None
        assert torch.equal(k_all[:, :, -1:], k)
    assert cache.k.numel() + cache.v.numel() == numel
    assert cache.length == 50


def test_rolling_cache_returns_keys_in_chronological_order() -> None:
    cache = RollingKVCache(batch_size=1, n_kv_heads=1, window=4, head_dim=1, dtype=F64)
    seen: list[float] = []
    for step, size in enumerate([2, 3, 1, 5, 1]):
        new = torch.arange(len(seen), len(seen) + size, dtype=F64).view(1, 1, size, 1)
        k_all, _, _ = cache.update(new, new)
        held = seen[-3:]
        seen += new.flatten().tolist()
        assert k_all.flatten().tolist() == held + new.flatten().tolist(), step


def _stack(window: int | None) -> nn.ModuleList:
    """Two pre-norm blocks: a global layer and (if window) a sliding-window layer."""
    torch.manual_seed(2)
    blocks = []
    for layer_window in (None, window):
        cfg = BlockConfig(
            attention=AttentionConfig(
                dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, causal=True, window=layer_window
            ),
            mlp=MLPConfig(dim=DIM, hidden_dim=24),
        )
        blocks.append(TransformerBlock(cfg))
    return nn.ModuleList(blocks).double()


def _stack_forward(blocks, x, rope, kpm=None, caches=None) -> torch.Tensor:
    for i, block in enumerate(blocks):
        x, stats = block(
            x, rope=rope, key_padding_mask=kpm, cache=None if caches is None else caches[i]
        )
        assert stats is None
    return x


def _stack_caches(batch: int, window: int | None, max_len: int = 32) -> KVCaches:
    return KVCaches.for_layers(
        [None, window],
        batch_size=batch,
        max_len=max_len,
        n_kv_heads=KV_HEADS,
        head_dim=DH,
        dtype=F64,
    )


@pytest.mark.parametrize("window", [None, 3])
def test_block_stack_decoding_equals_full_forward(window: int | None) -> None:
    blocks = _stack(window)
    x = torch.randn(2, 14, DIM, dtype=F64)
    full = _stack_forward(blocks, x, _rope(torch.arange(14)))
    caches = _stack_caches(2, window)
    assert isinstance(caches[1], RollingKVCache if window else StaticKVCache)
    outs = [_stack_forward(blocks, x[:, :5], _rope(torch.arange(5)), caches=caches)]
    for t in range(5, 14):
        outs.append(
            _stack_forward(blocks, x[:, t : t + 1], _rope(torch.arange(t, t + 1)), caches=caches)
        )
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert caches.length == 14


def test_left_padded_batch_decoding_equals_unpadded_rows() -> None:
    # Row 0: prompt of 6 tokens; row 1: prompt of 3, left-padded to 6. Then 5 decode steps.
    blocks, window = _stack(3), 3
    lengths, n_new, width = [6, 3], 5, 6
    torch.manual_seed(3)
    rows = [torch.randn(1, n + n_new, DIM, dtype=F64) for n in lengths]
    expected = [_stack_forward(blocks, r, _rope(torch.arange(r.shape[1]))) for r in rows]

    prompt = torch.zeros(2, width, DIM, dtype=F64)
    kpm = torch.zeros(2, width, dtype=torch.bool)
    positions = torch.zeros(2, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, width - n :] = rows[b][0, :n]
        kpm[b, width - n :] = True
        positions[b, width - n :] = torch.arange(n)  # pads keep position 0; they are masked
    caches = _stack_caches(2, window)
    out = _stack_forward(blocks, prompt, _rope(positions), kpm=kpm, caches=caches)
    assert torch.isfinite(out).all()  # pad queries see no key: zeros, never NaN
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, width - n :], expected[b][0, :n], rtol=1e-10, atol=1e-10)

    for step in range(n_new):
        pos = caches[0].seq_lens()  # each row's next position: its real token count
        assert pos.tolist() == [n + step for n in lengths]
        x = torch.stack([rows[b][0, lengths[b] + step] for b in range(2)]).unsqueeze(1)
        out = _stack_forward(blocks, x, _rope(pos[:, None]), caches=caches)
        for b in range(2):
            torch.testing.assert_close(
                out[b, 0], expected[b][0, lengths[b] + step], rtol=1e-10, atol=1e-10
            )
    assert caches[1].seq_lens().tolist() == [n + n_new for n in lengths]


def test_reset_restarts_and_crop_rolls_back() -> None:
    attn = _attn()
    torch.manual_seed(4)
    x, y = torch.randn(2, 10, DIM, dtype=F64), torch.randn(2, 4, DIM, dtype=F64)
    cache = _static(max_len=12)
    first = _run_chunks(attn, x, cache, [6, 4])
    cache.reset()
    assert cache.length == 0 and cache.seq_lens().tolist() == [0, 0]
    torch.testing.assert_close(_run_chunks(attn, x, cache, [10]), first)

    # Roll back to 6 tokens and continue with different ones: as if they had been fed first.
    cache.crop(6)
    assert cache.length == 6 and cache.seq_lens().tolist() == [6, 6]
    out = attn(y, rope=_rope(torch.arange(6, 10)), cache=cache)
    seq = torch.cat([x[:, :6], y], dim=1)
    full = attn(seq, rope=_rope(torch.arange(10)))
    torch.testing.assert_close(out, full[:, 6:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"crop\(length=11\)"):
        cache.crop(11)


def test_rolling_crop_only_before_wraparound() -> None:
    window = 5
    attn = _attn(window)
    torch.manual_seed(5)
    x, y = torch.randn(2, 4, DIM, dtype=F64), torch.randn(2, 3, DIM, dtype=F64)
    cache = _rolling(window)
    _run_chunks(attn, x, cache, [4])  # holds 4 = window - 1 tokens: not wrapped yet
    cache.crop(2)
    out = attn(y, rope=_rope(torch.arange(2, 5)), cache=cache)
    full = attn(torch.cat([x[:, :2], y], 1), rope=_rope(torch.arange(5)))
    torch.testing.assert_close(out, full[:, 2:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="wraps around"):
        cache.crop(3)  # 5 tokens seen, only 4 held
    cache.reset()
    assert cache.length == 0


def test_caches_container_and_cache_choice() -> None:
    caches = KVCaches.for_layers([None, 4, 100], batch_size=1, max_len=16, n_kv_heads=2, head_dim=4)
    assert [type(c).__name__ for c in caches] == [
        "StaticKVCache",
        "RollingKVCache",
        "StaticKVCache",
    ]
    assert caches[1].capacity == 3 and caches[0].capacity == 16
    for c in caches:
        c.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert caches.length == 3
    caches.crop(1)
    assert all(c.length == 1 for c in caches)
    caches.reset()
    assert caches.length == 0
    assert not caches.state_dict()  # caches are never saved with a model


def test_update_errors() -> None:
    cache = _static(batch=2, max_len=4)
    with pytest.raises(ValueError, match=r"shape \(B=2, Hkv=2, T, Dh=4\)"):
        cache.update(torch.zeros(2, 3, 1, DH, dtype=F64), torch.zeros(2, 3, 1, DH, dtype=F64))
    with pytest.raises(ValueError, match=r"holds torch\.float64"):
        cache.update(torch.zeros(2, KV_HEADS, 1, DH), torch.zeros(2, KV_HEADS, 1, DH))
    k = torch.zeros(2, KV_HEADS, 3, DH, dtype=F64)
    with pytest.raises(ValueError, match="key_padding_mask"):
        cache.update(k, k, torch.ones(2, 2, dtype=torch.bool))
    cache.update(k, k)
    with pytest.raises(ValueError, match="full"):
        cache.update(k, k)
    with pytest.raises(ValueError, match="window=0"):
        _rolling(0)
    with pytest.raises(ValueError, match="max_len=0"):
        _static(max_len=0)


def test_rolling_cache_rejected_where_it_would_drop_visible_keys() -> None:
    x = torch.randn(2, 3, DIM, dtype=F64)
    for layer in (_attn(None), _attn(6)):  # global attention, or a wider window
        with pytest.raises(ValueError, match="StaticKVCache"):
            layer(x, cache=_rolling(4))
    _attn(3)(x, cache=_rolling(4))  # a wider cache than the window is still exact
