"""The text-to-video model of apps and how it samples: a vats-text encoder feeding a
vats-diffusion VideoDiT, the image VAE decoding its latents frame by frame, the vision
classifiers that read the clips back, and the files a clip is written as.

A clip is read by two classifiers of the vision proof: the ViT-3D reads the direction of
motion from the whole clip, the ViT-2D reads each frame as an image (shape x colour, and
the size and background of its aux heads). A clip's shape, colour, size and background are
the commonest reading over its frames (the earlier frame wins a tie), and the clip is
*consistent* when every frame reads as its shape x colour: a shape that turns into another,
or changes colour, on the way is not.

Composition lives here, not in the packages: vats_diffusion knows no text encoder and
vats_text no diffusion model (DESIGN.md).

Shapes: B clips, T frames, C = 3 pixel channels, Cz latent channels, h / w latent side,
S frame side.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from vats_apps.data import ShapeBatch, ShapesConfig, ShapesWorld
from vats_apps.generation.images import enlarge, to_uint8
from vats_apps.generation.model import (
    Sampling,
    TextConditioned,
    encode_texts,
    guided_sample,
    read_images,
)
from vats_diffusion import VAE, Diffusion, VideoDiT
from vats_text.tokenizer import Tokenizer

__all__ = [
    "ClipReaders",
    "ClipReading",
    "TextToVideo",
    "clip_pixels",
    "sample_clips",
    "save_clips",
]

# The attributes a frame is read for (the ViT-2D's target and aux heads); the position is
# left out: it changes as the shape moves.
FRAME_LABELS = ("shape", "color", "size", "background")


class TextToVideo(TextConditioned):
    """The text encoder and the VideoDiT."""

    dit: VideoDiT


@torch.no_grad()
def sample_clips(
    model: TextToVideo,
    vae: VAE,
    diffusion: Diffusion,
    tokenizer: Tokenizer,
    texts: list[str],
    frames: int,
    sampling: Sampling,
    generator: torch.Generator,
    *,
    progress: bool = False,
    from_first: bool = False,
) -> Tensor:
    """Clips ``(B, 3, frames, S, S)`` in [-1, 1] for ``texts``: encode them, sample latents
    ``(B, Cz, frames, h, w)`` with guidance (initial noise from ``generator``), decode them
    frame by frame.

    ``from_first`` (a VideoDiT trained with ``train.dit.first_frame``): the clip's first
    frame (first tubelet) is kept from that sample, and the other frames are sampled again
    from fresh noise with it given clean at timestep 0, as the DiT learned to continue a
    given frame."""
    ids, mask = encode_texts(tokenizer, texts, model.encoder.config.max_seq_len)
    h, w = model.dit.config.latent_hw
    shape = (len(texts), model.dit.config.in_channels, frames, h, w)
    cond = model.condition(ids, mask)
    latents = guided_sample(model, diffusion, shape, cond, sampling, generator, progress=progress)
    given = model.dit.config.patch_frames
    if from_first and frames > given:
        first = latents[:, :, :given]
        denoiser = _GivenFirst(model.dit, first)
        latents = guided_sample(
            model, diffusion, shape, cond, sampling, generator, progress=progress,
            denoiser=denoiser,
        )  # fmt: skip
        latents[:, :, :given] = first
    return vae.decode_frames(latents).clamp(-1, 1)


class _GivenFirst:
    """The VideoDiT with the clip's first frames held at ``first`` (clean, timestep 0), as
    :func:`~vats_apps.pipelines.stages.diffusion_loss` trains it with ``first_frame``."""

    def __init__(self, dit: VideoDiT, first: Tensor) -> None:
        self.dit, self.first = dit, first  # (B, Cz, given, h, w)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        given = self.first.shape[2]
        first = self.first.repeat(x.shape[0] // self.first.shape[0], 1, 1, 1, 1)  # guidance
        x = torch.cat([first.to(x.dtype), x[:, :, given:]], dim=2)
        t_frames = t[:, None].expand(-1, x.shape[2]).clone()  # (B, T)
        t_frames[:, :given] = 0
        return self.dit(x, t_frames, **cond)


@dataclasses.dataclass(frozen=True)
class ClipReading:
    """What the classifiers read in one clip."""

    direction: str  # the ViT-3D's
    frames: list[dict[str, str]]  # each frame's reading (FRAME_LABELS)
    majority: dict[str, str]  # each label's commonest value over the frames

    @property
    def consistent(self) -> bool:
        """Every frame reads as the clip's shape x colour."""
        return all(
            f["shape"] == self.majority["shape"] and f["color"] == self.majority["color"]
            for f in self.frames
        )


