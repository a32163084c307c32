"""Muon on chosen weight matrices (``TrainerConfig.muon``, :class:`MuonAdamW`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vats_core.training import MuonAdamW, Trainer, TrainerConfig, build_optimizer
from vats_core.training.muon import orthogonalized


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def _batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(32, 6, generator=g)
    return {"x": x, "y": torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]), batch["y"])


def _config(tmp: Path, **overrides) -> TrainerConfig:
    fields = dict(
        max_steps=1, lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=None,
        out_dir=str(tmp), progress=False, muon=("2.weight",),
    )  # fmt: skip
    return TrainerConfig(**(fields | overrides))


def test_muon_updates_the_named_matrices_with_an_orthogonal_step(tmp_path: Path) -> None:
    start, model = _model(), _model()
    t = Trainer(model, _config(tmp_path), data=_batch, loss_fn=_loss)
    assert isinstance(t.optimizer, MuonAdamW)
    t.fit()
    # Muon's step on 2.weight is the gradient pushed towards a semi-orthogonal matrix
    # (Newton-Schulz): its leading singular values come out nearly equal, where the
    # gradient's fall off fast.
    _loss(start, _batch(0, 0)).backward()
    grad = torch.linalg.svdvals(start[2].weight.grad.double())
    step = torch.linalg.svdvals((model[2].weight - start[2].weight).detach().double())

    def flat(sv: torch.Tensor) -> int:  # singular values within half of the largest
        return int((sv > 0.5 * sv[0]).sum())

    assert flat(step) >= 8 and flat(step) >= 3 * flat(grad), (step, grad)
    # AdamW's first step moves every other parameter by lr elementwise
    moved = (model[4].weight - start[4].weight).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=0)


def test_groups_split_by_pattern_and_lr_scale(tmp_path: Path) -> None:
    model = _model()
    opt = build_optimizer(model, _config(tmp_path, muon=("*.weight",)), {"2": 0.5})
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.param_groups if g.get("muon") for p in g["params"]}
    assert muon == {id(model[i].weight) for i in (0, 2, 4)}  # the 2-D weights only
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scales[id(model[2].weight)] == 0.5 and scales[id(model[0].weight)] == 1.0
    assert all(p.ndim == 1 for g in opt.param_groups if not g.get("muon") for p in g["params"])


def test_muon_trains_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = dict(
        max_steps=8, warmup_steps=2, checkpoint_every=4, lr=3e-3, weight_decay=0.1, log_every=1
    )
    whole = _model()
    rows = Trainer(whole, _config(tmp_path / "a", **cfg), data=_batch, loss_fn=_loss).fit()
    assert rows[-1]["loss"] < rows[0]["loss"]
    part = _model()
    Trainer(part, _config(tmp_path / "b", **cfg), data=_batch, loss_fn=_loss).fit(stop_after=4)
    again = _model()
    t = Trainer(again, _config(tmp_path / "b", **cfg), data=_batch, loss_fn=_loss)
    t.fit(resume=True)
    for a, b in zip(whole.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the loaded state reaches both inner optimizers (Muon's momentum buffers too)
    buf = t.optimizer.state[again[2].weight]["momentum_buffer"]
    assert buf.abs().sum() > 0


def test_muon_differs_from_adamw(tmp_path: Path) -> None:
    a, b = _model(), _model()
    cfg = dict(max_steps=3)
    Trainer(a, _config(tmp_path / "a", **cfg), data=_batch, loss_fn=_loss).fit()
    Trainer(b, _config(tmp_path / "b", muon=(), **cfg), data=_batch, loss_fn=_loss).fit()
    assert not torch.allclose(a[2].weight, b[2].weight)
    assert isinstance(build_optimizer(_model(), _config(tmp_path, muon=())), torch.optim.AdamW)


def test_bad_muon_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no 2-D trainable parameter"):
        build_optimizer(_model(), _config(tmp_path, muon=("4.bias",)))
    with pytest.raises(ValueError, match="muon"):
        _config(tmp_path, muon=("",))
    with pytest.raises(ValueError, match="muon_momentum"):
        _config(tmp_path, muon_momentum=1.0)
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        MuonAdamW(
            [], [{"params": [nn.Parameter(torch.zeros(3))]}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8
        )


def test_one_step_is_torch_muon_s_in_float32(tmp_path: Path) -> None:
    # torch.optim.Muon with match_rms_adamw is the reference; it iterates in bfloat16, this
    # one in float32 on CPU, so the two steps agree to bfloat16's precision
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(24, 40))
    w.grad = torch.randn(24, 40)
    ref = nn.Parameter(w.detach().clone())
    ref.grad = w.grad.clone()
    bias = nn.Parameter(torch.zeros(3))
    ours = MuonAdamW(
        [{"params": [bias]}], [{"params": [w], "weight_decay": 0.1}],
        lr=0.02, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    theirs = torch.optim.Muon(
        [ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    start = w.detach().clone()
    ours.step()
    theirs.step()
    torch.testing.assert_close(w - start, ref - start, rtol=0.05, atol=2e-4)


def test_orthogonalized_flattens_the_spectrum_in_float32() -> None:
    torch.manual_seed(2)
    g = torch.randn(16, 48) @ torch.diag(torch.logspace(0, -1, 48))  # spread spectrum
    out = orthogonalized(g)
    assert out.dtype == torch.float32
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    tall = orthogonalized(g.mT.contiguous())
    torch.testing.assert_close(tall, out.mT, rtol=1e-5, atol=1e-6)
