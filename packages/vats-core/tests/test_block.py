"""TransformerBlock: pre-norm structure, dense and MoE feed-forward, cross-attention,
padding pass-through to the MoE, backward, config validation. FactorizedBlock: equals
attention run by hand per frame, then per token position; frames independent without the
temporal step; padding frames and padding context tokens masked; input checks."""

from __future__ import annotations

import pytest
import torch

from vats_core.attention.layer import AttentionConfig
from vats_core.block import BlockConfig, FactorizedBlock, TransformerBlock
from vats_core.mlp import Activation, MLPConfig
from vats_core.moe import MoEConfig, RouterStats
from vats_core.norms import LayerNorm, NormType, RMSNorm
from vats_core.rope import RopeConfig, RotaryEmbedding
from vats_core.testing import check_autocast_training

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
        ({"attention": SELF, "mlp": MLP.replace(out_dim=8)}, "mlp"),
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


# ---------------------------------------------------------------------- FactorizedBlock

BIDIR = AttentionConfig(dim=16, n_heads=4, n_kv_heads=2)  # Dh = 4


def _factorized(cross: bool = False, temporal: bool = True) -> FactorizedBlock:
    torch.manual_seed(3)
    cfg = BlockConfig(
        attention=BIDIR,
        cross_attention=CROSS if cross else None,
        mlp=MLP.replace(activation=Activation.GELU, bias=True),
        norm=NormType.LAYERNORM,
    )
    block = FactorizedBlock(cfg, temporal=temporal).double()
    with torch.no_grad():  # away from the unit / zero init, so a swapped norm would show
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block


def _rope(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(RopeConfig(head_dim=4))(torch.arange(n), dtype=F64)  # (1, 1, n, 4)


def test_factorized_block_equals_attention_per_frame_then_per_position() -> None:
    # The reference runs each frame's N tokens, then each position's real frames, through
    # the block's own layers one sequence at a time (no reshapes, no masks: padding frames
    # and padding context tokens are simply left out). The block must give the same rows.
    block = _factorized(cross=True)
    b, t, n = 2, 4, 5
    x = torch.randn(b, t, n, 16, dtype=F64)
    frames = [4, 2]  # clip 1 has two padding frames
    frame_mask = torch.arange(t) < torch.tensor(frames)[:, None]
    ctx = torch.randn(b, 3, 12, dtype=F64)
    ctx_len = [3, 2]
    ctx_mask = torch.arange(3) < torch.tensor(ctx_len)[:, None]
    rope_s, rope_t = _rope(n), _rope(t)
    with torch.no_grad():
        out = block(
            x,
            rope_spatial=rope_s,
            rope_temporal=rope_t,
            frame_mask=frame_mask,
            context=ctx,
            context_mask=ctx_mask,
        )
        assert out.shape == x.shape and torch.isfinite(out).all()
        for i in range(b):
            h = x[i, : frames[i]].clone()  # (T_i, N, D): the clip alone
            for f in range(frames[i]):
                h[f] = h[f] + block.spatial_attn(block.spatial_norm(h[f])[None], rope=rope_s)[0]
                q = block.cross_attn_norm(h[f])[None]
                h[f] = h[f] + block.cross_attn(q, context=ctx[i : i + 1, : ctx_len[i]])[0]
            rope = (rope_t[0][..., : frames[i], :], rope_t[1][..., : frames[i], :])
            for j in range(n):
                seq = block.temporal_norm(h[:, j])[None]  # (1, T_i, D)
                h[:, j] = h[:, j] + block.temporal_attn(seq, rope=rope)[0]
            h = h + block.ffn(block.ffn_norm(h))
            torch.testing.assert_close(out[i, : frames[i]], h, rtol=1e-12, atol=1e-12)


def test_factorized_block_without_temporal_step_encodes_each_frame_alone() -> None:
    # temporal=False: every frame is what a TransformerBlock with the spatial weights gives
    # it on its own, and no temporal parameters exist.
    block = _factorized(temporal=False)
    assert not any("temporal" in name for name, _ in block.named_parameters())
    single = TransformerBlock(block.config).double()
    single.load_state_dict(
        {
            k.replace("spatial_norm", "attn_norm").replace("spatial_attn", "attn"): v
            for k, v in block.state_dict().items()
        }
    )
    x = torch.randn(2, 3, 5, 16, dtype=F64)
    rope = _rope(5)
    with torch.no_grad():
        out = block(x, rope_spatial=rope)
        for f in range(3):
            alone, _ = single(x[:, f], rope=rope)
            torch.testing.assert_close(out[:, f], alone, rtol=1e-12, atol=1e-12)


def test_factorized_block_mixes_frames_only_through_the_temporal_step() -> None:
    x = torch.randn(1, 3, 4, 16, dtype=F64)
    changed = x.clone()
    changed[:, 0] += torch.randn(4, 16, dtype=F64)  # frame 0 only (not a constant: LayerNorm)
    for temporal in (True, False):
        block = _factorized(temporal=temporal)
        with torch.no_grad():
            diff = (block(x) - block(changed)).abs().amax(dim=(0, 2, 3))  # (T,)
        assert diff[0] > 0
        assert (diff[1:] > 1e-6).all() if temporal else (diff[1:] == 0).all()


def test_factorized_block_padding_frames_are_not_read() -> None:
    block = _factorized()
    x = torch.randn(2, 4, 3, 16, dtype=F64)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    other = x.clone()
    other[1, 2:] = torch.randn(2, 3, 16, dtype=F64) * 10  # new content in the padding
    rope_t = _rope(4)
    with torch.no_grad():
        a = block(x, rope_temporal=rope_t, frame_mask=mask)
        b = block(other, rope_temporal=rope_t, frame_mask=mask)
        unmasked = block(other, rope_temporal=rope_t)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unmasked[1, :2], a[1, :2])  # without the mask they are read


def test_factorized_block_backward_reaches_every_parameter() -> None:
    block = _factorized(cross=True)
    x = torch.randn(2, 2, 3, 16, dtype=F64, requires_grad=True)
    out = block(
        x, rope_spatial=_rope(3), rope_temporal=_rope(2), context=torch.randn(2, 4, 12, dtype=F64)
    )
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_factorized_block_input_errors() -> None:
    with pytest.raises(ValueError, match=r"BlockConfig\.mlp must be set"):
        FactorizedBlock(BlockConfig(attention=BIDIR, moe=MOE))
    block = _factorized()
    x = torch.randn(2, 3, 4, 16, dtype=F64)
    with pytest.raises(ValueError, match=r"\(B, T, N, 16\), got \(2, 4, 16\)"):
        block(x[:, 0])
    with pytest.raises(ValueError, match=r"frame_mask.*\(2, 3\)"):
        block(x, frame_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        block(x, context=torch.randn(2, 1, 12, dtype=F64))
    with pytest.raises(ValueError, match="context"):
        _factorized(cross=True)(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_block_trains_under_bf16_autocast_on_cuda() -> None:
    """Mixed-precision training as the trainer runs it on a GPU (bf16 autocast)."""
    torch.manual_seed(0)
    attention = AttentionConfig(dim=32, n_heads=4, n_kv_heads=2, causal=True)
    moe = MoEConfig(dim=32, hidden_dim=16, n_experts=4, top_k=2)
    block = TransformerBlock(BlockConfig(attention=attention, moe=moe))
    check_autocast_training(block, torch.randn(2, 8, 32), "cuda")
