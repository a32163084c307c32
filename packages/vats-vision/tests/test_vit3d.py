"""ViT-3D: model contract on every preset and on rectangular configs, padded / list clip
batches = lone runs, the temporal_attention switch (frames independent vs mixed),
positions (transpose equivariance on rectangular frames), the pad option,
forward_intermediates, bad input and config validation, torch.compile against eager."""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange

from vats_core.rope import rope_axes_dims
from vats_core.testing import (
    check_autocast_training,
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_vision.layers import Pool, VideoPosEmbed
from vats_vision.presets import VIT3D_PRESETS, vit3d_preset
from vats_vision.vit3d import ViT3D, ViT3DConfig

F64 = torch.float64


def _tiny(**overrides: object) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(vit3d_preset("tiny", **overrides)).eval()


@pytest.mark.parametrize("name", sorted(VIT3D_PRESETS))
def test_vit3d_preset_contract(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = vit3d_preset(name)
    model = ViT3D(config)
    (h, w), t = config.image_hw, config.num_frames
    batch = 2 if name == "tiny" else 1  # keep the CPU suite fast
    x = torch.randn(batch, config.in_channels, t, h, w)
    check_forward(model, x, (batch, config.num_classes))
    check_backward(model, x)
    check_save_load_roundtrip(model, x, tmp_path)
    check_dtype_device_moves(model, x)
    gh, gw = config.grid
    s = config.n_prefix_tokens + gh * gw
    assert model.forward_features(x).shape == (batch, config.n_tubelets, s, config.dim)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # rope3d, per-frame class token, token pool, GQA
        dict(pos_embed=VideoPosEmbed.LEARNED, n_register_tokens=1, pool=Pool.AVG, fc_norm=True),
        dict(pos_embed=VideoPosEmbed.LEARNED, num_frames=2),  # clips longer than the table
        dict(pos_embed=VideoPosEmbed.NONE, class_token=False, pool=Pool.AVG, qk_norm=True),
    ],
)
def test_padded_clip_batch_equals_lone_runs(overrides: dict) -> None:
    model = _tiny(**overrides).double()
    torch.manual_seed(1)
    lengths = [6, 2, 4]
    clips = [torch.randn(3, n, 16, 24, dtype=F64) for n in lengths]
    x = torch.zeros(3, 3, 6, 16, 24, dtype=F64)
    for i, clip in enumerate(clips):
        x[i, :, : clip.shape[1]] = clip
    frame_mask = torch.arange(6) < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        feats = model.forward_features(x, frame_mask)
        listed = model.forward_features(clips)
        logits = model(x, frame_mask)
        torch.testing.assert_close(model(clips), logits, rtol=0, atol=0)
        for i, clip in enumerate(clips):
            alone = model.forward_features(clip[None])[0]
            n = lengths[i] // 2
            torch.testing.assert_close(feats[i, :n], alone, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(listed[i], alone, rtol=1e-10, atol=1e-10)
            assert (feats[i, n:] == 0).all()
            torch.testing.assert_close(logits[i], model(clip[None])[0], rtol=1e-10, atol=1e-10)
        mask = model.tubelet_mask(frame_mask)
        torch.testing.assert_close(model.forward_head(feats, tubelet_mask=mask), logits)


def test_all_real_frame_mask_is_no_mask() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, torch.ones(2, 4, dtype=torch.bool)), model(x), rtol=0, atol=0
        )


@pytest.mark.parametrize("pos_embed", list(VideoPosEmbed))
def test_temporal_attention_switch(pos_embed: VideoPosEmbed) -> None:
    x = torch.randn(1, 3, 6, 16, 16)
    changed = x.clone()
    changed[:, :, 2:4] += 1.0  # frames 2-3 = tubelet 1
    for temporal in (False, True):
        model = _tiny(temporal_attention=temporal, pos_embed=pos_embed, num_frames=6)
        with torch.no_grad():
            diff = (model.forward_features(x) - model.forward_features(changed)).abs()
        per_tubelet = diff.amax(dim=(0, 2, 3))  # (T',)
        assert per_tubelet[1] > 0
        if temporal:
            assert (per_tubelet[[0, 2]] > 1e-4).all(), "temporal attention mixes frames"
        else:
            assert (per_tubelet[[0, 2]] == 0).all(), "without it frames are independent"
    plain = _tiny(temporal_attention=False)
    assert all(b.temporal_attn is None for b in plain.blocks)
    assert not any("temporal_attn" in n for n, _ in plain.named_parameters())


