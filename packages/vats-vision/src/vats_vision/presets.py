"""Named ViT-2D / ViT-3D configs.

``tiny`` is for tests (a forward in milliseconds on CPU), ``small`` for the CPU training
proofs on the shapes world, ``vit_small_patch16_224`` is timm's ViT-S/16 shape exactly
(class token, learned positions over prefix + patches, LayerNorm eps 1e-6, GELU MLP,
qkv / proj / MLP biases, token pooling, 1000 classes) for import and benchmarks.

Presets are square; any of them takes a rectangular default size as an override (the
learned tables then get the ``(H / p, W / p)`` grid).

Example::

    config = vit2d_preset("tiny", num_classes=24)
    wide = vit2d_preset("tiny", image_size=(32, 64))  # (H, W)
    video = vit3d_preset("small", temporal_attention=False)
"""

from __future__ import annotations

from typing import Any

from vats_core.mlp import Activation
from vats_core.norms import NormType
from vats_vision.layers import Pool, PosEmbed
from vats_vision.vit2d import ViT2DConfig
from vats_vision.vit3d import VideoPosEmbed, ViT3DConfig

__all__ = ["VIT2D_PRESETS", "VIT3D_PRESETS", "vit2d_preset", "vit3d_preset"]

VIT2D_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        patch_size=8,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        num_classes=10,
    ),
    "small": dict(
        image_size=64,
        patch_size=8,
        dim=192,
        n_layers=6,
        n_heads=3,
        mlp_hidden_dim=768,
        mlp_activation=Activation.SWIGLU,
        norm=NormType.RMSNORM,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        class_token=False,
        pool=Pool.AVG,
        num_classes=10,
    ),
    "vit_small_patch16_224": dict(
        image_size=224,
        patch_size=16,
        in_channels=3,
        dim=384,
        n_layers=12,
        n_heads=6,
        mlp_hidden_dim=1536,
        mlp_activation=Activation.GELU,
        mlp_bias=True,
        norm=NormType.LAYERNORM,
        norm_eps=1e-6,
        qkv_bias=True,
        out_bias=True,
        class_token=True,
        pos_embed=PosEmbed.LEARNED,
        pos_embed_prefix=True,
        pool=Pool.TOKEN,
        fc_norm=False,
        num_classes=1000,
    ),
}

VIT3D_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=16,
        num_frames=4,
        patch_size=8,
        tubelet_size=2,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        num_classes=4,
    ),
    "small": dict(
        image_size=32,
        num_frames=8,
        patch_size=8,
        tubelet_size=2,
        dim=128,
        n_layers=4,
        n_heads=4,
        mlp_hidden_dim=512,
        pos_embed=VideoPosEmbed.ROPE3D,
        class_token=False,
        pool=Pool.AVG,
        num_classes=4,
    ),
}


def _preset(table: dict[str, dict[str, Any]], family: str, name: str) -> dict[str, Any]:
    if name not in table:
        raise ValueError(f"unknown {family} preset {name!r}: expected one of {sorted(table)}")
    return dict(table[name])


def vit2d_preset(name: str, **overrides: Any) -> ViT2DConfig:
    """The named :class:`ViT2DConfig`, with fields replaced by ``overrides``."""
    return ViT2DConfig(**{**_preset(VIT2D_PRESETS, "ViT-2D", name), **overrides})


def vit3d_preset(name: str, **overrides: Any) -> ViT3DConfig:
    """The named :class:`ViT3DConfig`, with fields replaced by ``overrides``."""
    return ViT3DConfig(**{**_preset(VIT3D_PRESETS, "ViT-3D", name), **overrides})
