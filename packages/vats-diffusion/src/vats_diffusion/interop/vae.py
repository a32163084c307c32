"""Weight import from diffusers: an ``AutoencoderKL`` becomes a :class:`~vats_diffusion.vae.VAE`.

``from_autoencoder_kl(model)`` reads the diffusers model's ``.config`` and ``.state_dict()``
only (diffusers is never imported here), builds the matching
:class:`~vats_diffusion.vae.VAEConfig` and copies the weights. The result computes the same
function: the posterior's mean and logvar, ``decode`` and ``forward`` equal diffusers' to
float rounding (untiled; diffusers' tiling is its own scheme, not carried over).

Config mapping (diffusers -> vats)::

    in_channels, out_channels, latent_channels,
    block_out_channels, layers_per_block, norm_num_groups  -> the same fields
    mid_block_add_attention                                -> mid_attention
    use_quant_conv, use_post_quant_conv                    -> the same fields
    scaling_factor                                         -> scaling_factor
    shift_factor (None = 0)                                -> shift_factor
    sample_size, force_upcast                              -> not needed (tiling / pipeline
                                                              precision choices)

Refused with a ValueError naming the field: ``act_fn`` other than ``silu`` / ``swish``,
``down_block_types`` other than ``DownEncoderBlock2D`` / ``up_block_types`` other than
``UpDecoderBlock2D`` (or block lists whose length differs from ``block_out_channels``),
and per-channel ``latents_mean`` / ``latents_std`` (the VAE's latent normalisation is one
scalar scale and shift).

Weight mapping (both encoder and decoder)::

    down_blocks.i.resnets.j.*  /  up_blocks.i.resnets.j.*   -> the same names
    down_blocks.i.downsamplers.0.conv                      -> down_blocks.i.downsample.conv
    up_blocks.i.upsamplers.0.conv                          -> up_blocks.i.upsample.conv
    mid_block.resnets.{0,1}                                -> the same names
    mid_block.attentions.0.group_norm                      -> mid_block.attention.norm
    mid_block.attentions.0.to_q / to_k / to_v (stacked)    -> mid_block.attention.attn.qkv_proj
    mid_block.attentions.0.to_out.0                        -> mid_block.attention.attn.o_proj
    conv_norm_out                                          -> norm_out
    conv_in, conv_out, quant_conv, post_quant_conv         -> the same names
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vats_diffusion.vae import VAE, VAEConfig

__all__ = ["autoencoder_kl_config", "from_autoencoder_kl"]

_ACTIVATIONS = ("silu", "swish")  # diffusers maps both names to nn.SiLU
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Renames applied in order to every key; the mid-block q / k / v are stacked separately.
_RENAMES = (
    (re.compile(r"\.downsamplers\.0\."), ".downsample."),
    (re.compile(r"\.upsamplers\.0\."), ".upsample."),
    (re.compile(r"mid_block\.attentions\.0\.group_norm\."), "mid_block.attention.norm."),
    (re.compile(r"mid_block\.attentions\.0\.to_out\.0\."), "mid_block.attention.attn.o_proj."),
    (re.compile(r"\.conv_norm_out\."), ".norm_out."),
)
_QKV = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.(weight|bias)$")
# diffusers' fuse_qkv_projections() adds a stacked copy beside to_q / to_k / to_v.
_FUSED_COPY = re.compile(r"\.attentions\.0\.to_(qkv|kv)\.")


def _unsupported(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"from_autoencoder_kl: AutoencoderKL config {field}={value!r} cannot be represented "
        f"by VAE: expected {allowed}"
    )


def autoencoder_kl_config(config: Mapping[str, Any]) -> VAEConfig:
    """The :class:`VAEConfig` for a diffusers ``AutoencoderKL`` config (its ``.config``).

    Raises:
        ValueError: a field the VAE cannot represent, naming it.
    """
    chans = tuple(config["block_out_channels"])
    act = config.get("act_fn", "silu")
    if act not in _ACTIVATIONS:
        raise _unsupported("act_fn", act, f"one of {list(_ACTIVATIONS)}")
    for field, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = tuple(config.get(field, ()))
        if len(types) != len(chans) or any(t != kind for t in types):
            raise _unsupported(
                field, types, f"{kind} once per entry of block_out_channels ({len(chans)})"
            )
    for field in ("latents_mean", "latents_std"):
        if config.get(field) is not None:
            raise _unsupported(
                field, config[field], "None (VAE latents take one scalar scale and shift)"
            )
    shift = config.get("shift_factor")
    return VAEConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=chans,
        layers_per_block=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        norm_num_groups=config["norm_num_groups"],
        norm_eps=1e-6,  # diffusers' Encoder / Decoder fix every GroupNorm's eps at 1e-6
        mid_attention=bool(config.get("mid_block_add_attention", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=0.0 if shift is None else float(shift),
    )


def _convert_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> VAE state dict (names in the docstring)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if _FUSED_COPY.search(key):
            continue
        match = _QKV.match(key)
        if match:
            side, proj, kind = match.groups()
            qkv.setdefault((side, kind), {})[proj] = tensor
            continue
        for pattern, new in _RENAMES:
            key = pattern.sub(new, key)
        out[key] = tensor
    for (side, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"from_autoencoder_kl: {side}.mid_block.attentions.0 has to_{sorted(parts)} "
                f"{kind}s but not all of to_q, to_k, to_v"
            )
        # vats_core Attention stacks the query, key and value rows in that order.
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{side}.mid_block.attention.attn.qkv_proj.{kind}"] = stacked
    return out


def from_autoencoder_kl(model: Any) -> VAE:
    """Convert a diffusers ``AutoencoderKL`` into a :class:`VAE` computing the same function.

    Args:
        model: an ``AutoencoderKL`` (any config the VAE can represent; see the module
            docstring), on any device and dtype.

    Returns:
        The VAE, on the model's device and dtype, in the model's train / eval mode.

    Raises:
        ValueError: ``model`` is not an ``AutoencoderKL``, or its config has a field the
            VAE cannot represent (named in the message).
    """
    if type(model).__name__ != "AutoencoderKL":
        raise ValueError(
            f"from_autoencoder_kl expects a diffusers AutoencoderKL, got {type(model).__name__}"
        )
    config = autoencoder_kl_config(model.config)
    state = _convert_state(model.state_dict())
    vae = VAE(config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            "from_autoencoder_kl: the AutoencoderKL's weights do not match its config "
            f"(a modified module tree?): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )
    vae.load_state_dict(state, strict=True)
    ref = next(iter(model.parameters()))
    return vae.to(device=ref.device, dtype=ref.dtype).train(model.training)
