"""Audio files: save / load round trips (16-bit and float WAV, channels, downmix), resampling
(length and pitch), and every refused input, with nothing on disk changed by a failing save."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from vats_audio import io, load, save
from vats_core.testing import check_raises

SR = 16000


def _tone(freq: float, seconds: float, sample_rate: int = SR, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def _peak_hz(x: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(x.double()).abs()
    return spectrum.argmax().item() * sample_rate / x.shape[-1]


def _noise(shape: tuple[int, ...], scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- round trips


def test_pcm16_round_trip_is_exact_to_half_a_step(tmp_path: Path) -> None:
    x = _noise((2, 4000)).clamp(-1, 1)
    x[0, :3] = torch.tensor([-1.0, 1.0, 0.0])
    save(tmp_path / "a.wav", x, SR)
    y, sr = load(tmp_path / "a.wav", mono=False)
    assert sr == SR and y.shape == (2, 4000) and y.dtype == torch.float32
    inside = x <= 32767 / 32768
    assert (y - x)[inside].abs().max() <= 2**-16
    assert y[0, 1] == 32767 / 32768  # +1.0 saturates at the largest 16-bit step
    assert y[0, 0] == -1.0
    info = soundfile.info(tmp_path / "a.wav")
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 2)


def test_pcm16_clips_and_float32_keeps_samples(tmp_path: Path) -> None:
    x = torch.tensor([-3.0, -1.5, 0.25, 1.5, 2.0])
    save(tmp_path / "pcm.wav", x, SR)
    y, _ = load(tmp_path / "pcm.wav")
    assert y.tolist() == [[-1.0, -1.0, 0.25, 32767 / 32768, 32767 / 32768]]
    save(tmp_path / "float.wav", x, SR, encoding="float32")
    z, _ = load(tmp_path / "float.wav")
    assert torch.equal(z, x[None])  # stored as is, unclipped
    assert soundfile.info(tmp_path / "float.wav").subtype == "FLOAT"


def test_save_takes_1d_float64_and_grad_tensors(tmp_path: Path) -> None:
    x = _tone(440, 0.1).double().requires_grad_()
    save(tmp_path / "a.wav", x, SR, encoding="float32")
    y, _ = load(tmp_path / "a.wav")
    assert y.shape == (1, x.shape[0])
    assert torch.allclose(y[0].double(), x.detach(), atol=1e-7)


def test_mono_downmix_is_the_channel_mean(tmp_path: Path) -> None:
    x = torch.stack([_tone(440, 0.2), _tone(1000, 0.2, amp=0.25), _noise((3200,), 0.1)])
    save(tmp_path / "a.wav", x, SR, encoding="float32")
    mono, _ = load(tmp_path / "a.wav")
    every, _ = load(tmp_path / "a.wav", mono=False)
    assert mono.shape == (1, 3200) and every.shape == (3, 3200)
    assert torch.equal(every, x)
    assert torch.allclose(mono, x.mean(dim=0, keepdim=True), atol=1e-7)


def test_load_reads_flac(tmp_path: Path) -> None:
    x = _noise((1600,), 0.2).clamp(-1, 1)
    soundfile.write(tmp_path / "a.flac", x.numpy(), SR, subtype="PCM_16")
    y, sr = load(tmp_path / "a.flac")
    assert sr == SR and (y[0] - x).abs().max() <= 2**-15


@pytest.mark.parametrize(("file_rate", "rate"), [(44100, 16000), (16000, 24000), (8000, 8000)])
def test_resample_changes_length_and_keeps_pitch(tmp_path: Path, file_rate: int, rate: int) -> None:
    x = _tone(440.0, 1.0, file_rate)
    save(tmp_path / "a.wav", x, file_rate, encoding="float32")
    y, sr = load(tmp_path / "a.wav", sample_rate=rate)
    assert sr == rate
    assert y.shape == (1, math.ceil(file_rate * rate / file_rate))  # 1 s of audio at `rate`
    assert abs(_peak_hz(y[0], rate) - 440.0) <= 1.0  # 1 s: 1 Hz FFT bins
    # and the waveform itself: a 440 Hz sine sampled at the new rate, away from the edges
    t = torch.arange(y.shape[-1], dtype=torch.float64) / rate
    expected = 0.5 * torch.sin(2 * math.pi * 440.0 * t)
    middle = slice(rate // 10, -rate // 10)
    assert (y[0, middle].double() - expected[middle]).abs().max() < 2e-3


# ----------------------------------------------------------------------------- load errors


def test_load_missing_file(tmp_path: Path) -> None:
    check_raises(lambda: load(tmp_path / "nope.wav"), FileNotFoundError, "nope.wav")


def test_load_directory(tmp_path: Path) -> None:
    check_raises(lambda: load(tmp_path), ValueError, "directory")


def test_load_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.wav").write_bytes(b"")
    check_raises(lambda: load(tmp_path / "e.wav"), ValueError, r"e\.wav.*empty")


def test_load_not_audio(tmp_path: Path) -> None:
    (tmp_path / "t.wav").write_text("this is a text file, not audio\n" * 20)
    check_raises(lambda: load(tmp_path / "t.wav"), ValueError, r"t\.wav.*not a readable audio")


def test_load_wav_with_no_samples(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "z.wav", np.zeros(0, np.float32), SR)
    check_raises(lambda: load(tmp_path / "z.wav"), ValueError, r"z\.wav.*no audio samples")


def test_load_truncated_wav_data(tmp_path: Path) -> None:
    save(tmp_path / "a.wav", _tone(440, 0.5), SR)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    check_raises(lambda: load(tmp_path / "cut.wav"), ValueError, r"cut\.wav.*truncated")


def test_load_truncated_wav_header(tmp_path: Path) -> None:
    save(tmp_path / "a.wav", _tone(440, 0.5), SR)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:30])
    check_raises(lambda: load(tmp_path / "cut.wav"), ValueError, r"cut\.wav")


def test_load_truncated_flac(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "a.flac", _noise((16000,), 0.1).numpy(), SR)
    data = (tmp_path / "a.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    check_raises(lambda: load(tmp_path / "cut.flac"), ValueError, r"cut\.flac")


def test_load_streamed_wav_with_unknown_size_is_read(tmp_path: Path) -> None:
    """A WAV written to a pipe declares an unknown data size (0xFFFFFFFF): not truncated."""
    save(tmp_path / "a.wav", _tone(440, 0.1), SR)
    data = bytearray((tmp_path / "a.wav").read_bytes())
    at = data.index(b"data")
    data[at + 4 : at + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "s.wav").write_bytes(bytes(data))
    y, _ = load(tmp_path / "s.wav")
    assert y.shape == (1, 1600)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_non_finite_samples(tmp_path: Path, bad: float) -> None:
    soundfile.write(tmp_path / "f.wav", np.array([0.1, bad, 0.2], np.float32), SR, subtype="FLOAT")
    check_raises(lambda: load(tmp_path / "f.wav"), ValueError, r"f\.wav.*NaN or infinite")


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, True])
def test_load_bad_sample_rate(tmp_path: Path, rate: object) -> None:
    save(tmp_path / "a.wav", _tone(440, 0.1), SR)
    check_raises(lambda: load(tmp_path / "a.wav", sample_rate=rate), ValueError, "sample_rate")


# ----------------------------------------------------------------------------- save errors

_BAD_SAVES = {
    "rank 3": (lambda: torch.zeros(1, 2, 100), SR, "wav", r"\(S,\) or \(C, S\)"),
    "int dtype": (lambda: torch.zeros(100, dtype=torch.int16), SR, "wav", "float"),
    "nan": (lambda: torch.tensor([0.0, math.nan]), SR, "wav", "NaN or infinite"),
    "inf": (lambda: torch.tensor([0.0, -math.inf]), SR, "wav", "NaN or infinite"),
    "empty": (lambda: torch.zeros(2, 0), SR, "wav", "empty"),
    "(S, C) layout": (lambda: torch.zeros(1000, 2), SR, "wav", r"waveform\.T"),
    "rate 0": (lambda: torch.zeros(100), 0, "wav", "sample_rate"),
    "negative rate": (lambda: torch.zeros(100), -8000, "wav", "sample_rate"),
    "float rate": (lambda: torch.zeros(100), 16000.0, "wav", "sample_rate"),
    "not a wav": (lambda: torch.zeros(100), SR, "flac", r"\.wav"),
    "numpy": (lambda: np.zeros(100, np.float32), SR, "wav", "tensor"),
}


@pytest.mark.parametrize("case", sorted(_BAD_SAVES))
def test_bad_save_leaves_the_existing_file(tmp_path: Path, case: str) -> None:
    make, rate, suffix, match = _BAD_SAVES[case]
    target = tmp_path / f"keep.{suffix}"
    target.write_bytes(b"precious")
    check_raises(lambda: save(target, make(), rate), ValueError, match)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_save_bad_encoding(tmp_path: Path) -> None:
    check_raises(
        lambda: save(tmp_path / "a.wav", torch.zeros(10), SR, encoding="pcm24"), ValueError, "pcm16"
    )
    assert not any(tmp_path.iterdir())


def test_save_missing_directory_and_directory_target(tmp_path: Path) -> None:
    check_raises(
        lambda: save(tmp_path / "no" / "a.wav", torch.zeros(10), SR),
        FileNotFoundError,
        "does not exist",
    )
    (tmp_path / "d.wav").mkdir()
    check_raises(lambda: save(tmp_path / "d.wav", torch.zeros(10), SR), ValueError, "directory")


def test_save_failing_mid_write_leaves_the_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.wav"
    save(target, _tone(440, 0.1), SR)
    before = target.read_bytes()

    def broken_write(file: os.PathLike[str], *args: object, **kwargs: object) -> None:
        Path(file).write_bytes(b"RIFF half a header")
        raise OSError("disk full")

    monkeypatch.setattr(io.soundfile, "write", broken_write)
    check_raises(lambda: save(target, _tone(1000, 0.2), SR), OSError, "disk full")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temporary file left


def test_save_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a.wav"
    save(target, _tone(440, 0.1), SR)
    save(target, _tone(880, 0.2), SR)
    y, _ = load(target)
    assert y.shape == (1, 3200) and abs(_peak_hz(y[0], SR) - 880) <= 5
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]
