"""The trainer's per-step hook: called once per optimizer step, after the update."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vats_core.training import Trainer, TrainerConfig


def _batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(8, 4, generator=g)
    return {"x": x, "y": x.sum(-1, keepdim=True)}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]), batch["y"])


def _config(tmp: Path, **overrides) -> TrainerConfig:
    fields = dict(max_steps=5, lr=1e-2, warmup_steps=0, out_dir=str(tmp), progress=False)
    return TrainerConfig(**(fields | overrides))


def test_on_step_sees_every_optimizer_step_after_its_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    seen: list[tuple[int, torch.Tensor]] = []

    def on_step(step: int, m: nn.Module) -> None:
        assert m is model
        seen.append((step, m.weight.detach().clone()))

    config = _config(tmp_path, grad_accum_steps=2)  # once per step, not per micro-batch
    Trainer(model, config, data=_batch, loss_fn=_loss, on_step=on_step).fit()
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    # Each call holds the weights of its own step: all distinct, the last the final ones.
    weights = [w for _, w in seen]
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(weights))
    assert torch.equal(weights[-1], model.weight)


def test_on_step_does_not_change_the_run(tmp_path: Path) -> None:
    runs = []
    for hook in (None, lambda step, m: None):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        Trainer(
            model, _config(tmp_path / str(len(runs))), data=_batch, loss_fn=_loss, on_step=hook
        ).fit()
        runs.append(model.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_on_step_must_be_callable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_step must be None or a callable"):
        Trainer(nn.Linear(4, 1), _config(tmp_path), data=_batch, loss_fn=_loss, on_step=3)
