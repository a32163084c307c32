"""Named audio encoder configs.

``tiny`` is for tests (a forward in milliseconds on CPU), ``small`` for the CPU training
proofs of the apps (RoPE, so clips of any length; about 370 k parameters), and
``whisper-tiny`` / ``whisper-base`` are the encoders of OpenAI's Whisper tiny and base
exactly (80 mels, 1500 sinusoidal positions, LayerNorm eps 1e-5, exact GELU MLP of 4·D,
q / v / output biases): :func:`vats_audio.interop.from_transformers` gives these configs
for those models.

Example::

    config = audio_preset("tiny", num_classes=5)
    long_audio = audio_preset("whisper-base", window=256)  # no 30 s limit
"""

from __future__ import annotations

from typing import Any

from vats_audio.encoder import AudioEncoderConfig, AudioPosEmbed

__all__ = ["AUDIO_PRESETS", "audio_preset"]

_WHISPER = dict(
    n_mels=80,
    max_positions=1500,
    pos_embed=AudioPosEmbed.SINUSOIDAL,
    norm_eps=1e-5,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    num_classes=0,
)

AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        n_mels=80,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        max_positions=64,  # 128 input frames (1.28 s)
        num_classes=10,
    ),
    "small": dict(
        n_mels=80,
        dim=96,
        n_layers=3,
        n_heads=4,
        mlp_hidden_dim=384,
        pos_embed=AudioPosEmbed.ROPE,
        num_classes=10,
    ),
    "whisper-tiny": dict(_WHISPER, dim=384, n_layers=4, n_heads=6, mlp_hidden_dim=1536),
    "whisper-base": dict(_WHISPER, dim=512, n_layers=6, n_heads=8, mlp_hidden_dim=2048),
}


def audio_preset(name: str, **overrides: Any) -> AudioEncoderConfig:
    """The named :class:`~vats_audio.encoder.AudioEncoderConfig`, with fields replaced by
    ``overrides``."""
    if name not in AUDIO_PRESETS:
        raise ValueError(f"unknown audio preset {name!r}: expected one of {sorted(AUDIO_PRESETS)}")
    return AudioEncoderConfig(**{**AUDIO_PRESETS[name], **overrides})
