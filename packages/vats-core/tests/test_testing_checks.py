"""vats_core.testing: every check passes on a correct model and fails on a broken one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config
from vats_core.testing import (
    check_autocast_training,
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetConfig(Config):
    dim: int = 4
    out: int = 3


@dataclasses.dataclass
class NetOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


class Net(PretrainedMixin, nn.Module):
    """A correct model: Linear, LayerNorm, a persistent buffer, a tied-free head."""

    config_class = NetConfig

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.out)
        self.register_buffer("shift", torch.zeros(config.dim))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"x has {x.shape[-1]} features, expected dim={self.config.dim}")
        return self.norm(torch.tanh(self.proj(x)) + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


class DataclassNet(Net):
    def forward(self, x: torch.Tensor) -> NetOutput:  # type: ignore[override]
        h = self.hidden(x)
        return NetOutput(logits=self.head(h), hidden=h)


class UnusedParamNet(Net):
    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        self.forgotten = nn.Linear(config.dim, config.dim)  # never called in forward


class DetachedNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return nn.functional.linear(h, self.head.weight.detach(), self.head.bias)


class AutocastDetachedNet(Net):
    """Correct in float32; under autocast its head's weight is cut from the graph (a
    hand-made low-precision copy), so it would never train in mixed precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if torch.is_autocast_enabled(x.device.type):
            weight = self.head.weight.detach().to(torch.get_autocast_dtype(x.device.type))
            return nn.functional.linear(h.to(weight.dtype), weight, None) + self.head.bias
        return self.head(h)


class BadLowPrecisionNet(Net):
    """Under autocast it computes another function: its low-precision path skips the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return self.head(torch.tanh(self.proj(x)) + self.shift)
        return super().forward(x)


class InfGradNet(Net):
    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        self.gain = nn.Parameter(torch.zeros(config.out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sqrt(self.gain)  # d sqrt(g)/dg = inf at 0


class NonPersistentStateNet(Net):
    """Keeps calibrated state in a non-persistent buffer: save_pretrained drops it."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        self.register_buffer("calibration", torch.ones(config.out), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.calibration


class PlainTensorNet(Net):
    """Holds a weight as a plain attribute: not saved, not moved by .double()/.to()."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        self.mix = torch.randn(config.out, config.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.mix


class Float32OnlyNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()  # silently leaves float64


class CpuConstantNet(Net):
    """Creates a tensor on the default (CPU) device inside forward: breaks on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.ones(self.config.out)


class NaNNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(super().forward(x) - 100.0)


def build(cls: type[Net] = Net) -> Net:
    torch.manual_seed(0)
    model = cls(NetConfig())
    with torch.no_grad():
        model.shift.uniform_(-1, 1)  # not the constructor's value: a reload must restore it
    return model


X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))


def test_correct_model_passes_every_check(tmp_path: Path) -> None:
    model = build()
    out = check_forward(model, X, (2, 5, 3))
    assert out.shape == (2, 5, 3)
    check_forward(model, (X,), (2, None, 3))  # tuple inputs, wildcard axis
    check_forward(model, {"x": X}, (2, 5, 3))  # keyword inputs
    check_backward(model, X)
    check_backward(model, X, loss_fn=lambda out: out.square().mean())
    reloaded = check_save_load_roundtrip(model, X, tmp_path)
    assert isinstance(reloaded, Net)
    check_dtype_device_moves(model, X)
    check_raises(lambda: model(torch.randn(2, 5)), ValueError, r"expected dim=4")
    assert model.training  # the checks restore the mode


def test_output_fn_picks_a_field_of_an_output_dataclass(tmp_path: Path) -> None:
    model = build(DataclassNet)
    with pytest.raises(AssertionError, match="output_fn"):
        check_forward(model, X, (2, 5, 3))
    pick = lambda out: out.logits  # noqa: E731
    check_forward(model, X, (2, 5, 3), output_fn=pick)
    check_backward(model, X, output_fn=pick)
    check_save_load_roundtrip(model, X, tmp_path, output_fn=pick)
    check_dtype_device_moves(model, X, output_fn=pick)


