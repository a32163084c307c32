"""GriffinLimVocoder: a pure tone keeps its pitch through LogMel and back, lengths follow the
frames, the round trip's features come back close, outputs are bit-identical run to run, and
bad features or settings are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vats_audio import GriffinLimVocoder, LogMel, LogMelConfig, Vocoder
from vats_audio.features import mel_filters
from vats_core.testing import check_raises

SR, HOP = 16000, 160


def _tone(freq: float, seconds: float = 1.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def _peak_hz(x: torch.Tensor) -> float:
    return torch.fft.rfft(x.double()).abs().argmax().item() * SR / x.shape[-1]


def _mel_bin_hz(freq: float, n_mels: int) -> float:
    """Spacing of Slaney mel filters at ``freq`` (0-8 kHz): 200/3 Hz per mel below 1 kHz,
    logarithmic above, with ``n_mels + 1`` equal mel steps over the range."""
    top = 15 + 27 * math.log(8000 / 1000) / math.log(6.4)  # mel(8 kHz)
    step = top / (n_mels + 1)
    return step * (200 / 3 if freq < 1000 else freq * math.log(6.4) / 27)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("freq", [220.0, 440.0, 1000.0, 3333.0])
def test_pure_tone_keeps_its_pitch(n_mels: int, freq: float) -> None:
    config = LogMelConfig(n_mels=n_mels)
    features = LogMel(config)(_tone(freq))
    audio = GriffinLimVocoder(config)(features)
    assert audio.shape == (1, SR)
    # 1 s of output: 1 Hz FFT bins. Below 1 kHz (mel bins 24 to 38 Hz wide here) the pitch
    # comes back within a few Hz (measured: 0 to 6); above, where a mel bin spans 80 to
    # 130 Hz, within one bin (measured: 27 to 33 Hz off at 3333 Hz).
    tolerance = 8.0 if freq <= 1000 else _mel_bin_hz(freq, n_mels)
    assert abs(_peak_hz(audio[0]) - freq) <= tolerance
    assert 0.2 < audio.abs().max() < 2.0  # about the tone's 0.5 (the phase is estimated)


@pytest.mark.parametrize("normalization", ["whisper", "log"])
def test_round_trip_features_come_back(normalization: str) -> None:
    config = LogMelConfig(normalization=normalization)
    lm = LogMel(config)
    t = torch.arange(SR) / SR
    x = sum(0.2 / k * torch.sin(2 * math.pi * 180 * k * t) for k in range(1, 8))
    features = lm(x)
    again = lm(GriffinLimVocoder(config)(features))
    scale = 1.0 if normalization == "whisper" else 4 * math.log(10)  # to Whisper's units
    assert (again - features).abs().mean() / scale < 0.03


def test_lengths_shapes_and_dtypes() -> None:
    vocoder = GriffinLimVocoder(n_iter=4)
    features = LogMel()(torch.rand(3, 1234) - 0.5)  # 7 frames
    assert features.shape[-1] == 7
    audio = vocoder(features)
    assert audio.shape == (3, 7 * HOP) and audio.dtype == torch.float32
    assert vocoder(features[1]).shape == (7 * HOP,)
    # Each clip alone gives its batch row (float64: the FFTs' batch rounding stays tiny).
    batch64 = vocoder(features.double())
    assert batch64.dtype == torch.float64
    torch.testing.assert_close(vocoder(features[1].double()), batch64[1], atol=1e-9, rtol=0)
    assert vocoder(features[..., :1]).shape == (3, HOP)  # shorter than the STFT's padding
    assert vocoder(features[:0]).shape == (0, 7 * HOP)
    # T frames give T * hop samples, which LogMel turns back into T frames.
    assert LogMel()(audio).shape == features.shape


def test_bit_identical_outputs() -> None:
    features = LogMel()(_tone(440.0, 0.5) + 0.05 * _tone(3000.0, 0.5))
    first = GriffinLimVocoder()(features)
    again = GriffinLimVocoder()(features)  # a fresh module: nothing carried between calls
    assert torch.equal(first, again)
    assert torch.equal(first, GriffinLimVocoder()(features))


def test_padded_silence_vocodes_quiet() -> None:
    x = torch.zeros(2, SR)
    x[0] = _tone(440.0)
    features = LogMel()(x, [SR, SR // 2])
    audio = GriffinLimVocoder(n_iter=16)(features)
    # the second clip's padded half (silence's value) is ~80 dB under the tone
    assert audio[1, SR // 2 + 400 :].abs().max() < 1e-3 * audio[0].abs().max()


def test_inverse_is_the_filterbank_pseudo_inverse() -> None:
    """gels (InverseMelScale's CUDA driver) assumes full rank; Whisper's filterbank is not."""
    fb = mel_filters(LogMelConfig())  # (F, M)
    assert torch.linalg.matrix_rank(fb.T) < 80
    pinv = GriffinLimVocoder().mel_pinv
    torch.testing.assert_close(pinv, torch.linalg.pinv(fb.T, rtol=1e-3))
    # least squares: the residual of a mel power in the filterbank's range is ~0
    power = torch.rand(201, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mel = fb.T @ power
    assert (fb.T @ (pinv @ mel) - mel).abs().max() < 1e-6 * mel.abs().max()


def test_is_a_vocoder() -> None:
    vocoder = GriffinLimVocoder(LogMelConfig(n_mels=128))
    assert isinstance(vocoder, Vocoder)
    assert vocoder.sample_rate == SR and vocoder.config.n_mels == 128
    assert vocoder.state_dict() == {}


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.zeros(1, 64, 10), r"\(B, 80, T\)"),
        (torch.zeros(80), r"\(B, 80, T\)"),
        (torch.zeros(1, 1, 80, 10), r"\(B, 80, T\)"),
        (torch.zeros(1, 80, 0), "T >= 1"),
        (torch.zeros(80, 10, dtype=torch.long), "float"),
        (torch.full((80, 10), math.nan), "NaN or infinite"),
        (torch.full((80, 10), -math.inf), "NaN or infinite"),
        (np.zeros((80, 10), np.float32), "tensor"),
    ],
)
def test_bad_features(features: object, match: str) -> None:
    check_raises(lambda: GriffinLimVocoder(n_iter=1)(features), ValueError, match)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_iter": 0}, "n_iter=0"),
        ({"n_iter": 2.0}, "n_iter=2.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"config": LogMelConfig(n_fft=400, hop_length=400)}, "hop_length=400"),
        ({"config": {"n_mels": 80}}, "LogMelConfig"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    check_raises(lambda: GriffinLimVocoder(**kwargs), ValueError, match)
