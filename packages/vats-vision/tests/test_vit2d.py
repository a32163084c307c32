"""ViT-2D: model contract on every preset and on rectangular configs, ragged batches = lone
runs, 2D RoPE and learned tables on non-square grids (transpose equivariance), learned
positions resampled as timm, the pad option, forward_intermediates, bad input and config
validation (image_size forms), torch.compile against eager."""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange

from vats_core.testing import (
    check_autocast_training,
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_vision.layers import Pool, PosEmbed, resample_grid_embed
from vats_vision.presets import VIT2D_PRESETS, vit2d_preset
from vats_vision.vit2d import ViT2D, ViT2DConfig

F64 = torch.float64


def _tiny(**overrides: object) -> ViT2D:
    torch.manual_seed(0)
    return ViT2D(vit2d_preset("tiny", **overrides)).eval()


@pytest.mark.parametrize("name", sorted(VIT2D_PRESETS))
def test_vit2d_preset_contract(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = vit2d_preset(name)
    model = ViT2D(config)
    # ViT-S/16 at 224² is slow on 2 CPU cores: one 64² image (its table resampled).
    (h, w), batch = config.image_hw, 2
    if max(h, w) > 64:
        (h, w), batch = (64, 64), 1
    x = torch.randn(batch, config.in_channels, h, w)
    check_forward(model, x, (batch, config.num_classes))
    check_backward(model, x)
    check_save_load_roundtrip(model, x, tmp_path)
    check_dtype_device_moves(model, x)
    feats = model.forward_features(x)
    n = config.n_prefix_tokens + (h // config.patch_size) * (w // config.patch_size)
    assert feats.shape == (batch, n, config.dim)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # rope2d, class token, token pool, GQA
        dict(pos_embed=PosEmbed.LEARNED, n_register_tokens=2, pool=Pool.AVG, fc_norm=True),
        dict(pos_embed=PosEmbed.LEARNED, pos_embed_prefix=False, pre_norm=True),
        dict(pos_embed=PosEmbed.NONE, class_token=False, pool=Pool.AVG, window=5),
        dict(n_register_tokens=1, window=4, qk_norm=True, pad=True),
        dict(pool=Pool.NONE),
    ],
)
def test_ragged_batch_equals_lone_runs(overrides: dict) -> None:
    model = _tiny(**overrides).double()
    sizes = [(32, 48), (16, 16), (40, 24), (8, 64)]
    if overrides.get("pad"):
        sizes += [(30, 45), (9, 7)]
    torch.manual_seed(1)
    images = [torch.randn(3, h, w, dtype=F64) for h, w in sizes]
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images)
        padded, mask = model.forward_features_padded(images)
        for i, image in enumerate(images):
            alone = model.forward_features(image[None])[0]
            torch.testing.assert_close(feats[i], alone, rtol=1e-10, atol=1e-10)
            n = alone.shape[0]
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert (padded[i, n:] == 0).all()
            head_alone = model(image[None])[0]
            torch.testing.assert_close(logits[i], head_alone, rtol=1e-10, atol=1e-10)
        # forward_head accepts the list form too
        again = model.forward_head(feats)
    if model.config.pool is Pool.NONE:
        assert isinstance(logits, list) and all(
            a.shape == (f.shape[0], 10) for a, f in zip(logits, feats, strict=True)
        )
    else:
        assert logits.shape == (len(images), 10)
        torch.testing.assert_close(again, logits)


def test_same_size_list_equals_tensor_batch() -> None:
    model = _tiny(n_register_tokens=1)
    x = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(list(x)), model(x), rtol=0, atol=0)


