"""The parts of the diffusion transformer (:mod:`vats_diffusion.dit`): sinusoidal timestep
and 2D sin-cos position embeddings, the conditioning MLP, and the adaLN block.

Timesteps (DDPM, Ho et al., 2020; the numerics of diffusers' ``Timesteps``): ``t`` is
embedded as ``[sin(t·f_i), cos(t·f_i)]`` over ``half = channels / 2`` frequencies
``f_i = exp(-ln(max_period) · i / (half - freq_shift))``, optionally flipped to
``[cos, sin]``. DiT uses ``flip_sin_to_cos=True, freq_shift=1``; PixArt ``True, 0``.

2D sin-cos positions (MAE / DiT, as diffusers' ``get_2d_sincos_pos_embed``): of the D
channels, the first half encode a patch's column and the second half its row, each as
``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(-k / (D/4))``. On a grid other than
the base grid (the model's default latent size), positions are rescaled so that each axis
spans the base grid's range: ``pos_r = r · base_h / gh / interpolation_scale`` (diffusers'
``base_size``; PixArt sets ``interpolation_scale``).

The block (DiT, Peebles & Xie, 2023, arXiv:2212.09748; PixArt-α, Chen et al., 2023,
arXiv:2310.00426) modulates non-affine LayerNorms with six per-sample vectors
(shift, scale, gate for attention and for the MLP)::

    x = x + gate_msa · attn(LN(x) · (1 + scale_msa) + shift_msa)
    x = x + cross_attn(LN(x) or x, text)          # optional, text conditioning
    x = x + gate_mlp · mlp(LN(x) · (1 + scale_mlp) + shift_mlp)

adaLN-Zero (DiT) computes the six vectors in each block with its own linear layer from
``silu(c)``; adaLN-single (PixArt) computes them once for all blocks and each block adds
its own learned ``(6, D)`` table.

Shapes: B batch, N tokens (patches), D model width, S text tokens, Dc context width.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention import Attention, AttentionConfig
from vats_core.block import check_attention_pair
from vats_core.config import Config, check, check_positive
from vats_core.mlp import MLPConfig, build_mlp

__all__ = [
    "AdaLNMode",
    "ConditionMLP",
    "DiTBlock",
    "DiTBlockConfig",
    "gated_residual",
    "modulate",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


class AdaLNMode(enum.StrEnum):
    """How the blocks get their shift / scale / gate vectors from the conditioning ``c``."""

    ZERO = "zero"  # DiT adaLN-Zero: a Linear(D, 6D) of silu(c) in every block
    SINGLE = "single"  # PixArt adaLN-single: one shared Linear(D, 6D) + a (6, D) table per block


def timestep_embedding(
    timestep: Tensor,
    channels: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

    Computed in float32 whatever the input dtype (as diffusers does), so imported models
    see the same features.

    Args:
        timestep: ``(B,)`` ints or floats.
        channels: output width (even).
        flip_sin_to_cos: order ``[cos, sin]`` instead of ``[sin, cos]``.
        freq_shift: diffusers' ``downscale_freq_shift``: ``f_i = max_period^(-i / (half - shift))``.
        max_period: the slowest period.

    Returns:
        ``(B, channels)`` float32.
    """
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timestep.device
    )
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = timestep.float()[:, None] * freqs[None]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[sin(pos·ω), cos(pos·ω)]``, ``ω_k = 10000^(-k / (dim/2))``: ``(M,) -> (M, dim)``."""
    omega = torch.arange(dim // 2, dtype=pos.dtype, device=pos.device) / (dim / 2.0)
    out = pos[:, None] * (1.0 / 10000**omega)[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)


def sincos_pos_embed_2d(
    dim: int,
    grid: tuple[int, int],
    *,
    base_grid: tuple[int, int] | None = None,
    interpolation_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Fixed 2D sin-cos positions of a ``gh × gw`` patch grid, row-major (diffusers' numerics).

    Args:
        dim: D, a multiple of 4 (columns get the first D/2 channels, rows the last D/2).
        grid: ``(gh, gw)``.
        base_grid: the grid whose positions are the integers (divided by
            ``interpolation_scale``); other grids are stretched to span the same range.
            None = ``grid``.
        interpolation_scale: divides every position (PixArt's ``interpolation_scale``).
        device: where to build it.

    Returns:
        ``(gh·gw, D)`` float64 (float32 on MPS, which has no float64); token ``r·gw + c``
        is patch ``(r, c)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim={dim} is invalid: expected a multiple of 4")
    gh, gw = grid
    bh, bw = grid if base_grid is None else base_grid
    # Positions in float32, the angles in float64: the order diffusers computes them in.
    rows = torch.arange(gh, dtype=torch.float32, device=device) / (gh / bh) / interpolation_scale
    cols = torch.arange(gw, dtype=torch.float32, device=device) / (gw / bw) / interpolation_scale
    wide = torch.float32 if rows.device.type == "mps" else torch.float64
    row_emb = _sincos_1d(dim // 2, rows.to(wide))  # (gh, D/2)
    col_emb = _sincos_1d(dim // 2, cols.to(wide))  # (gw, D/2)
    table = torch.cat(
        [col_emb[None].expand(gh, gw, dim // 2), row_emb[:, None].expand(gh, gw, dim // 2)],
        dim=-1,
    )  # (gh, gw, D)
    return table.reshape(gh * gw, dim)


class ConditionMLP(nn.Module):
    """``linear_2(silu(linear_1(x)))``: the timestep and pooled-text embedders (diffusers'
    ``TimestepEmbedding`` layout)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, D)``."""
        return self.linear_2(F.silu(self.linear_1(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x · (1 + scale) + shift`` per sample: ``x (B, N, D)``, ``shift, scale (B, D)``.

    One ``addcmul`` writes the ``(B, N, D)`` result in a single pass; ``x * (1 + scale) +
    shift`` would materialise the product first and read it back, and on CPU these
    memory-bound passes over every token are a visible share of a DiT forward. ``1 +
    scale`` is only ``(B, 1, D)``.
    """
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate · y`` per sample, the adaLN residual: ``x, y (B, N, D)``, ``gate (B, D)``.

    One ``addcmul`` pass instead of a ``gate · y`` temporary and a second pass to add it
    (see :func:`modulate`).
    """
    return torch.addcmul(x, gate[:, None], y)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTBlockConfig(Config):
    """One adaLN transformer block of :class:`~vats_diffusion.dit.DiT`."""

    attention: AttentionConfig  # self-attention over the patches (context_dim None)
    cross_attention: AttentionConfig | None = None  # to the text states, or no text
    mlp: MLPConfig  # the feed-forward
    adaln: AdaLNMode = AdaLNMode.ZERO
    norm_eps: float = 1e-6  # the LayerNorms before attention and cross-attention
    mlp_norm_eps: float | None = None  # the LayerNorm before the MLP; None = norm_eps
    cross_attn_norm: bool = True  # LayerNorm before cross-attention (PixArt has none)

    def __post_init__(self) -> None:
        dim = self.attention.dim
        check_attention_pair(self, self.attention, self.cross_attention)
        check(
            self.mlp.dim == dim and self.mlp.output_dim == dim,
            self,
            "mlp",
            f"dim={self.mlp.dim}, out_dim={self.mlp.out_dim}",
            f"dim={dim} and out_dim None or {dim}",
        )
        check_positive(self, "norm_eps", "mlp_norm_eps")


class DiTBlock(nn.Module):
    """Self-attention, optional cross-attention and an MLP, modulated by adaLN (module
    docstring). Modules: ``attn``, ``cross_attn``, ``ffn``, and ``adaln`` (adaLN-Zero,
    ``Linear(D, 6D)``) or ``scale_shift_table`` (adaLN-single, ``(6, D)``)."""

    def __init__(self, config: DiTBlockConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.attention.dim
        self.dim = dim
        self.mlp_norm_eps = config.norm_eps if config.mlp_norm_eps is None else config.mlp_norm_eps
        self.attn = Attention(config.attention)
        self.cross_attn = (
            Attention(config.cross_attention) if config.cross_attention is not None else None
        )
        self.ffn = build_mlp(config.mlp)
        self.adaln: nn.Linear | None = None
        self.scale_shift_table: nn.Parameter | None = None
        if config.adaln is AdaLNMode.ZERO:
            self.adaln = nn.Linear(dim, 6 * dim)
        else:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def modulation(self, cond: Tensor) -> Tensor:
        """The six vectors ``(B, 6, D)`` (shift, scale, gate for attention, then for the MLP)
        from ``cond``: ``silu(c)`` ``(B, D)`` for adaLN-Zero, the shared projection
        ``(B, 6D)`` for adaLN-single."""
        b = cond.shape[0]
        if self.adaln is not None:
            return self.adaln(cond).view(b, 6, self.dim)
        assert self.scale_shift_table is not None
        return cond.view(b, 6, self.dim) + self.scale_shift_table

    def _norm(self, x: Tensor, eps: float) -> Tensor:
        return F.layer_norm(x, (self.dim,), eps=eps)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        context_gate: Tensor | None = None,
    ) -> Tensor:
        """Run the block.

        Args:
            x: ``(B, N, D)`` patch tokens.
            cond: see :meth:`modulation`.
            rope: ``(cos, sin)`` for self-attention, each ``(1, 1, N, Dh)``.
            context: ``(B, S, Dc)`` text states; None skips cross-attention (no text).
            context_mask: ``(B, S)`` bool, True = real text token.
            context_gate: ``(B, 1, 1)``, 0 for rows without any real text token (their
                cross-attention then adds nothing, not its output bias), else 1.

        Returns:
            ``(B, N, D)``.
        """
        cfg = self.config
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(
            cond
        ).unbind(1)  # each (B, D)
        h = modulate(self._norm(x, cfg.norm_eps), shift_msa, scale_msa)
        x = gated_residual(x, gate_msa, self.attn(h, rope=rope))
        if self.cross_attn is not None and context is not None:
            h = self._norm(x, cfg.norm_eps) if cfg.cross_attn_norm else x
            h = self.cross_attn(h, context=context, context_mask=context_mask)
            x = x + h if context_gate is None else torch.addcmul(x, h, context_gate)
        h = modulate(self._norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.ffn(h))

    def extra_repr(self) -> str:
        cfg = self.config
        return f"adaln={cfg.adaln.value}, cross_attn_norm={cfg.cross_attn_norm}"
