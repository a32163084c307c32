"""Audio files: ``load`` any format libsndfile reads (WAV, FLAC, OGG/Vorbis, ...), ``save``
WAV files atomically.

torchaudio 2.9 removed its file I/O (pytorch/audio#3902), so files go through soundfile
(libsndfile, shipped in its wheels); torchaudio resamples.

Conventions:

* Waveforms are ``(C, S)`` float32 tensors, channels first, as torchaudio's were.
* Integer PCM decodes to [-1, 1): a b-bit sample ``q`` becomes ``q / 2**(b-1)``. Float files
  are returned as stored (a float file may hold samples beyond ±1; nothing is clipped on
  load). NaN or infinite samples are refused.
* ``save`` writes 16-bit PCM (default) or 32-bit float WAV (:class:`WavEncoding`). For 16-bit
  PCM, samples are clipped to [-1, 1], scaled by 32768, rounded to the nearest integer and
  saturated at 32767 (so +1.0 is stored as 32767 / 32768): a save / load round trip is exact
  to half a step, 2**-16, inside [-1, 32767/32768]. Float WAV stores float32 as is, unclipped.
* Writes are atomic: a temporary file in the target's directory, renamed over the target
  once complete. A save that fails leaves any existing file untouched.

Shapes: C channels, S samples.
"""

from __future__ import annotations

import enum
import os
import struct
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from torch import Tensor

from vats_core.checkpoint import atomic_replace
from vats_core.config import is_int

__all__ = ["WavEncoding", "load", "save"]

_MAX_CHANNELS = 64  # more than this in a (C, S) tensor is almost surely an (S, C) one
# WAV data sizes that streaming writers put in the header before the length is known.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)


class WavEncoding(enum.StrEnum):
    """Sample encoding of a saved WAV file."""

    PCM16 = "pcm16"  # 16-bit integer PCM, clipped to [-1, 1] (module docstring)
    FLOAT32 = "float32"  # 32-bit IEEE float, stored as is


def load(
    path: str | os.PathLike[str], *, sample_rate: int | None = None, mono: bool = True
) -> tuple[Tensor, int]:
    """Read an audio file.

    Args:
        path: the file (any format libsndfile reads).
        sample_rate: resample to this rate (``torchaudio.functional.resample``, windowed
            sinc) when it differs from the file's; None keeps the file's rate.
        mono: average the channels into one (an explicit downmix: C = 1); False keeps them.

    Returns:
        ``(waveform, sample_rate)``: a ``(C, S)`` float32 tensor and its rate in Hz.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, empty, truncated, not audio, holds no samples
            or non-finite samples; or ``sample_rate`` is not a positive int.
    """
    if sample_rate is not None and not (is_int(sample_rate) and sample_rate > 0):
        raise ValueError(f"load: sample_rate={sample_rate!r} is invalid: expected an int > 0")
    if not isinstance(mono, bool):
        raise ValueError(f"load: mono={mono!r} is invalid: expected a bool")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no audio file at {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes), not an audio file")
    _check_wav_complete(path)

    try:
        with soundfile.SoundFile(path) as f:
            declared, file_rate = f.frames, f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # (S, C)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable audio file: {e}") from e
    if data.shape[0] < declared:
        raise ValueError(
            f"{str(path)!r} is truncated: its header declares {declared} samples per channel "
            f"but only {data.shape[0]} could be read"
        )
    if data.shape[0] == 0:
        raise ValueError(f"{str(path)!r} holds no audio samples")
    if not np.isfinite(data).all():
        raise ValueError(f"{str(path)!r} holds NaN or infinite samples")

    waveform = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, S)
    if mono:
        waveform = waveform.mean(dim=0, keepdim=True)  # (1, S)
    if sample_rate is not None and sample_rate != file_rate:
        waveform = torchaudio.functional.resample(waveform, file_rate, sample_rate)
        file_rate = sample_rate
    return waveform, file_rate


