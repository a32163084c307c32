"""The Attention module: against a float64 reference, GQA/MQA, QK-norm, cross-attention,
padding, dropout and config validation."""

from __future__ import annotations

import pytest
import torch

from vats_core.attention.layer import Attention, AttentionConfig
from vats_core.rope import RopeConfig, RotaryEmbedding

F64 = torch.float64


def _reference(
    attn: Attention, x: torch.Tensor, rope=None, causal=False, window=None, kpm=None
) -> torch.Tensor:
    """Plain multi-head attention: repeated KV heads, explicit mask, softmax."""
    b, t, _ = x.shape
    hq, hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.split([hq * dh, hkv * dh, hkv * dh])
    q = (x @ w_q.T).view(b, t, hq, dh).transpose(1, 2)
    k = (x @ w_k.T).view(b, t, hkv, dh).transpose(1, 2)
    v = (x @ w_v.T).view(b, t, hkv, dh).transpose(1, 2)
    if rope is not None:
        cos, sin = rope

        def rot(z):
            z1, z2 = z.chunk(2, -1)
            return z * cos + torch.cat([-z2, z1], -1) * sin

        q, k = rot(q), rot(k)
    k = k.repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // (Hq / Hkv)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / dh**0.5  # (B, Hq, T, T)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = torch.ones(t, t, dtype=torch.bool)
    if causal:
        visible &= j <= i
        if window is not None:
            visible &= j > i - window
    elif window is not None:
        visible &= (i - j).abs() < window
    visible = visible.expand(b, 1, t, t)
    if kpm is not None:
        visible = visible & kpm[:, None, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = (probs @ v).transpose(1, 2).reshape(b, t, hq * dh)
    return out @ attn.o_proj.weight.T


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "causal", "window"),
    [(4, 4, False, None), (4, 2, True, None), (4, 1, True, 3), (6, 3, False, 2)],
)
def test_matches_reference(n_heads: int, n_kv_heads: int, causal: bool, window: int | None) -> None:
    torch.manual_seed(0)
    cfg = AttentionConfig(
        dim=24, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8, causal=causal, window=window
    )
    attn = Attention(cfg).double()
    x = torch.randn(2, 7, 24, dtype=F64)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, :2] = False
    rope = RotaryEmbedding(RopeConfig(head_dim=8))(torch.arange(7), dtype=F64)
    out = attn(x, rope=rope, key_padding_mask=kpm)
    expected = _reference(attn, x, rope, causal, window, kpm)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_fused_projection_is_three_projections_stacked() -> None:
    # qkv_proj's rows are q's, then k's, then v's (biases likewise): the same outputs and
    # gradients as three separate linears holding those rows.
    torch.manual_seed(0)
    attn = Attention(AttentionConfig(dim=32, n_heads=4, n_kv_heads=2, qkv_bias=True))
    sizes = [32, 16, 16]
    three = [torch.nn.Linear(32, n) for n in sizes]
    with torch.no_grad():
        for lin, w, b in zip(
            three,
            attn.qkv_proj.weight.split(sizes),
            attn.qkv_proj.bias.split(sizes),
            strict=True,
        ):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    x = torch.randn(3, 10, 32)
    got = attn._project(x, x, None)
    for g, lin in zip(got, three, strict=True):
        torch.testing.assert_close(g, lin(x), rtol=0, atol=0)
    cot = [torch.randn_like(g) for g in got]
    sum((g * c).sum() for g, c in zip(got, cot, strict=True)).backward()
    sum((lin(x) * c).sum() for lin, c in zip(three, cot, strict=True)).backward()
    torch.testing.assert_close(
        attn.qkv_proj.weight.grad, torch.cat([lin.weight.grad for lin in three])
    )
    torch.testing.assert_close(attn.qkv_proj.bias.grad, torch.cat([lin.bias.grad for lin in three]))


