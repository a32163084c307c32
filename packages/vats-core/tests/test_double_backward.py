"""Double backward (``create_graph=True``: gradient penalties, meta-learning) through vats
modules: the penalty's gradients equal torch.func's grad-of-grad."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad

from vats_core.attention import AttentionConfig, attention_backend
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.mlp import MLPConfig
from vats_core.moe import MoE, MoEConfig
from vats_core.norms import RMSNorm
from vats_core.rope import RopeConfig, RotaryEmbedding, apply_rotary

Call = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _check_penalty(
    module: torch.nn.Module,
    x: torch.Tensor,
    call: Call,
    reference: torch.nn.Module | None = None,
) -> None:
    """``‖∂ sum(tanh(f(x))) / ∂x‖²``'s parameter gradients: eager autograd with
    ``create_graph`` against torch.func's grad of grad (run through ``reference``, a module
    with the same parameter names computing the same function, where given)."""
    x_eager = x.clone().requires_grad_()
    out = call(module, x_eager)
    (grad_x,) = torch.autograd.grad(out.tanh().sum(), x_eager, create_graph=True)
    module.zero_grad()
    grad_x.square().sum().backward()

    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p: dict[str, torch.Tensor], x_: torch.Tensor) -> torch.Tensor:
        return call(_Bound(reference or module, p), x_).tanh().sum()

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

    def __call__(self, *args: torch.Tensor, **kwargs: object) -> object:
        return functional_call(self.module, self.params, args, kwargs)


def test_gradient_penalty_through_a_block():
    # Fused q/k/v projection, QK-norm, RoPE, RMSNorm and SwiGLU, with the math attention
    # backend (torch's CPU flash attention has no double backward).
    torch.manual_seed(0)
    dim, t = 32, 12
    block = TransformerBlock(
        BlockConfig(
            attention=AttentionConfig(dim=dim, n_heads=4, n_kv_heads=2, qk_norm=True),
            mlp=MLPConfig(dim=dim, hidden_dim=48),
        )
    )
    rope = RotaryEmbedding(RopeConfig(head_dim=dim // 4))(torch.arange(t))
    with attention_backend("math"):
        _check_penalty(block, torch.randn(2, t, dim), lambda m, x_: m(x_, rope=rope)[0])


@pytest.mark.parametrize("strided", [False, True])
def test_gradient_penalty_through_the_fused_rmsnorm(strided):
    torch.manual_seed(1)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 48).t() if strided else torch.randn(48, 64)  # (48, 64) either way
    assert x.is_contiguous() != strided
    _check_penalty(norm, x, lambda m, x_: m(x_))


def test_gradient_penalty_through_rope():
    # RoPE has no parameters: the penalty's gradient is taken against a linear before it.
    torch.manual_seed(2)
    b, h, t, dh = 2, 2, 16, 32
    proj = torch.nn.Linear(dh, dh)
    cos, sin = RotaryEmbedding(RopeConfig(head_dim=dh))(torch.arange(t))

    def call(m: torch.nn.Module, x_: torch.Tensor) -> torch.Tensor:
        return apply_rotary(m(x_), cos, sin)

    _check_penalty(proj, torch.randn(b, h, t, dh), call)


@pytest.mark.parametrize("grouped", ["off", "on"])
def test_gradient_penalty_through_the_moe(grouped):
    # (torch.func runs the loop: grouped_mm needs real storage. Eager, "on" takes the CPU
    # grouped_mm kernel.)
    torch.manual_seed(3)
    config = MoEConfig(dim=32, hidden_dim=64, n_experts=4, top_k=2, grouped_mm=grouped)
    moe = MoE(config)
    loop = MoE(config.replace(grouped_mm="off"))
    _check_penalty(moe, torch.randn(2, 16, 32), lambda m, x_: m(x_)[0], reference=loop)