def test_frames_without_temporal_attention_are_lone_images() -> None:
    # With temporal attention off (and RoPE over t cancelling in spatial attention), every
    # tubelet is encoded as if it were a one-tubelet clip.
    model = _tiny(temporal_attention=False)
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        second = model.forward_features(x[:, :, 2:4])
    torch.testing.assert_close(feats[:, 1:2], second, rtol=1e-5, atol=1e-6)


def test_factorized_rope_equals_full_3d_positions() -> None:
    # The model rotates spatial attention by (0, row, col) and temporal attention by
    # (t, 0, 0); full (t, row, col) positions in both must give the same function.
    model = _tiny(n_register_tokens=1).double()
    b, t, gh, gw = 2, 3, 2, 3
    x = torch.randn(b, 3, 2 * t, 8 * gh, 8 * gw, dtype=F64)
    p = model.n_prefix
    rows = torch.cat(
        [
            torch.zeros(p, 2, dtype=torch.long),
            torch.tensor([[r, c] for r in range(gh) for c in range(gw)]),
        ]
    )  # (S, 2)
    s = rows.shape[0]
    full = torch.cat(
        [torch.arange(t).repeat_interleave(s)[:, None], rows.repeat(t, 1)], dim=1
    ).view(t, s, 3)  # (T', S, 3)
    assert model.rotary is not None
    cos, sin = model.rotary(full, F64)  # (T', 1, S, Dh)
    rope_s = (cos.repeat(b, 1, 1, 1), sin.repeat(b, 1, 1, 1))  # rows ordered (b t)
    cos, sin = model.rotary(full.transpose(0, 1), F64)  # (S, 1, T', Dh)
    rope_t = (cos.repeat(b, 1, 1, 1), sin.repeat(b, 1, 1, 1))  # rows ordered (b s)
    with torch.no_grad():
        h = model._embed(x, None)
        for block in model.blocks:
            h = block(h, rope_spatial=rope_s, rope_temporal=rope_t)
        torch.testing.assert_close(model.norm(h), model.forward_features(x))


def test_non_square_frames_and_pad() -> None:
    model = _tiny(pad=True, n_register_tokens=1)
    strict = ViT3D(model.config.replace(pad=False)).eval()
    strict.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 4, 13, 30)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))  # to 16 × 32
    with torch.no_grad():
        torch.testing.assert_close(model(x), strict(padded), rtol=0, atol=0)
        assert model.forward_features(x).shape == (1, 2, 2 + 2 * 4, 32)
    check_raises(lambda: strict(x), ValueError, r"multiples of patch_size=8.*H=13, W=30")


