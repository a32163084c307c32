"""TextEncoder: contract, bidirectionality, padding invariance, validation."""

from __future__ import annotations

import pytest
import torch

from vats_core.testing import (
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_text.encoder import TextEncoder, TextEncoderConfig, TextEncoderOutput
from vats_text.presets import ENCODER_PRESETS, encoder_preset


def _states(out: TextEncoderOutput) -> torch.Tensor:
    return out.last_hidden_state


def _pooled(out: TextEncoderOutput) -> torch.Tensor:
    return out.pooled


def _encoder(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(encoder_preset("tiny", **overrides)).eval()


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(7, 512, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(ENCODER_PRESETS))
def test_encoder_presets_build(name):
    config = encoder_preset(name)
    assert TextEncoderConfig.from_dict(config.to_dict()) == config


def test_encoder_contract(tmp_path):
    model = _encoder(qkv_bias=True, qk_norm=True)
    ids = _ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    inputs = {"input_ids": ids, "attention_mask": mask}
    check_forward(model, inputs, (2, 12, 64), output_fn=_states)
    check_forward(model, inputs, (2, 64), output_fn=_pooled)
    check_backward(model, inputs, output_fn=_states)
    check_save_load_roundtrip(model, inputs, tmp_path, output_fn=_pooled)
    check_dtype_device_moves(model, inputs, output_fn=_states)


@torch.no_grad()
def test_encoder_is_bidirectional_within_window():
    model = _encoder(layer_windows=[], n_layers=2)
    ids = _ids(1, 10)
    changed = ids.clone()
    changed[0, -1] = 8 if int(ids[0, -1]) != 8 else 9
    a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the first token sees the last one


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_encoder_padding_invariance(side):
    """Padding (either side, any pad id) changes neither real tokens' states nor pooled."""
    model = _encoder()  # layer_windows=[8, None]: a windowed and a global layer
    lengths, width = [13, 6], 16
    ids = _ids(2, 13)
    batch = torch.full((2, width), 5)  # pad with an arbitrary id: it must not matter
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        batch[i, sl] = ids[i, :n]
        mask[i, sl] = True
    out = model(batch, attention_mask=mask.long())
    for i, n in enumerate(lengths):
        alone = model(ids[i : i + 1, :n])
        states = out.last_hidden_state[i][mask[i]]
        torch.testing.assert_close(states, alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooled[i], alone.pooled[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            alone.pooled[0], alone.last_hidden_state[0].mean(0), rtol=1e-6, atol=1e-6
        )
    assert torch.all(out.last_hidden_state[~mask] == 0)
    assert torch.equal(out.attention_mask, mask)


def test_encoder_rejects_bad_input():
    model = _encoder()
    check_raises(lambda: model(torch.tensor([[3, 512]])), ValueError, "outside")
    check_raises(lambda: model(torch.zeros(2, 3)), ValueError, "integers")
    check_raises(lambda: model(_ids(1, 257)), ValueError, "max_seq_len")
    check_raises(lambda: model(_ids(2, 4), torch.ones(2, 5)), ValueError, "attention_mask")
    check_raises(lambda: model(_ids(2, 4), torch.full((2, 4), 3)), ValueError, "0/1")
    check_raises(lambda: model(torch.zeros(0, 4, dtype=torch.long)), ValueError, "empty")
    check_raises(lambda: encoder_preset("tiny", layer_windows=[4]), ValueError, "layer_windows")
    check_raises(lambda: encoder_preset("tiny", n_kv_heads=3), ValueError, "n_kv_heads")
    check_raises(lambda: encoder_preset("nope"), ValueError, "unknown")
