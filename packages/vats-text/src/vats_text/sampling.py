"""Next-token selection: logits processors and sampling, independent of any model.

The processors run in the order Hugging Face ``generate`` applies them, so the same settings
pick from the same distribution:

1. repetition penalty (Keskar et al., 2019, "CTRL", arXiv:1909.05858): the logit of every
   token already present (prompt or generated) is divided by ``penalty`` when positive and
   multiplied by it when negative, so ``penalty > 1`` always makes repeats less likely;
2. temperature: ``logits / temperature`` (0 = greedy: argmax after step 1);
3. top-k (Fan et al., 2018): keep the ``k`` largest logits (ties with the k-th are kept);
4. top-p / nucleus (Holtzman et al., 2020, arXiv:1904.09751): keep the smallest set of most
   probable tokens whose probability mass reaches ``p``;
5. min-p (Nguyen et al., 2024, arXiv:2407.01082): keep tokens whose probability is at least
   ``min_p`` times the most probable token's;

then draw one token per row with ``torch.multinomial`` (reproducible with a seeded
``torch.Generator``). Removed tokens get ``-inf`` logits; every filter keeps at least the
most probable token, so a row is never left with nothing to sample.

Shapes: B batch rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from vats_core.config import Config, check, check_at_least, check_positive

__all__ = [
    "SamplingConfig",
    "apply_repetition_penalty",
    "min_p_filter",
    "process_logits",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig(Config):
    """How the next token is chosen from the logits (the defaults are greedy decoding)."""

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before sampling
    top_k: int | None = None  # keep the k most likely tokens; None = no top-k
    top_p: float | None = None  # nucleus mass in (0, 1]; None (or 1) = no top-p
    min_p: float | None = None  # keep p >= min_p * p_max, in [0, 1]; None (or 0) = no min-p
    repetition_penalty: float = 1.0  # > 0; 1 = off, > 1 discourages repeats (CTRL)

    def __post_init__(self) -> None:
        check_at_least(self, 0, "temperature")
        check_positive(self, "top_k", "repetition_penalty")
        p = self.top_p
        check(p is None or 0 < p <= 1, self, "top_p", p, "None or a number in (0, 1]")
        m = self.min_p
        check(m is None or 0 <= m <= 1, self, "min_p", m, "None or a number in [0, 1]")

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (temperature 0)."""
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Penalize the tokens each row has already seen (HF / CTRL semantics).

    Args:
        logits: ``(B, V)`` float.
        seen: ``(B, V)`` bool, True where the token occurs in the row's prompt or output.
        penalty: > 0; a seen token's positive logit is divided by it, a negative one multiplied.

    Returns:
        ``(B, V)`` new logits.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (and ties with the k-th), ``-inf`` the rest.

    Args:
        logits: ``(B, V)``.
        k: >= 1; k >= V keeps everything.

    Returns:
        ``(B, V)``.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens with mass >= ``p``.

    A token is dropped when the tokens ranked above it already hold mass >= ``p``, so the most
    probable token is always kept.

    Args:
        logits: ``(B, V)``.
        p: in (0, 1]; 1 keeps everything.

    Returns:
        ``(B, V)``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better-ranked tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the row's largest.

    Args:
        logits: ``(B, V)``.
        min_p: in [0, 1]; 0 keeps everything, 1 keeps only the most probable token(s).

    Returns:
        ``(B, V)``.
    """
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, -math.inf)


def process_logits(logits: Tensor, config: SamplingConfig, seen: Tensor | None = None) -> Tensor:
    """Run the processors of ``config`` in HF order (see the module docstring).

    Args:
        logits: ``(B, V)``; computed on in float32 (or float64) whatever their dtype.
        config: the sampling settings.
        seen: ``(B, V)`` bool tokens already present; needed iff ``repetition_penalty != 1``.

    Returns:
        ``(B, V)`` float32 (or float64) scores: ``-inf`` for removed tokens. For greedy
        settings only the repetition penalty is applied (the others cannot change the argmax).
    """
    scores = logits if logits.dtype == torch.float64 else logits.float()
    if config.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the (B, V) `seen` token mask")
        scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if config.greedy:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k is not None:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p is not None:
        scores = top_p_filter(scores, config.top_p)
    if config.min_p is not None:
        scores = min_p_filter(scores, config.min_p)
    return scores


def sample_next_token(
    logits: Tensor,
    config: SamplingConfig,
    *,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row.

    Args:
        logits: ``(B, V)`` next-token logits.
        config: the sampling settings (``temperature == 0``: argmax).
        seen: ``(B, V)`` bool, tokens already present; needed iff ``repetition_penalty != 1``.
        generator: random source of ``torch.multinomial`` (same device as ``logits``).

    Returns:
        ``(B,)`` long token ids.
    """
    scores = process_logits(logits, config, seen)
    if config.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)  # (B, V); -inf -> 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
