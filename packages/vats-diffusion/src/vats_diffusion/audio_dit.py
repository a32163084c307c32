"""AudioDiT: a 1D diffusion transformer over log-mel frames (DiT, Peebles & Xie, 2023,
arXiv:2212.09748), conditioned on text and on duration as Stable Audio is ("Fast
Timing-Conditioned Latent Audio Diffusion", Evans et al., 2024; "Stable Audio Open",
Evans et al., 2024).

A log-mel spectrogram ``(B, M, L)`` (channels first, as the image DiT's ``(B, C, h, w)``;
the features of :class:`vats_audio.LogMel`) is cut into tokens of ``p`` frames by a strided
Conv1d, mixed by the image DiT's adaLN-Zero blocks
(:class:`~vats_diffusion.dit_layers.DiTBlock`: self-attention, cross-attention to the text,
MLP) and projected back to ``(B, M_out, L)``: the noise (or velocity) prediction, with the
learned variance's ``M`` channels after it when ``learned_sigma``. Self-attention runs over
``N = L / p`` tokens, so a forward costs O(N²·D) in attention and O(N·D²) elsewhere.

Length. Any ``L`` that is a multiple of ``p`` up to ``max_frames`` runs; positions are 1D
sin-cos of the token index added to the tokens (``sincos``: each token knows its absolute
time) or 1D RoPE in every self-attention (``rope``: relative offsets only). A duration in
seconds becomes a frame count with :func:`frames_for_seconds` (rounded up to the patch).

Conditioning. A vector ``c (B, D)`` drives every adaLN modulation::

    c = time_embed(sinusoid(t))
      + pooled_text_embed(masked_mean(text))                              # text_dim set
      + seconds_start_embed(s0 / max_seconds) + seconds_total_embed(s / max_seconds)

* text: as the image DiT (:mod:`vats_diffusion.dit`): projected text states read by a
  cross-attention in every block with ``text_mask`` as its key padding mask, and their
  masked mean in ``c``. Padding text tokens change nothing (the same prompt padded to 8 or
  77 positions gives the same prediction); a row of ``text_mask`` with no True (or
  ``text_states=None``) is the null text condition of classifier-free guidance, and in
  training ``text_dropout`` turns rows into it at random.
* duration (``max_seconds`` set): ``seconds_start`` (where the window starts in the sound)
  and ``seconds_total`` (the sound's length), each divided by ``max_seconds`` into [0, 1],
  become learned Fourier features ``[u, sin(2π·u·w), cos(2π·u·w)]`` (frequencies ``w``
  learned, as Stable Audio's number conditioners) and an MLP to ``D``. They go into ``c``
  only, not in prefix tokens: the duration is a property of the whole clip, like the
  timestep, and adaLN hands it to every token of every block at no sequence cost, while a
  prefix token would need its own position, an exemption from ``frame_mask`` and removing
  from the output. Stable Audio Open prepends its global token because its transformer
  has no adaLN; with ``sincos`` positions each token already knows its absolute time, which
  is what that prefix gives a RoPE model as an anchor, so ``c`` tells every frame whether
  it lies inside the requested sound.
* time to the end (``end_embed``): each token also gets, added to it, learned Fourier
  features and an MLP of its own time minus the sound's end in the window, over
  ``max_seconds``. From ``c`` and its position alone a token has to work out whether it
  lies past the end, and the ``sounds`` AudioDiT learnt that loosely: its sounds trailed a
  faint hiss to the end of the window and fell silent within 10 % of the requested length
  half the time; told the time to the end, 95 % of the time (text_to_audio's README
  figures).

Padded batches. ``frame_mask (B, L)`` (True = real frame) lets sounds of different lengths
train together: padded frames are zeroed before the patch embedding (they may hold
anything), a token is real when any of its frames is, padded tokens are left out of
self-attention as keys, and the prediction at padded frames is zero. A real frame's
prediction then depends neither on what fills the padding nor on how much follows (to
float rounding). Mask the training loss with the same ``frame_mask``.

Example::

    cfg = audio_dit_preset("sounds", text_dim=64)
    model = AudioDiT(cfg)
    frames = cfg.frames_for(2.5)  # 252: 250 frames of 10 ms, rounded up to the patch
    x = torch.randn(1, cfg.n_mels, frames)
    pred = model(x, t, text_states=states, text_mask=mask, seconds_start=0.0, seconds_total=2.5)

Shapes: B batch, M / M_out mel channels in / out, L frames, p patch (frames per token),
N = L / p tokens, D width, S text tokens, Dt text width, F duration Fourier features.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, check_head_fields
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_positive, check_probability, is_int, is_number
from vats_core.mlp import Activation, GeluMLP
from vats_core.rope import RopeConfig, RotaryEmbedding
from vats_diffusion.dit_layers import (
    AdaLNMode,
    ConditionMLP,
    DiTBlock,
    DiTBlockConfig,
    check_conditioning_fields,
    check_mask,
    check_text_inputs,
    check_timestep,
    context_width,
    dit_block_config,
    embed_text,
    embed_timestep,
    final_layer,
    init_dit_weights,
    sincos_pos_embed_1d,
    text_projection,
)

__all__ = [
    "AUDIO_DIT_PRESETS",
    "AudioDiT",
    "AudioDiTConfig",
    "AudioPosEmbed",
    "LearnedFourierFeatures",
    "audio_dit_preset",
    "frames_for_seconds",
]


class AudioPosEmbed(enum.StrEnum):
    SINCOS = "sincos"  # fixed 1D sin-cos of the token index added to the tokens: absolute time
    ROPE = "rope"  # 1D RoPE over the token index in every self-attention: relative offsets


def frames_for_seconds(
    seconds: float,
    sample_rate: int,
    hop_length: int,
    patch_size: int = 1,
    *,
    max_frames: int | None = None,
) -> int:
    """The frame count of a sound of ``seconds``, rounded up to a multiple of ``patch_size``.

    ``round(seconds · sample_rate)`` samples need ``ceil(samples / hop_length)`` frames for
    the vocoder's ``frames · hop_length`` samples to cover them (cut the waveform back to
    the samples afterwards); the patch then rounds that up.

    Raises:
        ValueError: ``seconds`` is not a finite number > 0, a size is not a positive int, or
            the frames pass ``max_frames``.
    """
    for name, value in (("sample_rate", sample_rate), ("hop_length", hop_length)):
        if not is_int(value) or value < 1:
            raise ValueError(
                f"frames_for_seconds: {name}={value!r} is invalid: expected an int > 0"
            )
    if not is_int(patch_size) or patch_size < 1:
        raise ValueError(
            f"frames_for_seconds: patch_size={patch_size!r} is invalid: expected an int > 0"
        )
    if not is_number(seconds) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"frames_for_seconds: seconds={seconds!r} is invalid: expected a finite number > 0"
        )
    samples = max(1, round(seconds * sample_rate))
    frames = -(-samples // hop_length)
    frames = -(-frames // patch_size) * patch_size
    if max_frames is not None and frames > max_frames:
        longest = max_frames * hop_length / sample_rate
        raise ValueError(
            f"{seconds:g} s needs {frames} frames (hop {hop_length} at {sample_rate} Hz, patch "
            f"{patch_size}), more than max_frames={max_frames} ({longest:g} s)"
        )
    return frames


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioDiTConfig(Config):
    """AudioDiT settings. Defaults are the ``sounds`` shape without text or duration."""

    n_mels: int = 80  # M: mel bins of the input (vats_audio.LogMel's and the encoder's)
    learned_sigma: bool = False  # M_out = 2M: the prediction, then the variance (DiT)
    patch_size: int = 4  # p: frames per token (40 ms at a 10 ms hop)
    max_frames: int = 352  # the longest input, a multiple of patch_size (3.52 s at 10 ms)
    sample_rate: int = 16000  # Hz of the audio the frames come from (for seconds <-> frames)
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz, vats_audio.LogMel's)
    dim: int = 128  # D
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA key/value heads; None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU_TANH  # DiT's approximate GELU
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    window: int | None = None  # self-attention over |i - j| < window tokens
    attention_backend: AttentionBackend = AttentionBackend.AUTO  # local: self-attention only
    norm_eps: float = 1e-6  # the blocks' LayerNorms (the final one is always 1e-6)
    mlp_norm_eps: float | None = None  # the LayerNorm before each MLP; None = norm_eps
    pos_embed: AudioPosEmbed = AudioPosEmbed.SINCOS
    rope_theta: float = 10000.0  # hundreds of tokens: the usual base
    timestep_channels: int = 256  # width of the sinusoid fed to time_embed
    timestep_flip_sin_to_cos: bool = True  # [cos, sin] (DiT, PixArt)
    timestep_freq_shift: float = 0.0  # diffusers' downscale_freq_shift
    text_dim: int | None = None  # Dt; None = no text conditioning
    text_proj: bool = True  # project text to D first (PixArt caption_projection) or attend to Dt
    pooled_text: bool = True  # masked-mean text into the adaLN conditioning
    cross_attn_norm: bool = True  # LayerNorm before cross-attention
    text_dropout: float = 0.0  # training: probability a row becomes the null text condition
    # Duration conditioning: seconds_start and seconds_total in [0, max_seconds] are
    # required inputs and enter c as learned Fourier features; None = no duration input.
    max_seconds: float | None = None
    duration_features: int = 256  # F: Fourier features per number (Stable Audio's 256); even
    # Each token also gets its time relative to the sound's end, (t - (seconds_total -
    # seconds_start)) / max_seconds, as learned Fourier features and an MLP added to it:
    # every token is told whether it lies inside the requested sound, instead of working
    # it out from its position and c. Needs max_seconds.
    end_embed: bool = False

    def __post_init__(self) -> None:
        check_positive(
            self,
            "n_mels",
            "patch_size",
            "max_frames",
            "sample_rate",
            "hop_length",
            "n_layers",
            "mlp_hidden_dim",
            "window",
            "norm_eps",
            "mlp_norm_eps",
            "rope_theta",
            "text_dim",
            "max_seconds",
            "duration_features",
        )
        p = self.patch_size
        check(
            self.max_frames % p == 0,
            self,
            "max_frames",
            self.max_frames,
            f"a positive multiple of patch_size={p}",
        )
        check(
            self.duration_features % 2 == 0,
            self,
            "duration_features",
            self.duration_features,
            "an even int (a sine and a cosine per frequency)",
        )
        check_probability(self, "text_dropout")
        check(
            not self.end_embed or self.max_seconds is not None,
            self,
            "end_embed",
            self.end_embed,
            "False without duration conditioning (max_seconds=None: no end to measure from)",
        )
        check_conditioning_fields(self)
        rope = self.pos_embed is AudioPosEmbed.ROPE
        check_head_fields(self, rope=rope)
        if not rope:
            check(
                self.dim % 2 == 0,
                self,
                "dim",
                self.dim,
                "an even int for sincos positions (a sine and a cosine per frequency)",
            )
        _ = self.block_config  # validates the block's sub-configs

    @property
    def out_channels(self) -> int:
        """M_out: ``2M`` with ``learned_sigma``, else ``M``."""
        return 2 * self.n_mels if self.learned_sigma else self.n_mels

    @property
    def max_tokens(self) -> int:
        """Tokens of the longest input."""
        return self.max_frames // self.patch_size

    @property
    def context_dim(self) -> int | None:
        """Width of the states cross-attention reads: D if ``text_proj``, else Dt."""
        return context_width(self)

    @property
    def block_config(self) -> DiTBlockConfig:
        """The block every layer is built from (adaLN-Zero)."""
        return dit_block_config(self, AdaLNMode.ZERO)

    def seconds(self, frames: int) -> float:
        """Seconds of audio that ``frames`` frames cover."""
        return frames * self.hop_length / self.sample_rate

    def frames_for(self, seconds: float) -> int:
        """:func:`frames_for_seconds` with this model's rate, hop, patch and ``max_frames``."""
        return frames_for_seconds(
            seconds,
            self.sample_rate,
            self.hop_length,
            self.patch_size,
            max_frames=self.max_frames,
        )


