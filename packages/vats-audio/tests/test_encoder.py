"""AudioEncoder: the model contract on every preset, padded batches = clips run alone (odd
and even lengths, every position and attention option), output lengths, attention options
against the math reference, positions (the sinusoidal limit, its continuation under a
window, RoPE at any length), the head, bad input, and torch.compile against eager."""

from __future__ import annotations

import pytest
import torch

from vats_audio.encoder import (
    AudioEncoder,
    AudioEncoderConfig,
    AudioPosEmbed,
    output_lengths,
    sinusoid_table,
)
from vats_audio.presets import AUDIO_PRESETS, audio_preset
from vats_core.attention import attention_backend, backend_unavailable_reason
from vats_core.testing import (
    check_autocast_training,
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)

F64 = torch.float64
M = 80  # mel bins of every preset


def _tiny(**overrides: object) -> AudioEncoder:
    torch.manual_seed(0)
    model = AudioEncoder(audio_preset("tiny", **overrides)).eval()
    with torch.no_grad():  # biases and norms away from their init, so a dropped one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", sorted(AUDIO_PRESETS))
def test_audio_preset_contract(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = audio_preset(name)
    model = AudioEncoder(config)
    # The Whisper-sized presets run short clips here (any length up to 30 s is valid).
    t = 48 if config.dim > 128 else 37
    x, lengths = torch.randn(2, M, t), torch.tensor([t, t - 10])
    out = config.num_classes or config.dim
    check_forward(model, (x, lengths), (2, out))
    check_backward(model, (x, lengths))
    check_save_load_roundtrip(model, (x, lengths), tmp_path)
    check_dtype_device_moves(model, (x, lengths))
    assert model.forward_features(x).shape == (2, (t + 1) // 2, config.dim)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # sinusoidal, GQA (tiny has 4 query heads over 2 kv heads)
        dict(pos_embed="rope", n_kv_heads=1),
        dict(window=3),
        dict(pos_embed="rope", window=2, qk_norm=True),
        dict(norm="rmsnorm", mlp_activation="swiglu", qkv_bias=False, out_bias=False),
    ],
    ids=["sinusoidal_gqa", "rope_mqa", "window", "rope_window_qknorm", "rmsnorm_swiglu"],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_padded_batch_equals_clips_alone(overrides: dict, dtype: torch.dtype) -> None:
    # Odd and even lengths, a clip that fills the batch and one of a single frame: each
    # clip's tokens, pooled vector and logits equal a lone run's, and its padding is zero.
    model = _tiny(**overrides).to(dtype)
    lengths = [37, 36, 20, 13, 2, 1]
    torch.manual_seed(1)
    x = torch.randn(len(lengths), M, max(lengths), dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        feats = model.forward_features(x, lengths)
        logits = model(x, lengths)
        pooled = model.forward_head(feats, lengths, pre_logits=True)
        n_out = model.output_lengths(lengths).tolist()
        assert feats.shape == (len(lengths), 19, 32)
        for i, n in enumerate(lengths):
            alone = model.forward_features(x[i : i + 1, :, :n])[0]
            assert alone.shape[0] == n_out[i] == (n + 1) // 2
            torch.testing.assert_close(feats[i, : n_out[i]], alone, **tol)
            assert (feats[i, n_out[i] :] == 0).all()
            torch.testing.assert_close(logits[i], model(x[i : i + 1, :, :n])[0], **tol)
            torch.testing.assert_close(pooled[i], alone.mean(0), **tol)


def test_padding_content_never_reaches_real_frames() -> None:
    # Whatever fills the padded frames (here huge values and NaN) changes nothing.
    model = _tiny(window=4)
    lengths = torch.tensor([30, 17, 9])
    x = torch.randn(3, M, 30)
    noisy = x.clone()
    noisy[1, :, 17:] = 1e4
    noisy[2, :, 9:] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(noisy, lengths), model.forward_features(x, lengths)
        )


def test_full_lengths_equal_no_lengths() -> None:
    model = _tiny()
    x = torch.randn(2, M, 25)
    with torch.no_grad():
        torch.testing.assert_close(model(x, [25, 25]), model(x), rtol=0, atol=0)


def test_output_lengths_are_the_conv_lengths() -> None:
    # ceil(L / 2): what Conv1d(k3, s2, p1) gives for L frames, exactly, for L = 1..40.
    model = _tiny()
    lengths = torch.arange(1, 41)
    expected = torch.tensor([model.conv2(torch.zeros(1, 32, n)).shape[-1] for n in range(1, 41)])
    assert torch.equal(output_lengths(lengths), expected)
    assert torch.equal(expected, (lengths + 1) // 2)
    got = model.output_lengths([1, 2, 3, 3000])
    assert got.dtype == torch.long and got.tolist() == [1, 1, 2, 1500]
    check_raises(lambda: model.output_lengths(torch.tensor([2.0])), ValueError, "integer")


def _backends() -> list[str]:
    return ["sdpa", "local", "flex"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=2),
        dict(n_kv_heads=1, window=3),
        dict(pos_embed="rope", n_kv_heads=2, window=5),
        dict(n_heads=4, n_kv_heads=4, window=1),
    ],
    ids=["gqa", "mqa_window", "rope_gqa_window", "mha_window1"],
)
def test_attention_options_equal_the_math_reference(overrides: dict) -> None:
    # The default dispatch (auto: SDPA, or the blocked local kernel for windows) and every
    # CPU backend pinned in the config give the math reference's outputs, padded or not.
    model = _tiny(**overrides)
    x, lengths = torch.randn(3, M, 40), torch.tensor([40, 27, 8])
    with torch.no_grad():
        with attention_backend("math"):
            reference = model.forward_features(x, lengths)
            reference_full = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x, lengths), reference)
        torch.testing.assert_close(model.forward_features(x), reference_full)
        q = torch.zeros(1, 4, 20, 8)
        for backend in _backends():
            if backend_unavailable_reason(backend, q, q, q, window=overrides.get("window")):
                continue
            pinned = AudioEncoder(model.config.replace(attention_backend=backend)).eval()
            pinned.load_state_dict(model.state_dict())
            torch.testing.assert_close(pinned.forward_features(x, lengths), reference, msg=backend)


