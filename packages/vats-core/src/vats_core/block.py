"""The pre-norm transformer block every vats decoder and encoder is built from.

    x = x + attn(norm(x))                       # self-attention (RoPE, cache, window, padding)
    x = x + cross_attn(norm(x), context)        # optional: text / image conditioning
    x = x + ffn(norm(x))                        # SwiGLU / GELU MLP, or a Mixture of Experts

Pre-norm (Xiong et al., 2020, arXiv:2002.04745) as in GPT-2, Llama, Mixtral and ViT.

Shapes: B batch, T tokens, S context tokens, D model width, Dc context width.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from vats_core.attention.layer import Attention, AttentionConfig
from vats_core.config import Config, check, check_positive
from vats_core.kv_cache import KVCache
from vats_core.mlp import MLPConfig, build_mlp
from vats_core.moe import MoE, MoEConfig, RouterStats
from vats_core.norms import NormType, build_norm

__all__ = ["BlockConfig", "TransformerBlock"]


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
        check(
            self.attention.context_dim is None,
            self,
            "attention",
            f"context_dim={self.attention.context_dim}",
            "a self-attention config (context_dim=None); put cross-attention in cross_attention",
        )
        if self.cross_attention is not None:
            check(
                self.cross_attention.context_dim is not None and self.cross_attention.dim == dim,
                self,
                "cross_attention",
                f"context_dim={self.cross_attention.context_dim}, dim={self.cross_attention.dim}",
                f"a cross-attention config (context_dim set) with dim={dim}",
            )
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