def _transpose_model(model: ViT2D) -> ViT2D:
    """A copy that computes on transposed images what ``model`` computes on the originals.

    Its config has ``image_size`` transposed; it swaps the conv kernel's axes, transposes
    the learned table's grid and, in every q/k head, swaps the RoPE channel blocks of the
    row and column axes (each axis owns a quarter of Dh at offsets 0 / Dh/2 and Dh/4 /
    3Dh/4; without RoPE the same permutation of q and k leaves every score unchanged).
    """
    h, w = model.config.image_hw
    twin = ViT2D(model.config.replace(image_size=(w, h))).to(F64).eval()
    state = dict(model.state_dict())
    if model.pos_embed is not None:
        gh, gw = model.config.grid
        n_prefix = model.pos_embed.shape[1] - gh * gw
        table = state["pos_embed"]
        patches = rearrange(table[:, n_prefix:], "b (h w) d -> b (w h) d", h=gh, w=gw)
        state["pos_embed"] = torch.cat([table[:, :n_prefix], patches], dim=1)
    twin.load_state_dict(state)
    proj = twin.patch_embed.proj
    with torch.no_grad():
        proj.weight.copy_(proj.weight.transpose(-1, -2).clone())
        for block in twin.blocks:
            attn = block.attn
            dh = attn.head_dim
            q = dh // 4
            idx = torch.arange(dh)
            perm = torch.cat([idx[q : 2 * q], idx[:q], idx[3 * q :], idx[2 * q : 3 * q]])
            # the query rows, then the key rows of the fused projection (values untouched)
            for first, heads in ((0, attn.n_heads), (attn.n_heads * dh, attn.n_kv_heads)):
                rows = torch.cat([first + perm + h * dh for h in range(heads)])
                span = slice(first, first + heads * dh)
                layer = attn.qkv_proj
                layer.weight[span] = layer.weight[rows].clone()
                if layer.bias is not None:
                    layer.bias[span] = layer.bias[rows].clone()
    return twin


@pytest.mark.parametrize(
    ("image_size", "pos_embed", "n_register_tokens", "size"),
    [
        (32, PosEmbed.ROPE2D, 0, (32, 48)),  # square config, rectangular input
        (32, PosEmbed.ROPE2D, 2, (32, 48)),
        ((32, 48), PosEmbed.ROPE2D, 1, (32, 48)),
        ((32, 48), PosEmbed.LEARNED, 0, (32, 48)),  # the table's own rectangular grid
        ((32, 48), PosEmbed.LEARNED, 2, (40, 24)),  # ... resampled to another one
        ((48, 16), PosEmbed.LEARNED, 1, (48, 16)),
    ],
)
def test_transpose_equivariance(image_size, pos_embed, n_register_tokens, size) -> None:
    # The transposed image on the transposed model must give the same tokens in transposed
    # order: fails if rows and columns are mixed up anywhere (RoPE positions, the learned
    # table's grid and its resampling, flattening order).
    torch.manual_seed(0)
    config = vit2d_preset(
        "tiny",
        image_size=image_size,
        dim=64,
        n_heads=4,
        pos_embed=pos_embed,
        n_register_tokens=n_register_tokens,
    )
    model = ViT2D(config).to(F64).eval()
    if model.pos_embed is not None:
        with torch.no_grad():  # a table with structure, so a transposed read would show
            model.pos_embed.normal_()
    twin = _transpose_model(model)
    h, w = size
    gh, gw = h // 8, w // 8
    x = torch.randn(2, 3, h, w, dtype=F64)
    with torch.no_grad():
        out = model.forward_features(x)
        out_t = twin.forward_features(x.transpose(-1, -2))
        p = config.n_prefix_tokens
        torch.testing.assert_close(out_t[:, :p], out[:, :p])
        grid = rearrange(out[:, p:], "b (h w) d -> b (w h) d", h=gh, w=gw)
        torch.testing.assert_close(out_t[:, p:], grid)
        _, inter = model.forward_intermediates(x, 1)
        _, inter_t = twin.forward_intermediates(x.transpose(-1, -2), 1)
        assert inter[0].shape == (2, 64, gh, gw) and inter_t[0].shape == (2, 64, gw, gh)
        torch.testing.assert_close(inter_t[0], inter[0].transpose(-1, -2))
        # ... and the twin is a different function on the untransposed image.
        assert not torch.allclose(twin.forward_features(x), out, atol=1e-4)