def test_window_limits_the_receptive_field() -> None:
    # One layer, window 2 over tokens: token j sees tokens j-1..j+1; the convs add 2 input
    # frames each way, so changing the last input frame moves only the last tokens.
    model = _tiny(window=2, n_layers=1)
    x = torch.randn(1, M, 40)
    moved = x.clone()
    moved[..., -1] += 1.0  # input frame 39 feeds token 19 only (conv2 reads 2j-1..2j+1)
    with torch.no_grad():
        diff = (model.forward_features(x) - model.forward_features(moved)).abs().sum(-1)[0]
    assert (diff[:18] == 0).all() and (diff[18:] > 0).all()


def test_sinusoidal_limit_window_continuation_and_rope() -> None:
    model = _tiny()  # max_positions=64: at most 128 input frames
    assert model.config.max_frames == 128
    with torch.no_grad():
        assert model(torch.randn(1, M, 128)).shape == (1, 10)
    check_raises(
        lambda: model(torch.randn(1, M, 129)),
        ValueError,
        r"at most 128 frames \(1\.28 s\).*max_positions=64.*got 129 frames.*window.*RoPE.*no limit",
    )
    # With a window the table continues by its formula: the same function as a model whose
    # table is long enough, on input far past the 64 rows.
    windowed = _tiny(window=8)
    assert windowed.config.max_frames is None
    longer = AudioEncoder(windowed.config.replace(max_positions=300)).eval()
    state = dict(windowed.state_dict())
    state["embed_positions"] = torch.cat([state["embed_positions"], longer.embed_positions[64:]])
    longer.load_state_dict(state)
    x = torch.randn(2, M, 500)
    with torch.no_grad():
        torch.testing.assert_close(windowed.forward_features(x), longer.forward_features(x))
    # RoPE: no table, no limit.
    rope = _tiny(pos_embed="rope")
    assert rope.embed_positions is None and rope.config.max_frames is None
    assert "embed_positions" not in rope.state_dict()
    with torch.no_grad():
        assert rope.forward_features(torch.randn(1, M, 1000)).shape == (1, 500, 32)


def test_sinusoid_table_formula() -> None:
    table = sinusoid_table(10, 8)
    t = torch.arange(10, dtype=F64)[:, None]
    w = 10000.0 ** (-torch.arange(4, dtype=F64) / 3)
    torch.testing.assert_close(table.double(), torch.cat([(t * w).sin(), (t * w).cos()], 1))
    assert torch.equal(sinusoid_table(4, 8, start=6), table[6:])
    model = _tiny(pos_embed="sinusoidal")
    # Not trained: a buffer, saved with the weights (an imported table is kept as is).
    assert "embed_positions" in model.state_dict()
    assert all("embed_positions" not in n for n, _ in model.named_parameters())