def save(
    path: str | os.PathLike[str],
    waveform: Tensor,
    sample_rate: int,
    *,
    encoding: WavEncoding | str = WavEncoding.PCM16,
) -> None:
    """Write a WAV file atomically (temporary file in the same directory, then rename).

    Args:
        path: the target, ending in ``.wav``; its directory must exist. An existing file is
            replaced only once the new one is complete.
        waveform: ``(S,)`` mono or ``(C, S)`` float samples, nominally in [-1, 1].
        sample_rate: its rate in Hz.
        encoding: ``"pcm16"`` (clipped to [-1, 1]) or ``"float32"`` (stored as is).

    Raises:
        FileNotFoundError: the target's directory does not exist.
        ValueError: a bad waveform (not a float tensor, rank not 1 or 2, no samples, more
            than 64 channels, NaN or infinite samples), sample rate or encoding, or a path
            that is a directory or not a ``.wav``. Nothing on disk changes.
    """
    path = Path(path)
    try:
        fmt = WavEncoding(encoding)
    except ValueError:
        allowed = [m.value for m in WavEncoding]
        raise ValueError(
            f"save: encoding={encoding!r} is invalid: expected one of {allowed}"
        ) from None
    if not (is_int(sample_rate) and sample_rate > 0):
        raise ValueError(f"save: sample_rate={sample_rate!r} is invalid: expected an int > 0")
    data = _checked_samples(waveform)  # (S, C) float32
    if path.suffix.lower() != ".wav":
        raise ValueError(f"save writes WAV files; {str(path)!r} should end in .wav")
    if path.is_dir():
        raise ValueError(f"cannot save to {str(path)!r}: it is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot save {str(path)!r}: directory {str(path.parent)!r} does not exist"
        )

    if fmt is WavEncoding.PCM16:
        scaled = np.rint(np.clip(data, -1.0, 1.0) * 32768.0)
        data = np.clip(scaled, -32768, 32767).astype(np.int16)
        subtype = "PCM_16"
    else:
        subtype = "FLOAT"
    with atomic_replace(path) as tmp:
        soundfile.write(tmp, data, sample_rate, subtype=subtype, format="WAV")


def _checked_samples(waveform: Tensor) -> np.ndarray:
    """The waveform as a finite ``(S, C)`` float32 array, or a ValueError saying why not."""
    if not isinstance(waveform, Tensor):
        raise ValueError(f"save expects a waveform tensor, got {type(waveform).__name__}")
    if waveform.dim() not in (1, 2):
        raise ValueError(
            f"save expects a waveform of shape (S,) or (C, S), got {tuple(waveform.shape)}"
        )
    if not waveform.is_floating_point():
        raise ValueError(
            f"save expects float samples in [-1, 1], got dtype {waveform.dtype} "
            "(integer PCM: divide by 2**(bits - 1) first)"
        )
    if waveform.numel() == 0:
        raise ValueError(f"save got an empty waveform, shape {tuple(waveform.shape)}")
    x_CS = waveform.detach() if waveform.dim() == 2 else waveform.detach()[None]
    channels = x_CS.shape[0]
    if channels > _MAX_CHANNELS:
        raise ValueError(
            f"save expects (C, S) channels first, got shape {tuple(waveform.shape)}: "
            f"{channels} channels (more than {_MAX_CHANNELS}); for an (S, C) tensor pass "
            "waveform.T"
        )
    if not bool(torch.isfinite(x_CS).all()):
        raise ValueError("save got NaN or infinite samples in the waveform")
    return x_CS.to(device="cpu", dtype=torch.float32).numpy().T  # (S, C)


def _check_wav_complete(path: Path) -> None:
    """Refuse a RIFF/WAVE file whose ``data`` chunk declares more bytes than the file holds.

    libsndfile reads such a file quietly, shortened to what is there; a cut download or an
    interrupted write should be an error instead. Other formats are checked after reading
    (fewer frames than their header declares).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - pos - 8
                if chunk_size not in _UNKNOWN_WAV_SIZES and chunk_size > available:
                    raise ValueError(
                        f"{str(path)!r} is truncated: its WAV data chunk declares {chunk_size} "
                        f"bytes but the file holds {available}"
                    )
                return
            pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word-aligned
    # No data chunk found: libsndfile reports it (a ValueError from load).
