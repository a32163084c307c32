"""Rotary position embeddings (RoPE) in 1D, 2D (axial, image patches) and 3D (video tubelets).

RoFormer (Su et al., 2021, arXiv:2104.09864) rotates each pair of query/key channels by an
angle proportional to the token position, so that ``q_m · k_n`` depends on ``m - n`` only.

Conventions (the HF transformers "rotate_half" layout, so that imported Llama / Mixtral /
Qwen2-MoE weights give HF's logits exactly):

* channel ``i`` is paired with channel ``i + Dh/2`` (first half / second half), not with
  its neighbour ``i + 1`` as in the original paper;
* ``cos`` and ``sin`` are ``cat([freqs, freqs], -1)`` with ``freqs = position * inv_freq``.

Multi-axis RoPE splits the ``Dh/2`` rotation *pairs* between the axes: axis ``a`` owns
``axes_dims[a] / 2`` consecutive frequencies, computed exactly as a 1D RoPE of head
dimension ``axes_dims[a]`` over that axis's coordinate. Every pair still rotates by a single
angle, so one :func:`apply_rotary` serves 1D, 2D and 3D alike, and scores depend only on the
per-axis offsets. The default split (:func:`rope_axes_dims`) gives each axis
``2 * (Dh // (2 * n_axes))`` channels and the remainder to the first axis (time in 3D):
``Dh=64`` in 2D is ``(32, 32)``, in 3D ``(24, 20, 20)``. Every axis dimension must be even.

Positions are integer tensors, so any sequence length or grid size works without a
precomputed table; only the inverse frequencies are cached, per (device, dtype).

Shapes: B batch, H heads, T tokens, Dh head dim, N number of position axes (1, 2 or 3).
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import Tensor, nn

from vats_core.config import Config, check, check_positive

__all__ = [
    "RopeConfig",
    "RopeScaling",
    "RotaryEmbedding",
    "apply_rotary",
    "grid_positions_2d",
    "grid_positions_3d",
    "rope_axes_dims",
    "rotate_half",
]


class RopeScaling(enum.StrEnum):
    """How a RoPE trained on short contexts is stretched to longer ones."""

    NONE = "none"
    LINEAR = "linear"  # positions / factor (position interpolation, Chen et al. 2023)
    NTK = "ntk"  # theta * factor ** (d / (d - 2)) ("NTK-aware" scaling, bloc97 2023)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig(Config):
    """Rotary embedding settings."""

    head_dim: int  # rotated channels per head (Dh); even
    theta: float = 10000.0  # base of the geometric frequency ladder
    n_axes: int = 1  # 1: sequence, 2: (h, w) image patches, 3: (t, h, w) tubelets
    axes_dims: tuple[int, ...] | None = None  # channels per axis (even, sum Dh); None: default
    scaling: RopeScaling = RopeScaling.NONE
    scaling_factor: float = 1.0  # context stretch for LINEAR / NTK; ignored for NONE

    def __post_init__(self) -> None:
        check(
            self.head_dim > 0 and self.head_dim % 2 == 0,
            self,
            "head_dim",
            self.head_dim,
            "a positive even integer (RoPE rotates channel pairs)",
        )
        check_positive(self, "theta")
        check(self.n_axes in (1, 2, 3), self, "n_axes", self.n_axes, "1, 2 or 3")
        check(
            self.scaling_factor >= 1.0,
            self,
            "scaling_factor",
            self.scaling_factor,
            "a number >= 1 (how many times longer the context becomes)",
        )
        if self.axes_dims is not None:
            check(
                len(self.axes_dims) == self.n_axes
                and all(d > 0 and d % 2 == 0 for d in self.axes_dims)
                and sum(self.axes_dims) == self.head_dim,
                self,
                "axes_dims",
                self.axes_dims,
                f"{self.n_axes} positive even integers summing to head_dim={self.head_dim}",
            )
        dims = self.resolved_axes_dims
        check(
            all(d > 0 and d % 2 == 0 for d in dims),
            self,
            "head_dim",
            self.head_dim,
            f"a head_dim whose default split over {self.n_axes} axes gives positive even "
            f"sizes (got {dims}); pass axes_dims explicitly",
        )
        if self.scaling is RopeScaling.NTK:
            # theta * factor ** (d / (d - 2)) is undefined for a 2-channel axis.
            check(
                all(d >= 4 for d in dims),
                self,
                "axes_dims",
                dims,
                "at least 4 channels per axis with NTK scaling",
            )

    @property
    def resolved_axes_dims(self) -> list[int]:
        """Channels per axis: ``axes_dims`` if given, else :func:`rope_axes_dims`."""
        if self.axes_dims is not None:
            return list(self.axes_dims)
        return rope_axes_dims(self.head_dim, self.n_axes)


def rope_axes_dims(head_dim: int, n_axes: int) -> list[int]:
    """Default split of ``head_dim`` channels between ``n_axes`` position axes.

    Each axis gets ``2 * (head_dim // (2 * n_axes))`` channels (even, so pairs never straddle
    axes); the remainder goes to the first axis. ``(64, 3) -> [24, 20, 20]``.
    """
    per_axis = 2 * (head_dim // (2 * n_axes))
    return [head_dim - per_axis * (n_axes - 1)] + [per_axis] * (n_axes - 1)


def grid_positions_2d(h: int, w: int, *, device: torch.device | str | None = None) -> Tensor:
    """Integer (row, col) coordinates of an ``h × w`` patch grid in row-major order.

    Returns:
        ``(h * w, 2)`` long tensor; token ``r * w + c`` has coordinates ``(r, c)``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"grid_positions_2d needs h >= 1 and w >= 1, got h={h}, w={w}")
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([rows, cols], dim=-1).reshape(h * w, 2)