def _commonest(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0]  # ties: the first seen


@dataclasses.dataclass
class ClipReaders:
    """The vision proof's classifiers as readers of clips of ``world``: the ViT-3D
    (``video``) reads the direction from its target head (its first ``num_video_classes``
    logits), the ViT-2D (``image``, with ``image_heads``: ``(label, classes)`` of each slice
    of its logits) reads each frame as an image
    (:func:`~vats_apps.generation.model.read_images`)."""

    image: nn.Module
    image_heads: list[tuple[str, int]]
    video: nn.Module
    world: ShapesConfig

    @torch.no_grad()
    def __call__(self, clips: Tensor) -> list[ClipReading]:
        """What each clip of ``clips`` ``(B, 3, T, S, S)`` in [-1, 1] shows."""
        b, t = clips.shape[0], clips.shape[2]
        logits = self.video(clips)[:, : self.world.num_video_classes]  # (B, directions)
        directions = [self.world.directions[k] for k in logits.argmax(-1).tolist()]
        flat = rearrange(clips, "b c t h w -> (b t) c h w")
        seen = read_images(self.image, self.image_heads, self.world, flat)
        out = []
        for i in range(b):
            frames = [
                {k: v for k, v in r.items() if k in FRAME_LABELS} for r in seen[i * t : (i + 1) * t]
            ]
            majority = {k: _commonest([f[k] for f in frames]) for k in frames[0]}
            out.append(ClipReading(directions[i], frames, majority))
        return out


def clip_pixels(
    world: ShapesWorld, indices: Sequence[int], split: str
) -> tuple[Tensor, ShapeBatch]:
    """Clips ``indices`` of ``split`` as pixels ``(B, 3, T, S, S)`` in [-1, 1] (the layout
    of the ViT-3D and of :meth:`~vats_diffusion.VAE.encode_frames`), and their batch."""
    batch = world.videos(indices, split)
    return batch.pixels.transpose(1, 2) * 2 - 1, batch  # (B, T, 3, S, S) -> (B, 3, T, S, S)


def save_clips(
    clips: Tensor, folder: Path, *, scale: int, fps: float
) -> dict[str, list[str] | list[list[str]]]:
    """Write each clip as ``clip_<i>.gif`` (frames enlarged ``scale`` times, nearest
    neighbour, ``fps`` frames a second, looping) and its frames at their own size as
    ``clip_<i>_frame_<t>.png`` under ``folder``. (Pillow writes two identical consecutive
    frames as one that lasts twice as long; the PNGs keep every frame.)

    Args:
        clips: ``(B, 3, T, S, S)`` in [-1, 1].

    Returns:
        ``{"gifs": [path per clip], "frames": [[path per frame] per clip]}`` as strings.
    """
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be (B, 3, T, S, S), got {tuple(clips.shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    gifs, pngs = [], []
    for i, clip in enumerate(clips):
        frames = clip.transpose(0, 1)  # (T, 3, S, S)
        small = [Image.fromarray(f.numpy()) for f in to_uint8(frames)]
        large = [Image.fromarray(f.numpy()) for f in to_uint8(enlarge(frames, scale))]
        gif = folder / f"clip_{i}.gif"
        large[0].save(
            gif, save_all=True, append_images=large[1:], duration=round(1000 / fps), loop=0
        )
        gifs.append(str(gif))
        pngs.append([])
        for t, image in enumerate(small):
            image.save(folder / f"clip_{i}_frame_{t}.png")
            pngs[-1].append(str(folder / f"clip_{i}_frame_{t}.png"))
    return {"gifs": gifs, "frames": pngs}
