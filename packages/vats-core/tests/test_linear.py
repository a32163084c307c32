"""vats_core.linear: the fused CPU inference path equals F.linear (+ GELU) and is taken exactly
where the module docstring says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vats_core import linear as L
from vats_core.linear import MIN_ROWS, Linear, linear

ONEDNN = torch.backends.mkldnn.is_available()


def _operands(rows: int, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen) / 7
    b = torch.randn(80, generator=gen) if bias else None
    return x, w, b


def _reference(x, w, b, activation):
    y = F.linear(x, w, b)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, MIN_ROWS])
def test_linear_equals_reference(activation, bias, rows):
    x, w, b = _operands(rows, bias)
    with torch.no_grad():
        got = linear(x, w, b, activation)
        # Strided inputs too: a slice of the tokens and a transposed batch.
        got_slice = linear(x[:, :1], w, b, activation)
        got_t = linear(x.transpose(0, 1), w, b, activation)
    torch.testing.assert_close(got, _reference(x, w, b, activation), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_slice, _reference(x[:, :1], w, b, activation))
    torch.testing.assert_close(got_t, _reference(x.transpose(0, 1), w, b, activation))


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_strided_weight_and_bias(activation):
    # Views as operands (a column slice of a wider weight, every other bias entry): the
    # fused kernel reads a bias as dense, so linear() must hand it a dense one.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MIN_ROWS, 96, generator=gen)[:, :48]
    w = torch.randn(80, 96, generator=gen)[:, ::2] / 7
    b = torch.randn(160, generator=gen)[::2]
    with torch.no_grad():
        got = linear(x, w, b, activation)
    torch.testing.assert_close(got, _reference(x, w, b, activation), rtol=1e-5, atol=1e-5)


def test_fused_path_taken_only_where_it_pays():
    x, w, b = _operands(MIN_ROWS)
    use = L._use_onednn
    with torch.no_grad():
        assert use(x, w, b, None) and use(x, w, None, "gelu")
        assert not use(x, w, None, None)  # nothing to fuse
        assert not use(x[:, :1], w, b, None)  # decoding-sized: 2 rows
        assert not use(x.double(), w.double(), b.double(), None)
        assert not use(x, w, b.double(), None)  # F.linear then reports the mismatch
        with torch.backends.mkldnn.flags(enabled=False):
            assert not use(x, w, b, None)
    assert use(x, w, b, None)  # grad mode, but nothing requires a gradient
    assert not use(x, w.requires_grad_(), b, None)


def test_gradients_flow_through_the_plain_path():
    module = Linear(48, 80)
    x = torch.randn(2, MIN_ROWS, 48, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and module.weight.grad is not None and module.bias.grad is not None
    ref = torch.nn.Linear(48, 80)
    ref.load_state_dict(module.state_dict())  # same parameters, same state dict
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_activation_raises():
    x, w, b = _operands(2)
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, w, b, "relu")
