"""VideoDiT: the model contract on its presets, any clip length up to max_frames, tubelets,
masked text (padding invariance, the null text condition and its training dropout), a clip
of one repeated frame, attention backends and the factorized attention's reach, ValueErrors
naming the bad input or config field; and the frame-wise VAE (equal to per-frame calls,
the network never sees more than a chunk of frames)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from vats_core.attention import AttentionBackend
from vats_core.testing import (
    check_backward,
    check_config,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_diffusion import (
    VAE,
    VIDEO_DIT_PRESETS,
    DiT,
    VideoDiT,
    VideoDiTConfig,
    classifier_free_guidance,
    dit_preset,
    inflate_dit,
    vae_preset,
    video_dit_preset,
)
from vats_diffusion.video_dit import INFLATED_FIELDS


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every weight perturbed, in eval mode: a fresh DiT predicts exactly
    zero (zero output layer), which would make comparisons between outputs trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.5 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _model(name: str = "tiny", seed: int = 0, **overrides: object) -> VideoDiT:
    """A preset, every weight perturbed."""
    torch.manual_seed(seed)
    model = _perturbed(VideoDiT(video_dit_preset(name, **overrides)), seed)
    assert isinstance(model, VideoDiT)
    return model


def _inputs(
    config: VideoDiTConfig, b: int = 2, t: int = 3, hw: tuple[int, int] = (8, 12), s: int = 6
) -> dict:
    g = torch.Generator().manual_seed(1)
    out: dict = dict(
        x=torch.randn(b, config.in_channels, t, *hw, generator=g),
        timestep=torch.tensor([17, 640, 3][:b]),
    )
    if config.text_dim is not None:
        out["text_states"] = torch.randn(b, s, config.text_dim, generator=g)
        out["text_mask"] = torch.arange(s)[None] < torch.tensor([s, 2, 4][:b])[:, None]
    return out


@pytest.mark.parametrize("name", sorted(VIDEO_DIT_PRESETS))
def test_preset_contract(name: str, tmp_path) -> None:
    model = _model(name)
    inputs = _inputs(model.config)
    b, _, t, h, w = inputs["x"].shape
    check_forward(model, inputs, (b, model.config.out_channels, t, h, w))
    check_backward(model, inputs)
    check_save_load_roundtrip(model, inputs, tmp_path)
    check_dtype_device_moves(model, inputs)
    check_config(model.config)


def test_fresh_model_starts_at_zero_and_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = VideoDiT(video_dit_preset("tiny", pos_embed="rope3d"))
    inputs = _inputs(model.config)
    with torch.no_grad():
        assert model(**inputs).abs().max() == 0
    check_backward(model, inputs)


def test_rope3d_and_tubelets_contract(tmp_path) -> None:
    model = _model("latte-tiny", pos_embed="rope3d", patch_frames=2, max_frames=6)
    inputs = _inputs(model.config, t=4)
    check_forward(model, inputs, (2, 8, 4, 8, 12))
    check_backward(model, inputs)
    check_save_load_roundtrip(model, inputs, tmp_path)
    check_config(model.config)
    assert model.proj_out.out_features == 2 * 2 * 2 * 8  # pt · p · p · C_out


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("pos_embed", ["sincos", "rope3d", "sincos_rope"])
def test_any_frame_count_up_to_max_frames(pos_embed: str) -> None:
    """Every T in 1 .. max_frames runs (not one fixed video_length); T = max_frames + 1 is
    refused naming the field and the limit, before any work."""
    model = _model(pos_embed=pos_embed, max_frames=5)
    inputs = _inputs(model.config, t=6)
    outs = {}
    for t in range(1, 6):
        clip = dict(inputs, x=inputs["x"][:, :, :t])
        outs[t] = check_forward(model, clip, (2, 8, t, 8, 12))
    # Frames meet in temporal attention: a clip's first frame depends on its other frames.
    assert (outs[2][:, :, 0] - outs[1][:, :, 0]).abs().max() > 1e-3
    check_raises(
        lambda: model(**inputs),
        ValueError,
        r"T=6 frames.*VideoDiTConfig\.max_frames=5",
    )


def test_one_repeated_frame_is_one_image_under_rope3d() -> None:
    """A clip of one frame repeated T times: finite, the right shape, and with 3D RoPE every
    frame's prediction is the one-frame clip's (temporal attention over identical frames
    returns their common value, whatever its position weights)."""
    model = _model(pos_embed="rope3d")
    inputs = _inputs(model.config, t=1)
    repeated = dict(inputs, x=inputs["x"].expand(-1, -1, 5, -1, -1).contiguous())
    with torch.no_grad():
        one = model(**inputs)
        clip = check_forward(model, repeated, (2, 8, 5, 8, 12))
    torch.testing.assert_close(clip, one.expand_as(clip), rtol=1e-5, atol=1e-5)


def test_one_repeated_frame_with_sincos_time_positions() -> None:
    """With sin-cos positions a one-frame clip runs (no temporal row added: an image), and
    a repeated frame's predictions differ per frame, since each frame gets its own row."""
    model = _model()
    inputs = _inputs(model.config, t=1)
    repeated = dict(inputs, x=inputs["x"].expand(-1, -1, 4, -1, -1).contiguous())
    check_forward(model, inputs, (2, 8, 1, 8, 12))
    clip = check_forward(model, repeated, (2, 8, 4, 8, 12))
    assert (clip[:, :, 1] - clip[:, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("pos_embed", ["sincos_rope", "rope3d"])
def test_frame_embed_tells_a_repeated_frame_s_copies_apart(pos_embed: str) -> None:
    """With relative (RoPE) time positions the copies of a repeated frame get one and the
    same prediction: nothing says which frame comes first, so no motion can be drawn from
    frames that look alike. frame_embed, the absolute index, breaks that; each clip of F
    frames reads the first F rows of its table."""
    inputs = _inputs(_model(pos_embed=pos_embed).config, t=1)
    repeated = dict(inputs, x=inputs["x"].expand(-1, -1, 4, -1, -1).contiguous())
    with torch.no_grad():
        plain = _model(pos_embed=pos_embed)(**repeated)
        torch.testing.assert_close(plain, plain[:, :, :1].expand_as(plain), rtol=1e-5, atol=1e-5)
        model = _model(pos_embed=pos_embed, frame_embed=True)
        assert model.frame_embed is not None and model.frame_embed.shape == (8, 32)
        out = model(**repeated)
        assert (out[:, :, 1] - out[:, :, 0]).abs().max() > 1e-3
        # Frame 0 of a 1-frame clip reads row 0 as frame 0 of a 4-frame clip does: only
        # row 0 moves the 1-frame clip.
        one = model(**inputs)
        shift = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
        model.frame_embed[1:].add_(shift[1:])
        torch.testing.assert_close(model(**inputs), one)
        model.frame_embed[0].add_(shift[0])
        assert (model(**inputs) - one).abs().max() > 1e-3


def _flip_frames(v: torch.Tensor) -> torch.Tensor:
    return v.flip(2)


def _flip_patch_rows(v: torch.Tensor) -> torch.Tensor:
    """Reverse the order of the rows of 2 × 2 patches, each patch's content kept."""
    rows = rearrange(v, "b c t (h p) w -> b c t h p w", p=2).flip(3)
    return rearrange(rows, "b c t h p w -> b c t (h p) w")


@pytest.mark.parametrize("pos_embed", ["sincos", "rope3d", "sincos_rope"])
def test_positions_tell_frames_and_patches_apart(pos_embed: str) -> None:
    """Without positions the model would commute with reordering the frames (temporal
    attention treats them as a set) and the patches of a frame (spatial attention, the
    per-token rest); its positions in time and in space each break that."""
    model = _model(pos_embed=pos_embed)
    inputs = _inputs(model.config, t=4, hw=(8, 8))
    with torch.no_grad():
        out = model(**inputs)
        for reorder in (_flip_frames, _flip_patch_rows):
            moved = model(**dict(inputs, x=reorder(inputs["x"])))
            assert (moved - reorder(out)).abs().max() > 1e-3, reorder.__name__


def test_block_attends_within_runs_of_attn_len_tokens() -> None:
    """DiTBlock's attn_len (how VideoDiT attends within frames, and within one position's
    frames): the block over a whole clip equals the block over each run alone, with the
    text and the modulation shared."""
    model = _model()
    block = model.spatial_blocks[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3 * 6, 32, generator=g)  # 3 frames of 6 tokens
    cond = torch.randn(2, 32, generator=g)
    context = torch.randn(2, 4, 32, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        whole = block(x, cond, context=context, context_mask=mask, attn_len=6)
        runs = [
            block(x[:, i : i + 6], cond, context=context, context_mask=mask)
            for i in range(0, 18, 6)
        ]
        joint = block(x, cond, context=context, context_mask=mask)
    torch.testing.assert_close(whole, torch.cat(runs, 1), rtol=1e-5, atol=1e-6)
    assert (whole - joint).abs().max() > 1e-3  # not the joint attention over all 18


# --------------------------------------------------------------------------- per-frame timesteps


@pytest.mark.parametrize(("name", "pt"), [("tiny", 1), ("latte-tiny", 1), ("tiny", 2)])
def test_a_timestep_per_frame_that_is_the_same_for_all_is_the_clip_s(name: str, pt: int) -> None:
    """Diffusion Forcing's (B, T) timestep with every frame at the clip's level is the (B,)
    timestep (adaLN-Zero and adaLN-single; one- and two-frame tubelets); each row's frames
    at one level still give each row its own output."""
    model = _model(name, patch_frames=pt)
    inputs = _inputs(model.config, t=4)
    per_frame = inputs["timestep"][:, None].expand(-1, 4)
    with torch.no_grad():
        clip = model(**inputs)
        frames = check_forward(model, dict(inputs, timestep=per_frame), tuple(clip.shape))
        scalar = model(**dict(inputs, timestep=torch.tensor(17)))
        same = model(**dict(inputs, timestep=torch.full((2, 4), 17)))
    torch.testing.assert_close(frames, clip, rtol=0, atol=1e-6)
    torch.testing.assert_close(same, scalar, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "latte-tiny"])
def test_a_frame_s_own_timestep_changes_its_frame(name: str) -> None:
    """Raising one frame's timestep changes that frame's prediction most (its own
    modulation in every block and the final layer), the other frames less (they meet it in
    temporal attention), and the other row not at all; the model trains through it."""
    model = _model(name)
    inputs = _inputs(model.config, t=4)
    t = inputs["timestep"][:, None].repeat(1, 4)  # (B, T)
    moved = t.clone()
    moved[0, 2] = 900
    with torch.no_grad():
        before = model(**dict(inputs, timestep=t))
        after = model(**dict(inputs, timestep=moved))
    change = (after - before).abs().amax(dim=(1, 3, 4))  # (B, T)
    assert change[0, 2] > 1e-2
    assert change[0, 2] > 5 * change[0, [0, 1, 3]].max()
    assert change[1].max() == 0
    check_backward(model, dict(inputs, timestep=moved))


def _frame_runs(block: torch.nn.Module, x, cond, context, mask, n: int) -> torch.Tensor:
    """``block`` on each run of ``n`` tokens alone, with that run's conditioning."""
    runs = [
        block(x[:, g * n : (g + 1) * n], cond[:, g], context=context, context_mask=mask)
        for g in range(cond.shape[1])
    ]
    return torch.cat(runs, 1)


@pytest.mark.parametrize("name", ["tiny", "latte-tiny"])
def test_block_modulates_each_token_with_its_group_s_vectors(name: str) -> None:
    """DiTBlock's cond_layout: a per-frame cond laid out "outer" ((f n), frame-major) is
    each frame's block alone with its own cond; laid out "inner" ((n f), position-major)
    it is the outer block on the tokens reordered (full attention without positions
    commutes with reordering)."""
    model = _model(name)
    block = model.spatial_blocks[0]
    g = torch.Generator().manual_seed(5)
    f, n = 3, 6
    x = torch.randn(2, f * n, 32, generator=g)  # 3 frames of 6 tokens, frame-major
    width = 32 if model.adaln_single is None else 6 * 32
    cond = torch.randn(2, f, width, generator=g)  # (B, F, D) or adaLN-single's (B, F, 6D)
    context = torch.randn(2, 4, 32, generator=g)  # the projected text (D)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    kw = dict(context=context, context_mask=mask)
    with torch.no_grad():
        outer = block(x, cond, attn_len=n, cond_layout="outer", **kw)
        ref = _frame_runs(block, x, cond, context, mask, n)
        whole = block(x, cond, cond_layout="outer", **kw)  # attention over all tokens
        inner = block(rearrange(x, "b (f n) d -> b (n f) d", f=f), cond, cond_layout="inner", **kw)
    torch.testing.assert_close(outer, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rearrange(inner, "b (n f) d -> b (f n) d", f=f), whole, rtol=1e-5, atol=1e-6
    )
    assert (whole - block(x, cond[:, 0], **kw)).abs().max() > 1e-3  # the groups differ


def test_bad_per_frame_timesteps_fail_before_any_work() -> None:
    """A per-frame timestep must be (B, T), and equal within a tubelet; ValueError naming
    the argument, before the patch embedding runs."""
    model = _model()
    tubelets = _model(patch_frames=2)
    calls: list[int] = []
    for m in (model, tubelets):
        m.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    inputs = _inputs(model.config, t=4)
    t = torch.tensor([[5, 5, 9, 9], [1, 1, 2, 2]])
    cases = [
        (model, dict(timestep=torch.zeros(2, 5)), r"timestep must be a real .*\(2, 4\) tensor"),
        (model, dict(timestep=torch.zeros(2, 4, 1)), r"timestep must be a real .*\(B, T\)"),
        (model, dict(timestep=torch.zeros(3, 4)), r"timestep must be a real .*got .* \(3, 4\)"),
        (model, dict(timestep=torch.zeros(2, 4, dtype=torch.bool)), r"timestep must be a real"),
        (
            tubelets,
            dict(timestep=torch.tensor([[5, 5, 9, 9], [1, 1, 2, 3]])),
            r"timestep \(B, T\) must be equal within each tubelet of patch_frames=2.*"
            r"\[2, 3\] for frames 2..3 of row 1",
        ),
    ]
    for m, changes, match in cases:
        check_raises(lambda m=m, c=changes: m(**{**inputs, **c}), ValueError, match)
    assert not calls
    with torch.no_grad():
        tubelets(**dict(inputs, timestep=t))  # equal within each tubelet: fine
    assert calls


# --------------------------------------------------------------------------- masked text


def test_padding_text_changes_nothing() -> None:
    """The same prompts padded to 8 or 77 positions (the padding holding garbage, even NaN)
    give the same prediction."""
    for name in ("tiny", "latte-tiny"):
        model = _model(name)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 4, 3, 8, 8, generator=g)
        t, lengths = torch.tensor([5, 500, 900]), torch.tensor([5, 1, 3])
        prompt = torch.randn(3, 5, 24, generator=g)
        outs = []
        for total in (8, 77):
            states = torch.randn(3, total, 24, generator=g) * 100
            states[:, :5] = prompt
            mask = torch.arange(total)[None] < lengths[:, None]
            states[~mask] = float("nan") if total == 77 else states[~mask]
            with torch.no_grad():
                outs.append(model(x, t, text_states=states, text_mask=mask))
        assert torch.isfinite(outs[0]).all()
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


def test_null_text_condition_for_guidance() -> None:
    """A text_mask row with no True is the null condition: finite, the same whatever its
    states hold and as text_states=None, its neighbours unchanged; guidance at scale 1 is
    the conditional prediction, and the text does steer it."""
    model = _model()
    inputs = _inputs(model.config)
    null = dict(inputs, text_mask=inputs["text_mask"].clone())
    null["text_mask"][1] = False
    with torch.no_grad():
        cond = model(**inputs)
        out = model(**null)
        other = dict(null, text_states=null["text_states"].clone())
        other["text_states"][1] = torch.randn_like(other["text_states"][1]) * 50
        changed = model(**other)
        no_text = model(inputs["x"], inputs["timestep"])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(changed, out, rtol=0, atol=0)
    torch.testing.assert_close(out[1], no_text[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], cond[0], rtol=0, atol=1e-6)
    assert (cond[1] - no_text[1]).abs().max() > 1e-3
    guided = classifier_free_guidance(cond, no_text, 1.0)
    torch.testing.assert_close(guided, cond, rtol=0, atol=1e-6)


def test_text_dropout_trains_the_null_condition() -> None:
    """In training, text_dropout turns rows into the null condition; in eval it does not."""
    model = _model(text_dropout=0.999)
    inputs = _inputs(model.config)
    with torch.no_grad():
        no_text = model(inputs["x"], inputs["timestep"])
        kept = model(**inputs)
        model.train()
        torch.manual_seed(0)
        dropped = model(**inputs)
    torch.testing.assert_close(dropped, no_text, rtol=0, atol=1e-6)
    assert (kept - no_text).abs().max() > 1e-3


def test_text_keep_is_the_dropout_given_instead_of_drawn() -> None:
    model = _model(text_dropout=0.5).eval()
    inputs = _inputs(model.config, b=3)
    keep = torch.tensor([True, False, False])
    with torch.no_grad():
        dropped = dict(inputs, text_mask=inputs["text_mask"] & keep[:, None])
        torch.testing.assert_close(
            model(**inputs, text_keep=keep), model(**dropped), rtol=0, atol=0
        )
        model.train()
        torch.manual_seed(0)
        drawn = model(**inputs)
        torch.manual_seed(0)
        given = model(**inputs, text_keep=torch.rand(3) >= 0.5)
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"VideoDiT: text_keep must be a torch.bool"):
        model(**inputs, text_keep=keep[:, None])


