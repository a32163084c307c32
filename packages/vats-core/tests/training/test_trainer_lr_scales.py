"""Per-module learning-rate multipliers (``Trainer(lr_scales=...)``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vats_core.training import Trainer, TrainerConfig, build_optimizer


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(16, 4, generator=g)
    return {"x": x, "y": x.sum(-1, keepdim=True)}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]), batch["y"])


def _config(tmp: Path, **overrides) -> TrainerConfig:
    fields = dict(
        max_steps=1, lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=None,
        out_dir=str(tmp), progress=False,
    )  # fmt: skip
    return TrainerConfig(**(fields | overrides))


def _steps(before: nn.Module, after: nn.Module) -> dict[str, float]:
    """The largest |change| of each parameter."""
    old = dict(before.named_parameters())
    return {n: float((p.detach() - old[n]).abs().max()) for n, p in after.named_parameters()}


def test_first_adam_step_moves_each_module_by_its_scaled_lr(tmp_path: Path) -> None:
    # Adam's first update is lr * g / (|g| + eps) elementwise: lr in size wherever g != 0,
    # so each parameter moves by exactly its group's learning rate.
    start, model = _model(), _model()
    scales = {"0": 0.1, "0.bias": 0.25}  # the longest prefix wins for 0.bias
    Trainer(model, _config(tmp_path), data=_batch, loss_fn=_loss, lr_scales=scales).fit()
    moved = _steps(start, model)
    expected = {"0.weight": 1e-3, "0.bias": 2.5e-3, "2.weight": 1e-2, "2.bias": 1e-2}
    for name, lr in expected.items():
        assert math.isclose(moved[name], lr, rel_tol=1e-3), (name, moved[name], lr)


def test_scales_follow_the_schedule_and_survive_a_resume(tmp_path: Path) -> None:
    cfg = dict(max_steps=6, warmup_steps=2, checkpoint_every=3)
    scales = {"2": 0.3}
    whole = _model()
    Trainer(
        whole, _config(tmp_path / "a", **cfg), data=_batch, loss_fn=_loss, lr_scales=scales
    ).fit()
    part = _model()
    t = Trainer(part, _config(tmp_path / "b", **cfg), data=_batch, loss_fn=_loss, lr_scales=scales)
    t.fit(stop_after=3)
    lrs = [g["lr"] for g in t.optimizer.param_groups if g["params"]]
    assert sorted(lrs) == pytest.approx(sorted([lrs[0], lrs[0], 0.3 * lrs[0], 0.3 * lrs[0]]))
    again = _model()
    Trainer(
        again, _config(tmp_path / "b", **cfg), data=_batch, loss_fn=_loss, lr_scales=scales
    ).fit(resume=True)
    for a, b in zip(whole.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_scales_the_groups_are_unchanged(tmp_path: Path) -> None:
    groups = build_optimizer(_model(), _config(tmp_path)).param_groups
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    assert {p.ndim for p in groups[0]["params"]} == {2}
    assert {p.ndim for p in groups[1]["params"]} == {1}


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({"encoder": 0.1}, "matches no trainable parameter"),
        ({"0": 0.0}, "expected a number > 0"),
        ({"0": -1.0}, "expected a number > 0"),
        ({"0": float("nan")}, "expected a number > 0"),
        ({"0": True}, "expected a number > 0"),
        ({"": 0.5}, "parameter-name prefixes"),
    ],
)
def test_bad_scales_are_refused_before_any_step(tmp_path: Path, scales, message) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        Trainer(model, _config(tmp_path), data=_batch, loss_fn=_loss, lr_scales=scales)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_frozen_module_cannot_be_scaled(tmp_path: Path) -> None:
    model = _model()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        build_optimizer(model, _config(tmp_path), {"0": 0.5})
