"""The image files a text-to-image run writes: each image at its own size and enlarged with
nearest-neighbour upsampling for viewing, and a grid of them all.

Shapes: B images, C = 3 channels, S image side.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["grid", "save_images", "to_uint8"]


def to_uint8(images: Tensor) -> Tensor:
    """``(B, C, S, S)`` pixels in [-1, 1] (values outside are clipped) -> uint8 ``(B, S, S, C)``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()  # (B, S, S, C)


def enlarge(images: Tensor, scale: int) -> Tensor:
    """Nearest-neighbour upsampling by ``scale`` (each pixel a ``scale`` x ``scale`` block)."""
    return (
        F.interpolate(images.float(), scale_factor=scale, mode="nearest") if scale > 1 else images
    )


def grid(images: Tensor, *, columns: int | None = None, gap: int = 2) -> Tensor:
    """The images tiled row by row on a white ground, ``gap`` pixels apart:
    ``(B, C, S, S) -> (C, rows·(S + gap) - gap, columns·(S + gap) - gap)``, in [-1, 1]."""
    b, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = torch.ones(c, rows * (h + gap) - gap, columns * (w + gap) - gap)
    for i in range(b):
        r, col = divmod(i, columns)
        out[:, r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = images[i]
    return out


def save_images(images: Tensor, out_dir: Path, *, scale: int) -> dict[str, list[str] | str]:
    """Write ``image_<i>.png`` (the images' own size), ``image_<i>_x<scale>.png`` (enlarged)
    and ``grid.png`` (the enlarged images tiled) under ``out_dir``.

    Args:
        images: ``(B, 3, S, S)`` in [-1, 1].
        scale: enlargement factor (>= 1) of the viewing copies and the grid.

    Returns:
        ``{"images": [...], "enlarged": [...], "grid": path}`` as strings.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, big = [], []
    large = enlarge(images, scale)
    for i, (small, wide) in enumerate(zip(to_uint8(images), to_uint8(large), strict=True)):
        raw.append(out_dir / f"image_{i}.png")
        Image.fromarray(small.numpy()).save(raw[-1])
        if scale > 1:
            big.append(out_dir / f"image_{i}_x{scale}.png")
            Image.fromarray(wide.numpy()).save(big[-1])
    sheet = out_dir / "grid.png"
    Image.fromarray(to_uint8(grid(large, gap=max(2, scale))[None])[0].numpy()).save(sheet)
    return {"images": [str(p) for p in raw], "enlarged": [str(p) for p in big], "grid": str(sheet)}
