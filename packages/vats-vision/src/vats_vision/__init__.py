"""vats-vision: ViT-2D image and ViT-3D video encoders on vats-core.

Both follow timm's encoder contract (``forward_features``, ``forward_head``,
``forward_intermediates``, ``forward``) and are built from vats-core's attention,
RoPE and transformer blocks.
"""

from vats_vision.layers import Pool, PosEmbed, VideoPosEmbed
from vats_vision.presets import vit2d_preset, vit3d_preset
from vats_vision.vit2d import ViT2D, ViT2DConfig
from vats_vision.vit3d import ViT3D, ViT3DConfig

__all__ = [
    "Pool",
    "PosEmbed",
    "ViT2D",
    "ViT2DConfig",
    "ViT3D",
    "ViT3DConfig",
    "VideoPosEmbed",
    "vit2d_preset",
    "vit3d_preset",
]
