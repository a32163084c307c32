"""vats_diffusion.ema: the shadow equals the closed form of the moving average (constant and
warm-up decay), float32 shadows keep updates a bf16 model cannot hold, buffers are copied,
weights swap in and back (also on an exception), state round trips through
torch.save(weights_only) and resumes identically, mismatches are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vats_core.testing import check_raises
from vats_diffusion.ema import EMA


def _toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.named_parameters()}


def _train_steps(model: nn.Module, ema: EMA, k: int) -> list[dict[str, torch.Tensor]]:
    """k fake optimizer steps (new random weights, a forward for the BN statistics), each
    followed by an EMA update; returns the weights after every step."""
    seen = []
    for _ in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))
        ema.update(model)
        seen.append(_params(model))
    return seen


def _closed_form(p0, steps, decays):
    """shadow_K = (Π d_n)·p0 + Σ_j (1 − d_j)·(Π_{n > j} d_n)·p_j, in float64."""
    out = {}
    for name in p0:
        total = torch.tensor(decays, dtype=torch.float64).prod() * p0[name]
        for j, params in enumerate(steps):
            later = torch.tensor(decays[j + 1 :], dtype=torch.float64).prod()
            total = total + (1 - decays[j]) * later * params[name]
        out[name] = total
    return out


@pytest.mark.parametrize("warmup", [False, True])
def test_shadow_is_the_closed_form_average(warmup: bool) -> None:
    model = _toy()
    p0 = _params(model)
    ema = EMA(model, decay=0.9, warmup=warmup)
    assert ema.current_decay() == (0.1 if warmup else 0.9)  # (1 + 0) / (10 + 0)
    steps = _train_steps(model, ema, 12)
    decays = [min(0.9, (1 + n) / (10 + n)) if warmup else 0.9 for n in range(12)]
    expected = _closed_form(p0, steps, decays)
    for name, value in expected.items():
        assert ema.shadow[name].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[name].double(), value, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 12
    # buffers are copied, not averaged: the latest running statistics and batch count
    for name, b in model.named_buffers():
        assert torch.equal(ema.buffers[name], b)
    assert ema.buffers["1.num_batches_tracked"].item() == 12


def test_float32_shadow_keeps_updates_bf16_cannot_hold() -> None:
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2**-7)  # the next bf16 number after 1
    ema.update(model)
    expected = 1.0 + 0.001 * 2**-7  # 1 + 7.8e-6: rounds back to 1 in bf16
    assert abs(ema.shadow["weight"].item() - expected) < 1e-7
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16 and model.weight.item() == 1.0


def test_applied_to_swaps_and_restores() -> None:
    model = _toy()
    ema = EMA(model, decay=0.5)
    _train_steps(model, ema, 3)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3)
    averaged = _toy(seed=1)
    ema.copy_to(averaged)
    with ema.applied_to(model) as swapped:
        assert swapped is model
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[name])
        torch.testing.assert_close(model.eval()(x), averaged.eval()(x), rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name])
    with pytest.raises(RuntimeError, match="boom"), ema.applied_to(model):
        model.train()(torch.randn(8, 3))  # changes BN statistics inside the block
        raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name]), name


def test_state_dict_round_trip_and_resume(tmp_path) -> None:
    model = _toy()
    ema = EMA(model, decay=0.8, warmup=True)
    _train_steps(model, ema, 4)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = EMA(_toy(seed=3), decay=0.1)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert (resumed.decay, resumed.warmup, resumed.num_updates) == (0.8, True, 4)
    for a, b in ((ema.shadow, resumed.shadow), (ema.buffers, resumed.buffers)):
        for name in a:
            assert torch.equal(a[name], b[name])
    model.train()(torch.randn(8, 3))
    ema.update(model)
    resumed.update(model)
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], resumed.shadow[name])


def test_errors_name_the_problem_and_change_nothing() -> None:
    model = _toy()
    check_raises(lambda: EMA(model, decay=1.0), ValueError, r"decay=1\.0 is invalid")
    check_raises(lambda: EMA(model, decay=True), ValueError, "decay=True")
    check_raises(lambda: EMA("model"), ValueError, "nn.Module")
    ema = EMA(model)
    other = nn.Sequential(nn.Linear(3, 4))
    check_raises(lambda: ema.update(other), ValueError, r"missing \['1.bias', '1.weight'")
    check_raises(
        lambda: ema.copy_to(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(4), nn.Linear(4, 2))),
        ValueError,
        r"'0.weight' is \(5, 3\)",
    )
    state = ema.state_dict()
    before = {k: v.clone() for k, v in ema.shadow.items()}
    bad = state | {
        "shadow": state["shadow"] | {"0.weight": torch.zeros(4, 3).double()},
        "num_updates": 7,
    }
    check_raises(
        lambda: ema.load_state_dict(bad), ValueError, r"'0.weight' is \(4, 3\) torch.float64"
    )
    check_raises(lambda: ema.load_state_dict({"shadow": {}}), ValueError, "expected keys")
    assert ema.num_updates == 0
    for name, value in before.items():
        assert torch.equal(ema.shadow[name], value)
