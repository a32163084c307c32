"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``.

The schedule is a pure function of the step, so resuming a run needs no scheduler
state beyond the step counter. Cosine decay follows Loshchilov & Hutter, "SGDR:
Stochastic Gradient Descent with Warm Restarts" (2017), without restarts.
"""

from __future__ import annotations

import math

from vats_core.training.config import TrainerConfig


def lr_at(step: int, config: TrainerConfig) -> float:
    """Learning rate for the optimizer step with 0-based index ``step``.

    - Warmup, ``step < W``: ``lr * (step + 1) / W``, so the first step already moves
      and step ``W - 1`` uses the peak ``lr``.
    - Decay, ``W <= step``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = (step - W) / (max_steps - 1 - W)`` clamped to [0, 1]: the first step after
      warmup uses ``lr`` and the last step (``max_steps - 1``) uses exactly ``min_lr``.
      Steps past the end stay at ``min_lr``.

    Args:
        step: 0-based optimizer step index (>= 0).
        config: supplies lr, min_lr_ratio, warmup_steps, max_steps.
    """
    if step < 0:
        raise ValueError(f"step={step} is invalid: expected an int >= 0")
    peak = config.lr
    warmup = config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    min_lr = peak * config.min_lr_ratio
    decay_steps = config.max_steps - 1 - warmup
    if decay_steps <= 0:  # no room to decay: a single post-warmup step stays at the peak
        return peak if step == warmup else min_lr
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
