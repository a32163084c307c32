"""The audio encoder: Whisper's encoder shape (Radford et al., 2022, arXiv:2212.04356) on
vats-core blocks, for clips of any length.

A log-mel spectrogram ``(B, n_mels, T)`` goes through two convolutions with GELU, the
second one strided (``T' = ceil(T / 2)`` tokens, 20 ms each at Whisper's 10 ms hop), gets
positions, then pre-norm transformer blocks from :mod:`vats_core.block` (LayerNorm, GELU
MLP, self-attention with every vats-core option: GQA, QK-norm, a bidirectional sliding
window, any attention backend) and a final norm::

    x = gelu(conv1(mel))            # (B, D, T)   k3, s1, pad 1
    x = gelu(conv2(x))              # (B, D, T')  k3, s2, pad 1: T' = (T - 1) // 2 + 1
    x = x + table[:T']              # sinusoidal positions (or RoPE inside attention)
    x = blocks(x); x = norm(x)      # (B, T', D)

Positions, by ``pos_embed``:

* ``sinusoidal`` (default): Whisper's fixed table of ``max_positions`` rows (1500 = 30 s),
  added after the convolutions and never trained (a buffer, not a parameter). Without a
  window, inputs longer than the table are refused, as Whisper was trained on it; with a
  ``window`` the rows past the table follow the same formula, so long audio runs.
* ``rope``: 1D RoPE over the token index inside every attention layer: no table, any length.

Clips of different lengths share one batch without changing each other's outputs: pass
``lengths`` (each clip's real input frames; the clips right-padded to ``T``). The padded
input frames are zeroed and the first conv's outputs past each clip's end are zeroed, so
the convolutions see exactly the zeros a lone run's ``padding=1`` shows them; padded
tokens are masked out of attention as keys, and padded outputs are zero. Every real token
then equals the clip run alone (to float rounding), and nothing is padded to 30 s
(transformers#26241: HF's Whisper encoder only takes exactly 3000 frames).

Whisper's attention has biases on q, v and the output but none on k; vats' fused
``qkv_proj`` has one bias over all rows, and a Whisper import stores zeros in the k rows.
That is the same function: a key bias adds ``q · b_k`` to every score of a query, which
the softmax removes (its gradient is zero too, so training keeps it at zero).

The contract is timm's: ``forward_features`` -> every token after the final norm,
``forward_head`` pools (masked mean over real tokens) and classifies, ``forward`` is both.

Module names: ``conv1``, ``conv2`` (Whisper's), ``embed_positions`` (the table, sinusoidal
only), ``blocks`` (vats-core ``TransformerBlock``: ``attn_norm``, ``attn.qkv_proj``,
``attn.o_proj``, ``ffn_norm``, ``ffn.fc1`` / ``fc2``), ``norm``, ``head``.

Shapes: B batch, M mel bins (``n_mels``), T input frames, T' = ceil(T / 2) tokens, D model
width, K classes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, AttentionConfig, check_head_fields
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_at_least, check_positive
from vats_core.mlp import Activation, MLPConfig
from vats_core.norms import NormType, build_norm
from vats_core.rope import RopeConfig, RotaryEmbedding

__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "AudioPosEmbed",
    "output_lengths",
    "sinusoid_table",
]

_LAYOUT = "(B, n_mels, T)"
Lengths = Tensor | Sequence[int]


class AudioPosEmbed(enum.StrEnum):
    """How the encoder's tokens learn where they are in time."""

    SINUSOIDAL = "sinusoidal"  # Whisper's fixed table (max_positions rows), added after convs
    ROPE = "rope"  # 1D rotary over the token index: no table, any length


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioEncoderConfig(Config):
    """Audio encoder settings. Defaults are Whisper-tiny's encoder (80 mels, 1500 positions)."""

    n_mels: int = 80  # M: mel bins of the input features (Whisper: 80; large-v3: 128)
    dim: int = 384  # D
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int | None = None  # GQA key/value heads; None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU  # Whisper: exact (erf) GELU
    mlp_bias: bool = True  # biases in the MLP (Whisper has them)
    norm: NormType = NormType.LAYERNORM
    norm_eps: float = 1e-5  # torch's LayerNorm default, which Whisper uses
    qkv_bias: bool = True  # one bias over the fused q/k/v rows (Whisper: zeros in the k rows)
    out_bias: bool = True  # bias on the attention output projection
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    pos_embed: AudioPosEmbed = AudioPosEmbed.SINUSOIDAL
    # Rows of the sinusoidal table: tokens after the stride-2 conv (1500 = 30 s at a 10 ms
    # hop). The longest input without a window is 2 · max_positions frames. RoPE ignores it.
    max_positions: int = 1500
    rope_theta: float = 10000.0  # RoPE base (pos_embed="rope")
    window: int | None = None  # bidirectional window |i - j| < window over the tokens
    num_classes: int = 0  # K; 0 = no head (forward returns the pooled features)
    # What the features are expected to come from; used in error messages (durations).
    sample_rate: int | None = 16000  # Hz of the audio the features were computed from
    hop_length: int | None = 160  # samples between feature frames (160 = 10 ms at 16 kHz)
    init_std: float = 0.02  # normal std of the linear layers' weights
    attention_backend: AttentionBackend = AttentionBackend.AUTO

    def __post_init__(self) -> None:
        check_positive(self, "n_mels", "n_layers", "mlp_hidden_dim", "max_positions")
        check_positive(self, "norm_eps", "rope_theta", "init_std", "window")
        check_positive(self, "sample_rate", "hop_length")
        check_at_least(self, 0, "num_classes")
        check_head_fields(self, rope=self.pos_embed is AudioPosEmbed.ROPE)
        if self.pos_embed is AudioPosEmbed.SINUSOIDAL:
            check(
                self.dim % 2 == 0 and self.dim >= 4,
                self,
                "dim",
                self.dim,
                "an even int >= 4 for sinusoidal positions (sin and cos halves of D / 2 "
                "frequencies each)",
            )
        _ = self.block_config  # validates the block settings

    @property
    def dh(self) -> int:
        """Head dim with the default applied."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def max_frames(self) -> int | None:
        """Longest input (frames) the encoder takes; None = no limit (RoPE or a window)."""
        if self.pos_embed is AudioPosEmbed.SINUSOIDAL and self.window is None:
            return 2 * self.max_positions
        return None

    @property
    def block_config(self) -> BlockConfig:
        """The vats-core block every layer is built from."""
        attention = AttentionConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            qk_norm=self.qk_norm,
            window=self.window,
            backend=self.attention_backend,
        )
        mlp = MLPConfig(
            dim=self.dim,
            hidden_dim=self.mlp_hidden_dim or 4 * self.dim,
            activation=self.mlp_activation,
            bias=self.mlp_bias,
        )
        return BlockConfig(attention=attention, mlp=mlp, norm=self.norm, norm_eps=self.norm_eps)

    def duration(self, frames: int) -> str:
        """``frames`` input frames in words, with seconds when the rate is known."""
        if self.sample_rate is None or self.hop_length is None:
            return f"{frames} frames"
        return f"{frames} frames ({frames * self.hop_length / self.sample_rate:g} s)"


def sinusoid_table(
    length: int, dim: int, *, start: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Whisper's position table: rows ``start .. start + length - 1``, float32.

    Row ``t`` is ``[sin(t·w_0), ..., sin(t·w_{h-1}), cos(t·w_0), ..., cos(t·w_{h-1})]`` with
    ``h = D / 2`` frequencies ``w_i = 10000 ** (-i / (h - 1))`` (from 1 down to 1 / 10000).
    Computed in float32 in that order, as Whisper computes it, so an imported table and
    this one agree bit for bit on the same machine.

    Returns:
        ``(length, D)`` float32.
    """
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    inv_timescales = torch.exp(-step * torch.arange(half, device=device))  # (D/2,) float32
    angles = torch.arange(start, start + length, device=device)[:, None] * inv_timescales[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (length, D)


def output_lengths(lengths: Tensor) -> Tensor:
    """Tokens after the stride-2 conv for ``lengths`` input frames: ``(L - 1) // 2 + 1``,
    i.e. ``ceil(L / 2)`` (Conv1d with kernel 3, stride 2, padding 1)."""
    return (lengths - 1).div(2, rounding_mode="floor") + 1


class AudioEncoder(PretrainedMixin, nn.Module):
    """Whisper-shaped audio encoder; see the module docstring and :class:`AudioEncoderConfig`.

    Example:
        >>> from vats_audio import AudioEncoder, audio_preset
        >>> encoder = AudioEncoder(audio_preset("tiny", num_classes=5)).eval()
        >>> mel = torch.randn(2, 80, 100)  # two clips right-padded to 100 frames
        >>> encoder(mel, lengths=torch.tensor([100, 61])).shape
        torch.Size([2, 5])
    """

    config_class = AudioEncoderConfig
    config: AudioEncoderConfig

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, AudioEncoderConfig):
            raise ValueError(f"config must be an AudioEncoderConfig, got {type(config).__name__}")
        self.config = config
        d = config.dim
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # The table is a saved buffer, not a parameter: never trained, and an imported table
        # (which a checkpoint may hold in half precision) is kept exactly as the peer has it.
        sinusoidal = config.pos_embed is AudioPosEmbed.SINUSOIDAL
        table = sinusoid_table(config.max_positions, d) if sinusoidal else None
        self.embed_positions: Tensor | None
        self.register_buffer("embed_positions", table)
        self.rotary: RotaryEmbedding | None = None
        if not sinusoidal:
            self.rotary = RotaryEmbedding(RopeConfig(head_dim=config.dh, theta=config.rope_theta))
        block = config.block_config
        self.blocks = nn.ModuleList(TransformerBlock(block) for _ in range(config.n_layers))
        self.norm = build_norm(config.norm, d, config.norm_eps)
        self.head: nn.Module = (
            nn.Linear(d, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal linear weights (``init_std``), zero linear biases; the convs and
        norms keep PyTorch's init. The table is not a parameter and is left alone."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ input checks

    def _check(self, features: Tensor, lengths: Lengths | None) -> Tensor | None:
        """Raise a ValueError for input the encoder cannot take; return lengths as a
        ``(B,)`` long tensor on the features' device (None when not given)."""
        cfg = self.config
        if not isinstance(features, Tensor):
            raise ValueError(
                f"AudioEncoder expects a tensor {_LAYOUT}, got {type(features).__name__}"
            )
        if features.ndim != 3:
            raise ValueError(
                f"AudioEncoder expects a rank-3 tensor {_LAYOUT}, got rank {features.ndim} with "
                f"shape {tuple(features.shape)}"
                + (" (add a batch axis: features[None])" if features.ndim == 2 else "")
            )
        if not features.is_floating_point():
            raise ValueError(f"AudioEncoder expects floating-point features, got {features.dtype}")
        b, m, t = features.shape
        if m != cfg.n_mels:
            raise ValueError(
                f"AudioEncoder was built for n_mels={cfg.n_mels} mel bins but the features have "
                f"{m} (axis 1 of {_LAYOUT}, shape {tuple(features.shape)}): compute the features "
                f"with n_mels={cfg.n_mels}, or build the encoder with n_mels={m}"
            )
        if b < 1 or t < 1:
            raise ValueError(f"AudioEncoder got an empty batch: shape {tuple(features.shape)}")
        weight = self.conv1.weight
        if features.device != weight.device:
            raise ValueError(
                f"AudioEncoder's weights are on {weight.device}, the features on "
                f"{features.device}: move one of them"
            )
        if features.dtype != weight.dtype and not torch.is_autocast_enabled(features.device.type):
            raise ValueError(
                f"AudioEncoder's weights are {weight.dtype}, the features {features.dtype}: "
                "cast one of them (or run under torch.autocast)"
            )
        limit = cfg.max_frames
        if limit is not None and t > limit:
            raise ValueError(
                f"AudioEncoder with sinusoidal positions takes at most {cfg.duration(limit)}: "
                f"its table has max_positions={cfg.max_positions} rows, one per token after the "
                f"stride-2 conv; got {cfg.duration(t)}. A sliding window (window=...) continues "
                "the table past its end, and with RoPE (pos_embed='rope') there is no limit"
            )
        lengths = self._check_lengths(lengths, b, t, features.device)
        if not torch.compiler.is_compiling():
            # Values are data: checked in eager calls; a compiled graph traces without them.
            real = features
            if lengths is not None:
                real = features.masked_fill(~_frame_mask(lengths, t)[:, None, :], 0.0)
            if not bool(torch.isfinite(real).all()):
                raise ValueError(
                    "AudioEncoder got features with NaN or inf values in real frames "
                    "(log-mel features need a floor before the log, e.g. log(max(x, 1e-10)))"
                )
        return lengths

    def _check_lengths(
        self, lengths: Lengths | None, batch: int, frames: int, device: torch.device
    ) -> Tensor | None:
        if lengths is None:
            return None
        if not isinstance(lengths, Tensor):
            if isinstance(lengths, str | bytes) or not isinstance(lengths, Sequence):
                raise ValueError(
                    f"lengths must be a (B,) integer tensor or a list of ints, got "
                    f"{type(lengths).__name__}"
                )
            if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
                raise ValueError(f"lengths must hold ints (frames per clip), got {list(lengths)}")
            lengths = torch.tensor(list(lengths), dtype=torch.long)
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(
                f"lengths must have one entry per clip: shape (B,) = ({batch},), got "
                f"{tuple(lengths.shape)}"
            )
        lengths = lengths.to(device=device, dtype=torch.long)
        if not torch.compiler.is_compiling():
            bad = [n for n in lengths.tolist() if not 1 <= n <= frames]
            if bad:
                raise ValueError(
                    f"lengths must be in [1, T={frames}] (real frames of each clip, right-padded "
                    f"to T), got {bad} in {lengths.tolist()}"
                )
        return lengths

    # ------------------------------------------------------------------ encoder

    def output_lengths(self, lengths: Lengths) -> Tensor:
        """Tokens per clip after the stride-2 conv: ``(L - 1) // 2 + 1`` = ``ceil(L / 2)``.

        Args:
            lengths: ``(B,)`` input frames per clip (a tensor or a list of ints).

        Returns:
            ``(B,)`` long, on the tensor's device (CPU for a list).
        """
        if not isinstance(lengths, Tensor):
            lengths = torch.tensor(list(lengths), dtype=torch.long)
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        return output_lengths(lengths.long())

    def _positions(self, n: int, like: Tensor) -> Tensor:
        """The table's first ``n`` rows ``(n, D)``; rows past its end (window only) follow
        the same formula."""
        table = self.embed_positions
        assert table is not None
        rows = table.shape[0]
        if n <= rows:
            return table[:n]
        extra = sinusoid_table(n - rows, self.config.dim, start=rows, device=like.device)
        return torch.cat([table, extra.to(table.dtype)])

    def forward_features(self, features: Tensor, lengths: Lengths | None = None) -> Tensor:
        """Every token after the final norm.

        Args:
            features: ``(B, n_mels, T)`` log-mel features, clips right-padded to ``T``.
            lengths: ``(B,)`` real input frames per clip (tensor or list of ints, each in
                ``[1, T]``); None = every clip fills ``T``.

        Returns:
            ``(B, T', D)`` with ``T' = ceil(T / 2)``; clip ``i``'s first
            ``output_lengths(lengths)[i]`` tokens equal that clip run alone, the rest are 0.

        Raises:
            ValueError: wrong rank, ``n_mels`` or dtype, NaN / inf in real frames, lengths
                that do not fit the batch, or (sinusoidal, no window) ``T > 2·max_positions``.
        """
        lengths = self._check(features, lengths)
        t = features.shape[-1]
        if lengths is not None and not torch.compiler.is_compiling() and bool((lengths == t).all()):
            # Nothing is padded: the unmasked fast path. (A compiled graph keeps the masks
            # whatever the lengths hold: one graph, no data-dependent branch.)
            lengths = None
        frames = None if lengths is None else _frame_mask(lengths, t)[:, None, :]  # (B, 1, T)
        # 1. Convolutions. Padded frames are zeroed before each conv, so a clip's last real
        #    frames see the zeros its lone run's padding=1 gives them.
        x = features if frames is None else features.masked_fill(~frames, 0.0)
        x = F.gelu(self.conv1(x))  # (B, D, T)
        if frames is not None:
            x = x.masked_fill(~frames, 0.0)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', D)
        n = x.shape[1]
        # 2. Positions: added here (sinusoidal) or inside attention (RoPE).
        rope = None
        if self.rotary is not None:
            rope = self.rotary(torch.arange(n, device=x.device), x.dtype)
        else:
            x = x + self._positions(n, x).to(x.dtype)
        # 3. Blocks with padded tokens masked out as keys, then the final norm.
        mask = None if lengths is None else _frame_mask(output_lengths(lengths), n)  # (B, T')
        for block in self.blocks:
            x, _ = block(x, rope=rope, key_padding_mask=mask)
        x = self.norm(x)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        return x

    def forward_head(
        self, tokens: Tensor, lengths: Lengths | None = None, *, pre_logits: bool = False
    ) -> Tensor:
        """Masked mean over the real tokens, then the classification head.

        Args:
            tokens: ``(B, T', D)`` from :meth:`forward_features`.
            lengths: the same ``(B,)`` input-frame lengths given to ``forward_features``
                (converted here with :meth:`output_lengths`); None = every token is real.
            pre_logits: return the pooled ``(B, D)`` vector, skip the head.

        Returns:
            ``(B, K)`` logits; ``(B, D)`` with ``pre_logits`` or ``num_classes=0``.
        """
        if (
            not isinstance(tokens, Tensor)
            or tokens.ndim != 3
            or tokens.shape[-1] != self.config.dim
        ):
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(
                f"AudioEncoder.forward_head expects tokens (B, T', D={self.config.dim}), got {got}"
            )
        b, n, _ = tokens.shape
        if lengths is None:
            pooled = tokens.mean(dim=1)
        else:
            lengths = self._check_lengths(lengths, b, 2 * n, tokens.device)
            assert lengths is not None
            keep = _frame_mask(output_lengths(lengths), n)[..., None].to(tokens.dtype)  # (B, T', 1)
            pooled = (tokens * keep).sum(dim=1) / keep.sum(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, features: Tensor, lengths: Lengths | None = None) -> Tensor:
        """``forward_head(forward_features(features, lengths), lengths)``.

        Args:
            features: ``(B, n_mels, T)``; see :meth:`forward_features`.
            lengths: ``(B,)`` real input frames per clip, or None.

        Returns:
            ``(B, K)`` logits (``(B, D)`` pooled features when ``num_classes=0``).
        """
        return self.forward_head(self.forward_features(features, lengths), lengths)


def _frame_mask(lengths: Tensor, n: int) -> Tensor:
    """``(B, n)`` bool: True for each row's first ``lengths[b]`` positions."""
    return torch.arange(n, device=lengths.device) < lengths[:, None]
