"""AudioDiT: the model contract on its presets, any length up to max_frames, masked text
and masked frames (padding changes no real prediction), duration conditioning (learned
Fourier features that reach the output), frames_for_seconds, ValueErrors naming the bad
input or config field, and a tiny training run whose loss falls."""

from __future__ import annotations

import math

import pytest
import torch

from vats_core.attention import attention_backend
from vats_core.testing import (
    check_backward,
    check_config,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_diffusion import (
    AUDIO_DIT_PRESETS,
    AudioDiT,
    AudioDiTConfig,
    AudioPosEmbed,
    audio_dit_preset,
    frames_for_seconds,
)
from vats_diffusion.audio_dit import LearnedFourierFeatures


def _wake(model: AudioDiT, seed: int = 0) -> AudioDiT:
    """Add noise to every weight, the zero-initialised adaLN and output layers included: a
    fresh model predicts exactly zero, which would make comparisons trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _model(name: str = "tiny", seed: int = 0, **overrides: object) -> AudioDiT:
    torch.manual_seed(seed)
    return _wake(AudioDiT(audio_dit_preset(name, **overrides)), seed).eval()


def _inputs(config: AudioDiTConfig, b: int = 2, frames: int = 24, s: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    out: dict = dict(
        x=torch.randn(b, config.n_mels, frames, generator=g),
        timestep=torch.tensor([17, 640, 3, 999][:b]),
    )
    if config.text_dim is not None:
        out["text_states"] = torch.randn(b, s, config.text_dim, generator=g)
        out["text_mask"] = torch.arange(s)[None] < torch.tensor([s, 2, 4, 1][:b])[:, None]
    if config.max_seconds is not None:
        top = config.max_seconds
        out["seconds_start"] = torch.tensor([0.0, 0.1, 0.0, 0.2][:b]) * top
        out["seconds_total"] = torch.tensor([0.9, 0.4, 1.0, 0.7][:b]) * top
    return out


@pytest.mark.parametrize("name", sorted(AUDIO_DIT_PRESETS))
def test_preset_contract(name: str, tmp_path) -> None:
    model = _model(name)
    cfg = model.config
    inputs = _inputs(cfg, frames=8 * cfg.patch_size)
    inputs["frame_mask"] = torch.arange(8 * cfg.patch_size)[None] < torch.tensor([[99], [13]])
    b, _, length = inputs["x"].shape
    check_forward(model, inputs, (b, cfg.out_channels, length))
    check_backward(model, inputs)
    check_save_load_roundtrip(model, inputs, tmp_path)
    check_dtype_device_moves(model, inputs)


def test_configs_contract() -> None:
    for name in AUDIO_DIT_PRESETS:
        config = audio_dit_preset(name)
        check_config(config)
        check_config(config.block_config)
    check_config(audio_dit_preset("tiny", pos_embed="rope", max_seconds=None, text_dim=None))


def test_sounds_preset_matches_the_audio_features() -> None:
    """vats_audio.LogMel's defaults (the audio encoder's input): 80 mels, 160-sample hop at
    16 kHz; ~3.5 s of frames."""
    cfg = audio_dit_preset("sounds")
    assert (cfg.n_mels, cfg.hop_length, cfg.sample_rate) == (80, 160, 16000)
    assert (cfg.dim, cfg.n_layers, cfg.text_dropout) == (128, 4, 0.1)
    assert cfg.frames_for(3.5) == cfg.max_frames == 352


def test_fresh_model_predicts_zero_and_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = AudioDiT(audio_dit_preset("tiny"))
    inputs = _inputs(model.config)
    with torch.no_grad():
        assert model(**inputs).abs().max() == 0
    check_backward(model, inputs)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("frames", [2, 10, 38, 64])
def test_any_length_up_to_max_frames(pos_embed: str, frames: int) -> None:
    model = _model("tiny", pos_embed=pos_embed, learned_sigma=True)
    inputs = _inputs(model.config, frames=frames)
    out = check_forward(model, inputs, (2, 32, frames))
    assert out.abs().amax(dim=(1, 2)).min() > 1e-3


def test_rope_and_sincos_differ_and_positions_matter() -> None:
    """Same weights (neither has position parameters), different functions; and moving a
    frame pattern in time changes more than its own frames (positions are read)."""
    sincos = _model("tiny")
    rope = AudioDiT(sincos.config.replace(pos_embed=AudioPosEmbed.ROPE)).eval()
    rope.load_state_dict(sincos.state_dict())
    inputs = _inputs(sincos.config)
    with torch.no_grad():
        assert (sincos(**inputs) - rope(**inputs)).abs().max() > 1e-3
        same = dict(inputs, x=inputs["x"][:, :, :2].repeat(1, 1, 12))  # one patch, repeated
        out = sincos(**same).unflatten(2, (12, 2))  # (B, M, tokens, p)
    # Identical tokens at different positions get different predictions.
    assert (out[:, :, 0] - out[:, :, 7]).abs().max() > 1e-3


# --------------------------------------------------------------------------- masked text


def test_padding_text_changes_nothing() -> None:
    """The same prompts padded to 8 or 77 positions (padding holding garbage, even NaN)
    give the same prediction."""
    model = _model("tiny")
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    base = _inputs(cfg, b=3)
    lengths = torch.tensor([5, 1, 3])
    prompt = torch.randn(3, 5, cfg.text_dim, generator=g)
    outs = []
    for total in (8, 77):
        states = torch.randn(3, total, cfg.text_dim, generator=g) * 100
        states[:, :5] = prompt
        mask = torch.arange(total)[None] < lengths[:, None]
        if total == 77:
            states[~mask] = float("nan")
        with torch.no_grad():
            outs.append(model(**dict(base, text_states=states, text_mask=mask)))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    with torch.no_grad():  # the text is read: another prompt changes the prediction
        other = model(**dict(base, text_states=states + 1.0, text_mask=mask))
    assert (other - outs[1]).abs().amax(dim=(1, 2)).min() > 1e-3


def test_null_text_row_is_the_no_text_condition() -> None:
    model = _model("tiny")
    inputs = _inputs(model.config)
    inputs["text_mask"][1] = False
    with torch.no_grad():
        out = model(**inputs)
        no_text = model(**{k: v for k, v in inputs.items() if not k.startswith("text")})
    torch.testing.assert_close(out[1], no_text[1], rtol=0, atol=1e-6)
    assert (out[0] - no_text[0]).abs().max() > 1e-3


def test_text_dropout_only_in_training() -> None:
    model = _model("tiny", text_dropout=0.5)
    inputs = _inputs(model.config, b=4)
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs))
        model.train()
        outs = [model(**inputs) for _ in range(8)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])


def test_text_keep_is_the_dropout_given_instead_of_drawn() -> None:
    model = _model("tiny", text_dropout=0.5)
    inputs = _inputs(model.config, b=4)
    keep = torch.tensor([False, True, True, False])
    with torch.no_grad():
        dropped = dict(inputs, text_mask=inputs["text_mask"] & keep[:, None])
        torch.testing.assert_close(
            model(**inputs, text_keep=keep), model(**dropped), rtol=0, atol=0
        )
        model.train()
        torch.manual_seed(0)
        drawn = model(**inputs)
        torch.manual_seed(0)
        given = model(**inputs, text_keep=torch.rand(4) >= 0.5)
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"AudioDiT: text_keep must be a torch.bool"):
        model(**inputs, text_keep=keep.long())


# --------------------------------------------------------------------------- masked frames


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_padded_frames_change_no_real_frame(pos_embed: str) -> None:
    """A sound of 20 real frames padded to 32 or 48 frames with noise or NaN predicts what
    it predicts alone, and its padded frames predict zero."""
    model = _model("tiny", pos_embed=pos_embed)
    g = torch.Generator().manual_seed(3)
    base = _inputs(model.config, frames=20)
    real = base["x"]  # (2, M, 20)
    lengths = torch.tensor([[20], [13]])  # row 1: 13 frames, a partly padded patch
    with torch.no_grad():
        alone = model(**base)[0]
        outs = []
        for total, fill in ((32, 5.0), (48, float("nan"))):
            pad = torch.full((2, model.config.n_mels, total - 20), fill)
            x = torch.cat([real, pad], dim=2)
            x[1, :, 13:] = torch.randn(model.config.n_mels, total - 13, generator=g) * fill
            mask = torch.arange(total)[None] < lengths
            out = model(**dict(base, x=x, frame_mask=mask))
            assert torch.isfinite(out).all()
            assert (out[~mask[:, None].expand_as(out)] == 0).all()
            outs.append(out[:, :, :20])
    torch.testing.assert_close(outs[0][0], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    # Without the mask, the padding does change the real frames: the mask is what holds it.
    with torch.no_grad():
        x = torch.cat([real, torch.full((2, model.config.n_mels, 12), 5.0)], dim=2)
        unmasked = model(**dict(base, x=x))[0, :, :20]
    assert (unmasked - alone).abs().max() > 1e-3


def test_no_gradient_reaches_padded_frames() -> None:
    model = _model("tiny").train()
    inputs = _inputs(model.config, frames=16)
    x = inputs["x"].clone().requires_grad_(True)
    mask = torch.arange(16)[None] < torch.tensor([[16], [7]])
    model(**dict(inputs, x=x, frame_mask=mask)).square().sum().backward()
    assert x.grad is not None
    assert (x.grad[1, :, 7:] == 0).all()
    assert x.grad[1, :, :7].abs().amax() > 0 and x.grad[0].abs().amax(dim=0).min() > 0


def test_attention_backends_agree_with_padding() -> None:
    model = _model("tiny")
    inputs = _inputs(model.config, frames=24)
    inputs["frame_mask"] = torch.arange(24)[None] < torch.tensor([[24], [9]])
    with torch.no_grad():
        with attention_backend("math"):
            reference = model(**inputs)
        with attention_backend("sdpa"):
            torch.testing.assert_close(model(**inputs), reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- duration


def test_duration_changes_the_prediction() -> None:
    model = _model("tiny")
    inputs = _inputs(model.config)
    with torch.no_grad():
        out = model(**inputs)
        longer = model(**dict(inputs, seconds_total=inputs["seconds_total"] * 0.5))
        later = model(**dict(inputs, seconds_start=inputs["seconds_start"] + 0.05))
        scalar = model(**dict(inputs, seconds_start=0.0, seconds_total=0.4))
        vector = model(
            **dict(inputs, seconds_start=torch.zeros(2), seconds_total=torch.full((2,), 0.4))
        )
    assert (out - longer).abs().amax(dim=(1, 2)).min() > 1e-3
    assert (out - later).abs().amax(dim=(1, 2)).min() > 1e-3
    torch.testing.assert_close(scalar, vector, rtol=0, atol=0)


def test_duration_enters_the_conditioning_as_learned_fourier_features() -> None:
    """c(seconds) - c(none) = the two duration embeddings of seconds / max_seconds, each
    an MLP of [u, sin(2π·u·w), cos(2π·u·w)]."""
    model = _model("tiny")
    top = model.config.max_seconds
    t, start, total = torch.tensor([5, 700]), torch.tensor([0.0, 0.3]), torch.tensor([0.5, 1.0])
    with torch.no_grad():
        with_duration = model.condition(
            t, seconds_start=start, seconds_total=total, batch=2, dtype=torch.float32
        )
        without = model.condition(t, batch=2, dtype=torch.float32)
        u = total / top
        w = model.seconds_total_embed.fourier.weight
        features = torch.cat(
            [
                u[:, None],
                torch.sin(2 * math.pi * u[:, None] * w),
                torch.cos(2 * math.pi * u[:, None] * w),
            ],
            dim=1,
        )
        expected = model.seconds_start_embed(start / top) + model.seconds_total_embed.mlp(features)
    torch.testing.assert_close(with_duration - without, expected, rtol=1e-5, atol=1e-6)
    assert w.requires_grad and w.shape == (model.config.duration_features // 2,)
    assert LearnedFourierFeatures(8)(torch.tensor([0.25])).shape == (1, 9)


def test_end_embed_tells_each_token_its_time_to_the_sound_end() -> None:
    """With ``end_embed`` each token gets end_embed((t_i - (total - start)) / max_seconds),
    t_i its first frame's time: the same for every window that leaves the same time to
    the end, and it reaches the output."""
    model = _model("tiny", end_embed=True)
    cfg = model.config
    inputs = _inputs(cfg)
    n = inputs["x"].shape[-1] // cfg.patch_size
    tokens = torch.zeros(2, n, cfg.dim)
    start, total = inputs["seconds_start"], inputs["seconds_total"]
    with torch.no_grad():
        got = model._to_end(start, total, tokens)
        times = torch.arange(n) * cfg.patch_size * cfg.hop_length / cfg.sample_rate
        u = (times[None] - (total - start)[:, None]) / cfg.max_seconds
        expected = model.end_embed(u.reshape(-1)).view(2, n, cfg.dim)
        shifted = model._to_end(start + 0.05, total + 0.05, tokens)
        out = model(**inputs)
        for p in model.end_embed.mlp.parameters():
            p.zero_()
        without = model(**inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted, got, rtol=1e-4, atol=1e-5)
    assert (got[:, 1:] - got[:, :-1]).abs().amax() > 1e-3  # tokens are told apart
    assert (out - without).abs().amax(dim=(1, 2)).min() > 1e-3


def test_frames_for_seconds() -> None:
    assert frames_for_seconds(2.5, 16000, 160) == 250
    assert frames_for_seconds(2.5, 16000, 160, 4) == 252  # rounded up to the patch
    assert frames_for_seconds(0.29, 16000, 160, 1) == 29  # 0.29 · 16000 is 4639.99...
    assert frames_for_seconds(0.001, 16000, 160, 2) == 2  # 16 samples still need a frame
    assert frames_for_seconds(1.0, 22050, 256, 1) == 87  # ceil(22050 / 256)
    cfg = audio_dit_preset("tiny")
    assert cfg.frames_for(0.64) == 64 and cfg.frames_for(0.33) == 34
    check_raises(lambda: cfg.frames_for(0.65), ValueError, r"66 frames.*max_frames=64")
    check_raises(lambda: frames_for_seconds(0.0, 16000, 160), ValueError, r"seconds=0.0")
    check_raises(lambda: frames_for_seconds(math.inf, 16000, 160), ValueError, r"seconds=inf")
    check_raises(lambda: frames_for_seconds(1.0, 16000, 0), ValueError, r"hop_length=0")
    check_raises(lambda: frames_for_seconds(1.0, 16000, 160, 2.0), ValueError, r"patch_size")


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument() -> None:
    model = _model("tiny")
    good = _inputs(model.config)

    def call(**changes: object) -> object:
        return lambda: model(**{**good, **changes})

    x, states, mask = good["x"], good["text_states"], good["text_mask"]
    cases = [
        (call(x=x[0]), r"x must be a floating \(B, n_mels=16, L\)"),
        (call(x=x.long()), r"x must be a floating"),
        (call(x=x[:, :15]), r"15 mel channels, expected n_mels=16"),
        (call(x=x[..., :7]), r"L=7 frames.*patch_size=2"),
        (call(x=x[..., :0]), r"L=0 frames"),
        (call(x=torch.randn(2, 16, 66)), r"L=66 frames \(0.66 s\).*max_frames=64 \(0.64 s\)"),
        (call(timestep=torch.tensor([1, 2, 3])), r"timestep"),
        (call(text_states=states[..., :5]), r"text_states.*text_dim"),
        (call(text_mask=mask[:, :3]), r"text_mask has shape"),
        (call(text_mask=mask.long()), r"text_mask must be a torch.bool"),
        (call(text_states=None), r"text_mask given without text_states"),
        (call(frame_mask=torch.ones(2, 23, dtype=torch.bool)), r"frame_mask has shape"),
        (call(frame_mask=torch.ones(2, 24)), r"frame_mask must be a torch.bool"),
        (call(frame_mask=torch.arange(24)[None] < torch.tensor([[3], [0]])), r"rows \[1\]"),
        (call(seconds_total=None), r"seconds_total missing.*max_seconds=1"),
        (call(seconds_start=None, seconds_total=None), r"seconds_start and seconds_total"),
        (
            call(seconds_total=torch.tensor([0.5, 1.5])),
            r"\[1.5\] outside the trained range \[0, 1\]",
        ),
        (call(seconds_start=-0.1), r"seconds_start=\[-0.1.*\[0, 1\] s"),
        (call(seconds_total=torch.tensor([0.5, math.nan])), r"seconds_total=\[nan\]"),
        (
            call(seconds_total=torch.ones(3)),
            r"seconds_total must be a real \(B,\) = \(2,\) tensor or a scalar",
        ),
        (call(seconds_total="1 s"), r"seconds_total must be"),
    ]
    for fn, match in cases:
        check_raises(fn, ValueError, match)
    timeless = _model("tiny", max_seconds=None)
    check_raises(
        lambda: timeless(x, good["timestep"], seconds_total=1.0),
        ValueError,
        r"seconds_total given.*max_seconds=None",
    )
    textless = _model("tiny", text_dim=None)
    check_raises(
        lambda: textless(x, good["timestep"], text_states=states, seconds_start=0, seconds_total=1),
        ValueError,
        r"text_dim=None",
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(max_frames=63), r"AudioDiTConfig\.max_frames=63.*patch_size=2"),
        (dict(max_frames=0), r"AudioDiTConfig\.max_frames=0"),
        (dict(patch_size=0), r"AudioDiTConfig\.patch_size=0"),
        (dict(max_seconds=0.0), r"AudioDiTConfig\.max_seconds=0.0"),
        (dict(duration_features=7), r"AudioDiTConfig\.duration_features=7"),
        (dict(dim=30, n_heads=2, n_kv_heads=None, pos_embed="rope"), r"AudioDiTConfig\.dim=30"),
        (dict(dim=33, n_heads=3, n_kv_heads=None, head_dim=11), r"AudioDiTConfig\.dim=33.*even"),
        (dict(n_kv_heads=3), r"AudioDiTConfig\.n_kv_heads=3"),
        (dict(pos_embed="learned"), r"AudioDiTConfig\.pos_embed"),
        (dict(text_dim=None, text_dropout=0.1), r"AudioDiTConfig\.text_dropout"),
        (dict(text_dropout=1.0), r"AudioDiTConfig\.text_dropout"),
        (dict(timestep_channels=7), r"AudioDiTConfig\.timestep_channels"),
        (dict(hop_length=0), r"AudioDiTConfig\.hop_length"),
        (dict(max_seconds=None, end_embed=True), r"AudioDiTConfig\.end_embed=True.*max_seconds"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, match: str) -> None:
    check_raises(lambda: audio_dit_preset("tiny", **overrides), ValueError, match)


def test_unknown_preset() -> None:
    check_raises(lambda: audio_dit_preset("nope"), ValueError, r"unknown AudioDiT preset 'nope'")


# --------------------------------------------------------------------------- training


def test_tiny_training_learns_two_text_conditioned_patterns() -> None:
    """50 steps of x0-prediction on two fixed mel patterns, each named by a 2-token prompt,
    in sounds of two lengths in one padded batch: the masked loss falls clearly, and at
    pure noise the prediction follows the prompt."""
    torch.manual_seed(0)
    cfg = audio_dit_preset("tiny", n_mels=8, max_frames=16, text_dim=8, timestep_channels=16)
    model = AudioDiT(cfg).train()
    frames = torch.arange(16)
    patterns = torch.zeros(2, 8, 16)
    patterns[0, 1:3] = 1.0 - frames / 20  # a low band that fades
    patterns[1, 5:7] = 1.0  # a steady high band
    patterns = patterns / patterns.square().mean(dim=(1, 2), keepdim=True).sqrt()
    words = torch.randn(3, 8)  # "low", "high", "tone"
    prompts = torch.stack([words[[0, 2]], words[[1, 2]]])  # (2, 2, Dt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        which = torch.randint(0, 2, (16,), generator=g)
        length = torch.where(torch.rand(16, generator=g) < 0.5, 16, 10)
        mask = frames[None] < length[:, None]  # (B, L)
        x0 = patterns[which] * mask[:, None]
        t = torch.randint(0, 1000, (16,), generator=g)
        alpha = torch.cos(t / 1000 * math.pi / 2)[:, None, None]
        noise = torch.randn(x0.shape, generator=g)
        xt = alpha * x0 + (1 - alpha**2).sqrt() * noise
        pred = model(
            xt,
            t,
            text_states=prompts[which],
            seconds_start=torch.zeros(16),
            seconds_total=length * cfg.hop_length / cfg.sample_rate,
            frame_mask=mask,
        )
        weights = mask[:, None].float().expand_as(pred)
        loss = ((pred - x0).square() * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.25 * first, f"loss {first:.3f} -> {last:.3f}"
    model.eval()
    with torch.no_grad():
        pred = model(
            torch.randn(2, 8, 16, generator=g),
            torch.tensor([999, 999]),
            text_states=prompts,
            seconds_start=0.0,
            seconds_total=0.16,
        )
    errors = (pred[:, None] - patterns[None]).square().mean(dim=(2, 3))  # (prompt, pattern)
    assert errors[0, 0] < 0.25 * errors[0, 1] and errors[1, 1] < 0.25 * errors[1, 0], errors