class LearnedFourierFeatures(nn.Module):
    """``[u, sin(2π·u·w), cos(2π·u·w)]`` of numbers ``u`` with learned frequencies ``w``
    (``F / 2`` of them, N(0, 1) at init): ``(B,) -> (B, F + 1)``. Stable Audio embeds its
    timing numbers this way, the number itself beside its features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features // 2))

    def forward(self, u: Tensor) -> Tensor:
        angles = 2 * math.pi * u[:, None] * self.weight[None]  # (B, F/2)
        return torch.cat([u[:, None], angles.sin(), angles.cos()], dim=-1)


class DurationEmbedding(nn.Module):
    """A number in [0, 1] to ``(B, D)``: :class:`LearnedFourierFeatures`, then an MLP."""

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        self.fourier = LearnedFourierFeatures(features)
        self.mlp = ConditionMLP(features + 1, dim)

    def forward(self, u: Tensor) -> Tensor:
        return self.mlp(self.fourier(u))


class AudioDiT(PretrainedMixin, nn.Module):
    """The audio diffusion transformer; see the module docstring and :class:`AudioDiTConfig`.

    Modules: ``patch_embed`` (Conv1d), ``time_embed``, ``text_proj``, ``pooled_text_embed``,
    ``seconds_start_embed``, ``seconds_total_embed``, ``blocks``, ``final_adaln``,
    ``proj_out``.
    """

    config_class = AudioDiTConfig

    def __init__(self, config: AudioDiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_size
        self.patch_embed = nn.Conv1d(config.n_mels, d, kernel_size=p, stride=p)
        self.time_embed = ConditionMLP(config.timestep_channels, d)
        self.text_proj: GeluMLP | None = None
        self.pooled_text_embed: ConditionMLP | None = None
        if config.text_dim is not None:
            if config.text_proj:
                self.text_proj = text_projection(config.text_dim, d)
            if config.pooled_text:
                self.pooled_text_embed = ConditionMLP(config.context_dim, d)  # type: ignore[arg-type]
        self.seconds_start_embed: DurationEmbedding | None = None
        self.seconds_total_embed: DurationEmbedding | None = None
        if config.max_seconds is not None:
            self.seconds_start_embed = DurationEmbedding(config.duration_features, d)
            self.seconds_total_embed = DurationEmbedding(config.duration_features, d)
        self.end_embed: DurationEmbedding | None = None
        if config.end_embed:
            self.end_embed = DurationEmbedding(config.duration_features, d)
        block = config.block_config
        self.rotary: RotaryEmbedding | None = None
        if config.pos_embed is AudioPosEmbed.ROPE:
            self.rotary = RotaryEmbedding(
                RopeConfig(head_dim=block.attention.dh, theta=config.rope_theta)
            )
        self.blocks = nn.ModuleList(DiTBlock(block) for _ in range(config.n_layers))
        self.final_adaln = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, p * config.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The image DiT's init (:func:`~vats_diffusion.dit_layers.init_dit_weights`; a fresh
        model predicts exactly zero, the blocks start as the identity) and N(0, 1) Fourier
        frequencies."""
        init_dit_weights(
            self,
            patch_embed=self.patch_embed,
            embedders=[
                self.time_embed,
                self.text_proj,
                self.pooled_text_embed,
                self.seconds_start_embed,
                self.seconds_total_embed,
                self.end_embed,
            ],
            blocks=self.blocks,
            final_adaln=self.final_adaln,
            final_scale_shift_table=None,
            proj_out=self.proj_out,
        )
        for module in self.modules():
            if isinstance(module, LearnedFourierFeatures):
                nn.init.normal_(module.weight)

    # ------------------------------------------------------------------ inputs

    def _check_inputs(
        self,
        x: Tensor,
        timestep: Tensor,
        text_states: Tensor | None,
        text_mask: Tensor | None,
        seconds: dict[str, Tensor | float | None],
        frame_mask: Tensor | None,
        text_keep: Tensor | None = None,
    ) -> None:
        """Every input error, before any work (ValueError naming the argument)."""
        cfg = self.config
        m, p = cfg.n_mels, cfg.patch_size
        if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"AudioDiT: x must be a floating (B, n_mels={m}, L) log-mel tensor, got {got}"
            )
        b, ch, length = x.shape
        if ch != m:
            raise ValueError(
                f"AudioDiT: x has {ch} mel channels, expected n_mels={m}: shape (B, {m}, L)"
            )
        if length == 0 or length % p:
            raise ValueError(
                f"AudioDiT: x has L={length} frames: expected a positive multiple of "
                f"patch_size={p} (frames_for_seconds rounds a duration up to it)"
            )
        if length > cfg.max_frames:
            raise ValueError(
                f"AudioDiT: x has L={length} frames ({cfg.seconds(length):g} s), more than "
                f"max_frames={cfg.max_frames} ({cfg.seconds(cfg.max_frames):g} s)"
            )
        check_timestep("AudioDiT", timestep, b)
        check_text_inputs("AudioDiT", text_states, text_mask, b, cfg.text_dim, text_keep)
        self._check_frame_mask(frame_mask, b, length)
        self._check_seconds(seconds, b)

    def _check_frame_mask(self, mask: Tensor | None, b: int, length: int) -> None:
        if mask is None:
            return
        check_mask("AudioDiT", "frame_mask", mask, (b, length), axes="(B, L)", real="frame", of="x")
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"AudioDiT: frame_mask rows {empty} have no real frame: every sound needs one"
            )

    def _check_seconds(self, seconds: dict[str, Tensor | float | None], b: int) -> None:
        top = self.config.max_seconds
        given = [name for name, value in seconds.items() if value is not None]
        if top is None:
            if given:
                raise ValueError(
                    f"AudioDiT: {' and '.join(given)} given, but the model has no duration "
                    "conditioning (max_seconds=None)"
                )
            return
        missing = [name for name, value in seconds.items() if value is None]
        if missing:
            raise ValueError(
                f"AudioDiT: {' and '.join(missing)} missing: the model conditions on duration "
                f"(seconds_start and seconds_total in [0, max_seconds={top:g}])"
            )
        for name, value in seconds.items():
            if not is_number(value):
                check_timestep("AudioDiT", value, b, name=name)  # type: ignore[arg-type]
            if torch.compiler.is_compiling():
                continue
            values = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
            bad = ~(values.isfinite() & (values >= 0) & (values <= top))
            if bool(bad.any()):
                raise ValueError(
                    f"AudioDiT: {name}={values[bad].tolist()} outside the trained range "
                    f"[0, {top:g}] s (AudioDiTConfig.max_seconds={top:g})"
                )

    # ------------------------------------------------------------------ conditioning

    def condition(
        self,
        timestep: Tensor,
        *,
        pooled_text: Tensor | None = None,
        seconds_start: Tensor | float | None = None,
        seconds_total: Tensor | float | None = None,
        batch: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """The adaLN conditioning ``c (B, D)`` (module docstring)."""
        c = embed_timestep(self.config, self.time_embed, timestep, batch, dtype)  # (B, D)
        if pooled_text is not None:
            c = c + pooled_text
        pairs = (
            (self.seconds_start_embed, seconds_start),
            (self.seconds_total_embed, seconds_total),
        )
        for embed, seconds in pairs:
            if embed is not None and seconds is not None:
                u = torch.as_tensor(seconds, dtype=dtype, device=c.device).expand(batch)
                c = c + embed(u / self.config.max_seconds)
        return c

    # ------------------------------------------------------------------ forward

    def _embed(self, x: Tensor) -> Tensor:
        """Patch tokens ``(B, N, D)`` with sin-cos positions added."""
        tokens = rearrange(self.patch_embed(x), "b d n -> b n d").contiguous()
        if self.config.pos_embed is AudioPosEmbed.SINCOS:
            table = sincos_pos_embed_1d(self.config.dim, tokens.shape[1], device=x.device)
            tokens = tokens + table.to(tokens.dtype)
        return tokens

    def _to_end(self, seconds_start: Any, seconds_total: Any, tokens: Tensor) -> Tensor:
        """``end_embed`` of each token's start time minus the sound's end in the window,
        over ``max_seconds``: ``(B, N, D)``."""
        cfg = self.config
        assert self.end_embed is not None and cfg.max_seconds is not None
        b, n, d = tokens.shape
        as_b = dict(dtype=tokens.dtype, device=tokens.device)
        end = torch.as_tensor(seconds_total, **as_b).expand(b) - torch.as_tensor(
            seconds_start, **as_b
        ).expand(b)  # (B,)
        starts = torch.arange(n, **as_b) * cfg.seconds(cfg.patch_size)  # (N,)
        u = (starts[None] - end[:, None]) / cfg.max_seconds  # (B, N)
        return self.end_embed(u.reshape(-1)).view(b, n, d)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        *,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        seconds_start: Tensor | float | None = None,
        seconds_total: Tensor | float | None = None,
        frame_mask: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> Tensor:
        """Predict from noisy log-mel frames.

        Args:
            x: ``(B, n_mels, L)``; ``L`` a multiple of ``patch_size``, at most ``max_frames``.
            timestep: ``(B,)`` (or a scalar for the whole batch), ints or floats.
            text_states: ``(B, S, Dt)`` text encoder states; None = the null text
                condition for every row. Models with ``text_dim`` only.
            text_mask: ``(B, S)`` bool, True = real token; None = all real. A row with no
                True is the null text condition.
            text_keep: ``(B,)`` bool, True = the row keeps its text (False: the null text
                condition), in place of ``text_dropout``'s draw; None = drawn in training.
            seconds_start: ``(B,)`` or one number: where the frames start in the sound, in
                seconds in ``[0, max_seconds]``. Required iff ``max_seconds`` is set.
            seconds_total: ``(B,)`` or one number: the sound's length in seconds, in
                ``[0, max_seconds]``. Required iff ``max_seconds`` is set.
            frame_mask: ``(B, L)`` bool, True = real frame; None = all real. Every row needs
                a real frame.

        Returns:
            ``(B, M_out, L)``, zero at padded frames: with ``learned_sigma`` the ``M``
            prediction channels, then the ``M`` variance channels.

        Raises:
            ValueError: bad shapes or dtypes, too many frames, seconds out of range, or
                conditioning the model does not have (or lacks).
        """
        seconds = {"seconds_start": seconds_start, "seconds_total": seconds_total}
        self._check_inputs(x, timestep, text_states, text_mask, seconds, frame_mask, text_keep)
        b, p = x.shape[0], self.config.patch_size
        # 1. Padding frames zeroed; a token is real when any of its frames is.
        token_mask = None
        if frame_mask is not None:
            x = torch.where(frame_mask[:, None], x, 0.0)
            token_mask = frame_mask.view(b, -1, p).any(dim=-1)  # (B, N)
        # 2. Patches, positions, the time to the sound's end.
        tokens = self._embed(x)
        if self.end_embed is not None:
            tokens = tokens + self._to_end(seconds_start, seconds_total, tokens)
        rope = None
        if self.rotary is not None:
            positions = torch.arange(tokens.shape[1], device=x.device)
            rope = self.rotary(positions, tokens.dtype)
        # 3. Text: projected context, its mask, the gate of text-less rows, pooled text.
        context = context_mask = gate = pooled = None
        if text_states is not None:
            context, context_mask, gate, pooled = embed_text(
                text_states.to(tokens.dtype),
                text_mask,
                text_proj=self.text_proj,
                pooled_text_embed=self.pooled_text_embed,
                text_dropout=self.config.text_dropout,
                training=self.training,
                keep=text_keep,
            )
        # 4. The adaLN conditioning: timestep, pooled text, duration.
        c = self.condition(
            timestep,
            pooled_text=pooled,
            seconds_start=seconds_start,
            seconds_total=seconds_total,
            batch=b,
            dtype=tokens.dtype,
        )
        cond = F.silu(c)
        # 5. Blocks.
        for block in self.blocks:
            tokens = block(
                tokens,
                cond,
                rope=rope,
                context=context,
                context_mask=context_mask,
                context_gate=gate,
                key_padding_mask=token_mask,
            )
        # 6. Final layer, unpatchify (channels last within a patch, as the image DiT).
        shift, scale = self.final_adaln(cond).chunk(2, dim=-1)  # (B, D) each
        out = final_layer(tokens, shift, scale, self.proj_out)  # (B, N, p·M_out)
        out = rearrange(out, "b n (p c) -> b c (n p)", p=p)
        if frame_mask is not None:
            out = torch.where(frame_mask[:, None], out, 0.0)
        return out


# ---------------------------------------------------------------------- presets

AUDIO_DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: text, duration, GQA; 64 frames (0.64 s) at most; a forward in milliseconds.
    "tiny": dict(
        n_mels=16,
        patch_size=2,
        max_frames=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        timestep_channels=32,
        text_dim=24,
        max_seconds=1.0,
        duration_features=16,
    ),
    # The CPU demo on vats_audio.LogMel features (80 mels, 10 ms hop at 16 kHz): up to
    # 3.52 s in 88 tokens of 40 ms, text and duration conditioning (each token told its
    # time to the sound's end), condition dropout 0.1 for guidance. text_dim comes from
    # the text encoder.
    "sounds": dict(
        n_mels=80,
        patch_size=4,
        max_frames=352,
        dim=128,
        n_layers=4,
        n_heads=4,
        mlp_hidden_dim=512,
        text_dim=64,
        text_dropout=0.1,
        max_seconds=3.5,
        end_embed=True,
    ),
}


def audio_dit_preset(name: str, **overrides: Any) -> AudioDiTConfig:
    """The named :class:`AudioDiTConfig` (:data:`AUDIO_DIT_PRESETS`), with fields replaced
    by ``overrides``. Example: ``audio_dit_preset("sounds", text_dim=128)``."""
    if name not in AUDIO_DIT_PRESETS:
        raise ValueError(
            f"unknown AudioDiT preset {name!r}: expected one of {sorted(AUDIO_DIT_PRESETS)}"
        )
    return AudioDiTConfig(**{**AUDIO_DIT_PRESETS[name], **overrides})
