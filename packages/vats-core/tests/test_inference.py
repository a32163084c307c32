"""compile_frozen: inductor with freezing gives eager's outputs; misuse fails clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from vats_core import inference
from vats_core.inference import FrozenModel, compile_frozen


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 4)
    ).eval()


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_frozen_inductor_equals_eager() -> None:
    """The real thing: inductor, freezing on, one small module and one shape (a few s)."""
    torch._dynamo.reset()
    model = _net()
    frozen = compile_frozen(model)
    with torch.no_grad():
        expected = model(X)
        first = frozen(X)
        again = frozen(X)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, first)  # deterministic, and no recompile changed anything


def test_wrapper_compiles_once_and_lists_the_weights_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CompileCounter()
    monkeypatch.setattr(inference, "_BACKEND", counter)
    torch._dynamo.reset()
    model = _net()
    frozen = compile_frozen(model)
    assert isinstance(frozen, FrozenModel) and frozen.module is model and not frozen.training
    assert [id(p) for p in frozen.parameters()] == [id(p) for p in model.parameters()]
    assert list(frozen.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(frozen(X), model(X))
    with torch.inference_mode():
        assert torch.equal(frozen(X), model(X))
    assert counter.frame_count >= 1
    frames = counter.frame_count
    with torch.no_grad():
        frozen(X)
    assert counter.frame_count == frames  # warm: no new compile for the same shape


def test_misuse_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "_BACKEND", "eager")
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"training mode: call model\.eval\(\)"):
        compile_frozen(_net().train())
    with pytest.raises(ValueError, match=r"needs an nn\.Module"):
        compile_frozen(lambda x: x)  # type: ignore[arg-type]

    model = _net()
    frozen = compile_frozen(model)
    with pytest.raises(RuntimeError, match=r"gradients off: call it inside torch\.no_grad\(\)"):
        frozen(X)
    with torch.no_grad():
        frozen(X)
        model.train()
        with pytest.raises(RuntimeError, match="put back in training mode"):
            frozen(X)
        model.eval()
        frozen(X)

    # An optimizer step changes the weights in place: the frozen constants are stale.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X).sum().backward()
    optimizer.step()
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match=r"0\.weight .*compile_frozen\(model\) again"),
    ):
        frozen(X)
    # So does load_state_dict (it copies into the parameters).
    model = _net()
    frozen = compile_frozen(model)
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    with torch.no_grad(), pytest.raises(RuntimeError, match="changed after compile_frozen"):
        frozen(X)
    with torch.no_grad():  # a new compile_frozen serves the new weights
        assert torch.equal(compile_frozen(model)(X), model(X))


def test_missing_setuptools_is_reported_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = inference.importlib.util.find_spec
    monkeypatch.setattr(
        inference.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "setuptools" else find_spec(name, *args),
    )
    with pytest.raises(ValueError, match="needs setuptools"):
        compile_frozen(_net())
