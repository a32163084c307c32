"""Batched, anti-aliased rasterization and counter-based randomness for the shapes world
(the randomness and the balanced targets serve the sounds world too).

Everything here is plain torch tensor math on a pixel grid, vectorized over the batch:

- :func:`uniforms`: a counter-based hash (two 32-bit ``lowbias32`` lanes, i.e. a 64-bit
  key per sample) that turns ``(sample key, stream)`` into a uniform float, so a
  sample's random draws do not depend on which batch it is generated in;
- :func:`balanced_targets`: classification targets in blocks that hold every class once;
- signed distance functions (after Inigo Quilez, "2D distance functions") for each
  shape, in pixel units with y pointing up; coverage ``clamp(0.5 - d, 0, 1)`` gives a
  one-pixel anti-aliased edge at any resolution;
- muted procedural backgrounds (plain, smooth noise, stripes, checker).

Shapes: B batch (images, or video frames flattened into the batch), N streams,
S image side in pixels, G noise grid side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """The ``lowbias32`` integer finalizer (C. Wellons) on int64 tensors holding uint32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_chain(parts: list[Tensor | int], lane: int) -> Tensor:
    """Fold integer parts (each broadcastable, values in [0, 2**32)) into one uint32 hash.

    ``lane`` salts the chain so two lanes give two independent 32-bit hashes.
    """
    h = torch.as_tensor(lane * 0x632BE5AB & _M32, dtype=torch.int64)
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.int64) & _M32
        h = mix32(h ^ mix32((p + _GOLDEN32) & _M32))
    return h


def uniforms(key_a: Tensor, key_b: Tensor, streams: Tensor) -> Tensor:
    """Uniform floats in [0, 1) for each (sample, stream).

    Args:
        key_a: (B,) first 32-bit lane of each sample's key (int64).
        key_b: (B,) second lane.
        streams: (N,) stream ids (int64); stream s of a sample is the same wherever the
            sample is generated.

    Returns:
        (B, N) float32.
    """
    s = streams.to(torch.int64)[None, :]
    h = mix32(mix32((key_a[:, None] + _mul32(s + 1, _GOLDEN32)) & _M32) ^ key_b[:, None])
    return (h >> 8).to(torch.float32) / float(1 << 24)


def balanced_targets(head: list[int], idx: Tensor, k: int) -> Tensor:
    """(B,) class targets in [0, k): each block of k consecutive indices holds every class
    once, in an order hashed from ``head`` (the world's seed, split and kind) and the block.

    Args:
        head: integers that select the stream (each in [0, 2**32)).
        idx: (B,) int64 sample indices.
        k: number of classes.
    """
    block, pos = idx // k, idx % k
    order = hash_chain([*head, 0xBA1A, block[:, None], torch.arange(k)], lane=3)  # (B, K)
    perm = torch.argsort(order, dim=1, stable=True)
    return perm.gather(1, pos[:, None])[:, 0]


# ---- signed distance functions: pixel units, y up, shape centred at the origin --------------
# Each takes (px, py) of shape (B, S, S) and per-sample sizes broadcastable to it; the size r is
# the "radius" of the shape, every shape stays inside a circle of radius BOUND * r.

BOUND = 1.15  # every shape's circumradius, in units of its size r (so positions keep it inside)


