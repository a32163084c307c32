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

The conditioning may also be per group of tokens, ``c (B, G, D)``: a video's frames, each
at its own noise level (Diffusion Forcing, Chen et al., 2024, arXiv:2407.01392). The six
vectors are then computed per group, ``(B, G, 6, D)``, and each token is modulated by its
group's (:class:`CondLayout` says which tokens a group owns), broadcast onto the tokens
rather than computed per token.

Shapes: B batch, N tokens (patches), G conditioning groups (N = G·n), D model width, S text
tokens, Dc context width.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention import Attention, AttentionBackend, AttentionConfig
from vats_core.block import check_attention_pair
from vats_core.config import Config, check, check_positive
from vats_core.mlp import Activation, GeluMLP, MLPConfig, build_mlp

__all__ = [
    "FINAL_NORM_EPS",
    "AdaLNMode",
    "CondLayout",
    "ConditionMLP",
    "DiTBlock",
    "DiTBlockConfig",
    "check_conditioning_fields",
    "check_mask",
    "check_text_inputs",
    "check_timestep",
    "context_width",
    "dit_attention_config",
    "dit_block_config",
    "embed_text",
    "embed_timestep",
    "final_layer",
    "final_modulation",
    "final_shift_scale",
    "gated_residual",
    "init_dit_weights",
    "latent_size",
    "modulate",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "text_embedders",
    "text_projection",
    "timestep_embedding",
]


class CondLayout(enum.StrEnum):
    """Which of N = G·n tokens a per-group conditioning ``(B, G, D)`` modulates."""

    OUTER = "outer"  # tokens "(g n)": group g owns tokens g·n .. g·n + n - 1 (frame-major)
    INNER = "inner"  # tokens "(n g)": token i belongs to group i mod G (position-major)


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


