"""from_latte_transformer: an imported diffusers Latte predicts what diffusers predicts
(relative error <= 1e-4, fp32) on small configs, for clips of video_length frames and of one
frame, at the default latent size and a rectangular one, with text padding masks of
different real lengths per row; the imported VideoDiT also runs the clip lengths diffusers'
Latte cannot; what VideoDiT cannot represent is refused naming the diffusers config field.

Every diffusers model is random-init and built locally (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LatteTransformer3DModel

from vats_core.testing import check_raises
from vats_diffusion import VideoDiT
from vats_diffusion.dit_layers import AdaLNMode
from vats_diffusion.interop import from_diffusers
from vats_diffusion.interop.latte import from_latte_transformer

RTOL = 1e-4
# Latte's checkpoints' layout (ada_norm_single, no affine norms, tanh GELU) in miniature.
SMALL = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    num_layers=2,
    patch_size=2,
    sample_size=8,
    cross_attention_dim=16,
    caption_channels=12,
    attention_bias=True,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    video_length=4,
)
CONFIGS = {
    "learned_sigma": dict(out_channels=8),
    "gelu_no_bias_patch4": dict(
        activation_fn="gelu", attention_bias=False, patch_size=4, sample_size=16, norm_eps=1e-5
    ),
    "swiglu_three_layers": dict(activation_fn="swiglu", num_layers=3, in_channels=3),
}


def _latte(seed: int = 0, **overrides: object) -> LatteTransformer3DModel:
    torch.manual_seed(seed)
    return LatteTransformer3DModel(**{**SMALL, **overrides}).eval()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.abs().max() > 1e-2  # a non-trivial prediction
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= RTOL, f"relative error {err:.2e}"
    return err


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_latte_parity(variant: str) -> None:
    ref = _latte(**CONFIGS[variant])
    ours = from_diffusers(ref)
    assert isinstance(ours, VideoDiT)
    cfg = ref.config
    assert ours.config.adaln is AdaLNMode.SINGLE and not ours.config.pooled_text
    assert ours.config.max_frames == cfg.video_length
    g = torch.Generator().manual_seed(1)
    b, s, p = 2, 7, cfg.patch_size
    text = torch.randn(b, s, cfg.caption_channels, generator=g)
    mask = torch.arange(s)[None] < torch.tensor([7, 3])[:, None]  # row 1: 4 padding tokens
    t = torch.tensor([10, 731])
    # Latte runs clips of video_length frames or of one; the default size and a larger,
    # rectangular one (positions stretched onto the base grid).
    for frames, (h, w) in [
        (cfg.video_length, (cfg.sample_size, cfg.sample_size)),
        (1, (cfg.sample_size + 2 * p, cfg.sample_size)),
    ]:
        x = torch.randn(b, cfg.in_channels, frames, h, w, generator=g)
        # diffusers' Latte needs the mask as an additive bias, one row per frame.
        bias = ((1 - mask.float()) * -10000.0).repeat_interleave(frames, 0)[:, None]
        with torch.no_grad():
            expected = ref(x, t, encoder_hidden_states=text, encoder_attention_mask=bias).sample
            actual = ours(x, t, text_states=text, text_mask=mask)
        _close(actual, expected)


def test_imported_latte_runs_clips_diffusers_cannot() -> None:
    """diffusers' Latte adds its whole video_length table (Vchitect/Latte#133); the import
    runs every length up to video_length."""
    ref = _latte()
    ours = from_latte_transformer(ref)
    x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 5, 12)
    with torch.no_grad():
        out = ours(x, torch.tensor([500]), text_states=text)
    assert out.shape == (1, 4, 3, 8, 8) and torch.isfinite(out).all()
    check_raises(
        lambda: ours(torch.randn(1, 4, 5, 8, 8), torch.tensor([1]), text_states=text),
        ValueError,
        "max_frames=4",
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(norm_type="layer_norm"), r"norm_type='layer_norm' cannot be represented by VideoDiT"),
        (dict(norm_elementwise_affine=True), r"norm_elementwise_affine=True"),
        (dict(activation_fn="geglu"), r"activation_fn='geglu'"),
        (dict(out_channels=5), r"out_channels=5"),
        (dict(cross_attention_dim=12), r"cross_attention_dim=12"),
    ],
)
def test_unrepresentable_configs_name_the_field(overrides: dict, match: str) -> None:
    check_raises(lambda: from_latte_transformer(_latte(**overrides)), ValueError, match)
