"""from_transformers: an imported Whisper encoder computes HF's function (80 and 128 mels,
from WhisperEncoder, WhisperModel and WhisperForConditionalGeneration) at the 3000-frame
length HF takes, and runs shorter clips and padded batches of them, which HF refuses; what
it cannot represent is refused with a ValueError naming the WhisperConfig field.

Every HF model here is random-init from a tiny WhisperConfig (nothing downloaded); the
weights are perturbed away from HF's init (zero biases, unit norms) so that a wrongly mapped
bias or norm would show.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.whisper.modeling_whisper import (
    WhisperEncoder,
    WhisperForConditionalGeneration,
    WhisperModel,
    sinusoids,
)

from vats_audio.encoder import AudioPosEmbed, sinusoid_table
from vats_audio.interop import from_transformers
from vats_audio.presets import audio_preset
from vats_core.mlp import Activation
from vats_core.testing import check_raises

RTOL = 1e-4
POSITIONS = 32  # max_source_positions of the tiny configs: HF takes exactly 64 frames
CLASSES = {
    "WhisperEncoder": lambda c: WhisperEncoder(c),
    "WhisperModel": lambda c: WhisperModel(c),
    "WhisperForConditionalGeneration": lambda c: WhisperForConditionalGeneration(c),
}


def _config(**overrides) -> transformers.WhisperConfig:
    fields = dict(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=POSITIONS,
        max_target_positions=16,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        begin_suppress_tokens=None,
    )
    return transformers.WhisperConfig(**{**fields, **overrides})


def _hf(kind: str = "WhisperModel", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init HF model, weights perturbed (the encoder's position table too: the
    import must copy it as it is)."""
    torch.manual_seed(seed)
    model = CLASSES[kind](_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_encoder(model: torch.nn.Module) -> WhisperEncoder:
    return model if isinstance(model, WhisperEncoder) else model.get_encoder()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-3  # a non-trivial output
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= RTOL, f"relative error {err:.2e}"


def _hf_layers(encoder: WhisperEncoder, x: torch.Tensor) -> torch.Tensor:
    """HF's encoder computation on an input of any length, from its own modules (HF's
    forward refuses anything but 2·max_source_positions frames)."""
    h = torch.nn.functional.gelu(encoder.conv1(x))
    h = torch.nn.functional.gelu(encoder.conv2(h)).transpose(1, 2)
    h = h + encoder.embed_positions.weight[: h.shape[1]]
    for layer in encoder.layers:
        h = layer(h, None)
    return encoder.layer_norm(h)


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("n_mels", [80, 128])
def test_parity_with_hf_whisper(kind: str, n_mels: int) -> None:
    model = _hf(kind, num_mel_bins=n_mels)
    encoder = _hf_encoder(model)
    ours = from_transformers(model)
    assert ours.config.n_mels == n_mels and not ours.training
    x = torch.randn(2, n_mels, 2 * POSITIONS)
    with torch.no_grad():
        ref = encoder(x).last_hidden_state
        _close(ours.forward_features(x), ref)
        _close(ours.forward_features(x, [2 * POSITIONS] * 2), ref)
        _close(ours(x), ref.mean(1))  # no head: the pooled features


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_parity_with_tanh_gelu(activation: str) -> None:
    model = _hf("WhisperEncoder", activation_function=activation)
    ours = from_transformers(model)
    assert ours.config.mlp_activation is Activation.GELU_TANH
    x = torch.randn(1, 80, 2 * POSITIONS)
    with torch.no_grad():
        _close(ours.forward_features(x), model(x).last_hidden_state)


def test_shorter_inputs_and_padded_batches_run_where_hf_refuses() -> None:
    model = _hf("WhisperModel", num_mel_bins=128)
    encoder = _hf_encoder(model)
    ours = from_transformers(model)
    lengths = [50, 37, 8, 1]
    x = torch.randn(len(lengths), 128, max(lengths))
    with pytest.raises(ValueError, match="64"):  # HF: "pad the input mel features to 64"
        encoder(x)
    with torch.no_grad():
        full = torch.randn(1, 128, 64)
        _close(_hf_layers(encoder, full), encoder(full).last_hidden_state)  # the reference
        batch = ours.forward_features(x, lengths)
        for i, n in enumerate(lengths):
            ref = _hf_layers(encoder, x[i : i + 1, :, :n])[0]
            _close(ours.forward_features(x[i : i + 1, :, :n])[0], ref)
            _close(batch[i, : (n + 1) // 2], ref)


def test_weights_map_one_to_one() -> None:
    model = _hf("WhisperEncoder")
    ours = from_transformers(model)
    attn, block = model.layers[1].self_attn, ours.blocks[1].attn
    d = 64
    qkv_w, qkv_b = block.qkv_proj.weight, block.qkv_proj.bias
    assert torch.equal(qkv_w[:d], attn.q_proj.weight) and torch.equal(
        qkv_w[d : 2 * d], attn.k_proj.weight
    )
    assert torch.equal(qkv_w[2 * d :], attn.v_proj.weight)
    assert torch.equal(qkv_b[:d], attn.q_proj.bias) and torch.equal(
        qkv_b[2 * d :], attn.v_proj.bias
    )
    assert (qkv_b[d : 2 * d] == 0).all()  # Whisper's k_proj has no bias
    assert torch.equal(ours.embed_positions, model.embed_positions.weight)
    assert torch.equal(ours.conv2.weight, model.conv2.weight)
    assert torch.equal(ours.norm.bias, model.layer_norm.bias)


def test_sinusoid_table_is_whispers() -> None:
    for length, dim in ((1500, 384), (1500, 512), (32, 64)):
        assert torch.equal(sinusoid_table(length, dim), sinusoids(length, dim))
    # HF initialises its table with it: an unperturbed import holds the vats table.
    ours = from_transformers(WhisperEncoder(_config()))
    assert torch.equal(ours.embed_positions, sinusoid_table(POSITIONS, 64))


@pytest.mark.parametrize(
    ("name", "dim", "layers", "heads"), [("whisper-tiny", 384, 4, 6), ("whisper-base", 512, 6, 8)]
)
def test_presets_are_the_whisper_encoders(name: str, dim: int, layers: int, heads: int) -> None:
    # OpenAI's Whisper tiny / base shapes (WhisperConfig's defaults are tiny's), built on the
    # meta device: the imported config equals the preset.
    config = transformers.WhisperConfig(
        d_model=dim, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=4 * dim
    )
    with torch.device("meta"):
        encoder = WhisperEncoder(config).eval()
    assert from_transformers(encoder).config == audio_preset(name)


def test_gradients_flow_and_weights_are_copies() -> None:
    model = _hf("WhisperModel")
    ours = from_transformers(model).train()
    ours(torch.randn(2, 80, 40), [40, 21]).sum().backward()
    assert all(p.grad is not None for p in ours.parameters())
    # A key bias never changes the softmax: its gradient is zero, so it stays zero.
    k_rows = ours.blocks[0].attn.qkv_proj.bias.grad[64:128]
    assert k_rows.abs().max() < 1e-6
    with torch.no_grad():
        ours.blocks[0].attn.qkv_proj.weight.zero_()
        ours.embed_positions.zero_()
    encoder = model.encoder
    assert encoder.layers[0].self_attn.q_proj.weight.abs().sum() > 0  # HF's weights untouched
    assert encoder.embed_positions.weight.abs().sum() > 0


def test_keeps_dtype_device_and_mode() -> None:
    model = _hf("WhisperForConditionalGeneration").to(torch.float64).train()
    ours = from_transformers(model)
    assert ours.training
    assert all(t.dtype == torch.float64 for t in ours.state_dict().values())
    assert all(t.device.type == "cpu" for t in ours.state_dict().values())
    x = torch.randn(1, 80, 64, dtype=torch.float64)
    model.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x), model.model.encoder(x).last_hidden_state
        )


def test_regularizers_are_fine_in_eval_mode() -> None:
    regularized = dict(
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, encoder_layerdrop=0.5
    )
    model = _hf("WhisperModel", **regularized)
    ours = from_transformers(model)
    x = torch.randn(1, 80, 64)
    with torch.no_grad():
        _close(ours.forward_features(x), model.encoder(x).last_hidden_state)
    # scale_embedding is the decoder's (HF's encoder never applies it).
    scaled = _hf("WhisperModel", scale_embedding=True)
    with torch.no_grad():
        _close(from_transformers(scaled).forward_features(x), scaled.encoder(x).last_hidden_state)


@pytest.mark.parametrize(
    ("overrides", "train", "pattern"),
    [
        (dict(activation_function="relu"), False, r"WhisperConfig\.activation_function='relu'"),
        (dict(activation_function="quick_gelu"), False, r"activation_function='quick_gelu'.*gelu"),
        (dict(encoder_layerdrop=0.1), True, r"WhisperConfig\.encoder_layerdrop=0\.1.*eval"),
        (dict(dropout=0.1), True, r"WhisperConfig\.dropout=0\.1"),
        (dict(attention_dropout=0.2), True, r"WhisperConfig\.attention_dropout=0\.2"),
        (dict(activation_dropout=0.3), True, r"WhisperConfig\.activation_dropout=0\.3"),
    ],
)
def test_refuses_what_it_cannot_represent(overrides: dict, train: bool, pattern: str) -> None:
    model = _hf("WhisperModel", **overrides).train(train)
    check_raises(lambda: from_transformers(model), ValueError, pattern)


def test_refuses_other_models() -> None:
    check_raises(
        lambda: from_transformers(torch.nn.Linear(2, 2)),
        ValueError,
        r"WhisperEncoder, WhisperModel or WhisperForConditionalGeneration.*Linear",
    )
    check_raises(lambda: from_transformers("openai/whisper-tiny"), ValueError, "got str")
    classifier = transformers.WhisperForAudioClassification(_config())
    check_raises(lambda: from_transformers(classifier), ValueError, "WhisperForAudioClassification")
    encoder = WhisperEncoder(_config())
    encoder.layers[0].self_attn.k_proj = torch.nn.Linear(64, 64, bias=True)
    check_raises(lambda: from_transformers(encoder), ValueError, r"layers\.0.*k without")


def test_imported_config_fields() -> None:
    cfg = from_transformers(_hf("WhisperEncoder")).config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden_dim) == (64, 2, 4, 128)
    assert cfg.max_positions == POSITIONS and cfg.pos_embed is AudioPosEmbed.SINUSOIDAL
    assert cfg.norm_eps == 1e-5 and cfg.num_classes == 0 and cfg.max_frames == 64
