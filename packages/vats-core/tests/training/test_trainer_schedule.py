"""lr_at: linear warmup then cosine decay, on hand-computed values."""

from __future__ import annotations

import pytest

from vats_core.training import TrainerConfig, lr_at


def test_warmup_then_cosine_hand_values() -> None:
    cfg = TrainerConfig(lr=1.0, warmup_steps=2, max_steps=7, min_lr_ratio=0.1)
    # Decay spans steps 2..6 (4 intervals): p = 0, 1/4, 1/2, 3/4, 1.
    # lr = 0.1 + 0.9 * (1 + cos(pi p)) / 2; cos(pi/4) = 0.70710678...
    expected = [
        0.5,  # warmup: (0 + 1) / 2
        1.0,  # warmup: (1 + 1) / 2
        1.0,
        0.1 + 0.45 * 1.7071067811865475,
        0.55,
        0.1 + 0.45 * 0.2928932188134524,
        0.1,  # the last step uses exactly min_lr
    ]
    assert [lr_at(s, cfg) for s in range(7)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_at(100, cfg) == pytest.approx(0.1)  # past the end: stays at min_lr


def test_no_warmup_and_edge_cases() -> None:
    cfg = TrainerConfig(lr=2.0, warmup_steps=0, max_steps=3, min_lr_ratio=0.0)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([2.0, 1.0, 0.0], abs=1e-15)
    one = TrainerConfig(lr=3.0, warmup_steps=0, max_steps=1, min_lr_ratio=0.5)
    assert lr_at(0, one) == 3.0
    all_warmup = TrainerConfig(lr=1.0, warmup_steps=4, max_steps=4, min_lr_ratio=0.5)
    assert [lr_at(s, all_warmup) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, cfg)
