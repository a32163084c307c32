"""The pre-norm transformer blocks every vats decoder and encoder is built from.

:class:`TransformerBlock`, over one sequence of tokens::

    x = x + attn(norm(x))                       # self-attention (RoPE, cache, window, padding)
    x = x + cross_attn(norm(x), context)        # optional: text / image conditioning
    x = x + ffn(norm(x))                        # SwiGLU / GELU MLP, or a Mixture of Experts

:class:`FactorizedBlock`, over a video's ``(T, N)`` grid of tokens (frames × tokens per
frame), with divided space / time attention (TimeSformer, Bertasius et al., 2021,
arXiv:2102.05095; ViViT's factorised encoder block, Arnab et al., 2021, arXiv:2103.15691)::

    x = x + spatial_attn(norm(x))               # within each frame: over its N tokens
    x = x + cross_attn(norm(x), context)        # optional: every token reads the context
    x = x + temporal_attn(norm(x))              # across frames: over one token position's T
    x = x + ffn(norm(x))

Pre-norm (Xiong et al., 2020, arXiv:2002.04745) as in GPT-2, Llama, Mixtral and ViT.

Shapes: B batch, T tokens (TransformerBlock) or frames (FactorizedBlock), N tokens per
frame, S context tokens, D model width, Dc context width, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention.layer import Attention, AttentionConfig
from vats_core.config import Config, check, check_positive
from vats_core.kv_cache import KVCache
from vats_core.mlp import MLPConfig, build_mlp
from vats_core.moe import MoE, MoEConfig, RouterStats
from vats_core.norms import NormType, build_norm

__all__ = ["BlockConfig", "FactorizedBlock", "TransformerBlock", "check_attention_pair"]


def check_attention_pair(
    owner: Config, attention: AttentionConfig, cross_attention: AttentionConfig | None
) -> None:
    """ValueError (naming ``owner``'s field) unless ``attention`` is a self-attention config
    and ``cross_attention`` is None or a cross-attention config of the same width: the
    fields of every block config that holds both."""
    check(
        attention.context_dim is None,
        owner,
        "attention",
        f"context_dim={attention.context_dim}",
        "a self-attention config (context_dim=None); put cross-attention in cross_attention",
    )
    if cross_attention is not None:
        check(
            cross_attention.context_dim is not None and cross_attention.dim == attention.dim,
            owner,
            "cross_attention",
            f"context_dim={cross_attention.context_dim}, dim={cross_attention.dim}",
            f"a cross-attention config (context_dim set) with dim={attention.dim}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig(Config):
    """One transformer block; exactly one of ``mlp`` / ``moe`` is set."""

    attention: AttentionConfig  # self-attention (context_dim must be None)
    cross_attention: AttentionConfig | None = None  # cross-attention (context_dim set), or none
    mlp: MLPConfig | None = None  # dense feed-forward
    moe: MoEConfig | None = None  # mixture-of-experts feed-forward
    norm: NormType = NormType.RMSNORM  # the pre-norms (QK-norm is always RMSNorm)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        dim = self.attention.dim
        check_attention_pair(self, self.attention, self.cross_attention)
        check(
            (self.mlp is None) != (self.moe is None),
            self,
            "moe" if self.moe is not None else "mlp",
            "both set" if self.moe is not None else None,
            "exactly one of mlp and moe",
        )
        ffn_dim = self.mlp.dim if self.mlp is not None else self.moe.dim  # type: ignore[union-attr]
        check(
            ffn_dim == dim,
            self,
            "mlp" if self.mlp is not None else "moe",
            f"dim={ffn_dim}",
            f"dim equal to attention.dim={dim}",
        )
        if self.mlp is not None:  # the residual adds the MLP's output to its input
            out = self.mlp.output_dim
            check(out == dim, self, "mlp", f"out_dim={out}", f"out_dim None or {dim}")
        check_positive(self, "norm_eps")


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, optional cross-attention, then an MLP or MoE."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.attention.dim
        self.attn_norm = build_norm(config.norm, dim, config.norm_eps)
        self.attn = Attention(config.attention)
        self.cross_attn_norm: nn.Module | None = None
        self.cross_attn: Attention | None = None
        if config.cross_attention is not None:
            self.cross_attn_norm = build_norm(config.norm, dim, config.norm_eps)
            self.cross_attn = Attention(config.cross_attention)
        self.ffn_norm = build_norm(config.norm, dim, config.norm_eps)
        self.ffn = MoE(config.moe) if config.moe is not None else build_mlp(config.mlp)  # type: ignore[arg-type]

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        out_tokens: int | None = None,
    ) -> tuple[Tensor, RouterStats | None]:
        """Run the block.

        Args:
            x: ``(B, T, D)``.
            rope: ``(cos, sin)``, each ``(B or 1, 1, T, Dh)``, for self-attention.
            key_padding_mask: ``(B, T)`` bool, True = real token (with a cache: the new
                chunk's); also excludes padding from the MoE's aux losses and counts.
            cache: the self-attention layer's KV cache.
            context: ``(B, S, Dc)``; required iff the block has cross-attention.
            context_mask: ``(B, S)`` bool, True = real context token.
            out_tokens: run only the first ``out_tokens`` tokens through the block (as
                queries; every token still serves as a key and value): the rows a full call
                gives them, for a caller that reads no others, such as a classifier's last
                block. See :meth:`~vats_core.attention.layer.Attention.forward`.

        Returns:
            ``(x, stats)``: ``(B, T, D)`` (``(B, out_tokens, D)``) and the MoE's router
            statistics (None for an MLP).
        """
        if (context is not None) != (self.cross_attn is not None):
            raise ValueError(
                "TransformerBlock: context must be given exactly when the block has "
                f"cross-attention (cross_attention is {'set' if self.cross_attn else 'None'})"
            )
        h = self.attn(
            self.attn_norm(x),
            rope=rope,
            key_padding_mask=key_padding_mask,
            cache=cache,
            out_tokens=out_tokens,
        )
        if out_tokens is not None:
            x = x[:, :out_tokens]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, :out_tokens]
        x = x + h
        if self.cross_attn is not None and self.cross_attn_norm is not None:
            h = self.cross_attn_norm(x)
            x = x + self.cross_attn(h, context=context, context_mask=context_mask)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x), token_mask=key_padding_mask)
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None


class FactorizedBlock(nn.Module):
    """Pre-norm divided space / time attention over a ``(B, T, N, D)`` grid of tokens.

    Shapes: B clips, T frames (time steps: frames, tubelets or video latents), N tokens
    per frame (its ``h·w`` patches plus any per-frame prefix tokens), D width; S context
    tokens of width Dc; Dh head dim.

    ::

        x = x + spatial_attn(norm(x))           # B·T sequences: the N tokens of each frame
        x = x + cross_attn(norm(x), context)    # if config.cross_attention: T·N queries per clip
        x = x + temporal_attn(norm(x))          # B·N sequences: one position's T frames
        x = x + ffn(norm(x))                    # per token

    Joint attention over all ``T·N`` tokens of a clip costs ``O((T·N)²)`` scores per head.
    Here spatial attention costs ``O(T·N²)``, linear in the number of frames T, and temporal
    attention ``O(N·T²)``, linear in the ``N = h·w`` tokens per frame: the factorized block
    stays affordable as clips grow longer or frames larger. Cross-attention costs
    ``O(T·N·S)``.

    Both self-attentions are built from ``config.attention`` (the same head layout, separate
    weights; its ``window`` applies to both axes). Cross-attention, when
    ``config.cross_attention`` is set, follows the spatial step: every token of every frame
    attends over the same context (e.g. a text encoder's states and their padding mask), as
    in a video diffusion transformer; its queries do not interact, so it runs as one call
    over the clip's ``T·N`` tokens. The feed-forward is ``config.mlp`` (a Mixture of Experts
    is not supported here). With ``temporal=False`` the block has no temporal step: frames
    are then encoded independently (every frame as :class:`TransformerBlock` would encode it
    alone with the spatial weights).

    Padding frames (clips of different lengths in one batch) are masked out of temporal
    attention as keys, so a real frame's outputs do not depend on them.

    Module names: ``spatial_norm``, ``spatial_attn``, ``cross_attn_norm``, ``cross_attn``,
    ``temporal_norm``, ``temporal_attn``, ``ffn_norm``, ``ffn``.
    """

    def __init__(self, config: BlockConfig, *, temporal: bool = True) -> None:
        super().__init__()
        if config.mlp is None:
            raise ValueError(
                "FactorizedBlock needs a dense feed-forward: BlockConfig.mlp must be set "
                "(BlockConfig.moe is not supported here)"
            )
        self.config = config
        dim, eps = config.attention.dim, config.norm_eps
        self.spatial_norm = build_norm(config.norm, dim, eps)
        self.spatial_attn = Attention(config.attention)
        self.cross_attn_norm: nn.Module | None = None
        self.cross_attn: Attention | None = None
        if config.cross_attention is not None:
            self.cross_attn_norm = build_norm(config.norm, dim, eps)
            self.cross_attn = Attention(config.cross_attention)
        self.temporal_norm = build_norm(config.norm, dim, eps) if temporal else None
        self.temporal_attn = Attention(config.attention) if temporal else None
        self.ffn_norm = build_norm(config.norm, dim, eps)
        self.ffn = build_mlp(config.mlp)

    def forward(
        self,
        x: Tensor,
        *,
        rope_spatial: tuple[Tensor, Tensor] | None = None,
        rope_temporal: tuple[Tensor, Tensor] | None = None,
        frame_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the block.

        Args:
            x: ``(B, T, N, D)``: T frames of N tokens each.
            rope_spatial: ``(cos, sin)`` for spatial attention, each ``(1 or B·T, 1, N, Dh)``
                (rows in ``(b t)`` order): the tokens' positions within a frame.
            rope_temporal: ``(cos, sin)`` for temporal attention, each
                ``(1 or B·N, 1, T, Dh)`` (rows in ``(b n)`` order): the frames' times.
            frame_mask: ``(B, T)`` bool, True = real frame; padding frames are left out of
                temporal attention as keys. None = every frame is real.
            context: ``(B, S, Dc)``; required iff the block has cross-attention.
            context_mask: ``(B, S)`` bool, True = real context token.

        Returns:
            ``(B, T, N, D)``.
        """
        self._check_inputs(x, frame_mask, context)
        b, t, n, d = x.shape
        # 1. Spatial: each frame is one sequence of N tokens.
        h = self.spatial_attn(self.spatial_norm(x).view(b * t, n, d), rope=rope_spatial)
        x = x + h.view(b, t, n, d)
        # 2. Cross-attention: per-token queries, so the whole clip is one call.
        if self.cross_attn is not None and self.cross_attn_norm is not None:
            h = self.cross_attn_norm(x).view(b, t * n, d)
            h = self.cross_attn(h, context=context, context_mask=context_mask)
            x = x + h.view(b, t, n, d)
        # 3. Temporal: each token position is one sequence of T frames.
        if self.temporal_attn is not None and self.temporal_norm is not None:
            h = rearrange(self.temporal_norm(x), "b t n d -> (b n) t d")
            mask = None if frame_mask is None else frame_mask.repeat_interleave(n, dim=0)
            h = self.temporal_attn(h, rope=rope_temporal, key_padding_mask=mask)
            x = x + rearrange(h, "(b n) t d -> b t n d", b=b)
        # 4. Feed-forward, per token.
        return x + self.ffn(self.ffn_norm(x))

    def _check_inputs(self, x: Tensor, frame_mask: Tensor | None, context: Tensor | None) -> None:
        dim = self.config.attention.dim
        if x.ndim != 4 or x.shape[-1] != dim:
            raise ValueError(
                f"FactorizedBlock expects x of shape (B, T, N, {dim}), got {tuple(x.shape)}"
            )
        b, t = x.shape[:2]
        if frame_mask is not None and (
            frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (b, t)
        ):
            raise ValueError(
                f"FactorizedBlock frame_mask must be a bool (B, T) = ({b}, {t}) tensor (True = "
                f"real frame), got {frame_mask.dtype} {tuple(frame_mask.shape)}"
            )
        if (context is not None) != (self.cross_attn is not None):
            raise ValueError(
                "FactorizedBlock: context must be given exactly when the block has "
                f"cross-attention (cross_attention is {'set' if self.cross_attn else 'None'})"
            )

    def extra_repr(self) -> str:
        return f"temporal={self.temporal_attn is not None}"