def test_positions_are_added() -> None:
    # Two identical halves of the input give different tokens at the same offsets.
    for pos in ("sinusoidal", "rope"):
        model = _tiny(pos_embed=pos)
        half = torch.randn(1, M, 20)
        with torch.no_grad():
            tokens = model.forward_features(torch.cat([half, half], -1))[0]
        assert not torch.allclose(tokens[3], tokens[13], atol=1e-3)


def test_head_options() -> None:
    x, lengths = torch.randn(2, M, 30), torch.tensor([30, 11])
    with torch.no_grad():
        model = _tiny()
        feats = model.forward_features(x, lengths)
        pooled = model.forward_head(feats, lengths, pre_logits=True)
        torch.testing.assert_close(pooled[1], feats[1, :6].mean(0))
        torch.testing.assert_close(model.head(pooled), model(x, lengths))
        torch.testing.assert_close(
            model.forward_head(feats[:1]), model.head(feats[0].mean(0))[None]
        )
        headless = _tiny(num_classes=0)
        assert isinstance(headless.head, torch.nn.Identity)
        assert headless(x, lengths).shape == (2, 32)
    check_raises(lambda: model.forward_head(feats[0]), ValueError, r"\(B, T', D=32\)")
    check_raises(lambda: model.forward_head(feats, [30]), ValueError, r"shape \(B,\) = \(2,\)")


def test_bad_input_errors() -> None:
    model = _tiny()
    x = torch.randn(2, M, 20)
    cases = [
        (
            lambda: model(torch.randn(M, 20)),
            r"rank-3 tensor \(B, n_mels, T\).*rank 2.*features\[None\]",
        ),
        (lambda: model(torch.randn(1, 2, M, 20)), r"rank-3.*rank 4"),
        (lambda: model(torch.randn(2, 128, 20)), r"n_mels=80 mel bins but the features have 128"),
        (lambda: model(x.long()), r"floating-point features, got torch\.int64"),
        (lambda: model(x.numpy()), r"expects a tensor.*ndarray"),
        (lambda: model(torch.randn(2, M, 0)), r"empty batch"),
        (lambda: model(x.double()), r"weights are torch\.float32, the features torch\.float64"),
        (lambda: model(x.clone().index_fill_(2, torch.tensor([3]), float("nan"))), r"NaN or inf"),
        (lambda: model(x.clone().index_fill_(2, torch.tensor([3]), float("inf"))), r"NaN or inf"),
        (lambda: model(x, [20]), r"one entry per clip: shape \(B,\) = \(2,\), got \(1,\)"),
        (lambda: model(x, [20, 21]), r"lengths must be in \[1, T=20\].*\[21\]"),
        (lambda: model(x, [20, 0]), r"lengths must be in \[1, T=20\].*\[0\]"),
        (lambda: model(x, torch.tensor([20.0, 3.0])), r"integer tensor, got torch\.float32"),
        (lambda: model(x, [20, 3.5]), r"lengths must hold ints"),
        (lambda: model(x, "20"), r"lengths must be a \(B,\) integer tensor or a list"),
        (lambda: model(x, torch.tensor([[20, 3]])), r"shape \(B,\) = \(2,\), got \(1, 2\)"),
        (lambda: model(torch.randn(1, M, 200)), r"at most 128 frames.*max_positions=64"),
    ]
    for fn, pattern in cases:
        check_raises(fn, ValueError, pattern)
    # Padding may hold anything: only real frames are checked.
    padded = x.clone()
    padded[1, :, 5:] = float("nan")
    with torch.no_grad():
        assert torch.isfinite(model(padded, [20, 5])).all()


