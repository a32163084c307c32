"""from_autoencoder_kl: an imported diffusers AutoencoderKL gives diffusers' posterior mean
and logvar, posterior samples, decoded pixels and reconstructions (several block counts,
with and without mid-block attention and quant convs, rectangular inputs); configs the VAE
cannot represent are refused with a ValueError naming the field.

Every AutoencoderKL here is random-init and built locally (nothing downloaded); weights are
perturbed away from diffusers' init (unit GroupNorm weights, zero biases) so that a wrongly
mapped norm or bias would show.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from vats_core.testing import check_raises
from vats_diffusion.interop import from_diffusers
from vats_diffusion.interop.vae import autoencoder_kl_config, from_autoencoder_kl
from vats_diffusion.vae import VAE, vae_preset

RTOL = 1e-4


def _diffusers_vae(levels: int = 2, seed: int = 0, **overrides) -> AutoencoderKL:
    config = dict(
        block_out_channels=(8, 16, 16, 16)[:levels],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    torch.manual_seed(seed)
    model = AutoencoderKL(**{**config, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-3  # a non-trivial output
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= RTOL, f"relative error {err:.2e}"


CASES = {
    # (levels, AutoencoderKL overrides, input (H, W))
    "two_levels_attention_quant": (2, dict(), (16, 16)),
    "three_levels_no_attention_no_quant_rect": (
        3,
        dict(
            block_out_channels=(8, 16, 24),
            layers_per_block=2,
            norm_num_groups=8,
            in_channels=2,
            out_channels=3,
            latent_channels=3,
            mid_block_add_attention=False,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        (16, 24),
    ),
    "one_level_only_quant_conv_shift_rect": (
        1,
        dict(
            block_out_channels=(16,),
            use_post_quant_conv=False,
            act_fn="swish",
            scaling_factor=0.5,
            shift_factor=0.1,
        ),
        (6, 10),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(case: str) -> None:
    levels, overrides, (h, w) = CASES[case]
    model = _diffusers_vae(levels, **overrides)
    vae = from_autoencoder_kl(model)
    assert not vae.training
    x = torch.randn(2, model.config.in_channels, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = model.encode(x).latent_dist, vae.encode(x)
        _close(ours.mean, ref.mean)
        _close(ours.logvar, ref.logvar)
        _close(vae(x), model(x).sample)
        z = torch.randn(ref.mean.shape, generator=torch.Generator().manual_seed(2))
        _close(vae.decode(z), model.decode(z).sample)
        # The same generator gives the same posterior sample.
        a = ours.sample(torch.Generator().manual_seed(3))
        b = ref.sample(torch.Generator().manual_seed(3))
        _close(a, b)
        # Diffusion latents as diffusers pipelines scale them.
        shift = model.config.shift_factor or 0.0
        expected = (ref.mode() - shift) * model.config.scaling_factor
        _close(vae.encode_latents(x, sample=False), expected)


def test_dispatcher_dtype_and_mode() -> None:
    model = _diffusers_vae().double().train()
    vae = from_diffusers(model)
    assert isinstance(vae, VAE) and vae.training
    assert {p.dtype for p in vae.parameters()} == {torch.float64}
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            vae.eval().encode(x).mean,
            model.eval().encode(x).latent_dist.mean,
            rtol=1e-10,
            atol=1e-10,
        )


def test_sd_config_maps_to_the_sd_preset() -> None:
    """The SD 1.x/2.x AutoencoderKL config (as in its config.json) is the ``sd`` preset."""
    sd = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    assert autoencoder_kl_config(sd) == vae_preset("sd")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(act_fn="gelu"), r"act_fn='gelu' .*'silu'"),
        (
            dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
            r"down_block_types=.*AttnDownEncoderBlock2D.* expected DownEncoderBlock2D",
        ),
        (
            dict(up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
            r"up_block_types=.*AttnUpDecoderBlock2D.* expected UpDecoderBlock2D",
        ),
        (dict(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4), r"latents_mean="),
    ],
)
def test_unrepresentable_configs_name_the_field(overrides: dict, match: str) -> None:
    model = _diffusers_vae(**overrides)
    check_raises(lambda: from_autoencoder_kl(model), ValueError, match)


def test_not_an_autoencoder_kl() -> None:
    check_raises(lambda: from_autoencoder_kl(VAE(vae_preset("tiny"))), ValueError, "got VAE")
