"""A user's own media for the chat pipeline: ``image=``, ``video=`` and ``audio=`` files
loaded into the tensors the encoders take, with errors that say what was given and what
was expected.

Example::

    from vats_apps.multimodal.media import load_audio, load_image, load_video, media_kind

    media_kind("shape.png")                        # MediaKind.IMAGE (a str: "image")
    load_image("shape.png", size=32)               # (3, 32, 32) float32 in [0, 1]
    load_video("moving.gif", size=32, frames=8)    # (8, 3, 32, 32)
    load_video("frames/", size=32, frames=8)       # a directory of frame_1.png, frame_2.png, ...
    load_audio("tone.wav", sample_rate=16_000)     # (N,) float32 mono at 16 kHz

Choices, all made so that the whole of what the user gave reaches the model:

* The kind of a file comes from its content, never its extension (:func:`media_kind`):
  a RIFF/WAVE header, or anything libsndfile reads (FLAC, OGG, ...), is audio; a file
  Pillow opens is an image, or a video when it holds more than one frame (animated GIF,
  APNG, animated WebP, multi-page TIFF); a directory is a video of frames. One exception:
  an MPO file (a camera JPEG that carries extra pictures such as previews or a depth map)
  is a still image, its first picture the main one.
* Images are resized to ``size x size`` by stretching, not cropping: a user's whole
  picture is seen, at the cost of its aspect ratio. The filter is Pillow's
  ``Image.BILINEAR``, which widens its support when shrinking, so downscaling is
  antialiased.
* Transparency is composited onto black: the shapes world draws on dark backgrounds, so a
  transparent background reads as one of them rather than as a white page. A JPEG's EXIF
  orientation is applied first, so a phone photo is seen upright.
* Any Pillow mode is accepted. 8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...) go through
  Pillow's ``convert``; 16-bit greyscale (``I;16*``, and ``I``, the 32-bit integer mode
  Pillow opens some 16-bit files as) is divided by 65535 and float greyscale (``F``) is
  taken as [0, 1]; both are clipped to [0, 1] and resized in float, so no precision is
  lost to an 8-bit round trip.
* A clip with more frames than asked for is sampled at evenly spaced indices that include
  its first and last frame (:func:`frame_indices`); one with fewer is an error, never
  padded. Frames of an animation are composited by Pillow as it seeks (GIF disposal, APNG
  blending), then treated like images. A directory's frames are its image files (by
  extension: :data:`FRAME_SUFFIXES`; hidden files skipped, other files ignored) in
  natural order, so ``frame_2`` comes before ``frame_10``; each may have its own size.
* Audio goes through :func:`vats_audio.load`: channels averaged to mono, resampled with
  torchaudio's windowed sinc.

Nothing is ever written to disk.

Shapes: T frames, 3 RGB channels, S image side (height = width = S), N audio samples.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

import vats_audio
from vats_core.config import is_int

__all__ = [
    "FRAME_SUFFIXES",
    "MediaKind",
    "frame_indices",
    "load_audio",
    "load_image",
    "load_video",
    "media_kind",
]

# Image files a directory of frames may hold (compared lower-cased).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# 16-bit greyscale modes, read as integers in [0, 65535]; "F" is float, read as [0, 1].
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WIDE_MODES = (*_WIDE_INT_MODES, "F")
_RESAMPLE = Image.Resampling.BILINEAR
# What each argument expects, for error messages.
_EXPECTED = {
    "image": "an image",
    "video": "a video (an animated GIF, PNG or WebP, or a directory of frames)",
    "audio": "an audio file (WAV, FLAC, OGG, ...)",
}


class MediaKind(enum.StrEnum):
    """What a path holds, named as the chat pipeline's argument that takes it."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"


@dataclass(frozen=True)
class _Found:
    """What a path turned out to hold: its kind (None: none we read) and, in words, what."""

    kind: MediaKind | None
    what: str  # completes "it is ...", e.g. "an animated GIF (6 frames, 32x32)"


# --------------------------------------------------------------------------- public API


def media_kind(path: str | os.PathLike[str]) -> MediaKind:
    """Tell an image, a video and an audio file apart by their content.

    Args:
        path: a file, or a directory of frames (always a video, even an empty one:
            :func:`load_video` then says what is missing).

    Returns:
        ``MediaKind.IMAGE``, ``VIDEO`` or ``AUDIO`` (each equal to its lower-case name).

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``path`` holds none of the three (the message says what it found).
    """
    path = _existing(path, None)
    found = _identify(path)
    if found.kind is None:
        raise ValueError(
            f"{str(path)!r} is not an image, a video (GIF or a directory of frames) or an "
            f"audio file (WAV): it is {found.what}"
        )
    return found.kind


def load_image(path: str | os.PathLike[str], size: int) -> Tensor:
    """Load a still image as the vision encoder's input.

    Args:
        path: any still image Pillow opens, in any mode and at any size or aspect.
        size: the side it is resized to (stretched, not cropped; module docstring).

    Returns:
        ``(3, S, S)`` float32 RGB in [0, 1].

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``size`` is not an int > 0, or ``path`` is not a still image (an
            animation is a video: the message says to pass it as ``video=``).
    """
    _check_positive("load_image", "size", size)
    path = _existing(path, "image")
    found = _identify(path)
    if found.kind is not MediaKind.IMAGE:
        raise _wrong_kind("image", path, found)
    with Image.open(path) as im:
        return _read_still(im, path, size)