def _transpose_model(model: ViT3D) -> ViT3D:
    """A copy computing on clips with H and W swapped what ``model`` computes on the originals:
    transposed ``image_size``, conv kernel and learned spatial table, and the row / col RoPE
    frequency blocks swapped in every q / k head (both axes own as many channels)."""
    h, w = model.config.image_hw
    twin = ViT3D(model.config.replace(image_size=(w, h))).to(F64).eval()
    state = dict(model.state_dict())
    if model.pos_embed_spatial is not None:
        gh, gw = model.config.grid
        table = state["pos_embed_spatial"]
        state["pos_embed_spatial"] = rearrange(table, "b (h w) d -> b (w h) d", h=gh, w=gw)
    twin.load_state_dict(state)
    dh = model.config.block_config.attention.dh
    dt, dr, dc = rope_axes_dims(dh, 3)
    assert dr == dc
    half = torch.arange(dh // 2)
    r0, c0 = dt // 2, dt // 2 + dr // 2
    half = torch.cat([half[:r0], half[c0:], half[r0:c0]])  # (t, col, row) frequencies
    perm = torch.cat([half, half + dh // 2])
    with torch.no_grad():
        proj = twin.patch_embed.proj
        proj.weight.copy_(proj.weight.transpose(-1, -2).clone())
        for block in twin.blocks:
            for attn in (block.spatial_attn, block.temporal_attn):
                if attn is None:
                    continue
                layer = attn.qkv_proj
                for first, heads in ((0, attn.n_heads), (attn.n_heads * dh, attn.n_kv_heads)):
                    rows = torch.cat([first + perm + i * dh for i in range(heads)])
                    span = slice(first, first + heads * dh)
                    layer.weight[span] = layer.weight[rows].clone()
                    if layer.bias is not None:
                        layer.bias[span] = layer.bias[rows].clone()
    return twin


@pytest.mark.parametrize(
    ("image_size", "pos_embed", "size"),
    [
        ((16, 32), VideoPosEmbed.ROPE3D, (16, 32)),
        ((16, 32), VideoPosEmbed.LEARNED, (16, 32)),  # the table's own rectangular grid
        ((32, 16), VideoPosEmbed.LEARNED, (24, 40)),  # ... resampled to another one
    ],
)
def test_transpose_equivariance(image_size, pos_embed, size) -> None:
    # Swapping H and W of the clip on the transposed model gives the same tokens in
    # transposed order: rows and columns are never mixed up (RoPE, tables, flattening).
    torch.manual_seed(0)
    config = vit3d_preset("tiny", image_size=image_size, pos_embed=pos_embed, dim=48)
    model = ViT3D(config).to(F64).eval()
    if model.pos_embed_spatial is not None:
        with torch.no_grad():
            model.pos_embed_spatial.normal_()
    twin = _transpose_model(model)
    h, w = size
    gh, gw = h // 8, w // 8
    x = torch.randn(2, 3, 4, h, w, dtype=F64)
    with torch.no_grad():
        out = model.forward_features(x)
        out_t = twin.forward_features(x.transpose(-1, -2))
        torch.testing.assert_close(out_t[:, :, :1], out[:, :, :1])  # class tokens
        grid = rearrange(out[:, :, 1:], "b t (h w) d -> b t (w h) d", h=gh, w=gw)
        torch.testing.assert_close(out_t[:, :, 1:], grid)
        _, inter = model.forward_intermediates(x, 1)
        _, inter_t = twin.forward_intermediates(x.transpose(-1, -2), 1)
        assert inter[0].shape == (2, 48, 2, gh, gw)
        torch.testing.assert_close(inter_t[0], inter[0].transpose(-1, -2))
        assert not torch.allclose(twin.forward_features(x), out, atol=1e-4)


@pytest.mark.parametrize("pos_embed", list(VideoPosEmbed))
def test_rectangular_config_contract(pos_embed: VideoPosEmbed, tmp_path) -> None:
    torch.manual_seed(0)
    config = vit3d_preset("tiny", image_size=[16, 40], pos_embed=pos_embed)
    assert config.image_size == (16, 40) and config.grid == (2, 5)
    model = ViT3D(config)
    if pos_embed is VideoPosEmbed.LEARNED:
        assert model.pos_embed_spatial is not None
        assert model.pos_embed_spatial.shape == (1, 2 * 5, 32)
    x = torch.randn(2, 3, 4, 16, 40)
    check_forward(model, x, (2, 4))
    check_backward(model, x)
    check_save_load_roundtrip(model, x, tmp_path)
    check_dtype_device_moves(model, x)
    assert ViT3D.from_pretrained(tmp_path).config == config
    assert model.forward_features(x).shape == (2, 2, 1 + 10, 32)
    with torch.no_grad():
        assert model.forward_intermediates(x, 1)[1][0].shape == (2, 32, 2, 2, 5)
    assert ViT3DConfig.from_dict(json.loads(config.to_json())) == config
    assert hash(config) == hash(config.replace(image_size=(16, 40)))
    assert config.replace(image_size=(16, 16)).image_size == 16
    check_raises(
        lambda: config.replace(image_size=(16, 36)),
        ValueError,
        r"ViT3DConfig\.image_size=\(16, 36\).*multiple of patch_size=8",
    )


def test_forward_intermediates() -> None:
    model = _tiny(n_layers=3)
    x = torch.randn(2, 3, 4, 16, 24)
    with torch.no_grad():
        feats, inter = model.forward_intermediates(x, [0, -1])
        torch.testing.assert_close(feats, model.forward_features(x))
        assert [t.shape for t in inter] == [(2, 32, 2, 2, 3)] * 2
        last = model.forward_intermediates(
            x, 1, norm=True, output_fmt="NTLC", intermediates_only=True
        )
        torch.testing.assert_close(last[0], feats[:, :, 1:])
        normed = model.forward_intermediates(x, [-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(rearrange(normed, "b d t h w -> b t (h w) d"), last[0])
        assert not torch.allclose(inter[0], inter[1])
    check_raises(lambda: model.forward_intermediates(x, [5]), ValueError, "out of range")
    check_raises(lambda: model.forward_intermediates(x, 1, output_fmt="NCHW"), ValueError, "NTLC")


def test_bad_input_errors() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 4, 16, 16)
    check_raises(lambda: model(x[:, :2]), ValueError, r"3 channels.*got 2")
    check_raises(lambda: model(x[0]), ValueError, r"rank-5.*\(B, C, T, H, W\).*got rank 4")
    check_raises(lambda: model(x[:, :, :1]), ValueError, r"multiple of tubelet_size=2, got T=1")
    check_raises(lambda: model(x[:, :, :3]), ValueError, "got T=3")
    check_raises(lambda: model(x[..., :15]), ValueError, "multiples of patch_size")
    check_raises(lambda: model([]), ValueError, "non-empty list")
    check_raises(lambda: model([x[0], x[1, :, :, :8, :8]]), ValueError, r"frame size.*\(8, 8\)")
    check_raises(lambda: model([x[0, :, :1]]), ValueError, "got T=1")
    check_raises(lambda: model(x, torch.ones(2, 3, dtype=torch.bool)), ValueError, r"\(2, 4\)")
    gap = torch.tensor([[True, False, True, True], [True] * 4])
    check_raises(lambda: model(x, gap), ValueError, "real frames first")
    odd = torch.tensor([[True, True, True, False], [True] * 4])
    check_raises(lambda: model(x, odd), ValueError, r"lengths \[3, 4\]")
    check_raises(lambda: model(list(x), torch.ones(2, 4, dtype=torch.bool)), ValueError, "list")


def test_config_validation_and_round_trip() -> None:
    check_raises(lambda: ViT3DConfig(class_token=False), ValueError, r"ViT3DConfig\.pool")
    check_raises(lambda: ViT3DConfig(num_frames=15), ValueError, "tubelet_size=2")
    check_raises(lambda: ViT3DConfig(dim=24, n_heads=6), ValueError, "head_dim=4")
    check_raises(lambda: ViT3DConfig(pos_embed="rope2d"), ValueError, "rope3d")
    check_raises(lambda: vit3d_preset("huge"), ValueError, "tiny")
    for field, bad in (
        ("num_frames", 16.0),
        ("tubelet_size", 0),
        ("temporal_attention", 1),
        ("rope_theta", -1.0),
        ("n_register_tokens", -1),
        ("image_size", (224, 200)),
    ):
        check_raises(
            lambda f=field, v=bad: ViT3DConfig(**{f: v}), ValueError, rf"ViT3DConfig\.{field}="
        )
    config = vit3d_preset("tiny", pos_embed="learned", temporal_attention=False)
    assert config.pos_embed is VideoPosEmbed.LEARNED
    again = ViT3DConfig.from_dict(config.to_dict())
    assert again == config and hash(again) == hash(config)


def test_compiles_to_one_graph() -> None:
    # Factorized space/time attention traces as one graph and gives eager's logits.
    model = _tiny()
    clips = torch.randn(2, 3, 4, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(clips), model(clips))


def _no_graph_breaks(fn, *args) -> None:
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    reasons = [r.reason.splitlines()[0] for r in report.break_reasons]
    assert report.graph_break_count == 0 and report.graph_count == 1, reasons


@pytest.mark.parametrize("pos_embed", list(VideoPosEmbed))
def test_every_entry_point_traces_without_graph_breaks(pos_embed: VideoPosEmbed) -> None:
    # The frame mask's values are never read on the host while compiling (no checks, and
    # learned temporal tables picked per clip by a gather), so padded batches, clip lists
    # and clips longer than the learned table all trace as one graph.
    model = _tiny(image_size=(16, 24), pos_embed=pos_embed, num_frames=2)
    x = torch.randn(2, 3, 6, 16, 24)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    _no_graph_breaks(model, x)
    _no_graph_breaks(model, x, mask)
    _no_graph_breaks(model.forward_features, x, mask)
    _no_graph_breaks(lambda x: model.forward_intermediates(x, 1), x)
    _no_graph_breaks(model, [x[0], x[1, :, :2]])
    _no_graph_breaks(model.forward_features, [x[0], x[1, :, :2]])
    model.train()
    _no_graph_breaks(lambda x, m: model(x, m).square().mean(), x, mask)


@pytest.mark.parametrize("pos_embed", list(VideoPosEmbed))
def test_aot_compiled_equals_eager(pos_embed: VideoPosEmbed) -> None:
    # Padded clips (one longer than the learned temporal table) on a rectangular config:
    # AOT-compiled features, logits and gradients equal eager's to float32 rounding.
    model = _tiny(image_size=(16, 24), pos_embed=pos_embed, num_frames=2, n_register_tokens=1)
    x = torch.randn(2, 3, 6, 16, 24)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.forward_features(x, mask), model.forward_features(x, mask)
        )
        torch.testing.assert_close(compiled(x, mask), model(x, mask))
        torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x, mask).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, mask).square().mean().backward()
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vit3d_trains_under_bf16_autocast_on_cuda() -> None:
    """Mixed-precision training as the trainer runs it on a GPU (bf16 autocast)."""
    torch.manual_seed(0)
    config = vit3d_preset("tiny")
    x = torch.randn(2, config.in_channels, config.num_frames, *config.image_hw)
    check_autocast_training(ViT3D(config), x, "cuda")
