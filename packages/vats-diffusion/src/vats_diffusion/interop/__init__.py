"""Import diffusers models into vats-diffusion: :func:`from_diffusers`.

diffusers is imported by the caller (this module only reads the model's config and state
dict), so importing vats_diffusion never imports the diffusers model classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["from_diffusers"]


def from_diffusers(model: Any) -> nn.Module:
    """The vats model equal to a diffusers ``model``, with its weights.

    Accepts ``AutoencoderKL`` (-> :class:`vats_diffusion.VAE`), ``DiTTransformer2DModel``
    and ``PixArtTransformer2DModel`` (-> :class:`vats_diffusion.DiT`), and
    ``LatteTransformer3DModel`` (-> :class:`vats_diffusion.VideoDiT`). A config the vats
    model cannot represent raises a ``ValueError`` naming the field.
    """
    name = type(model).__name__
    if name == "AutoencoderKL":
        from vats_diffusion.interop.vae import from_autoencoder_kl

        return from_autoencoder_kl(model)
    if name == "DiTTransformer2DModel":
        from vats_diffusion.interop.dit import from_dit_transformer

        return from_dit_transformer(model)
    if name == "PixArtTransformer2DModel":
        from vats_diffusion.interop.dit import from_pixart_transformer

        return from_pixart_transformer(model)
    if name == "LatteTransformer3DModel":
        from vats_diffusion.interop.latte import from_latte_transformer

        return from_latte_transformer(model)
    raise ValueError(
        f"from_diffusers: {name} is not supported: expected AutoencoderKL, "
        "DiTTransformer2DModel, PixArtTransformer2DModel or LatteTransformer3DModel"
    )