def test_rope2d_scores_depend_on_position() -> None:
    # The same patch content at two places gives different tokens with RoPE and the same
    # with no positions (attention is then permutation-equivariant): RoPE is applied.
    torch.manual_seed(0)
    image = torch.randn(1, 3, 16, 24)  # 2×3 grid
    image[..., 8:, 16:] = image[..., :8, :8]  # patch (1, 2) = patch (0, 0)
    for pos, same in ((PosEmbed.ROPE2D, False), (PosEmbed.NONE, True)):
        model = _tiny(pos_embed=pos, class_token=False, pool=Pool.AVG)
        with torch.no_grad():
            tokens = model.forward_features(image)[0]
        assert torch.allclose(tokens[0], tokens[-1], atol=1e-5) == same


def test_learned_positions_resampled_like_timm() -> None:
    import timm.layers as timm_layers

    torch.manual_seed(0)
    table = torch.randn(1, 4 * 4, 8)
    for new in ((4, 4), (6, 3), (2, 5), (8, 8)):
        ours = resample_grid_embed(table, (4, 4), new)
        theirs = timm_layers.resample_abs_pos_embed(table, list(new), [4, 4], num_prefix_tokens=0)
        torch.testing.assert_close(ours, theirs)
    assert resample_grid_embed(table, (4, 4), (4, 4)) is table


def test_learned_positions_follow_input_size() -> None:
    model = _tiny(pos_embed=PosEmbed.LEARNED, n_register_tokens=1)
    assert model.pos_embed is not None and model.pos_embed.shape == (1, 2 + 16, 32)
    x = torch.randn(1, 3, 48, 24)  # grid 6×3, table trained for 4×4
    with torch.no_grad():
        base = model.forward_features(x)
        model.pos_embed[:, 2:].add_(1.0)  # patch positions reach the output at any size
        moved = model.forward_features(x)
    assert base.shape == (1, 2 + 18, 32)
    assert not torch.allclose(base[:, 2:], moved[:, 2:])
    without_prefix = _tiny(pos_embed=PosEmbed.LEARNED, pos_embed_prefix=False)
    assert without_prefix.pos_embed is not None and without_prefix.pos_embed.shape[1] == 16


@pytest.mark.parametrize("pos_embed", list(PosEmbed))
def test_rectangular_config_contract(pos_embed: PosEmbed, tmp_path) -> None:
    # image_size=(H, W): the learned table has an (H/p, W/p) grid; the model trains, saves
    # and reloads (config.json stores the pair) and moves like any other.
    torch.manual_seed(0)
    config = vit2d_preset("tiny", image_size=(24, 56), pos_embed=pos_embed, n_register_tokens=1)
    assert config.image_size == (24, 56) and config.image_hw == (24, 56)
    assert config.grid == (3, 7)
    model = ViT2D(config)
    if pos_embed is PosEmbed.LEARNED:
        assert model.pos_embed is not None and model.pos_embed.shape == (1, 2 + 3 * 7, 32)
    x = torch.randn(2, 3, 24, 56)
    check_forward(model, x, (2, 10))
    check_backward(model, x)
    check_save_load_roundtrip(model, x, tmp_path)
    check_dtype_device_moves(model, x)
    assert ViT2D.from_pretrained(tmp_path).config == config
    assert model.forward_features(x).shape == (2, 2 + 21, 32)
    with torch.no_grad():
        feats, inter = model.forward_intermediates(x, 1)
    assert inter[0].shape == (2, 32, 3, 7)
    torch.testing.assert_close(feats, model.forward_features(x))


