"""LogMel: Whisper's extractor's frames (30 s clips: all of them; shorter clips: those whose
window lies inside the audio), padded batches equal to lone clips, frame_lengths, any length,
the plain log option, dtypes, one compiled graph, and every refused input or config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import WhisperFeatureExtractor

from vats_audio import LogMel, LogMelConfig
from vats_audio.features import mel_filters
from vats_core.testing import check_raises

SR, HOP, N_FFT = 16000, 160, 400
TOL = 1e-3  # the agreement asked of LogMel; measured ~2e-5 (float32 rounding)


def _speechlike(samples: int, seed: int = 0) -> torch.Tensor:
    """A harmonic series with vibrato, a chirp and noise, under a slow envelope that peaks
    mid-clip (so the clip's maximum lies away from its ends)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / SR
    f0 = 140 + 25 * torch.sin(2 * math.pi * 2.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    x = sum(0.25 / k * torch.sin(k * phase) for k in range(1, 12))
    x = (
        x
        + 0.05 * torch.sin(2 * math.pi * (300 * t + 400 * t * t))
        + 0.02 * torch.randn(samples, generator=g, dtype=torch.float64)
    )
    envelope = torch.sin(math.pi * (torch.arange(samples) + 0.5) / samples) ** 0.5
    return (x * envelope).float()


def _extractor(x: torch.Tensor, n_mels: int) -> np.ndarray:
    fe = WhisperFeatureExtractor(feature_size=n_mels)  # defaults: 16 kHz, 400, 160, 30 s
    return fe(x.numpy(), sampling_rate=SR, return_tensors="np")["input_features"][0]


@pytest.fixture(scope="module")
def clip_30s() -> torch.Tensor:
    return _speechlike(30 * SR)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_extractor_30s_every_frame(clip_30s: torch.Tensor, n_mels: int) -> None:
    ref = _extractor(clip_30s, n_mels)  # (M, 3000)
    ours = LogMel(LogMelConfig(n_mels=n_mels))(clip_30s, sample_rate=SR)
    assert ours.shape == (1, n_mels, 3000) == (1, *ref.shape)
    assert np.abs(ours[0].numpy() - ref).max() < TOL


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("samples", [3 * SR + 37, 5 * SR, 12345])
def test_whisper_extractor_short_clip_frames_inside(n_mels: int, samples: int) -> None:
    """The extractor pads to 30 s with zeros: frame t matches when its window,
    [t·hop − n_fft/2, t·hop + n_fft/2), lies inside the clip (the start's reflect padding is
    the same in both); the last one or two frames see zeros there, reflection here."""
    x = _speechlike(samples, seed=1)
    ref = _extractor(x, n_mels)
    ours = LogMel(LogMelConfig(n_mels=n_mels))(x)[0].numpy()
    T, inside = samples // HOP, (samples - N_FFT // 2) // HOP + 1
    assert ours.shape == (n_mels, T) and 1 <= T - inside <= 2
    assert np.abs(ours[:, :inside] - ref[:, :inside]).max() < TOL
    # Past the clip the extractor sees digital silence, which LogMel gives to padded frames.
    silence = LogMel(LogMelConfig(n_mels=n_mels))(torch.cat([x, torch.zeros(SR)]), [samples])
    assert np.abs(silence[0, :, T + 2 :].numpy() - ref[:, T + 2 : T + 100]).max() < TOL


def test_padded_batch_equals_clips_alone() -> None:
    lengths = [8000, 3217, 161, 50, 12000]
    S = max(lengths)
    clips = [_speechlike(n, seed=i) for i, n in enumerate(lengths)]
    # Garbage past each clip's end: none of it may leak into the clip's features.
    batch = 0.9 * torch.rand(len(lengths), S, generator=torch.Generator().manual_seed(5)) - 0.45
    for i, clip in enumerate(clips):
        batch[i, : lengths[i]] = clip
    lm = LogMel()
    out = lm(batch, torch.tensor(lengths))
    frames = lm.frame_lengths(lengths)
    assert out.shape == (5, 80, S // HOP)
    assert frames.tolist() == [n // HOP for n in lengths] and frames.dtype == torch.long
    for i, clip in enumerate(clips):
        alone = lm(clip)[0]
        n = frames[i]
        assert alone.shape[-1] == n
        torch.testing.assert_close(out[i, :, :n], alone, atol=1e-5, rtol=0)
        # Past the end: digital silence's value, (max(clip max − 8, −10) + 4) / 4.
        clip_max = alone.max() * 4 - 4 if n > 0 else torch.tensor(-math.inf)
        silence = (max(clip_max.item() - 8, -10.0) + 4) / 4
        assert torch.equal(out[i, :, n:], torch.full_like(out[i, :, n:], silence))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 2400), min_size=1, max_size=4), st.integers(0, 2**16))
def test_padded_batch_equals_clips_alone_any_lengths(lengths: list[int], seed: int) -> None:
    S = max(lengths)
    g = torch.Generator().manual_seed(seed)
    batch = torch.rand(len(lengths), S, generator=g) * 2 - 1
    lm = LogMel()
    out = lm(batch, lengths)
    for i, n in enumerate(lengths):
        alone = lm(batch[i, :n])[0]
        torch.testing.assert_close(out[i, :, : n // HOP], alone, atol=1e-5, rtol=0)


def test_any_length_reflects_like_numpy() -> None:
    """Clips shorter than n_fft / 2 have no torch.stft reflect padding; LogMel reflects
    repeatedly, as numpy's "reflect" pad: checked against a float64 numpy reference."""
    fb = mel_filters(LogMelConfig()).numpy()
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    for samples in (1, 2, 3, 159, 160, 170, 199, 200, 201, 450):
        x = _speechlike(samples, seed=samples).double()
        out = LogMel()(x)[0].numpy()
        T = samples // HOP
        assert out.shape == (80, T)
        if T == 0:
            continue
        padded = np.pad(x.numpy(), N_FFT // 2, mode="reflect")
        frames = np.stack([padded[t * HOP : t * HOP + N_FFT] * window for t in range(T)])
        mel = fb.T @ (np.abs(np.fft.rfft(frames, axis=-1)) ** 2).T
        log = np.log10(np.maximum(mel, 1e-10))
        ref = (np.maximum(log, log.max() - 8) + 4) / 4
        assert np.abs(out - ref).max() < 1e-9


def test_log_normalization_is_ln_of_mel_power() -> None:
    x = _speechlike(SR)
    x[SR // 2 :] = 0  # digital silence: floored at the clip max − 8 by Whisper, not by log
    whisper = LogMel()(x.double())
    plain = LogMel(LogMelConfig(normalization="log"))(x.double())
    above_floor = whisper > whisper.amin()
    # whisper = (log10(mel) + 4) / 4 where not floored, so ln(mel) = ln(10) (4 w - 4)
    expected = math.log(10) * (4 * whisper - 4)
    torch.testing.assert_close(plain[above_floor], expected[above_floor])
    assert plain.min() < expected.min()  # no floor in the plain log
    padded = LogMel(LogMelConfig(normalization="log"))(torch.cat([x, x]).reshape(2, -1), [SR, 100])
    assert torch.equal(padded[1], torch.full_like(padded[1], math.log(1e-10)))


def test_dtypes_shapes_and_determinism() -> None:
    lm = LogMel()
    x = _speechlike(4000)
    out = lm(x)
    assert out.dtype == torch.float32 and out.shape == (1, 80, 25)
    assert torch.equal(out, lm(x))
    assert lm(x.double()).dtype == torch.float64
    assert lm(x.bfloat16()).dtype == torch.float32
    assert lm(torch.zeros(2, 100)).shape == (2, 80, 0)
    assert lm(torch.zeros(0, 1600)).shape == (0, 80, 10)
    silence = lm(torch.zeros(1600))
    assert torch.equal(silence, torch.full_like(silence, -1.5))  # log10(1e-10) = -10 -> -1.5
    assert LogMel().state_dict() == {}  # every buffer derives from the config


def test_gradient_flows_to_the_waveform() -> None:
    x = _speechlike(3200).requires_grad_()
    LogMel()(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_compiles_in_one_graph() -> None:
    lm = LogMel()
    x = torch.rand(2, 4000) - 0.5
    lengths = torch.tensor([4000, 2500])
    compiled = torch.compile(lm, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, lengths), lm(x, lengths))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("waveform", "match"),
    [
        (torch.tensor([0.0, math.nan] * 200), "NaN or infinite"),
        (torch.tensor([0.0, math.inf] * 200), "NaN or infinite"),
        (torch.zeros(1, 1, 400), r"\(S,\) or \(B, S\)"),
        (torch.zeros(()), r"\(S,\) or \(B, S\)"),
        (torch.zeros(400, dtype=torch.int16), "float samples"),
        (np.zeros(400, np.float32), "tensor"),
    ],
)
def test_bad_waveforms(waveform: object, match: str) -> None:
    check_raises(lambda: LogMel()(waveform), ValueError, match)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        (torch.tensor([400]), r"shape \(2,\)"),
        (torch.tensor([[400, 400]]), r"shape \(2,\)"),
        (torch.tensor([400, 401]), "<= the waveform's 400 samples"),
        (torch.tensor([0, 400]), ">= 1"),
        (torch.tensor([-5, 400]), ">= 1"),
        (torch.tensor([400.0, 300.0]), "integer"),
        ([400, 300.5], "integer"),
        ([400, True], "integer"),
        ("400", "sequence of ints"),
    ],
)
def test_bad_lengths(lengths: object, match: str) -> None:
    check_raises(lambda: LogMel()(torch.zeros(2, 400), lengths), ValueError, match)
    if match not in (r"shape \(2,\)", "<= the waveform's 400 samples"):
        check_raises(lambda: LogMel().frame_lengths(lengths), ValueError, match)


@pytest.mark.parametrize("rate", [44100, 8000, 16000.0])
def test_wrong_sample_rate_says_how_to_resample(rate: object) -> None:
    e = check_raises(lambda: LogMel()(torch.zeros(1600), sample_rate=rate), ValueError, "16000 Hz")
    assert "vats_audio.io.load" in str(e) and "sample_rate=16000" in str(e)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_fft": 401}, "n_fft=401"),
        ({"n_fft": 0}, "n_fft=0"),
        ({"hop_length": 401}, "hop_length=401"),
        ({"n_mels": 0}, "n_mels=0"),
        ({"sample_rate": -1}, "sample_rate=-1"),
        ({"f_max": 9000.0}, "f_max=9000"),
        ({"f_min": 500.0, "f_max": 400.0}, "f_max=400"),
        ({"f_min": -1.0}, "f_min=-1"),
        ({"normalization": "db"}, "normalization='db'"),
        ({"n_mels": 80.0}, "n_mels=80.0"),
    ],
)
def test_bad_configs(fields: dict[str, object], match: str) -> None:
    check_raises(lambda: LogMelConfig(**fields), ValueError, match)


def test_too_many_mels_for_the_fft() -> None:
    check_raises(lambda: LogMel(LogMelConfig(n_mels=256)), ValueError, "cover no FFT bin")


def test_config_round_trips() -> None:
    config = LogMelConfig(n_mels=128, f_max=7600.0, normalization="log")
    assert LogMelConfig.from_dict(config.to_dict()) == config


def test_buffers_rebuilt_by_the_loading_hook_equal_the_constructors() -> None:
    # from_pretrained builds on the meta device, then calls init_non_persistent_buffers
    with torch.device("meta"):
        skeleton = LogMel(LogMelConfig(n_mels=64))
    assert skeleton.filters.is_meta
    skeleton.init_non_persistent_buffers()
    built = LogMel(LogMelConfig(n_mels=64))
    assert torch.equal(skeleton.filters, built.filters)
    assert torch.equal(skeleton.window, built.window)
