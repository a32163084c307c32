"""A bidirectional transformer text encoder, the conditioning source of the diffusion models.

The same vats-core pre-norm blocks as the language model, with non-causal self-attention
(every token sees every real token, or those within an optional bidirectional window
``|i - j| < w``), 1D RoPE, SwiGLU MLPs and a final RMSNorm; BERT-style bidirectional
context (Devlin et al., 2019) with a Llama-style block. It reads the ids of the vats
:class:`~vats_text.tokenizer.Tokenizer`.

Outputs per-token states (what a DiT cross-attends to, with the attention mask as its
context mask, like Imagen / Stable Diffusion 3 use T5 states) and one pooled vector per
sequence (for global conditioning, e.g. added to the timestep embedding). Padding never
changes a real token's state: padded keys are masked, positions count real tokens only,
and padding is excluded from the pooled mean.

Shapes: B batch, T tokens, D model dim.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, AttentionConfig, check_head_fields
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_positive
from vats_core.mlp import MLPConfig
from vats_core.norms import RMSNorm
from vats_core.rope import RopeConfig, RotaryEmbedding
from vats_text.model import check_layer_windows

__all__ = ["TextEncoder", "TextEncoderConfig", "TextEncoderOutput"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderConfig(Config):
    """Configuration of :class:`TextEncoder`."""

    vocab_size: int  # V; token ids are in [0, V)
    dim: int  # model width D
    n_layers: int  # transformer blocks
    n_heads: int  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None = n_heads
    head_dim: int | None = None  # Dh; None = dim // n_heads. Even (RoPE rotates pairs)
    hidden_dim: int | None = None  # SwiGLU hidden; None = 8/3·D rounded up to 64
    max_seq_len: int = 512  # longest input accepted
    rope_theta: float = 10000.0  # RoPE base
    # Per-layer bidirectional window: () = every layer global; else n_layers entries,
    # None = global, int w = token i sees tokens j with |i - j| < w.
    layer_windows: tuple[int | None, ...] = ()
    qkv_bias: bool = False  # biases on q/k/v projections
    qk_norm: bool = False  # RMSNorm of each query / key head before RoPE
    norm_eps: float = 1e-6  # eps of every RMSNorm
    init_std: float = 0.02  # std of the normal init of every weight matrix
    pad_token_id: int | None = 0  # vats Tokenizer PAD_ID
    attention_backend: AttentionBackend = AttentionBackend.AUTO  # pin a backend for all layers

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "n_layers", "max_seq_len", "hidden_dim")
        check_head_fields(self, rope=True)
        check_positive(self, "rope_theta", "norm_eps", "init_std")
        check_layer_windows(self)
        pad = self.pad_token_id
        ok = pad is None or 0 <= pad < self.vocab_size
        check(ok, self, "pad_token_id", pad, f"None or an id in [0, vocab_size={self.vocab_size})")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dh(self) -> int:
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def hidden(self) -> int:
        """SwiGLU hidden dim with the default applied."""
        return 64 * math.ceil(8 * self.dim / 3 / 64) if self.hidden_dim is None else self.hidden_dim

    def window_of(self, i: int) -> int | None:
        """Bidirectional window of layer ``i`` (None = global)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} out of range [0, n_layers={self.n_layers})")
        return self.layer_windows[i] if self.layer_windows else None

    def block_config(self, i: int) -> BlockConfig:
        """The vats-core :class:`BlockConfig` of layer ``i``."""
        attention = AttentionConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            n_kv_heads=self.kv_heads,
            head_dim=self.dh,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            qk_norm_eps=self.norm_eps,
            causal=False,
            window=self.window_of(i),
            backend=self.attention_backend,
        )
        mlp = MLPConfig(dim=self.dim, hidden_dim=self.hidden)
        return BlockConfig(attention=attention, mlp=mlp, norm_eps=self.norm_eps)