def test_image_size_forms() -> None:
    # An int S or a pair (H, W) (a list from YAML / JSON); a square pair is stored as its
    # int, so equal sizes give equal, equally hashed configs; JSON keeps the pair.
    rect = ViT2DConfig(image_size=[32, 48], patch_size=8)
    assert rect.image_size == (32, 48) and rect.grid == (4, 6)
    assert rect == ViT2DConfig(image_size=(32, 48), patch_size=8)
    assert hash(rect) == hash(ViT2DConfig(image_size=(32, 48), patch_size=8))
    assert ViT2DConfig.from_dict(json.loads(rect.to_json())) == rect
    square = ViT2DConfig(image_size=(32, 32), patch_size=8)
    assert square.image_size == 32 and square == ViT2DConfig(image_size=32, patch_size=8)
    assert hash(square) == hash(ViT2DConfig(image_size=32, patch_size=8))
    assert square.image_hw == (32, 32) and square.grid == (4, 4)
    for bad, pattern in (
        (
            (32, 44),
            r"ViT2DConfig\.image_size=\(32, 44\).*\(H, W\), each a positive multiple of patch_size=8",
        ),
        ((0, 32), r"ViT2DConfig\.image_size=\(0, 32\).*positive multiple"),
        ((32, 48, 8), r"ViT2DConfig\.image_size=\(32, 48, 8\).*pair \(H, W\)"),
        ((32, True), r"ViT2DConfig\.image_size"),
        ((32.0, 48), r"ViT2DConfig\.image_size"),
        ("32", r"ViT2DConfig\.image_size"),
        (36, r"ViT2DConfig\.image_size=36.*a positive multiple of patch_size=8"),
    ):
        check_raises(lambda bad=bad: ViT2DConfig(image_size=bad, patch_size=8), ValueError, pattern)


def test_pad_equals_zero_padded_input() -> None:
    model = _tiny(pad=True, n_register_tokens=1)
    strict = ViT2D(model.config.replace(pad=False)).eval()
    strict.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 27, 45)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 5))  # to 32 × 48
    with torch.no_grad():
        torch.testing.assert_close(model(x), strict(padded), rtol=0, atol=0)
        assert model.forward_features(x).shape == (2, 2 + 4 * 6, 32)
    check_raises(lambda: strict(x), ValueError, r"multiples of patch_size=8.*H=27, W=45.*pad")


def test_window_limits_attention() -> None:
    x = torch.randn(1, 3, 32, 32)
    windowed = _tiny(window=2, n_layers=1, class_token=False, pool=Pool.AVG)
    full = ViT2D(windowed.config.replace(window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    x2 = x.clone()
    x2[..., 24:, 24:] += 1.0  # changes only the last patch (token 15)
    with torch.no_grad():
        w_diff = (windowed.forward_features(x) - windowed.forward_features(x2)).abs().sum(-1)
        f_diff = (full.forward_features(x) - full.forward_features(x2)).abs().sum(-1)
    # one layer, window 2: only tokens 14 and 15 see token 15
    assert (w_diff[0, :14] == 0).all() and (w_diff[0, 14:] > 0).all()
    assert (f_diff[0] > 0).all()


def test_forward_intermediates() -> None:
    model = _tiny(n_layers=3, n_register_tokens=1)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats, inter = model.forward_intermediates(x, 2)
        torch.testing.assert_close(feats, model.forward_features(x))
        assert [t.shape for t in inter] == [(2, 32, 4, 6)] * 2
        last = model.forward_intermediates(x, [-1], norm=True, output_fmt="NLC")[1][0]
        torch.testing.assert_close(last, feats[:, 2:])
        nchw = model.forward_intermediates(x, [0, 2], intermediates_only=True)
        nlc = model.forward_intermediates(x, [2, 0], output_fmt="NLC", intermediates_only=True)
        assert isinstance(nchw, list) and len(nchw) == 2
        for a, b in zip(nchw, nlc, strict=True):
            torch.testing.assert_close(rearrange(a, "b d h w -> b (h w) d"), b)
        assert len(model.forward_intermediates(x, None, intermediates_only=True)) == 3
        assert not torch.allclose(nchw[0], nchw[1])
    check_raises(lambda: model.forward_intermediates(x, [3]), ValueError, r"out of range.*-3\.\.2")
    check_raises(lambda: model.forward_intermediates(x, 4), ValueError, "1..3")
    check_raises(lambda: model.forward_intermediates(x, 1, output_fmt="NHWC"), ValueError, "NLC")


def test_head_options() -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model = _tiny(pool=Pool.AVG, fc_norm=True)
        assert isinstance(model.norm, torch.nn.Identity)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, model.fc_norm(feats[:, 1:].mean(1)))
        torch.testing.assert_close(model.head(pooled), model(x))
        token = _tiny()
        feats = token.forward_features(x)
        torch.testing.assert_close(token.forward_head(feats, pre_logits=True), feats[:, 0])
        headless = _tiny(num_classes=0)
        assert headless(x).shape == (2, 32)
        assert _tiny(pool=Pool.NONE)(x).shape == (2, 17, 10)


@pytest.mark.parametrize("pos_embed", [PosEmbed.ROPE2D, PosEmbed.LEARNED])
def test_token_pool_forward_runs_only_the_class_token_in_the_last_block(pos_embed) -> None:
    # forward() with a class-token head computes just that token in the last block (its
    # MLP sees B rows, not B·N) and still equals forward_head(forward_features(x)).
    model = _tiny(pos_embed=pos_embed, n_register_tokens=2).double()
    x = torch.randn(2, 3, 32, 24, dtype=F64)
    rows = []
    hook = model.blocks[-1].ffn.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, model.forward_head(model.forward_features(x)))
    hook.remove()
    assert rows[0][:2] == (2, 1) and rows[1][:2] == (2, 3 + 4 * 3)  # forward, then features
    with torch.no_grad():  # a windowed model cannot: its forward takes the full path
        windowed = _tiny(window=2)
        torch.testing.assert_close(
            windowed(x.float()), windowed.forward_head(windowed.forward_features(x.float()))
        )


