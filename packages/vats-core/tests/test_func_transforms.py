"""torch.func transforms (grad, vmap) through vats modules, which are plain torch ops: the
results equal ordinary backward passes (per-sample gradients, functional training)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from vats_core.attention.layer import AttentionConfig
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.mlp import MLPConfig
from vats_core.moe import MoE, MoEConfig
from vats_core.rope import RopeConfig, RotaryEmbedding


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def _assert_grads_close(got: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# torch's CPU flash attention has no batching rule: vmap loops over it (its warning).
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_per_sample_gradients_through_a_block_match_a_loop() -> None:
    # RMSNorm, qk-norm, RoPE, the fused q/k/v projection and SwiGLU under vmap(grad),
    # against one backward a sample.
    torch.manual_seed(0)
    dim, t = 256, 96
    block = TransformerBlock(
        BlockConfig(
            attention=AttentionConfig(dim=dim, n_heads=4, qk_norm=True),
            mlp=MLPConfig(dim=dim, hidden_dim=512),
        )
    )
    rope = RotaryEmbedding(RopeConfig(head_dim=dim // 4))(torch.arange(t))
    x = torch.randn(3, t, dim)

    def loss(params: dict[str, torch.Tensor], x_TD: torch.Tensor) -> torch.Tensor:
        out, _ = functional_call(block, params, (x_TD[None],), {"rope": rope})
        return out.square().mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(_params(block), x)
    for i in range(x.shape[0]):
        block.zero_grad()
        block(x[i : i + 1], rope=rope)[0].square().mean().backward()
        _assert_grads_close({k: v[i] for k, v in per_sample.items()}, block)


@pytest.mark.parametrize("grouped_mm", ["off", "auto"])
def test_grad_through_the_moe_matches_backward(grouped_mm: str) -> None:
    # (vmap cannot run the MoE: which tokens reach which expert is data.)
    torch.manual_seed(1)
    moe = MoE(MoEConfig(dim=32, hidden_dim=64, n_experts=4, top_k=2, grouped_mm=grouped_mm))
    x = torch.randn(2, 16, 32)
    got = grad(lambda p: functional_call(moe, p, (x,))[0].square().sum())(_params(moe))
    moe(x)[0].square().sum().backward()
    _assert_grads_close(got, moe)
