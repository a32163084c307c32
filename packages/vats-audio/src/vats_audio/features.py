"""Log-mel spectrogram features, computed as Whisper's extractor does (Radford et al., 2022,
"Robust Speech Recognition via Large-Scale Weak Supervision", arXiv:2212.04356), at any
length and on padded batches.

The steps, for a clip of S samples at ``sample_rate``:

1. Centre the frames: reflect-pad ``n_fft // 2`` samples on each side (as ``torch.stft``'s
   ``center=True``), per clip at the clip's own end in a padded batch.
2. STFT with a periodic Hann window of ``n_fft`` samples every ``hop_length`` samples, the
   power spectrum ``|X|²``, and the last frame dropped: S samples give ``S // hop_length``
   frames (frame t is centred on sample ``t · hop_length``).
3. Mel power: Slaney-scale, Slaney-normalised (area) triangular filters from
   ``torchaudio.functional.melscale_fbanks``, built once in float64 (in float32 they are
   ~1e-4 off the extractor's numpy filters; in float64 they agree to 1e-15).
4. Normalisation (:class:`LogMelNormalization`):

   * ``whisper``: ``log10(max(mel, 1e-10))``, floored at the clip's maximum − 8, then
     ``(x + 4) / 4``;
   * ``log``: the natural log ``ln(max(mel, 1e-10))``, no floor.

Agreement with ``transformers.WhisperFeatureExtractor`` (which always pads or cuts to 30 s
with zeros before the STFT): for a 30 s clip all 3000 frames agree (within 2e-5: float32
rounding). For a shorter clip of S samples, frame t agrees when its window lies inside the
audio, ``t · hop_length + n_fft // 2 <= S`` (all frames but the last one or two with
Whisper's sizes), provided the clip's maximum lies in those frames. The last frames differ
because the extractor's window there sees its zero padding where LogMel reflects the clip's
own end; the floor (maximum − 8) would differ only if the maximum sat in those frames (the
extractor's maximum also runs over its padding, which is digital silence and never wins).

Padded batches: ``forward(waveform, lengths)`` gives each clip the features it gets alone:
the reflect padding and the maximum for the floor use only its own samples and frames, and
the frames past its end (``t >= lengths[i] // hop_length``) hold the value digital silence
gets, ``(max(clip max − 8, −10) + 4) / 4`` for ``whisper`` (exactly what the extractor gives
for its zero padding) and ``ln(1e-10)`` for ``log``.

Shapes: B batch, S samples, F = n_fft // 2 + 1 frequency bins, M mel bins, T frames.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Sequence

import torch
import torchaudio
from torch import Tensor, nn

from vats_core.config import Config, check, check_at_least, check_positive, is_int

__all__ = ["LogMel", "LogMelConfig", "LogMelNormalization", "mel_filters"]

_CLAMP = 1e-10  # the mel power floor before the log (Whisper's)
_DYNAMIC_RANGE = 8.0  # whisper: log10 values below the clip's max − 8 are raised to it


class LogMelNormalization(enum.StrEnum):
    """How mel power becomes features."""

    WHISPER = "whisper"  # log10, floor at clip max − 8, (x + 4) / 4: Whisper's input
    LOG = "log"  # ln(max(mel, 1e-10)): a plain log-mel, no per-clip statistic


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogMelConfig(Config):
    """Log-mel settings. Defaults are Whisper's (v1 to v3 use 80 mels, large-v3 128)."""

    sample_rate: int = 16000  # Hz the features are built for; other rates raise in forward
    n_fft: int = 400  # STFT size = Hann window length (25 ms at 16 kHz); even
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz): S samples -> S // hop
    n_mels: int = 80  # mel bins
    f_min: float = 0.0  # Hz, lowest mel filter edge
    f_max: float | None = None  # Hz, highest mel filter edge; None = sample_rate / 2
    normalization: LogMelNormalization = LogMelNormalization.WHISPER

    def __post_init__(self) -> None:
        check_positive(self, "sample_rate", "n_fft", "hop_length", "n_mels")
        check(self.n_fft % 2 == 0, self, "n_fft", self.n_fft, "an even int (centred frames)")
        check(
            self.hop_length <= self.n_fft,
            self,
            "hop_length",
            self.hop_length,
            f"an int <= n_fft={self.n_fft} (frames must cover the signal)",
        )
        nyquist = self.sample_rate / 2
        check_at_least(self, 0.0, "f_min")
        check(self.f_min < nyquist, self, "f_min", self.f_min, f"< sample_rate / 2 = {nyquist:g}")
        if self.f_max is not None:
            check(
                math.isfinite(self.f_max) and self.f_min < self.f_max <= nyquist,
                self,
                "f_max",
                self.f_max,
                f"None or a number in (f_min={self.f_min:g}, sample_rate / 2 = {nyquist:g}]",
            )

    @property
    def n_freqs(self) -> int:
        """Frequency bins of the one-sided STFT."""
        return self.n_fft // 2 + 1

    @property
    def f_max_hz(self) -> float:
        """The highest mel filter edge in Hz (``f_max`` or the Nyquist frequency)."""
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)