def load_video(path: str | os.PathLike[str], size: int, frames: int) -> Tensor:
    """Load a clip as the video encoder's input.

    Args:
        path: an animated GIF, APNG or WebP, or a directory of image files (one per frame,
            in natural order of their names).
        size: the side each frame is resized to (stretched, not cropped).
        frames: how many frames the encoder takes: a longer clip is sampled at
            :func:`frame_indices`, a shorter one is an error.

    Returns:
        ``(T, 3, S, S)`` float32 RGB in [0, 1], T = ``frames``.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``size`` or ``frames`` is not an int > 0; ``path`` is not a video (a
            still image, audio, an unreadable file); the clip has fewer than ``frames``
            frames; a directory holds no image files or an unreadable one.
    """
    _check_positive("load_video", "size", size)
    _check_positive("load_video", "frames", frames)
    path = _existing(path, "video")
    if path.is_dir():
        return _read_frame_directory(path, size, frames)
    found = _identify(path)
    if found.kind is not MediaKind.VIDEO:
        raise _wrong_kind("video", path, found)
    with Image.open(path) as im:
        count = im.n_frames
        pixels_TCSS = []
        for i in frame_indices(count, frames, source=f"video={str(path)!r}"):
            try:
                im.seek(i)  # Pillow composites the frame onto the ones before it
                pixels_TCSS.append(_to_tensor(im, size))
            except (OSError, EOFError, ValueError) as e:
                raise ValueError(f"video={str(path)!r}: frame {i} cannot be read: {e}") from e
    return torch.stack(pixels_TCSS)  # (T, 3, S, S)


def load_audio(path: str | os.PathLike[str], sample_rate: int) -> Tensor:
    """Load a sound as the audio encoder's input.

    Args:
        path: any file libsndfile reads (WAV, FLAC, OGG, ...).
        sample_rate: the rate in Hz the encoder expects; the file is resampled to it.

    Returns:
        ``(N,)`` float32 mono samples (channels averaged) at ``sample_rate``.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``sample_rate`` is not an int > 0; ``path`` is not audio; or it is
            empty, truncated or holds no or non-finite samples (:func:`vats_audio.load`).
    """
    _check_positive("load_audio", "sample_rate", sample_rate)
    path = _existing(path, "audio")
    found = _identify(path)
    if found.kind is not MediaKind.AUDIO:
        raise _wrong_kind("audio", path, found)
    waveform, _ = vats_audio.load(path, sample_rate=sample_rate, mono=True)  # (1, N)
    if waveform.shape[-1] == 0:  # vats_audio refuses empty files; kept in case resampling empties
        raise ValueError(f"audio={str(path)!r} holds no audio samples")
    return waveform[0]


