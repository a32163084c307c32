"""TransformerBlock: pre-norm structure, dense and MoE feed-forward, cross-attention,
padding pass-through to the MoE, backward, config validation."""

from __future__ import annotations

import pytest
import torch

from vats_core.attention.layer import AttentionConfig
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.mlp import Activation, MLPConfig
from vats_core.moe import MoEConfig, RouterStats
from vats_core.norms import LayerNorm, NormType, RMSNorm
from vats_core.rope import RopeConfig, RotaryEmbedding

F64 = torch.float64
SELF = AttentionConfig(dim=16, n_heads=4, n_kv_heads=2, causal=True)
CROSS = AttentionConfig(dim=16, n_heads=2, context_dim=12)
MLP = MLPConfig(dim=16, hidden_dim=32)
MOE = MoEConfig(dim=16, hidden_dim=8, n_experts=4, top_k=2)


def _check_backward(block: TransformerBlock, loss: torch.Tensor) -> None:
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dense_block_is_pre_norm_composition() -> None:
    torch.manual_seed(0)
    cfg = BlockConfig(
        attention=SELF,
        cross_attention=CROSS,
        mlp=MLP.replace(activation=Activation.GELU, bias=True),
        norm=NormType.LAYERNORM,
        norm_eps=1e-5,
    )
    block = TransformerBlock(cfg).double()
    assert isinstance(block.attn_norm, LayerNorm) and block.attn_norm.eps == 1e-5
    x = torch.randn(2, 5, 16, dtype=F64)
    ctx = torch.randn(2, 3, 12, dtype=F64)
    cmask = torch.tensor([[True, True, False], [True, True, True]])
    rope = RotaryEmbedding(RopeConfig(head_dim=4))(torch.arange(5), dtype=F64)
    out, stats = block(x, rope=rope, context=ctx, context_mask=cmask)
    assert stats is None

    h = x + block.attn(block.attn_norm(x), rope=rope)
    h = h + block.cross_attn(block.cross_attn_norm(h), context=ctx, context_mask=cmask)
    expected = h + block.ffn(block.ffn_norm(h))
    torch.testing.assert_close(out, expected)
    _check_backward(block, out.square().mean())


def test_moe_block_returns_stats_and_excludes_padding() -> None:
    torch.manual_seed(1)
    block = TransformerBlock(BlockConfig(attention=SELF, moe=MOE))
    assert isinstance(block.attn_norm, RMSNorm)
    x = torch.randn(2, 6, 16)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[0, :2] = False  # left padding on row 0
    out, stats = block(x, key_padding_mask=kpm)
    assert out.shape == x.shape and isinstance(stats, RouterStats)
    # The block's padding mask reaches the MoE: only the 10 real tokens are counted.
    assert int(stats.tokens_per_expert.sum()) == 10 * MOE.top_k
    _, unmasked = block(x)
    assert int(unmasked.tokens_per_expert.sum()) == 12 * MOE.top_k
    _check_backward(block, out[kpm].square().mean() + stats.load_balancing_loss + stats.z_loss)


def test_block_context_errors() -> None:
    plain = TransformerBlock(BlockConfig(attention=SELF, mlp=MLP))
    with pytest.raises(ValueError, match="cross-attention"):
        plain(torch.randn(1, 2, 16), context=torch.randn(1, 3, 16))
    cross = TransformerBlock(BlockConfig(attention=SELF, cross_attention=CROSS, mlp=MLP))
    with pytest.raises(ValueError, match="cross-attention"):
        cross(torch.randn(1, 2, 16))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attention": SELF}, "mlp"),
        ({"attention": SELF, "mlp": MLP, "moe": MOE}, "moe"),
        ({"attention": SELF, "mlp": MLP.replace(dim=8)}, "mlp"),
        ({"attention": SELF, "moe": MOE.replace(dim=8)}, "moe"),
        ({"attention": CROSS, "mlp": MLP}, "attention"),
        ({"attention": SELF, "cross_attention": SELF, "mlp": MLP}, "cross_attention"),
        ({"attention": SELF, "mlp": MLP, "norm": "batchnorm"}, "norm"),
        ({"attention": SELF, "mlp": MLP, "norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"BlockConfig\.{field}="):
        BlockConfig(**kwargs)


def test_config_round_trip() -> None:
    cfg = BlockConfig(attention=SELF, cross_attention=CROSS, moe=MOE, norm="layernorm")
    assert cfg.norm is NormType.LAYERNORM
    assert BlockConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("ffn", ["mlp", "moe"])
def test_out_tokens_gives_the_full_calls_first_rows(ffn: str) -> None:
    # A classifier's last block: only the first tokens' queries and MLP run; every token
    # is still a key. Same rows as the full call, padding and RoPE included; gradients flow.
    torch.manual_seed(2)
    attn = AttentionConfig(dim=16, n_heads=4, n_kv_heads=2)  # bidirectional, no window
    extra = {"mlp": MLP} if ffn == "mlp" else {"moe": MOE}
    block = TransformerBlock(BlockConfig(attention=attn, **extra)).double()
    x = torch.randn(2, 7, 16, dtype=F64, requires_grad=True)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False  # right padding on row 1 (keys it must not see)
    rope = RotaryEmbedding(RopeConfig(head_dim=4))(torch.arange(7), dtype=F64)
    full, _ = block(x, rope=rope, key_padding_mask=kpm)
    for n in (1, 3):
        part, _ = block(x, rope=rope, key_padding_mask=kpm, out_tokens=n)
        assert part.shape == (2, n, 16)
        torch.testing.assert_close(part, full[:, :n], rtol=1e-12, atol=1e-12)
    part.sum().backward()
    assert x.grad is not None and x.grad[:, 3:].abs().sum() > 0  # keys/values get gradients


def test_out_tokens_refuses_layers_where_fewer_queries_change_the_keys() -> None:
    x = torch.randn(1, 5, 16)
    refused = (
        AttentionConfig(dim=16, n_heads=4, causal=True),
        AttentionConfig(dim=16, n_heads=4, window=2),
    )
    for cfg in refused:
        block = TransformerBlock(BlockConfig(attention=cfg, mlp=MLP))
        with pytest.raises(ValueError, match="out_tokens needs bidirectional"):
            block(x, out_tokens=1)
    block = TransformerBlock(BlockConfig(attention=AttentionConfig(dim=16, n_heads=4), mlp=MLP))
    for bad in (0, 6, 1.0, True):
        with pytest.raises(ValueError, match="out_tokens must be"):
            block(x, out_tokens=bad)
