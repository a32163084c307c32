"""The multi-head attention layer every vats model uses (Vaswani et al., 2017).

Self-attention with grouped-query heads (GQA, Ainslie et al., 2023; MQA at one KV head),
optional QK-norm (RMSNorm on each head's queries and keys, as in ViT-22B and Qwen3), RoPE,
causal / sliding-window masks and a KV-cache hook; or cross-attention whose keys and
values come from a context sequence (text conditioning, diffusion) with its own padding
mask. The softmax itself is always :func:`vats_core.attention.dispatch.attention`, so every
backend (math, sdpa, flex, local, xformers, flash) serves every layer.

Self-attention stores its three input projections as one ``qkv_proj`` (rows: the Hq·Dh
query rows, then Hkv·Dh key rows, then Hkv·Dh value rows), as timm (``qkv``), nanoGPT and
gpt-fast (``wqkv``) do: one product per call, with nothing concatenated at run time.
Cross-attention stores ``q_proj`` and a fused ``kv_proj`` (keys then values), since its
keys and values read another sequence. The output projection is ``o_proj``; QK-norm is
``q_norm`` / ``k_norm``. The HF and timm importers split or stack their checkpoints'
separate or fused weights onto these.

Shapes: B batch, T tokens, S context tokens, D model width, Dc context width, Hq query
heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention.dispatch import AttentionBackend, attention
from vats_core.config import Config, check, check_positive, check_probability, is_int
from vats_core.kv_cache import KVCache, RollingKVCache
from vats_core.norms import RMSNorm
from vats_core.rope import apply_rotary

__all__ = ["Attention", "AttentionConfig", "check_head_fields"]


def check_head_fields(config: Any, *, rope: bool = False) -> None:
    """The head rules of every config with ``dim``, ``n_heads``, ``n_kv_heads`` and
    ``head_dim`` fields (:class:`AttentionConfig`, and model configs that name their own
    fields in errors): positive sizes, ``n_kv_heads`` divides ``n_heads``, and without
    ``head_dim`` the width splits evenly over the heads. ``rope``: the head dim must also be
    even, since RoPE rotates channel pairs."""
    check_positive(config, "dim", "n_heads")
    dim, n_heads, kv, head_dim = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    ok = kv is None or (kv >= 1 and n_heads % kv == 0)
    check(ok, config, "n_kv_heads", kv, f"None or a positive divisor of n_heads={n_heads}")
    even = " giving an even head dim" if rope else ""
    if head_dim is None:
        ok = dim % n_heads == 0 and (not rope or dim // n_heads % 2 == 0)
        allowed = f"a multiple of n_heads={n_heads}{even} (or set head_dim explicitly)"
        check(ok, config, "dim", dim, allowed)
    else:
        ok = head_dim >= 1 and (not rope or head_dim % 2 == 0)
        allowed = "an even int > 0 (RoPE rotates channel pairs)" if rope else "an int > 0"
        check(ok, config, "head_dim", head_dim, f"None or {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(Config):
    """Attention layer settings."""

    dim: int  # model width D (input and output of the layer)
    n_heads: int  # query heads Hq
    n_kv_heads: int | None = None  # key/value heads Hkv (GQA); None = n_heads (MHA), 1 = MQA
    head_dim: int | None = None  # Dh; None = dim // n_heads (Qwen3 / Gemma decouple it)
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2 and timm ViTs use them)
    out_bias: bool = False  # bias on the output projection
    qk_norm: bool = False  # RMSNorm over Dh of each query and key head, before RoPE
    qk_norm_eps: float = 1e-6
    # Output (residual) dropout: the attention dispatch has no dropout on the probabilities
    # (flash/xformers/local would each do it differently), so regularization acts here.
    dropout: float = 0.0
    causal: bool = False  # decoder self-attention; never set for cross-attention
    window: int | None = None  # sliding window (causal: i - window < j <= i; else |i - j| < window)
    context_dim: int | None = None  # None = self-attention; set = cross-attention from width Dc
    backend: AttentionBackend = AttentionBackend.AUTO  # pin a backend; auto = dispatch decides

    def __post_init__(self) -> None:
        check_head_fields(self)
        check_positive(self, "qk_norm_eps", "window", "context_dim")
        check_probability(self, "dropout")
        if self.context_dim is not None:
            check(
                not self.causal,
                self,
                "causal",
                self.causal,
                "False for cross-attention (context_dim is set): context tokens are not in time",
            )
            check(
                self.window is None,
                self,
                "window",
                self.window,
                "None for cross-attention (context_dim is set)",
            )

    @property
    def kv_heads(self) -> int:
        """Hkv with the default applied."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dh(self) -> int:
        """Dh with the default applied."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def is_cross(self) -> bool:
        return self.context_dim is not None


class Attention(nn.Module):
    """Multi-head self- or cross-attention; see :class:`AttentionConfig`."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.dh
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj: nn.Linear | None = None
        self.q_proj: nn.Linear | None = None
        self.kv_proj: nn.Linear | None = None
        if config.is_cross:
            self.q_proj = nn.Linear(config.dim, q_out, bias=config.qkv_bias)
            self.kv_proj = nn.Linear(config.context_dim, 2 * kv_out, bias=config.qkv_bias)  # type: ignore[arg-type]
        else:
            self.qkv_proj = nn.Linear(config.dim, q_out + 2 * kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, config.dim, bias=config.out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.qk_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.qk_norm_eps) if config.qk_norm else None
        self.dropout = nn.Dropout(config.dropout)

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
    ) -> Tensor:
        """Attend from ``x`` to itself (self-attention) or to ``context`` (cross-attention).

        Args:
            x: ``(B, T, D)``.
            rope: ``(cos, sin)`` from :class:`~vats_core.rope.RotaryEmbedding`, each
                ``(B or 1, 1, T, Dh)`` for the positions of ``x``'s tokens; self-attention only.
            key_padding_mask: ``(B, T)`` bool, True = real token, for ``x``'s tokens (with a
                cache: for the new chunk only; the cache remembers earlier chunks').
            cache: this layer's :class:`~vats_core.kv_cache.KVCache`; the new keys/values are
                appended and attention runs over everything it returns. Self-attention only.
            context: ``(B, S, Dc)`` keys/values source; required iff cross-attention.
            context_mask: ``(B, S)`` bool, True = real context token; cross-attention only.
            out_tokens: compute only the first ``out_tokens`` tokens' outputs (their queries
                attend over every key): the same rows as the full call, for less work, when
                only those are read (a classifier's last block and its class token).
                Bidirectional self-attention without a window or a cache only, where a
                query's visible keys do not depend on how many queries there are.

        Returns:
            ``(B, T, D)``; ``(B, out_tokens, D)`` with ``out_tokens``.
        """
        cfg = self.config
        self._check_inputs(x, rope, key_padding_mask, cache, context, context_mask)
        b, t, _ = x.shape
        src = context if cfg.is_cross else x
        if out_tokens is not None:
            self._check_out_tokens(out_tokens, t, cache)
            t = out_tokens
        q, k, v = self._project(x, src, out_tokens)
        # (B, Hq, T, Dh), T = out_tokens when given; (B, Hkv, S, Dh)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, src.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, src.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q_rope = rope if out_tokens is None else (cos[..., :t, :], sin[..., :t, :])
            q, k = apply_rotary(q, *q_rope), apply_rotary(k, *rope)

        mask = context_mask if cfg.is_cross else key_padding_mask
        if cache is not None:
            k, v, mask = cache.update(k, v, key_padding_mask)  # (B, Hkv, Tk, Dh), Tk >= T
        out = attention(
            q,
            k,
            v,
            causal=cfg.causal,
            window=cfg.window,
            key_padding_mask=mask,
            backend=cfg.backend,
        )  # (B, Hq, T, Dh)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, Hq·Dh)
        return self.dropout(self.o_proj(out))

    def _project(
        self, x: Tensor, src: Tensor, out_tokens: int | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``(B, T, Hq·Dh)`` of ``x`` (its first ``out_tokens`` tokens when given),
        keys and values ``(B, S, Hkv·Dh)`` of ``src``."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.kv_proj is not None and self.q_proj is not None:  # cross-attention
            k, v = self.kv_proj(src).split([kv_out, kv_out], dim=-1)
            return self.q_proj(x), k, v
        assert self.qkv_proj is not None
        if out_tokens is None:
            return self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        # Queries of the first tokens only: the query rows of the stacked weight (a view).
        w, bias = self.qkv_proj.weight, self.qkv_proj.bias
        q = F.linear(x[:, :out_tokens], w[:q_out], None if bias is None else bias[:q_out])
        k, v = F.linear(x, w[q_out:], None if bias is None else bias[q_out:]).split(
            [kv_out, kv_out], dim=-1
        )
        return q, k, v

    def _check_out_tokens(self, out_tokens: int, t: int, cache: KVCache | None) -> None:
        cfg = self.config
        if not is_int(out_tokens):
            raise ValueError(f"out_tokens must be an int, got {type(out_tokens).__name__}")
        if not 1 <= out_tokens <= t:
            raise ValueError(f"out_tokens must be in [1, T={t}], got {out_tokens}")
        if cfg.is_cross or cfg.causal or cfg.window is not None or cache is not None:
            raise ValueError(
                "out_tokens needs bidirectional self-attention without a window or a cache "
                f"(this layer: cross={cfg.is_cross}, causal={cfg.causal}, window={cfg.window}, "
                f"cache={'set' if cache is not None else None}): fewer queries would change "
                "which keys each one sees"
            )

    def _check_inputs(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        key_padding_mask: Tensor | None,
        cache: KVCache | None,
        context: Tensor | None,
        context_mask: Tensor | None,
    ) -> None:
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(
                f"Attention expects x of shape (B, T, {cfg.dim}), got {tuple(x.shape)}"
            )
        b, t, _ = x.shape
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, t)
        ):
            raise ValueError(
                f"Attention key_padding_mask must be a bool (B, T) = ({b}, {t}) tensor, got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if isinstance(cache, RollingKVCache) and not (
            cfg.causal and cfg.window is not None and cache.window >= cfg.window
        ):
            # It holds only the last window - 1 keys: exact for causal windows no wider.
            raise ValueError(
                f"a RollingKVCache(window={cache.window}) serves only causal layers with "
                f"window <= {cache.window}; this layer has causal={cfg.causal}, "
                f"window={cfg.window}: use a StaticKVCache"
            )
        if not cfg.is_cross:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "Attention got context/context_mask but is a self-attention layer "
                    "(AttentionConfig.context_dim is None)"
                )
            return
        if rope is not None or cache is not None:
            raise ValueError(
                "cross-attention takes no rope and no cache: context tokens have no positions "
                "in x's sequence and are recomputed from context each call"
            )
        if context is None or context.ndim != 3 or context.shape[::2] != (b, cfg.context_dim):
            shape = None if context is None else tuple(context.shape)
            raise ValueError(
                f"cross-attention needs context of shape (B={b}, S, {cfg.context_dim}), got {shape}"
            )
        if context_mask is not None and (
            context_mask.dtype != torch.bool or tuple(context_mask.shape) != (b, context.shape[1])
        ):
            raise ValueError(
                f"cross-attention context_mask must be a bool (B, S) = ({b}, {context.shape[1]}) "
                f"tensor, got {context_mask.dtype} {tuple(context_mask.shape)}"
            )

    def extra_repr(self) -> str:
        cfg = self.config
        kind = f"cross(context_dim={cfg.context_dim})" if cfg.is_cross else "self"
        return (
            f"{kind}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"head_dim={self.head_dim}, causal={cfg.causal}, window={cfg.window}"
        )