def grid_positions_3d(
    t: int, h: int, w: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Integer (time, row, col) coordinates of a ``t × h × w`` tubelet grid, row-major.

    Returns:
        ``(t * h * w, 3)`` long tensor; token ``(i * h + r) * w + c`` is at ``(i, r, c)``.
    """
    if t < 1 or h < 1 or w < 1:
        raise ValueError(f"grid_positions_3d needs t, h, w >= 1, got t={t}, h={h}, w={w}")
    grid = torch.meshgrid(
        torch.arange(t, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(t * h * w, 3)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Angles need fp32 at least: in bf16, position 1000 * inv_freq is off by several radians.
    # float64 stays float64 so reference tests are exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


class RotaryEmbedding(nn.Module):
    """Turns integer positions into the ``(cos, sin)`` pair that :func:`apply_rotary` uses.

    Computed once per forward by the model and shared by every attention layer. Holds no
    parameters and no state-dict entries: the inverse frequencies are derived from the config
    and cached per (device, compute dtype) in a plain dict, so ``model.to(bfloat16)`` cannot
    degrade them.
    """

    def __init__(self, config: RopeConfig) -> None:
        super().__init__()
        self.config = config
        self.axes_dims = config.resolved_axes_dims
        self._inv_freq_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Inverse frequencies of all axes, concatenated: ``(Dh/2,)``, cached per key.

        Axis ``a`` contributes ``theta_a ** (-2i / d_a)`` for ``i < d_a / 2`` where ``d_a`` is
        its channel count and ``theta_a`` is ``theta`` (NTK-scaled if configured).
        """
        dtype = _compute_dtype(dtype)
        key = (torch.device(device), dtype)
        if torch.compiler.is_compiling():
            # A compiled graph computes the few constants itself: filling the cache inside
            # it would fail the graph's guard on the cache and compile it a second time.
            return self._compute_inv_freq(*key)
        cached = self._inv_freq_cache.get(key)
        if cached is None:
            cached = self._inv_freq_cache[key] = self._compute_inv_freq(*key)
        return cached

    def _compute_inv_freq(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        cfg = self.config
        parts = []
        for d in self.axes_dims:
            theta = cfg.theta
            if cfg.scaling is RopeScaling.NTK:
                theta = theta * cfg.scaling_factor ** (d / (d - 2))
            exponent = torch.arange(0, d, 2, dtype=torch.int64).to(dtype) / d  # (d/2,)
            parts.append(1.0 / (theta**exponent))
        return torch.cat(parts).to(device)  # (Dh/2,)

    def forward(
        self, positions: Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Cos/sin tables for the given positions.

        Args:
            positions: integer tensor. 1D RoPE: ``(T,)`` shared by the batch or ``(B, T)`` per
                row (left-padded batches). 2D/3D: ``(T, N)`` or ``(B, T, N)`` with the
                coordinates along the last axis (see :func:`grid_positions_2d`).
            dtype: dtype of the returned tables (the activations' dtype).

        Returns:
            ``(cos, sin)``, each ``(B or 1, 1, T, Dh)``, ready to broadcast against
            ``(B, H, T, Dh)`` queries and keys.
        """
        n_axes = self.config.n_axes
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"RoPE positions must be an integer tensor, got {positions.dtype}")
        if n_axes == 1:
            if positions.ndim not in (1, 2):
                raise ValueError(
                    f"1D RoPE positions must be (T,) or (B, T), got shape {tuple(positions.shape)}"
                )
            positions = positions.unsqueeze(-1)  # (..., T, 1)
        elif positions.ndim not in (2, 3) or positions.shape[-1] != n_axes:
            raise ValueError(
                f"{n_axes}D RoPE positions must be (T, {n_axes}) or (B, T, {n_axes}), "
                f"got shape {tuple(positions.shape)}"
            )
        inv_freq = self.inv_freq(positions.device, dtype)  # (Dh/2,)
        pos = positions.to(inv_freq.dtype)
        if self.config.scaling is RopeScaling.LINEAR:
            pos = pos / self.config.scaling_factor
        # Each axis's coordinate multiplies that axis's block of frequencies.
        pos = torch.cat(
            [
                pos[..., a : a + 1].expand(*pos.shape[:-1], d // 2)
                for a, d in enumerate(self.axes_dims)
            ],
            dim=-1,
        )  # (..., T, Dh/2)
        freqs = pos * inv_freq  # (..., T, Dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, Dh)
        if emb.ndim == 2:
            emb = emb.unsqueeze(0)  # (1, T, Dh)
        emb = emb.unsqueeze(1)  # (B or 1, 1, T, Dh)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"head_dim={cfg.head_dim}, axes_dims={self.axes_dims}, theta={cfg.theta}, "
            f"scaling={cfg.scaling.value}, factor={cfg.scaling_factor}"
        )


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys by their positions' angles.

    Args:
        x: ``(B, H, T, Dh)`` queries or keys.
        cos: ``(B or 1, 1, T, Dh)`` (as returned by :class:`RotaryEmbedding`) or ``(T, Dh)``.
        sin: same shape as ``cos``.

    Returns:
        ``(B, H, T, Dh)``, in ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rotary expects x of shape (B, H, T, Dh), got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"RoPE cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    b, _, t, dh = x.shape
    ok = (cos.ndim == 2 and tuple(cos.shape) == (t, dh)) or (
        cos.ndim == 4 and cos.shape[0] in (1, b) and cos.shape[1] == 1 and cos.shape[2:] == (t, dh)
    )
    if not ok:
        raise ValueError(
            f"RoPE cos/sin of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}: "
            f"expected (T, Dh) = ({t}, {dh}) or (B or 1, 1, T, Dh) = ({b} or 1, 1, {t}, {dh})"
        )
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