def mel_filters(config: LogMelConfig) -> Tensor:
    """The Slaney-scale, Slaney-normalised mel filterbank, ``(F, M)`` float64.

    ``torchaudio.functional.melscale_fbanks`` builds its grids in the default dtype; it is
    run here with float64 as the default for the duration of the call (once, when a module
    is built), since float32 grids put the filter edges ~1e-4 off Whisper's.

    Raises:
        ValueError: a mel filter covers no FFT bin (too many mels for ``n_fft``).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # Built on the CPU whatever the default device (the empty-filter check reads values,
        # which a meta-device build, as in from_pretrained, could not); callers move it.
        with warnings.catch_warnings(), torch.device("cpu"):
            # torchaudio warns about empty filters; we raise instead, below.
            warnings.simplefilter("ignore", UserWarning)
            fb = torchaudio.functional.melscale_fbanks(
                n_freqs=config.n_freqs,
                f_min=float(config.f_min),
                f_max=config.f_max_hz,
                n_mels=config.n_mels,
                sample_rate=config.sample_rate,
                norm="slaney",
                mel_scale="slaney",
            )
    finally:
        torch.set_default_dtype(previous)
    empty = (fb.amax(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"LogMelConfig(n_mels={config.n_mels}, n_fft={config.n_fft}, f_min={config.f_min}, "
            f"f_max={config.f_max_hz:g}): mel filters {empty[:5]}{'...' if len(empty) > 5 else ''} "
            "cover no FFT bin; use fewer mels, a larger n_fft or a wider frequency range"
        )
    return fb


class LogMel(nn.Module):
    """Waveform -> log-mel features, Whisper's way, at any length (no padding to 30 s).

    Float32 (and float16 / bfloat16, upcast) waveforms are computed in float32, float64 in
    float64. Deterministic; plain torch ops (gather, ``torch.stft``, a matmul), so
    ``torch.compile(fullgraph=True)`` traces ``forward`` in one graph. The checks that
    read tensor values (finite samples, lengths in range) run in eager mode only.

    Args:
        config: the feature settings.
    """

    window: Tensor
    filters: Tensor

    def __init__(self, config: LogMelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else LogMelConfig()
        # Derived from the config, so not part of a state dict (persistent=False).
        window = torch.hann_window(self.config.n_fft, periodic=True, dtype=torch.float64)
        self.register_buffer("window", window, persistent=False)  # (n_fft,)
        filters = mel_filters(self.config).to(window.device)
        self.register_buffer("filters", filters, persistent=False)  # (F, M)

    def init_non_persistent_buffers(self) -> None:
        """Compute the window and the filters again, on the default device: what
        ``from_pretrained`` of a model holding a LogMel calls after building it on the meta
        device (:data:`vats_core.checkpoint.INIT_BUFFERS_HOOK`)."""
        window = torch.hann_window(self.config.n_fft, periodic=True, dtype=torch.float64)
        self.window = window
        self.filters = mel_filters(self.config).to(window.device)

    def frame_lengths(self, lengths: Tensor | Sequence[int]) -> Tensor:
        """Frames of each clip: ``lengths // hop_length``, a ``(B,)`` long tensor.

        Args:
            lengths: ``(B,)`` sample counts, integers >= 1.
        """
        lengths = _as_lengths(lengths, None, None)
        return torch.div(lengths, self.config.hop_length, rounding_mode="floor")

    def forward(
        self,
        waveform: Tensor,
        lengths: Tensor | Sequence[int] | None = None,
        *,
        sample_rate: int | None = None,
    ) -> Tensor:
        """Log-mel features of each clip.

        Args:
            waveform: ``(S,)`` one clip or ``(B, S)`` clips, float samples (nominally in
                [-1, 1]) at ``config.sample_rate``.
            lengths: ``(B,)`` sample counts of right-padded clips (1 <= length <= S); None
                means every clip is S samples long.
            sample_rate: the waveform's rate, checked against ``config.sample_rate`` when
                given (pass it: a mismatch silently shifts every mel bin otherwise).

        Returns:
            ``(B, M, S // hop_length)`` features (B = 1 for a ``(S,)`` waveform). Frames
            past a clip's end hold digital silence's value (module docstring).

        Raises:
            ValueError: a non-float or non-finite waveform, a rank other than 1 or 2, lengths
                that do not fit the batch, or a sample rate other than the config's.
        """
        x_BS = self._check_waveform(waveform, sample_rate)
        lengths_B = None
        if lengths is not None:
            lengths_B = _as_lengths(lengths, x_BS.shape[0], x_BS.shape[1]).to(x_BS.device)
        return self._features(x_BS, lengths_B)

    def _check_waveform(self, waveform: Tensor, sample_rate: int | None) -> Tensor:
        cfg = self.config
        if sample_rate is not None and (not is_int(sample_rate) or sample_rate != cfg.sample_rate):
            raise ValueError(
                f"LogMel was built for {cfg.sample_rate} Hz audio but got sample_rate="
                f"{sample_rate!r}; resample first, e.g. vats_audio.io.load(path, "
                f"sample_rate={cfg.sample_rate}) or torchaudio.functional.resample"
            )
        if not isinstance(waveform, Tensor):
            raise ValueError(f"LogMel expects a waveform tensor, got {type(waveform).__name__}")
        if waveform.dim() not in (1, 2):
            raise ValueError(
                f"LogMel expects a waveform of shape (S,) or (B, S), got {tuple(waveform.shape)}"
                " (downmix multichannel audio first: vats_audio.io.load(..., mono=True))"
            )
        if not waveform.is_floating_point():
            raise ValueError(
                f"LogMel expects float samples in [-1, 1], got dtype {waveform.dtype} "
                "(integer PCM: divide by 2**(bits - 1), or read with vats_audio.io.load)"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(waveform).all()):
            raise ValueError("LogMel got NaN or infinite samples in the waveform")
        dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
        return (waveform if waveform.dim() == 2 else waveform[None]).to(dtype)  # (B, S)

    def _features(self, x_BS: Tensor, lengths_B: Tensor | None) -> Tensor:
        cfg = self.config
        B, S = x_BS.shape
        T, pad = S // cfg.hop_length, cfg.n_fft // 2
        if T == 0 or B == 0:  # (MKL's FFT refuses an empty batch)
            return x_BS.new_zeros(B, cfg.n_mels, T)
        if lengths_B is None:
            lengths_B = torch.full((B,), S, dtype=torch.long, device=x_BS.device)

        # 1. Reflect-pad each clip at its own ends: padded position p reads sample
        # |p - pad| folded into [0, L - 1] with period 2 (L - 1), the mirror image without
        # repeating the edge sample (torch's "reflect"), repeated when pad >= L.
        pos = torch.arange(S + 2 * pad, device=x_BS.device) - pad  # (S + n_fft,)
        period = (2 * (lengths_B - 1)).clamp_min(1)[:, None]  # (B, 1)
        folded = pos.abs()[None, :] % period  # (B, S + n_fft)
        idx = torch.where(folded < lengths_B[:, None], folded, period - folded)
        padded = x_BS.gather(1, idx)  # (B, S + n_fft)

        # 2. Power spectrum of the T centred frames (the STFT's last frame is dropped).
        spec = torch.stft(
            padded,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            window=self.window.to(x_BS.dtype),
            center=False,
            return_complex=True,
        )  # (B, F, T + 1)
        power_BFT = spec[..., :T].abs().pow(2)

        # 3. Mel power, then 4. the normalisation.
        mel_BMT = self.filters.to(x_BS.dtype).T @ power_BFT
        valid_BT = torch.arange(T, device=x_BS.device)[None, :] < (
            lengths_B[:, None] // cfg.hop_length
        )
        if cfg.normalization is LogMelNormalization.LOG:
            log_BMT = mel_BMT.clamp_min(_CLAMP).log()
            return log_BMT.masked_fill(~valid_BT[:, None, :], math.log(_CLAMP))
        log_BMT = mel_BMT.clamp_min(_CLAMP).log10()
        clip_max = (
            log_BMT.masked_fill(~valid_BT[:, None, :], -math.inf)
            .amax(dim=(1, 2), keepdim=True)
            .clamp_min(math.log10(_CLAMP))  # a clip with no frames: digital silence
        )  # (B, 1, 1)
        floor = clip_max - _DYNAMIC_RANGE
        silence = floor.clamp_min(math.log10(_CLAMP))  # what a zero-padded frame gets
        log_BMT = torch.where(valid_BT[:, None, :], torch.maximum(log_BMT, floor), silence)
        return (log_BMT + 4.0) / 4.0

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"sample_rate={cfg.sample_rate}, n_fft={cfg.n_fft}, hop_length={cfg.hop_length}, "
            f"n_mels={cfg.n_mels}, normalization={cfg.normalization.value}"
        )


def _as_lengths(lengths: Tensor | Sequence[int], batch: int | None, samples: int | None) -> Tensor:
    """``(B,)`` long lengths, checked: integers, the batch's shape, 1 <= length <= S."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must hold integer sample counts, got dtype {lengths.dtype}")
        lengths_t = lengths.long()
    else:
        if isinstance(lengths, str | bytes) or not isinstance(lengths, Sequence):
            raise ValueError(
                f"lengths must be a (B,) integer tensor or a sequence of ints, got "
                f"{type(lengths).__name__}"
            )
        if not all(is_int(n) for n in lengths):
            raise ValueError(f"lengths must hold integer sample counts, got {list(lengths)!r}")
        lengths_t = torch.tensor(list(lengths), dtype=torch.long)
    expected = "(B,)" if batch is None else f"({batch},), one per clip of the batch"
    if lengths_t.dim() != 1 or (batch is not None and lengths_t.shape[0] != batch):
        raise ValueError(f"lengths must have shape {expected}, got {tuple(lengths_t.shape)}")
    if not torch.compiler.is_compiling() and lengths_t.numel():
        low, high = int(lengths_t.min()), int(lengths_t.max())
        if low < 1 or (samples is not None and high > samples):
            bound = "" if samples is None else f" and <= the waveform's {samples} samples"
            raise ValueError(
                f"lengths must be >= 1{bound}; got values in [{low}, {high}]: "
                f"{lengths_t.tolist()[:8]}"
            )
    return lengths_t
