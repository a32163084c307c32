"""Every vats-text config: hashes, round trips through dict and JSON, and its int fields
reject floats and bools naming the field (vats_core.testing.check_config)."""

from __future__ import annotations

import pytest

from vats_core.testing import check_config, config_classes, int_fields
from vats_text.encoder import TextEncoderConfig
from vats_text.model import MoELMConfig
from vats_text.presets import ENCODER_PRESETS, PRESETS, encoder_preset, lm_preset
from vats_text.sampling import SamplingConfig

EXAMPLES = {
    MoELMConfig: [
        *(preset() for preset in PRESETS.values()),
        MoELMConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, rope_scaling="ntk"),
    ],
    TextEncoderConfig: [preset() for preset in ENCODER_PRESETS.values()],
    SamplingConfig: [
        SamplingConfig(),
        SamplingConfig(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    ],
}
CASES = [config for configs in EXAMPLES.values() for config in configs]


def test_every_text_config_class_has_examples():
    assert config_classes("vats_text") == sorted(EXAMPLES, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("config", CASES, ids=lambda c: type(c).__name__)
def test_text_config_contract(config):
    """Hashes; dict and JSON round trips give an equal config with an equal hash; each int
    field rejects 64.0 and True naming the field (see check_config)."""
    check_config(config)


def test_int_fields_cover_the_sizes_and_ids():
    fields = int_fields(MoELMConfig)
    assert {"vocab_size", "dim", "n_layers", "top_k", "pad_token_id"} <= set(fields)
    assert "rope_theta" not in fields and "layer_windows" not in fields
    assert int_fields(SamplingConfig) == ["top_k"]


def test_layer_windows_from_lists_are_stored_as_tuples():
    # Hydra YAML and config.json hand over lists; the configs keep tuples, so they hash.
    lm = lm_preset("tiny", layer_windows=[8, None, 8])
    assert lm.layer_windows == (8, None, 8) and lm.windows == [8, None, 8]
    assert MoELMConfig.from_dict({**lm.to_dict(), "layer_windows": [4, 4, 4]}).layer_windows == (
        4,
        4,
        4,
    )
    assert encoder_preset("tiny", layer_windows=[]).layer_windows == ()
    with pytest.raises(ValueError, match=r"MoELMConfig\.layer_windows\[1\]=True is invalid"):
        lm_preset("tiny", layer_windows=[8, True, 8])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: lm_preset("tiny", n_kv_heads=3), r"MoELMConfig\.n_kv_heads=3 .* divisor"),
        (lambda: lm_preset("tiny", head_dim=7), r"MoELMConfig\.head_dim=7 .* even"),
        (lambda: lm_preset("tiny", dim=68), r"MoELMConfig\.dim=68 .* even head dim"),
        (lambda: encoder_preset("tiny", n_kv_heads=3), r"TextEncoderConfig\.n_kv_heads=3"),
        (lambda: encoder_preset("tiny", layer_windows=[4]), r"n_layers=2 entries"),
        (lambda: lm_preset("tiny", layer_windows=[8, 0, 8]), r"None or an int >= 1"),
        (lambda: lm_preset("tiny", norm_eps=0.0), r"MoELMConfig\.norm_eps=0\.0 .* > 0"),
        (lambda: SamplingConfig(top_k=0), r"SamplingConfig\.top_k=0 .* None or an int > 0"),
    ],
)
def test_shared_rules_name_the_config_field_value_and_what_is_allowed(build, match):
    with pytest.raises(ValueError, match=match):
        build()