def test_check_forward_fails_on_wrong_shape_and_non_finite_output() -> None:
    with pytest.raises(AssertionError, match=r"shape \(2, 5, 3\), expected \(2, 5, 4\)"):
        check_forward(build(), X, (2, 5, 4))
    with pytest.raises(AssertionError, match=r"shape \(2, 5, 3\), expected \(2, 5\)"):
        check_forward(build(), X, (2, 5))
    with pytest.raises(AssertionError, match="non-finite"):
        check_forward(build(NaNNet), X, (2, 5, 3))


@pytest.mark.parametrize(
    ("cls", "message", "culprits"),
    [
        (UnusedParamNet, r"no gradient: \['forgotten.weight', 'forgotten.bias'\]", ["forgotten"]),
        (DetachedNet, r"no gradient: \['head.weight'\]", ["head"]),
        (InfGradNet, r"non-finite gradients: \['gain'\]", None),
    ],
)
def test_check_backward_fails_on_broken_gradients(
    cls: type[Net], message: str, culprits: list[str] | None
) -> None:
    model = build(cls)
    with pytest.raises(AssertionError, match=message):
        check_backward(model, X)
    assert all(p.grad is None for p in model.parameters())  # left clean
    if culprits is not None:  # naming the parameters that may lack a gradient passes
        allowed = [n for n, _ in model.named_parameters() if n.split(".")[0] in culprits]
        check_backward(model, X, allow_no_grad=allowed)


def test_check_save_load_fails_when_the_save_drops_state(tmp_path: Path) -> None:
    dropped_buffer = build(NonPersistentStateNet)
    dropped_buffer.calibration.fill_(2.0)  # state that lives outside the state_dict
    with pytest.raises(AssertionError, match="outputs differ after save/load"):
        check_save_load_roundtrip(dropped_buffer, X, tmp_path / "a")
    # A tensor that is neither parameter nor buffer stays on the meta device of the load.
    with pytest.raises(AssertionError, match=r"failed to save and reload: .*meta device.*'mix'"):
        check_save_load_roundtrip(build(PlainTensorNet), X, tmp_path / "b")
    with pytest.raises(AssertionError, match="PretrainedMixin"):
        check_save_load_roundtrip(nn.Linear(4, 3), X, tmp_path / "c")


def test_check_save_load_fails_when_the_state_does_not_survive(tmp_path: Path) -> None:
    class ReinitNet(Net):
        """Overwrites a loaded weight after loading (e.g. a buggy load hook)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def, override]
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            with torch.no_grad():
                self.proj.bias.zero_()
            return result

    with pytest.raises(AssertionError, match=r"proj\.bias differs"):
        check_save_load_roundtrip(build(ReinitNet), X, tmp_path)


def test_check_dtype_device_moves_fails_on_unregistered_tensors_and_fixed_dtypes() -> None:
    with pytest.raises(AssertionError, match=r"fails after \.double\(\)"):
        check_dtype_device_moves(build(PlainTensorNet), X)
    with pytest.raises(AssertionError, match=r"returns torch\.float32, expected float64"):
        check_dtype_device_moves(build(Float32OnlyNet), X)


def test_check_raises_fails_when_it_should() -> None:
    def bad() -> None:
        raise ValueError("dim must be positive")

    error = check_raises(bad, ValueError, "positive")
    assert isinstance(error, ValueError)
    with pytest.raises(AssertionError, match="nothing was raised"):
        check_raises(lambda: None, ValueError)
    with pytest.raises(AssertionError, match="expected ValueError, got KeyError"):
        check_raises(lambda: {}["k"], ValueError)
    with pytest.raises(AssertionError, match="does not match 'negative'"):
        check_raises(bad, ValueError, "negative")


def test_autocast_training_check_passes_a_correct_model_and_catches_broken_ones() -> None:
    check_autocast_training(build(), X, "cpu")  # bf16 autocast runs on CPU too
    with pytest.raises(AssertionError, match=r"no finite gradient .*\['head.weight'\]"):
        check_autocast_training(build(AutocastDetachedNet), X, "cpu")
    with pytest.raises(AssertionError, match="relative error"):
        check_autocast_training(build(BadLowPrecisionNet), X, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_moves_on_cuda() -> None:
    check_dtype_device_moves(build(), X)
    with pytest.raises(AssertionError, match=r"fails after \.to\(cuda\)"):
        check_dtype_device_moves(build(CpuConstantNet), X)  # fine on CPU, broken once moved