def frame_indices(count: int, frames: int, *, source: str = "the clip") -> list[int]:
    """Which of a clip's ``count`` frames to keep so that ``frames`` remain, evenly spaced.

    Frame ``k`` of the result is source frame ``round(k * (count - 1) / (frames - 1))``
    (halves round up), so the first and the last frame are always kept; ``frames == 1``
    keeps the first. For example 6 frames sampled to 4 keep ``[0, 2, 3, 5]``.

    Args:
        count: frames in the clip.
        frames: frames wanted.
        source: names the clip in the error.

    Raises:
        ValueError: ``count < frames`` (the clip is too short; nothing is padded).
    """
    if count < frames:
        raise ValueError(
            f"{source} has {count} frame{'s' if count != 1 else ''} but frames={frames} "
            f"are needed: give a clip of at least {frames} frames or lower frames="
        )
    if frames == 1:
        return [0]
    # Integer round-half-up of k * (count - 1) / (frames - 1); the step is >= 1, so the
    # indices are distinct and increasing.
    return [(2 * k * (count - 1) + frames - 1) // (2 * (frames - 1)) for k in range(frames)]


# --------------------------------------------------------------------------- identifying


def _identify(path: Path) -> _Found:
    """What ``path`` (which exists) holds, read from its content."""
    if path.is_dir():
        return _Found(MediaKind.VIDEO, "a directory (a video of frames)")
    size = path.stat().st_size
    if size == 0:
        return _Found(None, "an empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    is_wav = head[:4] == b"RIFF" and head[8:12] == b"WAVE"  # WebP is RIFF too: check WAVE
    if not is_wav:
        found = _identify_picture(path)
        if found is not None:
            return found
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as e:
        if is_wav:  # a WAV libsndfile cannot read: vats_audio.load reports it in detail
            return _Found(MediaKind.AUDIO, f"a WAV file libsndfile cannot read ({e})")
        return _Found(
            None, f"a file neither Pillow nor libsndfile can read (it starts with {head!r})"
        )
    channels = f"{info.channels} channel{'s' if info.channels != 1 else ''}"
    return _Found(
        MediaKind.AUDIO,
        f"{_article(info.format)} {info.format} audio file ({info.samplerate} Hz, {channels}, {info.duration:.2f} s)",
    )


def _identify_picture(path: Path) -> _Found | None:
    """An image or an animation, if Pillow opens ``path``; None if it does not."""
    try:
        with Image.open(path) as im:
            fmt, (w, h), mode = im.format or "image", im.size, im.mode
            count = 1 if fmt == "MPO" else getattr(im, "n_frames", 1)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{str(path)!r} is an image too large to load safely: {e}") from e
    except (OSError, EOFError, ValueError, SyntaxError) as e:  # opened, but a bad header
        raise ValueError(f"{str(path)!r} is a damaged image file: {e}") from e
    if count > 1:
        return _Found(MediaKind.VIDEO, f"an animated {fmt} ({count} frames, {w}x{h})")
    return _Found(MediaKind.IMAGE, f"{_article(fmt)} {fmt} image ({w}x{h}, mode {mode})")


def _wrong_kind(arg: str, path: Path, found: _Found) -> ValueError:
    """The error for ``arg=path`` holding something else; says where it belongs, if anywhere."""
    hint = f"; pass it as {found.kind.value}=" if found.kind is not None else ""
    return ValueError(f"{arg}={str(path)!r} is not {_EXPECTED[arg]}: it is {found.what}{hint}")


def _existing(path: str | os.PathLike[str], arg: str | None) -> Path:
    """``path`` as a Path (``~`` expanded), or FileNotFoundError naming it (and ``arg=``)."""
    given = f"{arg}={str(path)!r}" if arg else repr(str(path))
    if isinstance(path, str) and not path.strip():
        # Path("") is the working directory: an empty argument must not load it as frames
        raise ValueError(f"{given} is empty: expected a path")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        what = "file" if arg in ("image", "audio") else "file or directory"
        raise FileNotFoundError(f"{given}: no such {what}")
    return resolved


def _check_positive(fn: str, name: str, value: object) -> None:
    if not (is_int(value) and value > 0):
        raise ValueError(f"{fn}: {name}={value!r} is invalid: expected an int > 0")


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


# --------------------------------------------------------------------------- reading


def _read_still(im: Image.Image, path: Path, size: int, arg: str = "image") -> Tensor:
    """A still picture, upright per its EXIF orientation, as a ``(3, S, S)`` tensor."""
    try:
        return _to_tensor(ImageOps.exif_transpose(im), size)
    except (OSError, EOFError, ValueError, SyntaxError) as e:  # e.g. a truncated file
        raise ValueError(f"{arg}={str(path)!r} cannot be decoded: {e}") from e


def _read_frame_directory(path: Path, size: int, frames: int) -> Tensor:
    """The image files of a directory, in natural order, sampled to ``frames``."""
    files = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")
        ),
        key=_natural_key,
    )
    if not files:
        held = "is empty" if not any(path.iterdir()) else "holds no image files"
        raise ValueError(
            f"video={str(path)!r} {held}: a directory of frames needs image files "
            f"({', '.join(FRAME_SUFFIXES)})"
        )
    source = f"video={str(path)!r} (a directory of {len(files)} image files)"
    pixels_TCSS = []
    for i in frame_indices(len(files), frames, source=source):
        file = files[i]
        found = _identify(file)
        if found.kind is not MediaKind.IMAGE:
            raise ValueError(
                f"video={str(path)!r}: frame file {file.name!r} is not a still image: "
                f"it is {found.what}"
            )
        with Image.open(file) as im:
            pixels_TCSS.append(_read_still(im, file, size, arg="video"))
    return torch.stack(pixels_TCSS)  # (T, 3, S, S)


def _natural_key(path: Path) -> tuple[tuple[str | int, ...], str]:
    """Sort key reading digit runs as numbers: ``frame_2`` < ``frame_10``."""
    # re.split with a group alternates text, number, text, ...: positions always compare
    # like with like.
    parts = re.split(r"(\d+)", path.name.casefold())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), path.name


def _to_tensor(im: Image.Image, size: int) -> Tensor:
    """One picture (the current frame of ``im``) as ``(3, S, S)`` float32 in [0, 1]."""
    if im.mode in _WIDE_MODES:
        scale = 65535.0 if im.mode in _WIDE_INT_MODES else 1.0
        grey = np.clip(np.asarray(im, dtype=np.float32) / scale, 0.0, 1.0)  # (H, W)
        small = Image.fromarray(grey).resize((size, size), _RESAMPLE)  # float "F" image
        grey_SS = torch.from_numpy(np.array(small, dtype=np.float32)).clamp_(0.0, 1.0)
        return grey_SS.expand(3, size, size).contiguous()  # (3, S, S)
    if im.has_transparency_data:  # an alpha channel or a transparent colour / palette entry
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, im.convert("RGBA")).convert("RGB")
    else:
        rgb = im.convert("RGB")
    small = rgb.resize((size, size), _RESAMPLE)
    pixels_SSC = torch.from_numpy(np.array(small, dtype=np.uint8))  # (S, S, 3)
    return pixels_SSC.permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