def _box(px: Tensor, py: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    dx, dy = px.abs() - bx, py.abs() - by
    outside = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def sdf_circle(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    return torch.hypot(px, py) - r


def sdf_square(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    b = 0.8 * r  # half side: area close to the circle's, half-diagonal 1.13 r
    return _box(px, py, b, b)


def sdf_triangle(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Equilateral triangle pointing up, centroid at the origin, circumradius 1.1 r."""
    a = 0.95 * r  # half side
    k = math.sqrt(3.0)
    px = px.abs() - a
    py = py + a / k
    fold = px + k * py > 0
    px, py = (
        torch.where(fold, (px - k * py) / 2, px),
        torch.where(fold, (-k * px - py) / 2, py),
    )
    px = px - torch.maximum(px.clamp(max=0), -2 * a)  # clamp(px, -2a, 0)
    return -torch.hypot(px, py) * torch.sign(py)


def sdf_cross(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Plus sign: two bars of half length 0.95 r and half width 0.32 r."""
    a, w = 0.95 * r, 0.32 * r
    return torch.minimum(_box(px, py, a, w), _box(px, py, w, a))


def sdf_star(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Five-pointed star, one point up, outer radius r, inner radius ratio 0.5."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px = px.abs()
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px = px.abs()
    py = py - r
    rf = 0.5
    bax, bay = -rf * k1y, rf * k1x - 1.0
    h = torch.minimum(((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(min=0), r)
    return torch.hypot(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)


def sdf_diamond(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Rhombus, half width 0.7 r and half height r."""
    bx, by = 0.7 * r, r
    px, py = px.abs(), py.abs()
    h = (((bx - 2 * px) * bx - (by - 2 * py) * by) / (bx * bx + by * by)).clamp(-1, 1)
    d = torch.hypot(px - 0.5 * bx * (1 - h), py - 0.5 * by * (1 + h))
    return d * torch.sign(px * by + py * bx - bx * by)


SDFS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "circle": sdf_circle,
    "square": sdf_square,
    "triangle": sdf_triangle,
    "cross": sdf_cross,
    "star": sdf_star,
    "diamond": sdf_diamond,
}


def coverage(
    shape_names: list[str],
    shape: Tensor,
    center: Tensor,
    radius: Tensor,
    rotation: Tensor,
    size: int,
) -> Tensor:
    """Anti-aliased coverage of one shape per image.

    Args:
        shape_names: name of each shape id (index into :data:`SDFS` keys by name).
        shape: (B,) shape ids into ``shape_names``.
        center: (B, 2) centre (x, y) in pixels, x right and y down, pixel (i, j) covering
            [j, j+1) x [i, i+1).
        radius: (B,) size r in pixels.
        rotation: (B,) counter-clockwise rotation in degrees.
        size: S.

    Returns:
        (B, 1, S, S) float32 coverage in [0, 1].
    """
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres, (S,)
    dx = grid[None, None, :] - center[:, 0, None, None]  # (B, 1, S)
    dy = center[:, 1, None, None] - grid[None, :, None]  # (B, S, 1), y up
    theta = torch.deg2rad(rotation)[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    px = cos * dx + sin * dy  # rotate the grid by -theta == rotate the shape by +theta
    py = -sin * dx + cos * dy  # (B, S, S)
    r = radius[:, None, None]
    dist = torch.empty(shape.shape[0], size, size)
    for k, name in enumerate(shape_names):
        (rows,) = torch.nonzero(shape == k, as_tuple=True)
        if rows.numel():
            dist[rows] = SDFS[name](px[rows], py[rows], r[rows])
    return (0.5 - dist).clamp(0, 1)[:, None]


# ---- backgrounds ----------------------------------------------------------------------------


def texture(kind: Tensor, u: Tensor, noise: Tensor, size: int) -> Tensor:
    """Zero-mean brightness pattern in [-1, 1] for each background kind.

    Args:
        kind: (B,) 0 plain, 1 noise, 2 stripes, 3 checker.
        u: (B, 3) uniforms: angle, period, phase for stripes and checker.
        noise: (B, 1, G, G) uniforms for the noise kind.
        size: S.

    Returns:
        (B, 1, S, S) float32.
    """
    b = kind.shape[0]
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, S), (1, S, 1)
    angle = (u[:, 0] * math.pi)[:, None, None]
    period = (size * (0.12 + 0.13 * u[:, 1]))[:, None, None]  # 4 to 8 periods per side
    phase = (u[:, 2] * 2 * math.pi)[:, None, None]
    along = x * torch.cos(angle) + y * torch.sin(angle)
    stripes = (3 * torch.sin(2 * math.pi * along / period + phase)).clamp(-1, 1)
    checker = (
        6 * torch.sin(math.pi * x / period + phase) * torch.sin(math.pi * y / period + phase)
    ).clamp(-1, 1)
    smooth = F.interpolate(noise * 2 - 1, size=(size, size), mode="bicubic", align_corners=False)
    smooth = smooth[:, 0].clamp(-1, 1)
    out = torch.zeros(b, size, size)
    k = kind[:, None, None]
    out = torch.where(k == 1, smooth, out)
    out = torch.where(k == 2, stripes.expand(b, size, size), out)
    out = torch.where(k == 3, checker.expand(b, size, size), out)
    return out[:, None]
