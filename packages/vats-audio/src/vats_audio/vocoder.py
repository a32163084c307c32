"""Log-mel features -> waveform.

:class:`Vocoder` is the interface a generator's output goes through to become sound;
:class:`GriffinLimVocoder` is the model-free one: it undoes :class:`~vats_audio.LogMel`'s
normalisation, maps mel power back to linear-frequency power with the minimum-norm
least-squares inverse of the mel filterbank (negative powers cut to zero), and estimates a
phase with Griffin-Lim (Griffin & Lim, 1984, "Signal estimation from modified short-time
Fourier transform"; the fast momentum variant of Perraudin et al., 2013,
``torchaudio.functional.griffinlim``).

Why a pseudo-inverse rather than ``torchaudio.transforms.InverseMelScale``: that solves the
least squares with ``torch.linalg.lstsq``, and its ``gels`` driver (the only one on CUDA)
assumes a full-rank filterbank. Whisper's is not: below 1 kHz its mel filters are narrower
than an FFT bin (40 Hz at n_fft = 400), so several cover the same one or two bins; the
80-mel bank has rank 79, the 128-mel bank rank 106. Measured with torchaudio 2.10: for 128
mels ``gels`` raises (not full rank); for 80 mels in float64 it returns powers ~1e15; in
float32 rounding hides the missing rank, and the vocoded speech-like clip gets its strongest
component at 0 Hz and twice the features' error of the pseudo-inverse. The SVD
pseudo-inverse (``torch.linalg.pinv``, computed once in float64, singular values below 1e-3
of the largest dropped) is the minimum-norm least-squares solution whatever the rank, as
the CPU-only ``gelsd`` driver gives it, and one matmul on any device.

The phase starts from zero (``rand_init=False``), so there is no randomness: the same
features give bit-identical waveforms on the same machine and thread count.

Lengths: T frames give ``T * hop_length`` samples, the shortest clip :class:`LogMel` turns
into T frames. LogMel drops the STFT's last frame; the vocoder puts back a copy of frame
T - 1 in its place, so the T + 1 frames of a ``T * hop_length``-sample signal are all known.
(A clip too short for the STFT's reflect padding, ``T * hop_length <= n_fft / 2``, one frame
with Whisper's sizes, is vocoded with more copies of its last frame and cut to length.)

The Whisper normalisation floors each clip at its maximum − 8 (in log10 power), so the
quietest 80 dB of a clip come back as a uniform noise floor; features past a clip's end in
a padded batch (digital silence's value) come back near-silent.

Shapes: B batch, M mel bins, F = n_fft // 2 + 1 frequency bins, T frames, S samples.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torchaudio
from torch import Tensor, nn

from vats_audio.features import LogMelConfig, LogMelNormalization, mel_filters
from vats_core.config import is_int

__all__ = ["GriffinLimVocoder", "Vocoder"]

_PINV_RTOL = 1e-3  # singular values of the filterbank below this fraction of the largest: 0


@runtime_checkable
class Vocoder(Protocol):
    """Turns log-mel features into a waveform at ``sample_rate``.

    ``vocoder(features)``: ``(B, M, T)`` -> ``(B, S)``, or ``(M, T)`` -> ``(S,)``, with the
    features as :class:`~vats_audio.LogMel` computes them for ``config``.
    """

    @property
    def config(self) -> LogMelConfig: ...

    @property
    def sample_rate(self) -> int: ...

    def __call__(self, features: Tensor) -> Tensor: ...


class GriffinLimVocoder(nn.Module):
    """Griffin-Lim inversion of :class:`~vats_audio.LogMel` features; no trained weights.

    Runs in float32 (float64 for float64 features); the mel inverse is applied in float64.
    The default ``n_iter=64`` vocodes a 2 s clip (200 frames) in ~70 ms on a 2-core CPU
    (measured: 66 ms; 32 iterations 34 ms, 128 iterations 130 ms). For a speech-like clip
    LogMel of the result is then within 0.009 (mean abs, Whisper units: 0.04 in log10
    power) of the input features, against 0.012 at 32 and 0.007 at 128 iterations.

    Args:
        config: the features' settings (rate, STFT sizes, mels, normalisation).
        n_iter: Griffin-Lim iterations: more sharpen the phase, linearly slower.
        momentum: the fast Griffin-Lim momentum, in [0, 1); 0 is the original algorithm.
    """

    mel_pinv: Tensor
    window: Tensor

    def __init__(
        self, config: LogMelConfig | None = None, *, n_iter: int = 64, momentum: float = 0.99
    ) -> None:
        super().__init__()
        config = config if config is not None else LogMelConfig()
        if not isinstance(config, LogMelConfig):
            raise ValueError(
                f"GriffinLimVocoder expects a LogMelConfig, got {type(config).__name__}"
            )
        if not (is_int(n_iter) and n_iter >= 1):
            raise ValueError(
                f"GriffinLimVocoder: n_iter={n_iter!r} is invalid: expected an int >= 1"
            )
        if isinstance(momentum, bool) or not (
            isinstance(momentum, int | float) and 0.0 <= momentum < 1.0
        ):
            raise ValueError(
                f"GriffinLimVocoder: momentum={momentum!r} is invalid: expected a number in [0, 1)"
            )
        if config.hop_length >= config.n_fft:
            raise ValueError(
                f"GriffinLimVocoder needs overlapping frames: hop_length={config.hop_length} must "
                f"be < n_fft={config.n_fft} for the inverse STFT"
            )
        self._config = config
        self.n_iter = n_iter
        self.momentum = float(momentum)
        # (F, M): mel power -> linear power, the minimum-norm least-squares inverse.
        pinv = torch.linalg.pinv(mel_filters(config).T, rtol=_PINV_RTOL)
        self.register_buffer("mel_pinv", pinv, persistent=False)
        window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float64)
        self.register_buffer("window", window, persistent=False)

    @property
    def config(self) -> LogMelConfig:
        return self._config

    @property
    def sample_rate(self) -> int:
        return self._config.sample_rate

    def forward(self, features: Tensor) -> Tensor:
        """Waveform of log-mel features.

        Args:
            features: ``(B, M, T)`` or ``(M, T)`` features as :class:`LogMel` gives them.

        Returns:
            ``(B, T * hop_length)`` or ``(T * hop_length,)`` samples at ``sample_rate``,
            not clipped (:func:`vats_audio.save` clips 16-bit files to [-1, 1]).

        Raises:
            ValueError: not a float tensor, rank not 2 or 3, ``M != n_mels``, no frames, or
                NaN / infinite values.
        """
        cfg = self._config
        if not isinstance(features, Tensor):
            raise ValueError(
                f"GriffinLimVocoder expects a features tensor, got {type(features).__name__}"
            )
        if (
            features.dim() not in (2, 3)
            or features.shape[-2] != cfg.n_mels
            or features.shape[-1] < 1
        ):
            raise ValueError(
                f"GriffinLimVocoder expects features of shape (B, {cfg.n_mels}, T) or "
                f"({cfg.n_mels}, T) with T >= 1 frames, got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(
                f"GriffinLimVocoder expects float features, got dtype {features.dtype}"
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("GriffinLimVocoder got NaN or infinite features")

        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        x_BMT = features.reshape(-1, *features.shape[-2:])
        T = x_BMT.shape[-1]
        if x_BMT.shape[0] == 0:  # (MKL's FFT refuses an empty batch)
            return features.new_zeros(0, T * cfg.hop_length, dtype=dtype)

        # 1. Undo the normalisation: mel power.
        if cfg.normalization is LogMelNormalization.WHISPER:
            mel_BMT = torch.pow(10.0, x_BMT.double() * 4.0 - 4.0)
        else:
            mel_BMT = x_BMT.double().exp()
        # 2. Linear-frequency power: least squares through the filterbank, negatives cut.
        power_BFT = torch.relu(self.mel_pinv.to(torch.float64) @ mel_BMT).to(dtype)
        # 3. The frame LogMel dropped, approximated by its neighbour (module docstring), and
        # more copies while the signal is too short for the STFT's reflect padding (T_run
        # frames for T_run * hop > n_fft / 2); the output is cut back to T * hop samples.
        T_run = max(T, cfg.n_fft // (2 * cfg.hop_length) + 1)
        extra = power_BFT[..., -1:].expand(-1, -1, T_run + 1 - T)
        power_BFT = torch.cat([power_BFT, extra], dim=-1)  # (B, F, T_run + 1)
        # 4. A phase for it: Griffin-Lim from a zero phase.
        wave_BS = torchaudio.functional.griffinlim(
            power_BFT,
            window=self.window.to(dtype),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.n_fft,
            power=2.0,
            n_iter=self.n_iter,
            momentum=self.momentum,
            length=T_run * cfg.hop_length,
            rand_init=False,
        )[..., : T * cfg.hop_length]
        return wave_BS if features.dim() == 3 else wave_BS[0]

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}, momentum={self.momentum:g}, sample_rate={self.sample_rate}"
