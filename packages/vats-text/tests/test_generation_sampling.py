"""vats_text.sampling: each logits processor on hand-checked cases, the HF order, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vats_core.testing import check_raises
from vats_text.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    min_p_filter,
    process_logits,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)


def _kept(scores: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(torch.isfinite(scores[0])).flatten()}


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", 0),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_sampling_config_rejects(field, value):
    check_raises(lambda: SamplingConfig(**{field: value}), ValueError, field)


def test_sampling_config_accepts_edges():
    SamplingConfig(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=0.5)
    SamplingConfig(min_p=1.0, top_p=1e-6)
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.7).greedy


# ------------------------------------------------------------------ processors


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    assert _kept(top_k_filter(logits, 2)) == {1, 4}
    assert _kept(top_k_filter(logits, 1)) == {1}
    assert _kept(top_k_filter(logits, 9)) == {0, 1, 2, 3, 4}
    # The kept logits are unchanged.
    assert top_k_filter(logits, 3)[0, [1, 4, 2]].tolist() == [5.0, 4.0, 3.0]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = _logits_of([0.15, 0.5, 0.05, 0.3])
    assert _kept(top_p_filter(logits, 0.4)) == {1}
    assert _kept(top_p_filter(logits, 0.5)) == {1}  # 0.5 alone reaches 0.5
    assert _kept(top_p_filter(logits, 0.75)) == {1, 3}
    assert _kept(top_p_filter(logits, 0.85)) == {1, 3, 0}
    assert _kept(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert _kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert _kept(top_p_filter(logits, 1e-9)) == {1}  # never empty


@settings(max_examples=30, deadline=None)
@given(
    probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12),
    p=st.floats(0.05, 0.95),
)
def test_top_p_is_minimal_and_sufficient(probs, p):
    total = sum(probs)
    probs = [x / total for x in probs]
    kept = _kept(top_p_filter(_logits_of(probs), p))
    mass = sum(probs[i] for i in kept)
    assert mass >= p - 1e-6  # enough mass
    assert mass - min(probs[i] for i in kept) < p + 1e-6  # dropping any kept token falls short
    assert all(probs[i] >= probs[j] - 1e-9 for i in kept for j in set(range(len(probs))) - kept)


def test_min_p_keeps_tokens_above_scaled_max():
    logits = _logits_of([0.15, 0.5, 0.05, 0.3])
    assert _kept(min_p_filter(logits, 0.5)) == {1, 3}  # threshold 0.25
    assert _kept(min_p_filter(logits, 0.25)) == {0, 1, 3}  # threshold 0.125
    assert _kept(min_p_filter(logits, 0.0)) == {0, 1, 2, 3}
    assert _kept(min_p_filter(logits, 1.0)) == {1}


def test_repetition_penalty_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -1.0, 1.0, -1.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_process_logits_hf_order():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    seen = torch.rand(3, 20) < 0.3
    cfg = SamplingConfig(temperature=0.7, top_k=8, top_p=0.8, min_p=0.1, repetition_penalty=1.3)
    expected = min_p_filter(
        top_p_filter(top_k_filter(apply_repetition_penalty(logits, seen, 1.3) / 0.7, 8), 0.8),
        0.1,
    )
    torch.testing.assert_close(process_logits(logits, cfg, seen), expected)
    check_raises(lambda: process_logits(logits, cfg), ValueError, "seen")


def test_process_logits_upcasts_half_logits():
    logits = torch.randn(2, 10).to(torch.bfloat16)
    assert process_logits(logits, SamplingConfig(temperature=1.0)).dtype == torch.float32


# -------------------------------------------------------------------- sampling


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample_next_token(logits, SamplingConfig()).tolist() == [0]
    cfg = SamplingConfig(repetition_penalty=2.0)
    assert sample_next_token(logits, cfg, seen=seen).tolist() == [1]  # 3 / 2 < 2


def test_sampling_reproducible_and_within_filters():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    cfg = SamplingConfig(temperature=1.3, top_k=5)
    a = sample_next_token(logits, cfg, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, cfg, generator=torch.Generator().manual_seed(7))
    c = sample_next_token(logits, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top5 = logits.topk(5, dim=-1).indices
    assert bool((top5 == a[:, None]).any(dim=-1).all())


def test_sampling_frequencies_follow_tempered_softmax():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, 4)
    cfg = SamplingConfig(temperature=0.5)
    tokens = sample_next_token(logits, cfg, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    expected = (probs.log() / 0.5).softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