def test_bad_input_errors() -> None:
    model = _tiny()
    check_raises(lambda: model(torch.randn(2, 1, 32, 32)), ValueError, r"3 channels.*got 1")
    check_raises(lambda: model(torch.randn(3, 32, 32)), ValueError, r"rank-4.*\(B, C, H, W\).*3")
    check_raises(lambda: model(torch.randn(1, 3, 30, 32)), ValueError, "multiples of patch_size")
    check_raises(lambda: model([]), ValueError, "non-empty list.*empty")
    check_raises(lambda: model([torch.randn(1, 3, 8, 8)]), ValueError, r"rank-3.*\(C, H, W\)")
    check_raises(lambda: model([torch.randn(3, 8, 8), torch.randn(4, 8, 8)]), ValueError, "got 4")
    check_raises(lambda: model(torch.zeros(1, 3, 32, 32, dtype=torch.long)), ValueError, "float")


def test_config_validation_and_round_trip() -> None:
    check_raises(lambda: ViT2DConfig(class_token=False), ValueError, r"ViT2DConfig\.pool")
    check_raises(lambda: ViT2DConfig(image_size=100), ValueError, "multiple of patch_size=16")
    check_raises(lambda: ViT2DConfig(dim=12, n_heads=6), ValueError, "head_dim=2")
    check_raises(lambda: ViT2DConfig(pos_embed="sincos"), ValueError, "rope2d")
    check_raises(lambda: ViT2DConfig(n_kv_heads=4), ValueError, "n_kv_heads")
    check_raises(lambda: ViT2DConfig(window=0), ValueError, "window")
    check_raises(lambda: vit2d_preset("huge"), ValueError, "tiny")
    for field, bad in (
        ("dim", 64.0),
        ("n_layers", True),
        ("class_token", 1),
        ("norm_eps", 0.0),
        ("n_register_tokens", -1),
        ("num_classes", -2),
        ("mlp_hidden_dim", 0),
        ("init_std", "0.02"),
        ("patch_size", 0),
    ):
        check_raises(
            lambda f=field, v=bad: ViT2DConfig(**{f: v}), ValueError, rf"ViT2DConfig\.{field}="
        )
    config = vit2d_preset("tiny", pos_embed="learned", pool="avg", norm="rmsnorm")
    assert config.pos_embed is PosEmbed.LEARNED and config.pool is Pool.AVG
    again = ViT2DConfig.from_dict(config.to_dict())
    assert again == config and hash(again) == hash(config)