def _grouped(x: Tensor, groups: int, layout: CondLayout) -> Tensor:
    """``x (B, N, D)`` viewed as ``(B, G, n, D)`` (outer) or ``(B, n, G, D)`` (inner)."""
    b, tokens, d = x.shape
    if CondLayout(layout) is CondLayout.OUTER:
        return x.reshape(b, groups, tokens // groups, d)
    return x.reshape(b, tokens // groups, groups, d)


def _lifted(v: Tensor, layout: CondLayout) -> Tensor:
    """A group's vector ``v (B, G, D)`` broadcast over its tokens in :func:`_grouped`'s view."""
    return v[:, :, None] if CondLayout(layout) is CondLayout.OUTER else v[:, None]


def modulate(x: Tensor, shift: Tensor, scale: Tensor, layout: CondLayout | None = None) -> Tensor:
    """``x · (1 + scale) + shift`` per sample: ``x (B, N, D)``, ``shift, scale (B, D)``; or
    per group of tokens, ``shift, scale (B, G, D)`` laid out on the tokens by ``layout``.

    One ``addcmul`` writes the ``(B, N, D)`` result in a single pass; ``x * (1 + scale) +
    shift`` would materialise the product first and read it back, and on CPU these
    memory-bound passes over every token are a visible share of a DiT forward. ``1 +
    scale`` is only ``(B, 1, D)`` (``(B, G, D)``): per group, the vectors broadcast onto a
    view of the tokens, never copied per token.
    """
    if layout is None:
        return torch.addcmul(shift[:, None], x, 1 + scale[:, None])
    grouped = _grouped(x, shift.shape[1], layout)
    out = torch.addcmul(_lifted(shift, layout), grouped, 1 + _lifted(scale, layout))
    return out.reshape(x.shape)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, layout: CondLayout | None = None) -> Tensor:
    """``x + gate · y`` per sample, the adaLN residual: ``x, y (B, N, D)``, ``gate (B, D)``;
    or per group of tokens, ``gate (B, G, D)`` laid out on the tokens by ``layout``.

    One ``addcmul`` pass instead of a ``gate · y`` temporary and a second pass to add it
    (see :func:`modulate`).
    """
    if layout is None:
        return torch.addcmul(x, gate[:, None], y)
    g = gate.shape[1]
    out = torch.addcmul(_grouped(x, g, layout), _lifted(gate, layout), _grouped(y, g, layout))
    return out.reshape(x.shape)


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
        ``(B, 6D)`` for adaLN-single; per group, ``(B, G, 6, D)`` from ``(B, G, D)`` or
        ``(B, G, 6D)``."""
        lead = cond.shape[:-1]  # (B,) or (B, G)
        if self.adaln is not None:
            return self.adaln(cond).view(*lead, 6, self.dim)
        assert self.scale_shift_table is not None
        return cond.view(*lead, 6, self.dim) + self.scale_shift_table

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
        key_padding_mask: Tensor | None = None,
        attn_len: int | None = None,
        cond_layout: CondLayout | None = None,
    ) -> Tensor:
        """Run the block.

        Args:
            x: ``(B, N, D)`` patch tokens.
            cond: see :meth:`modulation`: per sample, or with ``cond_layout`` per group of
                tokens (``(B, G, D)``, or ``(B, G, 6D)`` for adaLN-single).
            rope: ``(cos, sin)`` for self-attention, each ``(1, 1, N, Dh)``.
            context: ``(B, S, Dc)`` text states; None skips cross-attention (no text).
            context_mask: ``(B, S)`` bool, True = real text token.
            context_gate: ``(B, 1, 1)``, 0 for rows without any real text token (their
                cross-attention then adds nothing, not its output bias), else 1.
            key_padding_mask: ``(B, N)`` bool, True = real token: padding tokens are left
                out of self-attention as keys, so they change no real token's output.
            attn_len: self-attention runs within each run of ``attn_len`` consecutive
                tokens, as ``N / attn_len`` independent sequences (a video's frames, or
                one patch position's frames: :mod:`~vats_diffusion.video_dit`); ``rope``
                then covers one run (``(1, 1, attn_len, Dh)``). None = over all N tokens.
                Cross-attention, the MLP and the modulation act per token, so they need
                no grouping.
            cond_layout: None: ``cond`` is per sample. Else ``cond`` is per group of the
                N = G·n tokens and this says which tokens a group owns: ``outer``, runs of
                n consecutive tokens ("(g n)": a video's frames, frame-major); ``inner``,
                every G-th token ("(n g)": the frames of each patch position).

        Returns:
            ``(B, N, D)``.
        """
        cfg = self.config
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(
            cond
        ).unbind(-2)  # each (B, D), or (B, G, D) per group
        h = modulate(self._norm(x, cfg.norm_eps), shift_msa, scale_msa, cond_layout)
        attn = self._self_attention(h, rope, key_padding_mask, attn_len)
        x = gated_residual(x, gate_msa, attn, cond_layout)
        if self.cross_attn is not None and context is not None:
            h = self._norm(x, cfg.norm_eps) if cfg.cross_attn_norm else x
            h = self.cross_attn(h, context=context, context_mask=context_mask)
            x = x + h if context_gate is None else torch.addcmul(x, h, context_gate)
        h = modulate(self._norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp, cond_layout)
        return gated_residual(x, gate_mlp, self.ffn(h), cond_layout)

    def _self_attention(
        self,
        h: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        key_padding_mask: Tensor | None,
        attn_len: int | None,
    ) -> Tensor:
        """``attn`` over all of ``h`` ``(B, N, D)``, or over each run of ``attn_len`` tokens."""
        if attn_len is None:
            return self.attn(h, rope=rope, key_padding_mask=key_padding_mask)
        b, n, d = h.shape
        mask = None if key_padding_mask is None else key_padding_mask.reshape(-1, attn_len)
        out = self.attn(h.reshape(-1, attn_len, d), rope=rope, key_padding_mask=mask)
        return out.view(b, n, d)  # from (B·N / attn_len, attn_len, D)

    def extra_repr(self) -> str:
        cfg = self.config
        return f"adaln={cfg.adaln.value}, cross_attn_norm={cfg.cross_attn_norm}"


# ---------------------------------------------------------------------- shared by the DiTs
# The image, video and audio DiTs (dit.py, video_dit.py, audio_dit.py) name their transformer and conditioning
# fields alike (DiTConfig's names); the helpers below read those fields from any such
# config, as vats-core's check_head_fields does, so the rules and the numerics live once.

FINAL_NORM_EPS = 1e-6  # DiT's and PixArt's final LayerNorm


def sincos_pos_embed_1d(
    dim: int, length: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Fixed 1D sin-cos positions of tokens ``0 .. length - 1``: ``[sin(pos·ω), cos(pos·ω)]``
    with ``ω_k = 10000^(-k / (D/2))`` (one axis of :func:`sincos_pos_embed_2d`).

    Returns:
        ``(length, D)`` float64 (float32 on MPS, which has no float64).
    """
    if dim % 2 != 0:
        raise ValueError(f"sincos_pos_embed_1d: dim={dim} is invalid: expected an even int")
    pos = torch.arange(length, dtype=torch.float32, device=device)
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    return _sincos_1d(dim, pos.to(wide))


def check_conditioning_fields(config: Any) -> None:
    """The timestep and text rules of a DiT config (``timestep_channels``,
    ``timestep_freq_shift``, ``text_dim``, ``text_dropout``): ValueError naming the field."""
    check(
        config.text_dropout == 0 or config.text_dim is not None,
        config,
        "text_dropout",
        config.text_dropout,
        "0 when text_dim is None (no text to drop)",
    )
    half = config.timestep_channels // 2
    check(
        config.timestep_channels >= 2 and config.timestep_channels % 2 == 0,
        config,
        "timestep_channels",
        config.timestep_channels,
        "an even int >= 2",
    )
    check(
        half - config.timestep_freq_shift > 0,
        config,
        "timestep_freq_shift",
        config.timestep_freq_shift,
        f"a number < timestep_channels / 2 = {half}",
    )


def context_width(config: Any) -> int | None:
    """Width of the states cross-attention reads: D if ``text_proj``, else ``text_dim``;
    None without text."""
    if config.text_dim is None:
        return None
    return config.dim if config.text_proj else config.text_dim


def dit_attention_config(config: Any) -> AttentionConfig:
    """The self-attention of a DiT config's blocks (its ``dim``, head, bias, ``qk_norm``,
    ``window`` and ``attention_backend`` fields)."""
    return AttentionConfig(
        dim=config.dim,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        qkv_bias=config.qkv_bias,
        out_bias=config.out_bias,
        qk_norm=config.qk_norm,
        window=config.window,
        backend=config.attention_backend,
    )


def dit_block_config(config: Any, adaln: AdaLNMode) -> DiTBlockConfig:
    """The block every layer of a DiT config is built from: its self-attention, a
    cross-attention to the text (``text_dim`` set), the MLP (``mlp_hidden_dim``,
    ``mlp_activation``) and the norms (``norm_eps``, ``mlp_norm_eps``, ``cross_attn_norm``)."""
    attn = dit_attention_config(config)
    context_dim = context_width(config)
    cross = None
    if context_dim is not None:
        # The local backend serves sliding windows only: cross-attention then uses auto.
        backend = attn.backend
        if backend is AttentionBackend.LOCAL:
            backend = AttentionBackend.AUTO
        cross = attn.replace(window=None, context_dim=context_dim, backend=backend)
    hidden = 4 * config.dim if config.mlp_hidden_dim is None else config.mlp_hidden_dim
    mlp = MLPConfig(dim=config.dim, hidden_dim=hidden, activation=config.mlp_activation, bias=True)
    return DiTBlockConfig(
        attention=attn,
        cross_attention=cross,
        mlp=mlp,
        adaln=adaln,
        norm_eps=config.norm_eps,
        mlp_norm_eps=config.mlp_norm_eps,
        cross_attn_norm=config.cross_attn_norm,
    )


def text_projection(text_dim: int, dim: int) -> GeluMLP:
    """PixArt's caption projection ``Dt -> D -> D`` (tanh GELU between)."""
    return GeluMLP(
        MLPConfig(
            dim=text_dim, hidden_dim=dim, out_dim=dim, activation=Activation.GELU_TANH, bias=True
        )
    )


def check_timestep(
    owner: str,
    timestep: Tensor,
    batch: int,
    *,
    name: str = "timestep",
    frames: int | None = None,
    tubelet: int = 1,
) -> None:
    """ValueError unless ``timestep`` is a real ``(B,)`` tensor or a scalar tensor (any
    per-sample number: ``name`` is the argument the error names); with ``frames`` (a
    video's T), also a real ``(B, T)`` tensor, one per frame, equal within each run of
    ``tubelet`` frames (the frames of one token)."""
    per_frame = frames is not None and isinstance(timestep, Tensor) and timestep.ndim == 2
    if (
        not isinstance(timestep, Tensor)
        or (timestep.ndim > 1 and not per_frame)
        or (timestep.ndim == 1 and timestep.shape[0] != batch)
        or (per_frame and tuple(timestep.shape) != (batch, frames))
        or timestep.dtype == torch.bool
        or timestep.is_complex()
    ):
        got = (
            f"{timestep.dtype} {tuple(timestep.shape)}"
            if isinstance(timestep, Tensor)
            else type(timestep).__name__
        )
        shapes = f"(B,) = ({batch},) tensor"
        if frames is not None:
            shapes += f", a (B, T) = ({batch}, {frames}) tensor (one per frame)"
        raise ValueError(f"{owner}: {name} must be a real {shapes} or a scalar, got {got}")
    if per_frame and tubelet > 1:
        runs = timestep.reshape(batch, -1, tubelet)  # (B, T / tubelet, tubelet)
        unequal = (runs != runs[..., :1]).any(-1)  # (B, T / tubelet)
        if unequal.any():
            row, k = (int(i) for i in unequal.nonzero()[0])
            raise ValueError(
                f"{owner}: {name} (B, T) must be equal within each tubelet of patch_frames="
                f"{tubelet} frames (one token holds them all), got {runs[row, k].tolist()} "
                f"for frames {k * tubelet}..{(k + 1) * tubelet - 1} of row {row}"
            )


def check_text_inputs(
    owner: str,
    states: Tensor | None,
    mask: Tensor | None,
    batch: int,
    text_dim: int | None,
    keep: Tensor | None = None,
) -> None:
    """ValueError unless ``states`` is None (and ``mask`` and ``keep`` too) or a floating
    ``(B, S >= 1, text_dim)`` tensor with ``mask`` None or a bool ``(B, S)`` tensor and
    ``keep`` (``text_keep``) None or a bool ``(B,)`` tensor."""
    if states is None:
        for name, given in (("text_mask", mask), ("text_keep", keep)):
            if given is not None:
                raise ValueError(f"{owner}: {name} given without text_states")
        return
    if keep is not None and (
        not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (batch,)
    ):
        got = (
            f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        )
        raise ValueError(
            f"{owner}: text_keep must be a torch.bool (B,) = ({batch},) tensor (True = the row "
            f"keeps its text), got {got}"
        )
    if text_dim is None:
        raise ValueError(f"{owner}: text_states given, but the model has no text (text_dim=None)")
    if (
        not isinstance(states, Tensor)
        or states.ndim != 3
        or not states.is_floating_point()
        or states.shape[0] != batch
        or states.shape[1] == 0
        or states.shape[2] != text_dim
    ):
        got = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
        raise ValueError(
            f"{owner}: text_states must be a floating (B, S, text_dim) = ({batch}, S >= 1, "
            f"{text_dim}) tensor, got {got}"
        )
    if mask is not None:
        check_mask(owner, "text_mask", mask, tuple(states.shape[:2]))


def check_mask(
    owner: str,
    name: str,
    mask: Tensor,
    shape: tuple[int, ...],
    *,
    axes: str = "(B, S)",
    real: str = "token",
    of: str = "text_states",
) -> None:
    """ValueError unless ``mask`` is a torch.bool tensor of ``shape`` (the ``axes`` of
    ``of``; True = real ``real``)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{owner}: {name} must be a torch.bool tensor (True = real {real}), got {got}"
        )
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(mask.shape)}, expected {axes} = {shape} of {of}"
        )


def embed_text(
    states: Tensor,
    mask: Tensor | None,
    *,
    text_proj: nn.Module | None,
    pooled_text_embed: nn.Module | None,
    text_dropout: float,
    training: bool,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Project and pool the text (the masked-text rules of :mod:`vats_diffusion.dit`).

    Padding positions are zeroed before any product (they may hold anything, even NaN); in
    training, ``text_dropout`` turns whole rows into the null text condition (no real token),
    drawn here from the global RNG unless ``keep`` gives the rows that keep their text.

    Args:
        states: ``(B, S, Dt)``.
        mask: ``(B, S)`` bool, True = real token; None = all real.
        text_proj: ``Dt -> Dc``, or None to read the states as they are.
        pooled_text_embed: ``Dc -> D`` of the masked mean, or None for no pooled text.
        text_dropout: the probability a row is dropped, in training.
        training: the model's mode.
        keep: ``(B,)`` bool, True = the row keeps its text, in any mode: the rows to drop,
            given instead of drawn (a data-parallel trainer draws them for the global batch
            and gives each rank its rows). None: drawn in training when ``text_dropout > 0``.

    Returns:
        ``(context (B, S, Dc), context_mask (B, S) | None, gate (B, 1, 1) | None,
        pooled (B, D) | None)``: gate and pooled are 0 for rows with no real token.
    """
    b = states.shape[0]
    if keep is None and training and text_dropout > 0:
        keep = torch.rand(b, device=states.device) >= text_dropout  # (B,)
    if keep is not None:
        keep = keep.to(states.device)
        mask = keep[:, None] if mask is None else mask & keep[:, None]
        mask = mask.expand(b, states.shape[1])
    if mask is not None:
        states = torch.where(mask[..., None], states, 0.0)
    context = text_proj(states) if text_proj is not None else states  # (B, S, Dc)
    gate, pooled = None, None
    if mask is not None:
        has_text = mask.any(dim=1)  # (B,)
        gate = has_text[:, None, None].to(context.dtype)
    if pooled_text_embed is not None:
        if mask is None:
            mean = context.mean(dim=1)  # (B, Dc)
        else:
            weights = mask[..., None].to(context.dtype)  # (B, S, 1)
            total = (context * weights).sum(dim=1)
            mean = total / weights.sum(dim=1).clamp(min=1.0)
        pooled = pooled_text_embed(mean)  # (B, D)
        if gate is not None:
            pooled = pooled * gate[:, :, 0]
    return context, mask, gate, pooled


def embed_timestep(
    config: Any, time_embed: nn.Module, timestep: Tensor, batch: int, dtype: torch.dtype
) -> Tensor:
    """``time_embed(sinusoid(t))`` ``(B, D)`` with the config's ``timestep_channels``,
    ``timestep_flip_sin_to_cos`` and ``timestep_freq_shift``; a scalar ``t`` serves the
    whole batch."""
    t = timestep.expand(batch) if timestep.ndim == 0 else timestep
    freqs = timestep_embedding(
        t,
        config.timestep_channels,
        flip_sin_to_cos=config.timestep_flip_sin_to_cos,
        freq_shift=config.timestep_freq_shift,
    )  # (B, timestep_channels) float32
    return time_embed(freqs.to(dtype))


def final_layer(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    proj_out: nn.Module,
    layout: CondLayout | None = None,
) -> Tensor:
    """DiT's final layer: a non-affine LayerNorm (eps 1e-6), adaLN modulation, the output
    projection: ``(B, N, D) -> (B, N, proj_out's width)``. ``shift, scale`` ``(B, D)``, or
    per group ``(B, G, D)`` laid out on the tokens by ``layout`` (:func:`modulate`)."""
    x = F.layer_norm(x, (x.shape[-1],), eps=FINAL_NORM_EPS)
    return proj_out(modulate(x, shift, scale, layout))


def latent_size(config: Any) -> tuple[int, int]:
    """``(h, w)`` of a config's ``sample_size``: an int S (square) or a pair ``(h, w)``."""
    size = config.sample_size
    if isinstance(size, tuple):
        if len(size) != 2:
            raise ValueError(
                f"{type(config).__name__}.sample_size={size!r} is invalid: expected an int or "
                "(h, w)"
            )
        return size[0], size[1]
    return size, size


def text_embedders(config: Any) -> tuple[GeluMLP | None, ConditionMLP | None]:
    """``(text_proj, pooled_text_embed)`` of a DiT config: PixArt's caption projection
    ``Dt -> D`` (``text_proj``) and the MLP of the masked-mean text into the conditioning
    (``pooled_text``); each None where off, both without text (``text_dim`` None)."""
    if config.text_dim is None:
        return None, None
    d = config.dim
    proj = text_projection(config.text_dim, d) if config.text_proj else None
    pooled = ConditionMLP(context_width(config), d) if config.pooled_text else None  # type: ignore[arg-type]
    return proj, pooled


def final_modulation(dim: int, adaln: AdaLNMode) -> tuple[nn.Linear | None, nn.Parameter | None]:
    """``(final_adaln, final_scale_shift_table)``, the final layer's modulation: adaLN-Zero's
    ``Linear(D, 2D)`` of ``silu(c)`` (and no table), or adaLN-single's ``(2, D)`` table
    added to ``c`` (and no linear)."""
    if adaln is AdaLNMode.ZERO:
        return nn.Linear(dim, 2 * dim), None
    return None, nn.Parameter(torch.zeros(2, dim))


def final_shift_scale(
    c: Tensor, final_adaln: nn.Module | None, final_scale_shift_table: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The final layer's ``(shift, scale)``, each ``(B, D)``, from the conditioning ``c``
    ``(B, D)`` through :func:`final_modulation`'s pair (one of them None); per group, each
    ``(B, G, D)`` from ``c (B, G, D)``."""
    if final_adaln is not None:
        shift, scale = final_adaln(F.silu(c)).chunk(2, dim=-1)
        return shift, scale
    assert final_scale_shift_table is not None
    shift, scale = (final_scale_shift_table + c[..., None, :]).unbind(-2)
    return shift, scale


def init_dit_weights(
    model: nn.Module,
    *,
    patch_embed: nn.Module,
    embedders: Sequence[nn.Module | None],
    blocks: Iterable[nn.Module],
    final_adaln: nn.Linear | None,
    final_scale_shift_table: nn.Parameter | None,
    proj_out: nn.Linear,
) -> None:
    """DiT's init, for every DiT-style model: Xavier-uniform linears (zero biases) and patch
    embedding (its weight flattened per output channel), N(0, 0.02) embedders (the weights
    of their linears and embedding tables). adaLN-Zero zeroes every block's modulation
    linear and the final one, so each block starts as the identity; adaLN-single follows
    PixArt (N(0, 1/D) tables, zero cross-attention output projections). The output
    projection is zero in both: a fresh model predicts exactly zero.

    Args:
        model: every ``nn.Linear`` in it gets the Xavier init first.
        patch_embed: the Conv1d / Conv2d / Conv3d patch embedding.
        embedders: timestep, text, class ... embedders (None entries are skipped).
        blocks: the model's :class:`DiTBlock` s.
        final_adaln, final_scale_shift_table: the final layer's modulation (one is None).
        proj_out: the output projection.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = patch_embed.weight
    assert isinstance(weight, Tensor) and isinstance(patch_embed.bias, Tensor)
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(patch_embed.bias)
    for embedder in embedders:
        for module in [] if embedder is None else embedder.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
    for block in blocks:
        assert isinstance(block, DiTBlock)
        if block.adaln is not None:
            nn.init.zeros_(block.adaln.weight)
            nn.init.zeros_(block.adaln.bias)
        if block.scale_shift_table is not None:
            with torch.no_grad():
                block.scale_shift_table.normal_(std=block.dim**-0.5)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.o_proj.weight)
    if final_adaln is not None:
        nn.init.zeros_(final_adaln.weight)
        nn.init.zeros_(final_adaln.bias)
    if final_scale_shift_table is not None:
        with torch.no_grad():
            final_scale_shift_table.normal_(std=final_scale_shift_table.shape[-1] ** -0.5)
    nn.init.zeros_(proj_out.weight)
    nn.init.zeros_(proj_out.bias)
