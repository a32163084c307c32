"""Import diffusers' ``LatteTransformer3DModel`` as a
:class:`~vats_diffusion.video_dit.VideoDiT` that computes the same function.

Only the model's ``.config`` and ``.state_dict()`` are read; diffusers is never imported.
The state dict is mapped by :mod:`vats_diffusion.interop.dit`'s mapper, as PixArt's is.

Mapping (diffusers -> vats)::

    pos_embed.proj (Conv2d)                         -> patch_embed (Conv3d, pt = 1)
    adaln_single.emb.timestep_embedder.linear_1/2   -> time_embed.linear_1/2
    adaln_single.linear                             -> adaln_single
    caption_projection.linear_1/2                   -> text_proj.fc1/fc2
    transformer_blocks.i.scale_shift_table          -> spatial_blocks.i.scale_shift_table
    transformer_blocks.i.attn1 / attn2 / ff         -> spatial_blocks.i.attn / cross_attn / ffn
    temporal_transformer_blocks.i.scale_shift_table -> temporal_blocks.i.scale_shift_table
    temporal_transformer_blocks.i.attn1 / ff        -> temporal_blocks.i.attn / ffn
    scale_shift_table / proj_out                    -> final_scale_shift_table / proj_out

and the config: adaLN-single, no pooled text, no cross-attention norm, timestep shift 0,
sin-cos positions with the base grid ``sample_size / p`` and Latte's interpolation scale
``max(sample_size // 64, 1)``, ``video_length`` -> ``max_frames``.

Latte's forward, as VideoDiT computes it: per-frame patches with 2D sin-cos positions; the
timestep through adaLN-single (its six vectors shared by the spatial and the temporal
blocks, each adding its own table; the final layer modulated by the embedded timestep);
the captions projected once; spatial then temporal blocks in pairs, its fixed temporal
sin-cos table added right before the first temporal block, for clips of more than one
frame; channels last within a patch when unpatchifying. Latte adds its whole table of
``video_length`` rows, so it runs only clips of ``video_length`` frames or of one
(Vchitect/Latte#133); the imported VideoDiT computes the same there and also runs every
length up to ``max_frames = video_length``.

Not carried over: dropout (an identity in eval mode) and the ``enable_temporal_attentions``
argument of Latte's forward (False skips the temporal blocks and table, Latte's image
mode); the import computes its default, True.

Masks. Latte hands ``encoder_attention_mask`` as is to its spatial blocks, whose batch is
``B·T``: a ``(B, S)`` mask fails there with a shape error, and a 2D mask is not turned into
a bias as PixArt's forward does. What diffusers' Latte computes correctly is an additive
bias ``(B·T, 1, S)`` (0 = keep, -10000 = discard, the rows repeated per frame); vats'
``text_mask`` ``(B, S)`` (True = real token) gives the same predictions. Only rows with no
real token differ (diffusers then averages every padded token, vats' null text condition
adds nothing).

What VideoDiT cannot compute raises a ValueError naming the diffusers config field: a
``norm_type`` other than ``ada_norm_single`` and ``norm_elementwise_affine=True`` (the class
defaults; Latte's checkpoints set both), an ``activation_fn`` other than ``gelu`` /
``gelu-approximate`` / ``swiglu`` (the class default ``geglu`` among them), ``out_channels``
other than ``in_channels`` or twice it, no ``caption_channels``, and a
``cross_attention_dim`` other than the width (the projected captions' width).
"""

from __future__ import annotations

from typing import Any

from vats_diffusion.dit_layers import AdaLNMode
from vats_diffusion.interop.dit import _common, _config, _Mapper, _unsupported
from vats_diffusion.video_dit import VideoDiT, VideoDiTConfig, VideoPosEmbed

__all__ = ["from_latte_transformer"]

_CLS = "LatteTransformer3DModel"


def from_latte_transformer(model: Any) -> VideoDiT:
    """The :class:`VideoDiT` equal to a diffusers ``LatteTransformer3DModel``, with its
    weights, in eval mode.

    Its call maps as ``model(x, timestep, encoder_hidden_states=text,
    encoder_attention_mask=bias)`` -> ``video_dit(x, timestep, text_states=text,
    text_mask=mask)``, with ``bias = (1 - mask) * -10000`` of shape ``(B·T, 1, S)`` (module
    docstring).

    Args:
        model: a ``LatteTransformer3DModel`` (read through ``.config`` and ``.state_dict()``).

    Raises:
        ValueError: a config field VideoDiT cannot represent (named).
    """
    cfg = _config(model)
    fields = _common(_CLS, cfg, "ada_norm_single", target="VideoDiT")
    dim = fields["dim"]
    caption, cross_dim = cfg.get("caption_channels"), cfg.get("cross_attention_dim")
    if caption is None:
        raise _unsupported(
            _CLS, "caption_channels", caption, "expected the text width", target="VideoDiT"
        )
    if cross_dim != dim:
        raise _unsupported(
            _CLS,
            "cross_attention_dim",
            cross_dim,
            "cross-attention reads the projected captions, of width num_attention_heads * "
            f"attention_head_dim = {dim}",
            target="VideoDiT",
        )
    sample = fields["sample_size"]
    config = VideoDiTConfig(
        **{**fields, "pos_embed": VideoPosEmbed.SINCOS},
        max_frames=cfg.get("video_length", 16),
        patch_frames=1,
        adaln=AdaLNMode.SINGLE,
        timestep_freq_shift=0.0,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        pos_interpolation_scale=float(max(sample // 64, 1)),
        text_dim=caption,
        text_proj=True,
        pooled_text=False,
        cross_attn_norm=False,
    )
    m = _Mapper(_CLS, model.state_dict())
    m.out["patch_embed.weight"] = m.get("pos_embed.proj.weight")[:, :, None]  # (D, C, 1, p, p)
    m.out["patch_embed.bias"] = m.get("pos_embed.proj.bias")
    m.linear("adaln_single.emb.timestep_embedder.linear_1", "time_embed.linear_1")
    m.linear("adaln_single.emb.timestep_embedder.linear_2", "time_embed.linear_2")
    m.linear("adaln_single.linear", "adaln_single")
    m.linear("caption_projection.linear_1", "text_proj.fc1")
    m.linear("caption_projection.linear_2", "text_proj.fc2")
    for i in range(cfg["num_layers"]):
        for src, dst in (
            (f"transformer_blocks.{i}", f"spatial_blocks.{i}"),
            (f"temporal_transformer_blocks.{i}", f"temporal_blocks.{i}"),
        ):
            m.out[f"{dst}.scale_shift_table"] = m.get(f"{src}.scale_shift_table")
            m.attention(f"{src}.attn1", f"{dst}.attn", cross=False, bias=config.qkv_bias)
            m.mlp(f"{src}.ff", f"{dst}.ffn", config.mlp_activation)
        spatial = f"transformer_blocks.{i}"
        m.attention(
            f"{spatial}.attn2", f"spatial_blocks.{i}.cross_attn", cross=True, bias=config.qkv_bias
        )
    m.out["final_scale_shift_table"] = m.get("scale_shift_table")
    m.linear("proj_out", "proj_out")
    return m.build(config, VideoDiT)
