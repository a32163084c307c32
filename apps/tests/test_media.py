"""A user's media files for the chat pipeline: images in every mode, animations and
directories of frames, audio, and the errors for the wrong kind of file.

Shapes: T frames, 3 RGB channels, S image side, N audio samples.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import vats_audio
from vats_apps.multimodal.media import (
    MediaKind,
    frame_indices,
    load_audio,
    load_image,
    load_video,
    media_kind,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# Six colours a GIF palette keeps exactly, one per frame, to tell which frames were kept.
RAINBOW = [RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _colour(pixels_3SS: torch.Tensor) -> tuple[int, ...]:
    """The mean colour of a picture, as 8-bit RGB."""
    return tuple(round(v) for v in (pixels_3SS.mean(dim=(1, 2)) * 255).tolist())


def _gif(path, colours, size=(12, 12)):
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


def _wav(path, seconds=0.25, rate=16_000, channels=1):
    vats_audio.save(path, torch.full((channels, int(seconds * rate)), 0.25), rate)
    return path


# --------------------------------------------------------------------------- images


def _rgba(path):
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(path)  # half-transparent red


def _grey(path):
    Image.new("L", (20, 30), 200).save(path)


def _palette(path):
    Image.new("RGB", (30, 20), GREEN).convert("P").save(path)


def _jpeg(path):
    Image.new("RGB", (25, 25), BLUE).save(path, quality=95)


def _cmyk_jpeg(path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # red in ink


def _grey16(path):
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(path)  # mid-grey, 16-bit


@pytest.mark.parametrize(
    ("name", "write", "colour"),
    [
        ("rgba.png", _rgba, (128, 0, 0)),  # composited onto black
        ("grey.png", _grey, (200, 200, 200)),
        ("palette.png", _palette, GREEN),
        ("photo.jpg", _jpeg, BLUE),
        ("ink.jpg", _cmyk_jpeg, RED),
        ("deep.png", _grey16, (128, 128, 128)),  # scaled by 65535, not clipped at 255
    ],
)
def test_every_mode_loads_as_rgb_in_unit_range(tmp_path, name, write, colour):
    path = tmp_path / name
    write(path)
    pixels = load_image(path, size=8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert _colour(pixels) == pytest.approx(colour, abs=3)  # JPEG drifts a little


def test_solid_red_stays_red_after_resize(tmp_path):
    Image.new("RGB", (37, 23), RED).save(tmp_path / "red.png")
    pixels = load_image(str(tmp_path / "red.png"), size=16)  # str paths too
    assert torch.equal(pixels, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 16, 16))


def test_transparent_palette_pixels_become_black(tmp_path):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)  # entry 0 white, entry 1 red
    im.paste(0, (0, 0, 4, 8))  # left half: entry 0, declared transparent below
    im.save(tmp_path / "p.png", transparency=0)
    pixels = load_image(tmp_path / "p.png", size=8)
    assert torch.equal(pixels[:, :, 0], torch.zeros(3, 8))  # not the palette's white
    assert pixels[:, :, 7].tolist() == [[1.0] * 8, [0.0] * 8, [0.0] * 8]


def test_non_square_image_is_stretched_not_cropped(tmp_path):
    im = Image.new("RGB", (40, 10), BLUE)
    im.paste(RED, (0, 0, 10, 10))  # the leftmost quarter; a centre crop would lose it
    im.save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", size=8)
    assert _colour(pixels[:, :, :1]) == RED  # the first column, every row
    assert _colour(pixels[:, :, 3:]) == BLUE  # columns 1 and 2 blend the two


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), BLUE)
    im.paste(RED, (0, 0, 10, 10))  # stored: red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the stored left becomes the top
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pixels = load_image(tmp_path / "phone.jpg", size=8)
    assert _colour(pixels[:, :3]) == pytest.approx(RED, abs=8)
    assert _colour(pixels[:, 5:]) == pytest.approx(BLUE, abs=8)


# --------------------------------------------------------------------------- videos


def test_frame_indices_are_evenly_spaced_from_first_to_last():
    assert frame_indices(6, 4) == [0, 2, 3, 5]
    assert frame_indices(10, 10) == list(range(10))
    assert frame_indices(9, 3) == [0, 4, 8]
    assert frame_indices(7, 1) == [0]


def test_gif_is_sampled_to_evenly_spaced_frames(tmp_path):
    gif = _gif(tmp_path / "clip.gif", RAINBOW)
    clip = load_video(gif, size=8, frames=4)
    assert clip.shape == (4, 3, 8, 8) and clip.dtype == torch.float32
    assert [_colour(f) for f in clip] == [RAINBOW[i] for i in (0, 2, 3, 5)]


def test_animated_png_and_webp_are_videos(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, GREEN, BLUE)]
    for name in ("clip.png", "clip.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)
        assert media_kind(tmp_path / name) == "video"
        clip = load_video(tmp_path / name, size=4, frames=3)
        assert [_colour(f) for f in clip] == [RED, GREEN, BLUE]


def test_directory_of_frames_in_natural_order(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    # Lexical order would be frame_1, frame_10, frame_2; sizes differ per file.
    Image.new("RGB", (12, 12), RED).save(frames / "frame_1.png")
    Image.new("RGB", (30, 20), GREEN).save(frames / "frame_2.jpg", quality=95)
    Image.new("RGB", (8, 16), BLUE).save(frames / "frame_10.bmp")
    (frames / "notes.txt").write_text("not a frame")
    (frames / ".frame_0.png").write_bytes(b"a hidden resource fork, skipped")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    clip = load_video(frames, size=8, frames=3)
    assert clip.shape == (3, 3, 8, 8)
    for frame, colour in zip(clip, (RED, GREEN, BLUE), strict=True):
        assert _colour(frame) == pytest.approx(colour, abs=3)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_too_few_frames_is_an_error(tmp_path):
    gif = _gif(tmp_path / "short.gif", RAINBOW[:3])
    with pytest.raises(ValueError, match=r"short\.gif.*3 frames but frames=4"):
        load_video(gif, size=8, frames=4)
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (8, 8), RED).save(frames / "only.png")
    with pytest.raises(ValueError, match="1 frame but frames=2"):
        load_video(frames, size=8, frames=2)


def test_directory_without_image_files_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty"):
        load_video(empty, size=8, frames=1)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="holds no image files"):
        load_video(empty, size=8, frames=1)


# --------------------------------------------------------------------------- audio


def test_stereo_44k_wav_becomes_16k_mono(tmp_path):
    stereo = torch.stack([torch.full((22_050,), 0.5), torch.zeros(22_050)])  # 0.5 s
    vats_audio.save(tmp_path / "stereo.wav", stereo, 44_100)
    wave = load_audio(tmp_path / "stereo.wav", sample_rate=16_000)
    assert wave.shape == (8_000,) and wave.dtype == torch.float32
    assert wave[1000:7000].mean().item() == pytest.approx(0.25, abs=1e-3)  # channels averaged


def test_empty_audio_clip_is_an_error(tmp_path):
    soundfile.write(tmp_path / "silent.wav", np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(ValueError, match="no audio samples"):
        load_audio(tmp_path / "silent.wav", sample_rate=16_000)


# --------------------------------------------------------------------------- kinds and errors


def test_media_kind_reads_content_not_extension(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "still.dat", format="PNG")
    _gif(tmp_path / "clip.png", RAINBOW[:2])  # a GIF named .png
    _wav(tmp_path / "sound.wav").rename(tmp_path / "sound.bin")  # save wants .wav
    soundfile.write(tmp_path / "sound.flac", np.zeros((800, 1), np.float32), 16_000)
    (tmp_path / "frames").mkdir()
    assert media_kind(tmp_path / "still.dat") == MediaKind.IMAGE == "image"
    assert media_kind(tmp_path / "clip.png") == "video"
    assert media_kind(tmp_path / "frames") == "video"
    assert media_kind(tmp_path / "sound.bin") == "audio"
    assert media_kind(tmp_path / "sound.flac") == "audio"
    (tmp_path / "notes.txt").write_text("What colour is the shape?")
    with pytest.raises(ValueError, match=r"notes\.txt' is not an image, a video .*What colour"):
        media_kind(tmp_path / "notes.txt")
    (tmp_path / "empty.png").touch()
    with pytest.raises(ValueError, match=r"empty\.png' is not .*empty file"):
        media_kind(tmp_path / "empty.png")


def test_wrong_kind_of_file_names_path_argument_and_finding(tmp_path):
    (tmp_path / "notes.txt").write_text("What colour is the shape?")
    with pytest.raises(ValueError, match=r"image='.*notes\.txt' is not an image: .*neither Pillow"):
        load_image(tmp_path / "notes.txt", size=8)
    wav = _wav(tmp_path / "tone.wav")
    with pytest.raises(ValueError, match=r"image='.*tone\.wav' is not an image: .*WAV.*audio="):
        load_image(wav, size=8)
    gif = _gif(tmp_path / "clip.gif", RAINBOW)
    with pytest.raises(ValueError, match=r"image='.*clip\.gif' is not an image: .*video="):
        load_image(gif, size=8)
    Image.new("RGB", (8, 8), RED).save(tmp_path / "still.png")
    with pytest.raises(ValueError, match=r"audio='.*still\.png' is not an audio .*PNG.*image="):
        load_audio(tmp_path / "still.png", sample_rate=16_000)
    with pytest.raises(ValueError, match=r"video='.*still\.png' is not a video.*image="):
        load_video(tmp_path / "still.png", size=8, frames=1)
    with pytest.raises(ValueError, match=r"image='.*' is not an image: it is a directory.*video="):
        load_image(tmp_path, size=8)


def test_missing_paths_and_bad_numbers(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image='.*nope\.png': no such file"):
        load_image(tmp_path / "nope.png", size=8)
    with pytest.raises(FileNotFoundError, match=r"nope"):
        load_video(tmp_path / "nope", size=8, frames=2)
    with pytest.raises(FileNotFoundError, match=r"audio='.*nope\.wav'"):
        load_audio(tmp_path / "nope.wav", sample_rate=16_000)
    with pytest.raises(ValueError, match="is empty: expected a path"):
        load_image("", size=8)
    Image.new("RGB", (8, 8), RED).save(tmp_path / "still.png")
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match=r"size=.* is invalid: expected an int > 0"):
            load_image(tmp_path / "still.png", size=bad)
    with pytest.raises(ValueError, match="frames=0 is invalid"):
        load_video(tmp_path, size=8, frames=0)
    with pytest.raises(ValueError, match="sample_rate=0 is invalid"):
        load_audio(tmp_path / "still.png", sample_rate=0)
