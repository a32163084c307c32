"""MoELanguageModel with KV caches: incremental decoding equals full forwards."""

from __future__ import annotations

import pytest
import torch

from vats_core.kv_cache import RollingKVCache
from vats_core.testing import check_raises
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset

# Windows of 3 and 5 over sequences of ~30 tokens: the rolling caches wrap many times.
_WINDOWS = [5, None, 3]


def _model() -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(lm_preset("tiny", layer_windows=_WINDOWS)).eval()


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(7, 512, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prefill", [1, 4, 11])
@torch.no_grad()
def test_lm_cached_decoding_equals_full_forward(prefill):
    model = _model()
    ids = _ids(2, 30)
    full = model(ids).logits
    caches = model.setup_caches(2, 30)
    chunks = [model(ids[:, :prefill], caches=caches).logits]
    for t in range(prefill, 30):
        chunks.append(model(ids[:, t : t + 1], caches=caches).logits)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert caches.length == 30


@torch.no_grad()
def test_lm_chunked_prefill_equals_full_forward():
    model = _model()
    ids = _ids(1, 29)
    full = model(ids).logits
    caches = model.setup_caches(1, 29)
    chunks = [model(ids[:, s : s + 7], caches=caches).logits for s in range(0, 29, 7)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lm_left_padded_batch_equals_unpadded_rows():
    """Full forward and cached decoding of a left-padded batch match each row run alone."""
    model = _model()
    lengths = [20, 9, 14]
    width, new = max(lengths), 12
    prompts = _ids(3, width, seed=2)
    continuation = _ids(3, new, seed=3)
    batch = torch.zeros(3, width, dtype=torch.long)  # PAD_ID = 0 on the left
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        batch[i, width - n :] = prompts[i, :n]
        mask[i, width - n :] = True

    padded_full = model(batch, attention_mask=mask).logits
    caches = model.setup_caches(3, width + new)
    prefill = model(batch, attention_mask=mask, caches=caches).logits
    torch.testing.assert_close(prefill, padded_full, rtol=1e-5, atol=1e-5)
    steps = []
    for t in range(new):
        # The mask covers only the new token (all real); the caches remember the padding.
        steps.append(model(continuation[:, t : t + 1], caches=caches).logits)
    decoded = torch.cat(steps, dim=1)  # (3, new, V)

    for i, n in enumerate(lengths):
        alone = model(torch.cat([prompts[i : i + 1, :n], continuation[i : i + 1]], dim=1)).logits
        torch.testing.assert_close(padded_full[i, width - n :], alone[0, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoded[i], alone[0, n:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lm_rolling_cache_memory_is_bounded_by_window():
    model = _model()
    caches = model.setup_caches(1, 200)
    for layer, cache in enumerate(caches):
        window = _WINDOWS[layer]
        if window is None:
            assert cache.capacity == 200
        else:
            assert isinstance(cache, RollingKVCache) and cache.capacity == window - 1
    model(_ids(1, 8), caches=caches)
    for t in range(40):
        model(_ids(1, 1, seed=t), caches=caches)
    assert caches.length == 48
    assert caches[0].k.shape[2] == 4 and caches[2].k.shape[2] == 2  # never grew


@torch.no_grad()
def test_lm_cache_errors():
    model = _model()
    check_raises(lambda: model.setup_caches(0, 8), ValueError, "batch_size")
    check_raises(lambda: model.setup_caches(1, 0), ValueError, "max_len")
    check_raises(lambda: model.setup_caches(1, 257), ValueError, "max_seq_len")
    caches = model.setup_caches(2, 8)
    check_raises(lambda: model(_ids(3, 2), caches=caches), ValueError, "batch size")
    model(_ids(2, 6), caches=caches)
    check_raises(lambda: model(_ids(2, 3), caches=caches), ValueError, "full")
    wide = model.setup_caches(1, 4, dtype=torch.float64)
    assert wide[1].k.dtype == torch.float64