@pytest.mark.parametrize("train", [False, True])
def test_compiles_to_one_graph(train: bool) -> None:
    # torch.compile traces the whole forward (no graph break in RoPE, attention dispatch or
    # the linear layers' fused-path checks) and gives eager's logits.
    model = _tiny(n_register_tokens=1).train(train)
    x = torch.randn(2, 3, 32, 24)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def _no_graph_breaks(fn, *args) -> None:
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    reasons = [r.reason.splitlines()[0] for r in report.break_reasons]
    assert report.graph_break_count == 0 and report.graph_count == 1, reasons


@pytest.mark.parametrize("pos_embed", [PosEmbed.ROPE2D, PosEmbed.LEARNED])
def test_every_entry_point_traces_without_graph_breaks(pos_embed: PosEmbed) -> None:
    # Rectangular config, inputs at its size and at another (the table resampled), ragged
    # lists, intermediates and a training step's forward + loss: each one graph.
    model = _tiny(image_size=(32, 48), pos_embed=pos_embed, n_register_tokens=1)
    x = torch.randn(2, 3, 32, 48)
    _no_graph_breaks(model, x)
    _no_graph_breaks(model, torch.randn(2, 3, 40, 24))
    _no_graph_breaks(model.forward_features, x)
    _no_graph_breaks(lambda x: model.forward_intermediates(x, 1), x)
    _no_graph_breaks(model, [torch.randn(3, 32, 48), torch.randn(3, 16, 24)])
    _no_graph_breaks(model.forward_features, [torch.randn(3, 32, 48), torch.randn(3, 16, 24)])
    model.train()
    _no_graph_breaks(lambda x: model(x).square().mean(), x)


@pytest.mark.parametrize(
    ("image_size", "pos_embed", "size"),
    [
        (32, PosEmbed.ROPE2D, (32, 32)),
        ((32, 48), PosEmbed.ROPE2D, (32, 48)),
        ((32, 48), PosEmbed.LEARNED, (32, 48)),
        ((32, 48), PosEmbed.LEARNED, (48, 24)),  # the table resampled in the graph
    ],
)
def test_aot_compiled_equals_eager(image_size, pos_embed, size) -> None:
    # AOT autograd (functionalized aten graphs, forward and backward, as inductor gets
    # them, without inductor's slow C++ codegen) gives eager's features, logits,
    # intermediates and gradients to float32 rounding.
    torch.manual_seed(0)
    config = vit2d_preset("tiny", image_size=image_size, pos_embed=pos_embed, n_register_tokens=1)
    model = ViT2D(config).eval()
    x = torch.randn(2, 3, *size)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled.forward_features(x), model.forward_features(x))
        torch.testing.assert_close(compiled(x), model(x))
        got = compiled.forward_intermediates(x, 2, intermediates_only=True)
        want = model.forward_intermediates(x, 2, intermediates_only=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    model.train()
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().mean().backward()
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.slow
def test_inductor_compiled_equals_eager() -> None:
    # The real compiler once, on a tiny rectangular model: ~1 min on 2 CPU cores, most of
    # it inductor's one-time C++ toolchain set-up.
    torch.manual_seed(0)
    model = ViT2D(vit2d_preset("tiny", image_size=(16, 24), n_layers=1)).eval()
    x = torch.randn(2, 3, 16, 24)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled.forward_features(x), model.forward_features(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vit2d_trains_under_bf16_autocast_on_cuda() -> None:
    """Mixed-precision training as the trainer runs it on a GPU (bf16 autocast)."""
    torch.manual_seed(0)
    config = vit2d_preset("tiny")
    x = torch.randn(2, config.in_channels, *config.image_hw)
    check_autocast_training(ViT2D(config), x, "cuda")
