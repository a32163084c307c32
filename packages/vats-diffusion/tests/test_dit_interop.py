"""from_dit_transformer / from_pixart_transformer: an imported diffusers DiT or PixArt
transformer predicts what diffusers predicts (relative error <= 1e-4) on several configs,
at the default latent size and at other (square or, for PixArt, rectangular) sizes, with
text padding masks of different real lengths per row; the embeddings match diffusers'
helpers; what DiT cannot represent is refused naming the diffusers config field.

Every diffusers model is random-init and built locally (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from vats_core.testing import check_raises
from vats_diffusion.dit import DiT
from vats_diffusion.dit_layers import AdaLNMode, sincos_pos_embed_2d, timestep_embedding
from vats_diffusion.interop import from_diffusers
from vats_diffusion.interop.dit import from_dit_transformer, from_pixart_transformer

RTOL = 1e-4
SMALL = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, patch_size=2)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.abs().max() > 1e-2  # a non-trivial prediction
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= RTOL, f"relative error {err:.2e}"
    return err


def _dit(seed: int = 0, **overrides: object) -> DiTTransformer2DModel:
    """A random diffusers DiT whose blocks share one timestep / class embedder, as every
    checkpoint converted from the original DiT does."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**SMALL, "sample_size": 8, **overrides}).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("transformer_blocks.0.norm1.emb."):
                for i in range(1, model.config.num_layers):
                    state[key.replace(".0.", f".{i}.", 1)].copy_(value)
    return model


def _pixart(seed: int = 0, **overrides: object) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(SMALL, sample_size=8, cross_attention_dim=16, caption_channels=12)
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()


DIT_CONFIGS = {
    "learned_sigma": dict(out_channels=8, num_embeds_ada_norm=10),
    "gelu_no_qkv_bias": dict(
        activation_fn="gelu", attention_bias=False, norm_eps=1e-3, num_embeds_ada_norm=5
    ),
    "patch4_swiglu": dict(
        patch_size=4, sample_size=16, in_channels=3, activation_fn="swiglu", num_layers=3
    ),
}


@pytest.mark.parametrize("variant", sorted(DIT_CONFIGS))
def test_dit_parity(variant: str) -> None:
    ref = _dit(**DIT_CONFIGS[variant])
    ours = from_dit_transformer(ref)
    cfg = ref.config
    assert (
        ours.config.adaln is AdaLNMode.ZERO and ours.config.num_classes == cfg.num_embeds_ada_norm
    )
    g = torch.Generator().manual_seed(1)
    # The default size and a larger square one (positions stretched onto the base grid;
    # diffusers' DiT unpatchifies square latents only).
    for side in (cfg.sample_size, cfg.sample_size + 2 * cfg.patch_size):
        x = torch.randn(3, cfg.in_channels, side, side, generator=g)
        t = torch.tensor([0, 371, 999])
        y = torch.tensor([0, cfg.num_embeds_ada_norm - 1, cfg.num_embeds_ada_norm])  # + null
        with torch.no_grad():
            _close(ours(x, t, class_labels=y), ref(x, t, y).sample)


PIXART_CONFIGS = {
    "caption_projection": dict(out_channels=8),
    "raw_text_interpolation": dict(
        caption_channels=None, cross_attention_dim=20, interpolation_scale=2, norm_eps=1e-5
    ),
    "sample16_gelu_use_additional_off": dict(
        sample_size=16,
        activation_fn="gelu",
        attention_bias=False,
        use_additional_conditions=False,
        num_layers=3,
    ),
}


@pytest.mark.parametrize("variant", sorted(PIXART_CONFIGS))
def test_pixart_parity_with_padding_masks(variant: str) -> None:
    ref = _pixart(**PIXART_CONFIGS[variant])
    ours = from_diffusers(ref)  # the dispatcher
    assert isinstance(ours, DiT) and ours.config.adaln is AdaLNMode.SINGLE
    cfg = ref.config
    text_dim = cfg.caption_channels or cfg.cross_attention_dim
    g = torch.Generator().manual_seed(2)
    s, p = 7, cfg.patch_size
    text = torch.randn(3, s, text_dim, generator=g)
    mask = torch.arange(s)[None] < torch.tensor([7, 2, 4])[:, None]  # different real lengths
    base = cfg.sample_size
    for hw in [(base, base), (base, base + 2 * p), (base + 4 * p, base - p)]:
        x = torch.randn(3, cfg.in_channels, *hw, generator=g)
        t = torch.tensor([1, 500, 998])
        with torch.no_grad():
            expected = ref(
                x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask.long()
            ).sample
            _close(ours(x, t, text_states=text, text_mask=mask), expected)
    # The mask is honoured: treating every token as real changes diffusers' prediction.
    with torch.no_grad():
        unmasked = ref(x, encoder_hidden_states=text, timestep=t).sample
    assert (unmasked - expected).abs().max() > 1e-3


def test_pixart_without_cross_attention_is_timestep_only() -> None:
    ref = _pixart(cross_attention_dim=None, caption_channels=None)
    ours = from_pixart_transformer(ref)
    assert ours.config.text_dim is None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        _close(ours(x, t), ref(x, timestep=t).sample)


def test_imported_model_saves_and_reloads(tmp_path) -> None:
    ours = from_dit_transformer(_dit(out_channels=8, num_embeds_ada_norm=10))
    ours.save_pretrained(tmp_path)
    again = DiT.from_pretrained(tmp_path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(again(x, t, class_labels=y), ours(x, t, class_labels=y))


def test_embeddings_match_diffusers_helpers() -> None:
    t = torch.tensor([0, 1, 17, 999])
    for flip, shift in ((True, 1), (True, 0), (False, 1)):
        ref = get_timestep_embedding(t, 256, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ours = timestep_embedding(t, 256, flip_sin_to_cos=flip, freq_shift=shift)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for grid, base, scale in (((4, 4), 4, 1.0), ((6, 10), 4, 1.0), ((5, 3), 8, 2.0)):
        ref = get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale)
        ours = sincos_pos_embed_2d(32, grid, base_grid=(base, base), interpolation_scale=scale)
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=1e-7)


def test_untied_block_embedders_are_refused() -> None:
    torch.manual_seed(0)
    ref = DiTTransformer2DModel(**SMALL, sample_size=8, num_embeds_ada_norm=4)
    check_raises(
        lambda: from_dit_transformer(ref), ValueError, r"transformer_blocks\.1\.norm1\.emb.*differs"
    )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _dit(norm_elementwise_affine=True), r"norm_elementwise_affine=True"),
        (lambda: _dit(activation_fn="geglu"), r"activation_fn='geglu'"),
        (lambda: _dit(out_channels=5), r"out_channels=5"),
        (lambda: _pixart(sample_size=128, num_layers=1), r"use_additional_conditions=None"),
        (lambda: _pixart(use_additional_conditions=True), r"use_additional_conditions=True"),
        (lambda: _pixart(cross_attention_dim=20), r"cross_attention_dim=20"),
        (lambda: _pixart(cross_attention_dim=None), r"cross_attention_dim=None"),
        (lambda: _pixart(norm_elementwise_affine=True), r"norm_elementwise_affine"),
        (lambda: _pixart(activation_fn="geglu-approximate"), r"activation_fn"),
    ],
)
def test_unrepresentable_configs_name_the_field(build, match: str) -> None:
    model = build()
    convert = (
        from_dit_transformer
        if isinstance(model, DiTTransformer2DModel)
        else from_pixart_transformer
    )
    check_raises(lambda: convert(model), ValueError, match)
    check_raises(lambda: from_diffusers(model), ValueError, match)
