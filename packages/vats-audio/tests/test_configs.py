"""Every vats-audio config: hashes, round trips through dict and JSON, and its int fields
reject floats and bools naming the field (vats_core.testing.check_config)."""

from __future__ import annotations

import pytest

from vats_audio.encoder import AudioEncoderConfig
from vats_audio.presets import AUDIO_PRESETS, audio_preset
from vats_core.config import Config
from vats_core.testing import check_config, config_classes, int_fields

EXAMPLES: dict[type[Config], list[Config]] = {
    AudioEncoderConfig: [
        *(audio_preset(name) for name in sorted(AUDIO_PRESETS)),
        audio_preset("tiny", pos_embed="rope", window=16, n_kv_heads=1, sample_rate=None),
    ],
}


def _examples(cls: type[Config]) -> list[Config]:
    """The listed examples, else the class's defaults (a config with required fields needs
    an entry in EXAMPLES)."""
    if cls in EXAMPLES:
        return EXAMPLES[cls]
    try:
        return [cls()]
    except TypeError as e:
        raise AssertionError(f"add an example of {cls.__name__} to EXAMPLES ({e})") from e


CLASSES = config_classes("vats_audio")


def test_the_encoder_config_is_found() -> None:
    assert AudioEncoderConfig in CLASSES


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_audio_config_contract(cls: type[Config]) -> None:
    """Hashes; dict and JSON round trips give an equal config with an equal hash; each int
    field rejects 64.0 and True naming the field (see check_config)."""
    for config in _examples(cls):
        check_config(config)


def test_int_fields_cover_the_sizes() -> None:
    fields = set(int_fields(AudioEncoderConfig))
    assert {"n_mels", "dim", "n_layers", "max_positions", "window", "num_classes"} <= fields
    assert {"sample_rate", "hop_length"} <= fields and "norm_eps" not in fields