@dataclasses.dataclass
class TextEncoderOutput:
    """What :meth:`TextEncoder.forward` returns.

    Attributes:
        last_hidden_state: ``(B, T, D)`` final-norm per-token states; zero at padding.
        pooled: ``(B, D)`` mean of the real tokens' states (zero for a row without any).
        attention_mask: ``(B, T)`` bool, True = real token (all True without a mask), to
            pass on as a cross-attention context mask.
    """

    last_hidden_state: Tensor
    pooled: Tensor
    attention_mask: Tensor


class TextEncoder(PretrainedMixin, nn.Module):
    """Bidirectional transformer over token ids; see the module docstring.

    Example:
        >>> from vats_text.presets import encoder_preset
        >>> encoder = TextEncoder(encoder_preset("tiny"))
        >>> out = encoder(torch.tensor([[2, 40, 41, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
        >>> out.last_hidden_state.shape, out.pooled.shape
        (torch.Size([1, 4, 64]), torch.Size([1, 64]))
    """

    config_class = TextEncoderConfig
    config: TextEncoderConfig

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise ValueError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.rotary = RotaryEmbedding(RopeConfig(head_dim=config.dh, theta=config.rope_theta))
        self.layers = nn.ModuleList(
            TransformerBlock(config.block_config(i)) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norm gains; the residual-writing
        projections (``o_proj``, ``down_proj``) scaled by ``1 / sqrt(2 * n_layers)`` (GPT-2)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextEncoderOutput:
        """Encode token ids.

        Args:
            input_ids: ``(B, T)`` integer ids in ``[0, V)``.
            attention_mask: ``(B, T)`` bool or 0/1, True = real token; None = all real.
                Padding may sit on either side: positions count real tokens only.

        Returns:
            :class:`TextEncoderOutput`.

        Raises:
            ValueError: bad shapes or dtypes, ids out of range, T > max_seq_len.
        """
        mask = self._check_inputs(input_ids, attention_mask)
        device = self.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        mask = mask.to(device) if mask is not None else None
        if mask is not None and bool(mask.all()):
            mask = None  # nothing padded: attention takes its unmasked fast path

        h = self.embed_tokens(input_ids)  # (B, T, D)
        if mask is None:
            positions = torch.arange(input_ids.shape[1], device=device)  # (T,)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), real tokens from 0
        rope = self.rotary(positions, dtype=h.dtype)
        for layer in self.layers:
            h, _ = layer(h, rope=rope, key_padding_mask=mask)
        h = self.norm(h)  # (B, T, D)

        if mask is None:
            full = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
            return TextEncoderOutput(last_hidden_state=h, pooled=h.mean(dim=1), attention_mask=full)
        weights = mask.to(h.dtype)[..., None]  # (B, T, 1)
        h = h * weights  # padding states are meaningless: zero them
        pooled = h.sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, D) masked mean
        return TextEncoderOutput(last_hidden_state=h, pooled=pooled, attention_mask=mask)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"TextEncoder: input_ids must be a (B, T) tensor, got {got}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"TextEncoder: input_ids must be integers, got {input_ids.dtype}")
        b, t = input_ids.shape
        if b < 1 or t < 1:
            raise ValueError(f"TextEncoder: empty input of shape {(b, t)}")
        if t > cfg.max_seq_len:
            raise ValueError(f"TextEncoder: {t} tokens exceed max_seq_len={cfg.max_seq_len}")
        bad = (input_ids < 0) | (input_ids >= cfg.vocab_size)
        if bool(bad.any()):
            raise ValueError(
                f"TextEncoder: input_ids holds {int(input_ids[bad][0])}, outside "
                f"[0, vocab_size={cfg.vocab_size})"
            )
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, t):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else None
            raise ValueError(f"TextEncoder: attention_mask must be (B, T) = ({b}, {t}), got {got}")
        if attention_mask.dtype != torch.bool:
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("TextEncoder: attention_mask must hold only 0/1 (or be bool)")
            attention_mask = attention_mask != 0
        return attention_mask