# --------------------------------------------------------------------------- options


def test_attention_backends_agree() -> None:
    """Every backend option the image DiT exposes reaches the VideoDiT's attention."""
    ref = _model(pos_embed="rope3d")
    inputs = _inputs(ref.config)
    with torch.no_grad():
        expected = ref(**inputs)
        for backend in (AttentionBackend.MATH, AttentionBackend.SDPA):
            model = _model(pos_embed="rope3d", attention_backend=backend)
            torch.testing.assert_close(model(**inputs), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- from an image DiT


def _image_dit(seed: int = 0, **overrides: object) -> DiT:
    """The tiny text DiT, every weight perturbed (a fresh one predicts zero)."""
    torch.manual_seed(seed)
    fields = dict(num_classes=0, learned_sigma=False, text_dropout=0.0, **overrides)
    model = _perturbed(DiT(dit_preset("tiny", **fields)), seed)
    assert isinstance(model, DiT)
    return model


def _video_config(image: DiT, **overrides: object) -> VideoDiTConfig:
    fields = {f: getattr(image.config, f) for f in INFLATED_FIELDS}
    return VideoDiTConfig(**{**fields, "max_frames": 8, "pos_embed": "sincos_rope", **overrides})


def _per_frame(image: DiT, inputs: dict) -> torch.Tensor:
    """The image DiT on each frame alone, stacked: ``(B, C, T, h, w)``."""
    x = inputs["x"]
    rest = {k: v for k, v in inputs.items() if k != "x"}
    with torch.no_grad():
        return torch.stack([image(x[:, :, i], **rest) for i in range(x.shape[2])], 2)


def test_inflated_dit_predicts_each_frame_as_the_image_dit() -> None:
    """inflate_dit with one-frame tubelets and sincos_rope: every frame of any clip gets
    exactly the image DiT's prediction for that frame alone (the temporal blocks start as
    the identity), text and padding mask included; training moves it away from that."""
    image = _image_dit()
    video = inflate_dit(image, _video_config(image)).eval()
    for t in (1, 3, 5):
        inputs = _inputs(video.config, t=t)
        with torch.no_grad():
            out = video(**inputs)
        torch.testing.assert_close(out, _per_frame(image, inputs), rtol=1e-5, atol=1e-5)
    # frame_embed starts at zero: the same predictions, and it is trained.
    with_frames = inflate_dit(image, _video_config(image, frame_embed=True)).eval()
    assert with_frames.frame_embed is not None and not with_frames.frame_embed.any()
    inputs = _inputs(video.config, t=4)
    with torch.no_grad():
        torch.testing.assert_close(with_frames(**inputs), video(**inputs), rtol=0, atol=0)
    with_frames(**inputs).square().mean().backward()
    grad = with_frames.frame_embed.grad
    assert grad is not None and grad[:4].abs().amax(1).min() > 0 and not grad[4:].any()
    # The temporal blocks are fresh (not copies) and still learn: after they change, the
    # frames meet.
    with torch.no_grad():
        for p in video.temporal_blocks.parameters():
            p.add_(0.05)
        inputs = _inputs(video.config, t=3)
        out = video(**inputs)
    assert (out - _per_frame(image, inputs)).abs().max() > 1e-3


def test_inflated_dit_predicts_each_frame_at_its_own_timestep_as_the_image_dit() -> None:
    """With a timestep per frame, the inflated model (adaLN-Zero: its temporal blocks the
    identity) gives each frame the image DiT's prediction for that frame at that frame's
    timestep: the spatial blocks and the final layer modulate every token by its frame."""
    image = _image_dit()
    video = inflate_dit(image, _video_config(image)).eval()
    inputs = _inputs(video.config, t=3)
    t = torch.tensor([[17, 300, 900], [640, 5, 640]])
    x, rest = inputs["x"], {k: v for k, v in inputs.items() if k not in ("x", "timestep")}
    with torch.no_grad():
        out = video(**dict(inputs, timestep=t))
        ref = torch.stack([image(x[:, :, i], t[:, i], **rest) for i in range(3)], 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_inflated_tubelets_repeat_the_image_prediction_for_a_repeated_frame() -> None:
    """With two-frame tubelets the patch embedding averages a tubelet's frames, so a clip
    whose tubelets hold one repeated frame gets the image DiT's prediction on every frame;
    sincos positions (a time table added to the tokens) make an inflated model that
    differs from the image DiT once the clip has several tubelets."""
    image = _image_dit(seed=3)
    video = inflate_dit(image, _video_config(image, patch_frames=2)).eval()
    inputs = _inputs(video.config, t=2)
    frames = inputs["x"][:, :, :1].expand(-1, -1, 2, -1, -1)
    second = torch.randn_like(frames[:, :, :1]).expand(-1, -1, 2, -1, -1)
    clip = dict(inputs, x=torch.cat([frames, second], 2).contiguous())
    with torch.no_grad():
        out = video(**clip)
    torch.testing.assert_close(out, _per_frame(image, clip), rtol=1e-5, atol=1e-5)
    sincos = inflate_dit(image, _video_config(image, pos_embed="sincos")).eval()
    with torch.no_grad():
        moved = sincos(**clip)
    assert (moved - _per_frame(image, clip)).abs().max() > 1e-3


def test_inflate_refuses_what_does_not_fit() -> None:
    image = _image_dit()
    check_raises(
        lambda: inflate_dit(image, _video_config(image, dim=64, n_heads=4, n_kv_heads=2)),
        ValueError,
        r"VideoDiTConfig\.dim=64 is invalid: expected the image DiT's dim=32",
    )
    check_raises(
        lambda: inflate_dit(image, _video_config(image, pos_embed="rope3d")),
        ValueError,
        r"pos_embed='rope3d' is invalid",
    )
    labelled = DiT(dit_preset("tiny", learned_sigma=False))
    check_raises(lambda: inflate_dit(labelled, _video_config(image)), ValueError, r"num_classes=10")
    rope = _image_dit(pos_embed="rope2d")
    check_raises(lambda: inflate_dit(rope, _video_config(rope)), ValueError, r"'rope2d'")


def test_configs_refuse_bad_fields() -> None:
    bad = [
        (dict(patch_frames=3), r"max_frames=8 is invalid.*multiple of patch_frames=3"),
        (dict(max_frames=0), r"max_frames=0 is invalid"),
        (dict(pos_embed="rope3d", dim=16, n_heads=4), r"head_dim=4 is invalid.*3D RoPE"),
        (dict(dim=30, n_heads=5), r"dim=30 is invalid.*multiple of 4"),
        (dict(sample_size=7), r"sample_size=7 is invalid"),
        (dict(text_dim=None), r"text_dropout=0.1 is invalid"),
        (dict(pos_embed="rope2d"), r"pos_embed='rope2d' is invalid"),
    ]
    for overrides, match in bad:
        check_raises(lambda o=overrides: video_dit_preset("shapes", **o), ValueError, match)
    check_raises(lambda: video_dit_preset("huge"), ValueError, "unknown VideoDiT preset")


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_what_is_wrong() -> None:
    model = _model()
    inputs = _inputs(model.config)
    x, states, mask = inputs["x"], inputs["text_states"], inputs["text_mask"]

    def call(**changes: object) -> None:
        model(**{**inputs, **changes})

    cases = [
        (dict(x=x[:, :, 0]), r"x must be a \(B, C=4, T, h, w\) clip"),
        (dict(x=x[:, :3]), r"3 channels, expected in_channels=4"),
        (dict(x=x.double()), r"dtype torch.float32"),
        (dict(x=x.long()), r"dtype torch.float32"),
        (dict(x=torch.randn(2, 4, 9, 8, 8)), r"T=9 frames.*max_frames=8"),
        (dict(x=x[..., :7]), r"\(h, w\)=\(8, 7\).*patch_size=2"),
        (dict(timestep=torch.tensor([1, 2, 3])), r"timestep must be a real \(B,\)"),
        (dict(text_states=states[..., :20]), r"text_states must be .*\(2, S >= 1, 24\)"),
        (dict(text_mask=mask[:, :4]), r"text_mask has shape \(2, 4\), expected .*\(2, 6\)"),
        (dict(text_mask=mask.float()), r"text_mask must be a torch.bool"),
        (dict(text_states=None), r"text_mask given without text_states"),
    ]
    for changes, match in cases:
        check_raises(lambda c=changes: call(**c), ValueError, match)
    tubelets = _model(patch_frames=2)
    check_raises(
        lambda: tubelets(**_inputs(tubelets.config, t=3)), ValueError, "multiple of patch_frames=2"
    )
    no_text = _model(text_dim=None)
    check_raises(
        lambda: no_text(x, inputs["timestep"], text_states=states),
        ValueError,
        r"text_states given, but the model has no text \(text_dim=None\)",
    )


# --------------------------------------------------------------------------- frame-wise VAE


def _vae() -> VAE:
    torch.manual_seed(0)
    return VAE(vae_preset("tiny", scaling_factor=0.5, shift_factor=0.1)).eval()


def test_framewise_vae_equals_per_frame_calls_and_sees_one_chunk_at_a_time() -> None:
    vae = _vae()
    g = torch.Generator().manual_seed(3)
    clip = torch.rand(2, 3, 5, 8, 12, generator=g) * 2 - 1  # (B, C, T, H, W)
    seen: list[int] = []
    hooks = [
        vae.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])),
        vae.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])),
    ]
    with torch.no_grad():
        latents = vae.encode_frames(clip, chunk=2, sample=False)
        frames = vae.decode_frames(latents, chunk=2)
        per_frame = [vae.encode_latents(clip[:, :, i], sample=False) for i in range(5)]
        decoded = [vae.decode_latents(latents[:, :, i]) for i in range(5)]
    for hook in hooks:
        hook.remove()
    assert latents.shape == (2, 4, 5, 4, 6) and frames.shape == clip.shape
    torch.testing.assert_close(latents, torch.stack(per_frame, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frames, torch.stack(decoded, 2), rtol=1e-5, atol=1e-6)
    # Three chunks (2, 2, 1 frames of 2 clips) each way, then the per-frame reference calls.
    assert seen[:6] == [4, 4, 2, 4, 4, 2]


def test_framewise_vae_sample_does_not_depend_on_chunk() -> None:
    vae = _vae()
    clip = torch.rand(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        draws = [
            vae.encode_frames(clip, chunk=c, generator=torch.Generator().manual_seed(7))
            for c in (1, 3, 4)
        ]
        mode = vae.encode_frames(clip, sample=False)
    torch.testing.assert_close(draws[1], draws[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(draws[2], draws[0], rtol=1e-5, atol=1e-6)
    assert (draws[0] - mode).abs().max() > 1e-4  # a sample, not the mode


def test_framewise_vae_bad_input() -> None:
    vae = _vae()
    clip = torch.zeros(1, 3, 2, 8, 8)
    check_raises(lambda: vae.encode_frames(clip[:, :, 0]), ValueError, r"rank 5 \(B, C, T, H, W\)")
    check_raises(lambda: vae.encode_frames(clip, chunk=0), ValueError, r"chunk=0 is invalid")
    check_raises(lambda: vae.decode_frames(clip), ValueError, r"4 channels")
    check_raises(
        lambda: vae.decode_frames(torch.zeros(1, 4, 0, 4, 4)), ValueError, "at least one frame"
    )