def test_config_validation() -> None:
    cases = [
        (dict(n_kv_heads=4), r"AudioEncoderConfig\.n_kv_heads=4"),
        (dict(dim=32), r"AudioEncoderConfig\.dim=32 .*multiple of n_heads=6"),
        (dict(dim=42, n_heads=6, pos_embed="rope"), r"AudioEncoderConfig\.dim=42 .*even head dim"),
        (dict(dim=3, n_heads=1), r"AudioEncoderConfig\.dim=3 .*even int >= 4"),
        (dict(dim=2, n_heads=1), r"AudioEncoderConfig\.dim=2 .*even int >= 4"),
        (dict(window=0), r"AudioEncoderConfig\.window=0"),
        (dict(max_positions=0), r"AudioEncoderConfig\.max_positions=0"),
        (dict(n_mels=0), r"AudioEncoderConfig\.n_mels=0"),
        (dict(num_classes=-1), r"AudioEncoderConfig\.num_classes=-1"),
        (dict(pos_embed="learned"), r"AudioEncoderConfig\.pos_embed='learned'.*sinusoidal"),
        (dict(n_mels=80.0), r"AudioEncoderConfig\.n_mels=80\.0"),
        (dict(sample_rate=0), r"AudioEncoderConfig\.sample_rate=0"),
        (dict(norm_eps=0.0), r"AudioEncoderConfig\.norm_eps=0\.0"),
    ]
    for overrides, pattern in cases:
        check_raises(lambda o=overrides: AudioEncoderConfig(**o), ValueError, pattern)
    check_raises(lambda: audio_preset("huge"), ValueError, r"unknown audio preset 'huge'.*tiny")
    check_raises(lambda: AudioEncoder(dict(dim=32)), ValueError, "AudioEncoderConfig")
    config = audio_preset("tiny", pos_embed="rope", mlp_activation="gelu_tanh")
    assert config.pos_embed is AudioPosEmbed.ROPE
    assert AudioEncoderConfig.from_dict(config.to_dict()) == config
    # Durations in messages need both rates; without them, frames only.
    assert config.duration(300) == "300 frames (3 s)"
    assert config.replace(sample_rate=None).duration(300) == "300 frames"


@pytest.mark.parametrize("pos_embed", ["sinusoidal", "rope"])
def test_save_load_keeps_the_function(pos_embed: str, tmp_path) -> None:
    model = _tiny(pos_embed=pos_embed, window=4)
    x, lengths = torch.randn(2, M, 300), torch.tensor([300, 77])
    check_save_load_roundtrip(model, (x, lengths), tmp_path)
    wide = AudioEncoder.from_pretrained(tmp_path, dtype=F64)
    assert all(t.dtype == F64 for t in wide.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(
            wide(x.double(), lengths).float(), model(x, lengths), rtol=1e-4, atol=1e-5
        )


def _no_graph_breaks(fn, *args) -> None:
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    reasons = [r.reason.splitlines()[0] for r in report.break_reasons]
    assert report.graph_break_count == 0 and report.graph_count == 1, reasons


@pytest.mark.parametrize("pos_embed", ["sinusoidal", "rope"])
def test_traces_without_graph_breaks(pos_embed: str) -> None:
    model = _tiny(pos_embed=pos_embed, window=4)
    x, lengths = torch.randn(3, M, 41), torch.tensor([41, 30, 7])
    _no_graph_breaks(model, x)
    _no_graph_breaks(model, x, lengths)
    _no_graph_breaks(model.forward_features, x, lengths)
    _no_graph_breaks(model.forward_features, torch.randn(1, M, 400), None)  # past the table
    model.train()
    _no_graph_breaks(lambda x, n: model(x, n).square().mean(), x, lengths)


@pytest.mark.parametrize(
    "overrides", [dict(), dict(pos_embed="rope", window=3, n_kv_heads=1)], ids=["sin", "rope"]
)
def test_aot_compiled_equals_eager(overrides: dict) -> None:
    # AOT autograd (the functionalized forward and backward graphs inductor gets, without
    # its slow codegen) gives eager's features, logits and gradients, padded or not.
    model = _tiny(**overrides)
    x, lengths = torch.randn(3, M, 41), torch.tensor([41, 30, 7])
    torch._dynamo.reset()
    features = torch.compile(model.forward_features, backend="aot_eager", fullgraph=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(features(x, lengths), model.forward_features(x, lengths))
        torch.testing.assert_close(features(x, None), model.forward_features(x))
        torch.testing.assert_close(compiled(x, lengths), model(x, lengths))
    model.train()
    compiled(x, lengths).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, lengths).square().mean().backward()
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_audio_encoder_trains_under_bf16_autocast_on_cuda() -> None:
    """Mixed-precision training as the trainer runs it on a GPU (bf16 autocast)."""
    torch.manual_seed(0)
    x, lengths = torch.randn(2, M, 37), torch.tensor([37, 27])
    check_autocast_training(AudioEncoder(audio_preset("tiny")), (x, lengths), "cuda")
