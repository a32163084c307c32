"""Pieces ViT-2D and ViT-3D share: patch embedding, position choices, pooling, input checks.

Patch / tubelet embedding is the ViT recipe (Dosovitskiy et al., 2021, arXiv:2010.11929;
tubelets from ViViT, Arnab et al., 2021, arXiv:2103.15691): a convolution whose kernel
equals its stride cuts the input into non-overlapping patches and projects each to ``D``.

Shapes: B batch, C channels, T frames, H height, W width, D model width, N tokens,
gh / gw / gt patch-grid height / width / length (H' W' T' in the docs).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention import AttentionConfig
from vats_core.block import BlockConfig
from vats_core.config import check, check_at_least, check_positive
from vats_core.mlp import MLPConfig

__all__ = [
    "PatchEmbed",
    "Pool",
    "PosEmbed",
    "VideoPosEmbed",
    "check_image_size",
    "check_images",
    "image_hw",
    "init_vit_weights",
    "pad_to_multiple",
    "padded_size",
    "pool_tokens",
    "resample_grid_embed",
    "resample_sequence_embed",
]


class PosEmbed(enum.StrEnum):
    """How ViT-2D patches learn where they are (ViT-3D has ``VideoPosEmbed``)."""

    ROPE2D = "rope2d"  # axial 2D rotary over (row, col); any grid, no parameters
    LEARNED = "learned"  # absolute embeddings added to the tokens, resampled to the grid
    NONE = "none"  # no positions at all (a bag of patches)


class VideoPosEmbed(enum.StrEnum):
    """How ViT-3D tubelets learn where they are."""

    ROPE3D = "rope3d"  # rotary over (t, row, col); any clip length and grid, no parameters
    LEARNED = "learned"  # separable tables: spatial (resampled bicubic) + temporal (per frame)
    NONE = "none"


class Pool(enum.StrEnum):
    """How ``forward_head`` turns tokens into one vector per image (timm's ``global_pool``)."""

    TOKEN = "token"  # the class token (needs class_token=True)
    AVG = "avg"  # mean of the patch tokens (prefix tokens excluded, padding excluded)
    NONE = "none"  # no pooling: the head runs on every token


class PatchEmbed(nn.Module):
    """Non-overlapping patches (2D) or tubelets (3D) projected to ``dim`` by a strided conv.

    The conv is ``proj`` (timm's ``patch_embed.proj``) so timm weights map one to one.
    """

    def __init__(
        self, kernel: Sequence[int], in_channels: int, dim: int, *, bias: bool = True
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if len(kernel) == 2 else nn.Conv3d
        self.kernel = tuple(kernel)
        self.proj = conv(in_channels, dim, kernel_size=self.kernel, stride=self.kernel, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, D, gh, gw)`` or ``(B, C, T, H, W) -> (B, D, gt, gh, gw)``."""
        return self.proj(x)


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= size``."""
    return math.ceil(size / multiple) * multiple


def pad_to_multiple(x: Tensor, patch: int) -> Tensor:
    """Zero-pad the last two axes (H, W) on the bottom / right up to multiples of ``patch``.

    Bottom/right padding keeps every real pixel in the patch it would have without padding
    (timm's ``dynamic_img_pad`` does the same).
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, patch) - h, padded_size(w, patch) - w
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph))


def check_images(
    owner: str,
    x: Tensor,
    *,
    rank: int,
    layout: str,
    channel_axis: int,
    in_channels: int,
    patch: int,
    pad: bool,
) -> None:
    """Raise a ValueError naming expected vs got for a batch the encoder cannot take.

    Args:
        owner: model name for the message.
        x: the input.
        rank: expected ``x.ndim`` (4 for images, 5 for clips, 3 / 4 for one list item).
        layout: the expected layout in words, e.g. ``"(B, C, H, W)"``.
        channel_axis: where C is (``-3`` for images, ``-4`` for clips).
        in_channels: expected C.
        patch: spatial patch size; H and W must be multiples unless ``pad``.
        pad: whether sizes that are not multiples get padded instead.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{owner} expects a tensor {layout}, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(
            f"{owner} expects a rank-{rank} tensor {layout}, got rank {x.ndim} with shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{owner} expects floating-point pixels, got {x.dtype}")
    if x.shape[channel_axis] != in_channels:
        raise ValueError(
            f"{owner} expects {in_channels} channels (C in {layout}), got {x.shape[channel_axis]} "
            f"in shape {tuple(x.shape)}"
        )
    h, w = x.shape[-2:]
    if h < 1 or w < 1:
        raise ValueError(f"{owner} got an empty image: shape {tuple(x.shape)}")
    if not pad and (h % patch or w % patch):
        raise ValueError(
            f"{owner} expects H and W to be multiples of patch_size={patch}, got H={h}, W={w} "
            "(set pad=True to zero-pad them up to the next multiple)"
        )


def resample_grid_embed(embed: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Resample learned patch positions from one grid to another (bicubic, as timm).

    Bicubic with antialiasing, ``align_corners=False``: timm's ``resample_abs_pos_embed``
    defaults, so imported timm models agree at every input size.

    Args:
        embed: ``(1, gh_old * gw_old, D)``.
        old: ``(gh_old, gw_old)``.
        new: ``(gh, gw)``.

    Returns:
        ``(1, gh * gw, D)``; ``embed`` itself when the grids agree.
    """
    if tuple(old) == tuple(new):
        return embed
    d = embed.shape[-1]
    grid = embed.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)  # (1, D, gh_old, gw_old)
    # Interpolate in at least float32: bicubic in half precision loses visible accuracy.
    work = torch.promote_types(grid.dtype, torch.float32)
    grid = F.interpolate(
        grid.to(work), size=tuple(new), mode="bicubic", antialias=True, align_corners=False
    )
    return grid.to(embed.dtype).permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)


def resample_sequence_embed(embed: Tensor, length: int) -> Tensor:
    """Learned temporal positions for a clip of ``length`` tubelets.

    Shorter clips take the first ``length`` positions (time keeps its speed: the 3rd
    tubelet is the 3rd tubelet in any clip); longer clips get the table stretched by linear
    interpolation.

    Args:
        embed: ``(1, gt, D)``.
        length: T'.

    Returns:
        ``(1, T', D)``.
    """
    if length <= embed.shape[1]:
        return embed[:, :length]
    work = torch.promote_types(embed.dtype, torch.float32)
    seq = embed.transpose(1, 2).to(work)  # (1, D, gt)
    seq = F.interpolate(seq, size=length, mode="linear", align_corners=False)
    return seq.to(embed.dtype).transpose(1, 2)


def pool_tokens(x: Tensor, pool: Pool, n_prefix: int, mask: Tensor | None = None) -> Tensor:
    """Pool ``(B, N, D)`` tokens as timm's ``global_pool_nlc`` does.

    Args:
        x: ``(B, n_prefix + N_patches, D)``.
        pool: token -> ``x[:, 0]``; avg -> mean over the patch tokens; none -> ``x``.
        n_prefix: class + register tokens at the front.
        mask: ``(B, N)`` bool, True = real token; padding is left out of the average.

    Returns:
        ``(B, D)`` (``(B, N, D)`` for ``Pool.NONE``).
    """
    if pool is Pool.TOKEN:
        return x[:, 0]
    if pool is Pool.NONE:
        return x
    patches = x[:, n_prefix:]  # (B, N_patches, D)
    if mask is None:
        return patches.mean(dim=1)
    keep = mask[:, n_prefix:].unsqueeze(-1).to(patches.dtype)  # (B, N_patches, 1)
    return (patches * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def init_vit_weights(
    model: nn.Module, std: float, tables: Sequence[Tensor | None], tokens: Sequence[Tensor | None]
) -> None:
    """timm's default ViT init: truncated-normal linears and position tables, zero biases,
    prefix tokens near zero (std 1e-6). Convs and norms keep PyTorch's init."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for table in tables:
            if table is not None:
                nn.init.trunc_normal_(table, std=std, a=-2 * std, b=2 * std)
        for token in tokens:
            if token is not None:
                nn.init.normal_(token, std=1e-6)


def image_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of an ``image_size`` field: an int S is the square ``(S, S)``."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def check_image_size(config: Any) -> None:
    """Validate ``config.image_size`` against ``config.patch_size`` and store its normal form.

    The field is an int S (square) or a pair ``(H, W)``; both sides must be positive
    multiples of the patch size (the learned position table has one row per patch of the
    ``(H / p, W / p)`` grid). A square pair ``(S, S)`` is stored as S, so equal sizes give
    equal (and equally hashed) configs and square configs keep their int.
    """
    size, p = config.image_size, config.patch_size
    if isinstance(size, tuple):
        check(len(size) == 2, config, "image_size", size, "an int S or a pair (H, W)")
    h, w = image_hw(size)
    sides = "a" if isinstance(size, int) else "(H, W), each a"
    check(
        h > 0 and w > 0 and h % p == 0 and w % p == 0,
        config,
        "image_size",
        size,
        f"{sides} positive multiple of patch_size={p}",
    )
    if isinstance(size, tuple) and h == w:
        object.__setattr__(config, "image_size", h)


def check_encoder_fields(config: Any) -> None:
    """Value checks shared by :class:`~vats_vision.vit2d.ViT2DConfig` and
    :class:`~vats_vision.vit3d.ViT3DConfig` (their types are checked from the annotations
    before, by :class:`~vats_core.config.Config`)."""
    check_positive(
        config, "patch_size", "in_channels", "dim", "n_layers", "n_heads", "mlp_hidden_dim"
    )
    check_positive(config, "norm_eps", "rope_theta", "init_std")
    check_at_least(config, 0, "n_register_tokens", "num_classes")
    check_image_size(config)
    check(
        config.pool is not Pool.TOKEN or config.class_token,
        config,
        "pool",
        config.pool.value,
        "'avg' or 'none' when class_token=False (token pooling reads the class token)",
    )


def encoder_block_config(config: Any, *, window: int | None) -> BlockConfig:
    """The vats-core block (non-causal attention, MLP, norms) a ViT config describes;
    shared by ViT2D and ViT3D, whose attention and MLP fields are the same."""
    attention = AttentionConfig(
        dim=config.dim,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        qkv_bias=config.qkv_bias,
        out_bias=config.out_bias,
        qk_norm=config.qk_norm,
        window=window,
        backend=config.attention_backend,
    )
    mlp = MLPConfig(
        dim=config.dim,
        hidden_dim=config.mlp_hidden_dim or 4 * config.dim,
        activation=config.mlp_activation,
        bias=config.mlp_bias,
    )
    return BlockConfig(attention=attention, mlp=mlp, norm=config.norm, norm_eps=config.norm_eps)