def test_out_tokens_gives_the_full_calls_first_rows() -> None:
    torch.manual_seed(0)
    attn = Attention(AttentionConfig(dim=32, n_heads=4, n_kv_heads=2, qkv_bias=True)).double()
    x = torch.randn(2, 9, 32, dtype=F64)
    torch.testing.assert_close(attn(x, out_tokens=2), attn(x)[:, :2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n_kv_heads", "kind"), [(None, "MHA"), (2, "GQA"), (1, "MQA")])
def test_gqa_mqa_shapes(n_kv_heads: int | None, kind: str) -> None:
    cfg = AttentionConfig(dim=32, n_heads=8, n_kv_heads=n_kv_heads, head_dim=6)
    attn = Attention(cfg)
    hkv = 8 if n_kv_heads is None else n_kv_heads
    assert attn.qkv_proj.weight.shape == ((8 + 2 * hkv) * 6, 32)
    assert attn.o_proj.weight.shape == (32, 8 * 6)
    assert attn(torch.randn(3, 5, 32)).shape == (3, 5, 32), kind


def test_qk_norm_makes_output_invariant_to_qk_scale() -> None:
    # RMSNorm on each head's q and k removes their scale, so scaling q_proj / k_proj
    # changes nothing with qk_norm and changes the attention pattern without it.
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16, dtype=F64)
    for qk_norm in (True, False):
        attn = Attention(AttentionConfig(dim=16, n_heads=2, qk_norm=qk_norm, qk_norm_eps=1e-12))
        attn = attn.double()
        before = attn(x)
        with torch.no_grad():
            attn.qkv_proj.weight[:16].mul_(7.0)  # the query rows
            attn.qkv_proj.weight[16:32].mul_(0.3)  # the key rows
        assert torch.allclose(attn(x), before, atol=1e-9) == qk_norm
    assert attn.q_norm is None
    normed = Attention(AttentionConfig(dim=16, n_heads=2, qk_norm=True))
    assert normed.q_norm.weight.shape == normed.k_norm.weight.shape == (8,)


def test_cross_attention_ignores_masked_context() -> None:
    torch.manual_seed(2)
    cfg = AttentionConfig(dim=16, n_heads=4, n_kv_heads=2, context_dim=10, qkv_bias=True)
    attn = Attention(cfg).double()
    assert attn.q_proj.weight.shape == (16, 16) and attn.qkv_proj is None
    assert attn.kv_proj.weight.shape == (2 * 2 * 4, 10)
    x = torch.randn(2, 5, 16, dtype=F64)
    ctx = torch.randn(2, 7, 10, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    out = attn(x, context=ctx, context_mask=mask)
    changed = ctx.clone()
    changed[0, 4:] = 100.0 * torch.randn(3, 10, dtype=F64)
    torch.testing.assert_close(attn(x, context=changed, context_mask=mask), out)
    # Equivalent to dropping the masked tokens; and real tokens do matter.
    torch.testing.assert_close(attn(x[:1], context=ctx[:1, :4]), out[:1])
    changed[0, 0] += 1.0
    assert not torch.allclose(attn(x, context=changed, context_mask=mask)[0], out[0])


def test_cross_attention_input_errors() -> None:
    cross = Attention(AttentionConfig(dim=8, n_heads=2, context_dim=4))
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="context of shape"):
        cross(x)
    with pytest.raises(ValueError, match="context of shape"):
        cross(x, context=torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="context_mask"):
        cross(x, context=torch.randn(1, 2, 4), context_mask=torch.ones(1, 3, dtype=torch.bool))
    rope = RotaryEmbedding(RopeConfig(head_dim=4))(torch.arange(3))
    with pytest.raises(ValueError, match="no rope"):
        cross(x, context=torch.randn(1, 2, 4), rope=rope)
    with pytest.raises(ValueError, match="self-attention layer"):
        Attention(AttentionConfig(dim=8, n_heads=2))(x, context=torch.randn(1, 2, 8))


def test_self_attention_input_errors() -> None:
    attn = Attention(AttentionConfig(dim=8, n_heads=2))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        attn(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(2, 3, 8), key_padding_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(2, 3, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_dropout_is_output_dropout_in_training_only() -> None:
    torch.manual_seed(3)
    attn = Attention(AttentionConfig(dim=8, n_heads=2, dropout=0.5))
    x = torch.randn(2, 4, 8)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    out = attn(x)
    zeros = (out == 0).float().mean().item()
    assert 0.2 < zeros < 0.8  # whole output elements dropped, rest scaled by 2
    attn.eval()
    kept = out != 0
    torch.testing.assert_close(out[kept], 2 * attn(x)[kept])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 8, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 8, "n_heads": 4, "n_kv_heads": 0}, "n_kv_heads"),
        ({"dim": 10, "n_heads": 4}, "dim"),
        ({"dim": 8, "n_heads": 0}, "n_heads"),
        ({"dim": 8, "n_heads": 2, "head_dim": 0}, "head_dim"),
        ({"dim": 8, "n_heads": 2, "window": 0}, "window"),
        ({"dim": 8, "n_heads": 2, "dropout": 1.0}, "dropout"),
        ({"dim": 8, "n_heads": 2, "context_dim": 4, "causal": True}, "causal"),
        ({"dim": 8, "n_heads": 2, "context_dim": 4, "window": 2}, "window"),
        ({"dim": 8, "n_heads": 2, "backend": "cudnn"}, "backend"),
    ],
)
def test_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"AttentionConfig\.{field}="):
        AttentionConfig(**kwargs)


def test_config_defaults_and_round_trip() -> None:
    cfg = AttentionConfig(dim=12, n_heads=3, head_dim=None, backend="math", window=4, causal=True)
    assert cfg.kv_heads == 3 and cfg.dh == 4 and cfg.backend.value == "math"
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    # head_dim decoupled from dim (Qwen3 style): dim need not divide.
    assert Attention(AttentionConfig(dim=10, n_heads=4, head_dim=3))(
        torch.randn(1, 2, 10)
    ).shape == (
        1,
        2,
        10,
    )
