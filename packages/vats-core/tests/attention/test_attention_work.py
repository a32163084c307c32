"""The sliding-window paths do O(T·window) work, shown by counting tiles, not by timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vats_core.attention import _local, attention
from vats_core.attention._flex import flex_block_count
from vats_core.attention._local import default_block_size, local_work

WINDOW = 512


@pytest.mark.parametrize("causal", [True, False])
def test_local_work_is_linear_in_t_and_bounded_by_window(causal):
    block = default_block_size(WINDOW)
    reach = (WINDOW - 1) * (1 if causal else 2)
    works = {t: local_work(t, t, window=WINDOW, causal=causal) for t in (2048, 4096, 8192, 16384)}
    for t, work in works.items():
        assert work == t * (block + reach)  # every tile is Q x (Q + reach): O(T·window)
        assert block + reach <= 3 * WINDOW  # so per-query work does not grow with T
    assert works[16384] == 8 * works[2048]  # doubling T doubles the work
    assert works[16384] < 0.1 * 16384**2  # dense attention would do T^2


def test_local_work_counts_what_the_kernel_computes(monkeypatch):
    """Record the tiles the local path hands to SDPA: their score count is local_work."""
    seen: list[int] = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kw):
        # q (B·N, Hkv, G·Q, Dh), k (B·N, Hkv, L, Dh): scores per head = G·Q·L per tile
        seen.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(_local.F, "scaled_dot_product_attention", counting_sdpa)
    b, hq, hkv, t, window = 2, 4, 2, 1000, 64
    q, k, v = torch.randn(b, hq, t, 8), torch.randn(b, hkv, t, 8), torch.randn(b, hkv, t, 8)
    attention(q, k, v, causal=True, window=window, backend="local")
    assert seen == [b * hq * local_work(t, t, window=window, causal=True)]
    assert seen[0] < 0.25 * b * hq * t * t


def test_flex_block_mask_skips_blocks_outside_the_window():
    window, block = 256, 128
    counts = {t: flex_block_count(t, t, causal=True, window=window) for t in (1024, 2048, 4096)}
    for t, count in counts.items():
        n = t // block
        dense_causal = n * (n + 1) // 2
        # Each query block touches its own block and at most window/block + 1 before it.
        assert count <= n * (window // block + 2)
        assert count < dense_causal or t <= window
    assert counts[4096] - counts[2048] == 2 * (counts[2048] - counts[1024])  # linear growth
    assert flex_block_count(4096, 4096, causal=True, window=None) == 32 * 33 // 2


def test_flex_block_mask_skips_fully_padded_key_blocks():
    kpm = torch.zeros(2, 512, dtype=torch.bool)
    kpm[0, :128] = True  # one real key block
    kpm[1] = True
    count = flex_block_count(512, 512, causal=False, window=None, key_padding_mask=kpm)
    assert count == 4 * 1 + 4 * 4  # row 0 visits one key block per query block, row 1 all
