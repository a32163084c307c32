"""Double backward (``create_graph=True``: gradient penalties) through vats' hand-written
autograd nodes. Under ``create_graph`` each node's backward returns its gradients as a graph
of plain ops (vats_core._autograd), so the penalty's gradients must equal torch.func's
grad-of-grad, which runs plain torch ops throughout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad

from vats_core.linear import MIN_TIMED_MACS, Linear
from vats_core.moe import MoE, MoEConfig
from vats_core.norms import RMSNorm
from vats_core.rope import RopeConfig, RotaryEmbedding, apply_rotary

Call = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _nodes(t: torch.Tensor) -> set[str]:
    """The class names of every node in ``t``'s graph."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _check_penalty(module: torch.nn.Module, x: torch.Tensor, call: Call, node: str) -> None:
    """``‖∂ sum(tanh(f(x))) / ∂x‖²``'s parameter gradients: eager (vats' nodes, their
    backward under create_graph) against torch.func (plain ops)."""
    x_eager = x.clone().requires_grad_()
    out = call(module, x_eager)
    assert node in _nodes(out), f"{node} not on the eager path: {_nodes(out)}"
    (grad_x,) = torch.autograd.grad(out.tanh().sum(), x_eager, create_graph=True)
    module.zero_grad()
    grad_x.square().sum().backward()

    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p: dict[str, torch.Tensor], x_: torch.Tensor) -> torch.Tensor:
        return call(_Bound(module, p), x_).tanh().sum()

    def penalty(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return grad(inner, argnums=1)(p, x).square().sum()

    expected = grad(penalty)(params)
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert expected[name].abs().max() > 0, name  # the penalty reaches every parameter
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


class _Bound:
    """``module`` called with ``params`` in place of its own (torch.func.functional_call)."""

    def __init__(self, module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.module, self.params = module, params

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.params, args)


def test_gradient_penalty_through_the_timed_linear():
    torch.manual_seed(0)
    linear = Linear(512, 512)
    x = torch.randn(128, 512) / 8
    assert x.shape[0] * 512 * 512 >= MIN_TIMED_MACS  # the hand-written node's path
    _check_penalty(linear, x, lambda m, x_: m(x_), "_LinearFunctionBackward")


@pytest.mark.parametrize("strided", [False, True])
def test_gradient_penalty_through_the_fused_rmsnorm(strided):
    torch.manual_seed(1)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 48).t() if strided else torch.randn(48, 64)  # (48, 64) either way
    assert x.is_contiguous() != strided
    _check_penalty(norm, x, lambda m, x_: m(x_), "_RMSNormFunctionBackward")


def test_gradient_penalty_through_rope():
    # RoPE has no parameters: the penalty's gradient is taken against a linear before it.
    torch.manual_seed(2)
    b, h, t, dh = 2, 2, 16, 32
    proj = torch.nn.Linear(dh, dh)
    cos, sin = RotaryEmbedding(RopeConfig(head_dim=dh))(torch.arange(t))

    def call(m: torch.nn.Module, x_: torch.Tensor) -> torch.Tensor:
        return apply_rotary(m(x_), cos, sin)

    _check_penalty(proj, torch.randn(b, h, t, dh), call, "_RotaryBackward")


@pytest.mark.parametrize("grouped", ["off", "on"])
def test_gradient_penalty_through_the_moe(grouped):
    torch.manual_seed(3)
    config = MoEConfig(dim=32, hidden_dim=64, n_experts=4, top_k=2, grouped_mm=grouped)
    moe = MoE(config)
    node = "_ExpertsLoopBackward" if grouped == "off" else "_SwiGLUBackward"
    try:
        _check_penalty(moe, torch.randn(2, 16, 32), lambda m, x_: m(x_)[0], node)
    except (RuntimeError, ValueError) as e:
        if grouped == "on" and "grouped" in str(e).lower():
            pytest.skip(f"this torch runs no grouped_mm here: {e}")
        raise
