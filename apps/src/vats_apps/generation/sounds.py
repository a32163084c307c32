"""The text-to-audio model of apps and how it samples: a vats-text encoder feeding a
vats-diffusion AudioDiT over log-mel frames, conditioned on the sound's length, the vocoder
turning the frames into audio, and the audio classifier that reads the sounds back.

The AudioDiT generates a fixed window of ``L`` frames (the world's longest sound) in the
units of the audio proof's :class:`vats_audio.LogMel` (Whisper's normalisation), scaled to
about unit variance (:class:`MelScale`), and is told the length of the sound it should
make (``seconds_total``; ``seconds_start`` is 0: every window starts at the sound's start).
Trained on sounds padded to the window with digital silence, it learns to fall silent where
the requested length ends, as Stable Audio does; :func:`sound_ends` reads where a generated
sound stops (its last frame within 40 dB of its peak), which is how the pipeline checks
that the length follows the request.

Composition lives here, not in the packages: vats_diffusion knows no text encoder and
vats_text no diffusion model (DESIGN.md).

Shapes: B batch, T text tokens, M mel bins, L frames, S samples.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from vats_apps.generation.model import Sampling, TextConditioned, encode_texts, guided_sample
from vats_audio import GriffinLimVocoder, LogMel
from vats_diffusion import AudioDiT, Diffusion
from vats_text.tokenizer import Tokenizer

__all__ = [
    "SOUND_RANGE",
    "MelScale",
    "TextToAudio",
    "read_sounds",
    "sample_sounds",
    "sound_ends",
    "vocode",
]

# A frame is sound when its loudest mel bin is within this range of the clip's loudest (in
# LogMel's units, where 1 is 4 decades of power: 40 dB). Relative to the peak, not to the
# floor: what a listener hears, and what a generated clip's leftover noise (a few decades
# over Whisper's floor, 8 decades under the peak) does not reach. The world's hiss sits
# about 3 decades under the peak, inside the range, and lasts as long as the tone; a
# release fades through the last 40 dB in its last milliseconds.
SOUND_RANGE = 1.0


@dataclasses.dataclass(frozen=True)
class MelScale:
    """LogMel features <-> the AudioDiT's unit-variance frames: ``(x - mean) / std``."""

    mean: float
    std: float

    def normalize(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


class TextToAudio(TextConditioned):
    """The text encoder and the AudioDiT."""

    dit: AudioDiT

    @staticmethod
    def timing(seconds: Tensor) -> dict[str, Tensor]:
        """The duration condition of sounds of ``seconds`` (B,), each window starting at 0."""
        seconds = seconds.float()
        return {"seconds_start": torch.zeros_like(seconds), "seconds_total": seconds}

    @staticmethod
    def null_condition(cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unconditional side of guidance: no text, the same duration (the length is
        not what guidance should amplify, and the null text is what ``text_dropout``
        trains)."""
        null = TextConditioned.null_condition(cond)
        return null | {k: v for k, v in cond.items() if k.startswith("seconds_")}


@torch.no_grad()
def sample_sounds(
    model: TextToAudio,
    diffusion: Diffusion,
    tokenizer: Tokenizer,
    texts: list[str],
    seconds: Tensor,
    frames: int,
    scale: MelScale,
    sampling: Sampling,
    generator: torch.Generator,
    *,
    progress: bool = False,
) -> Tensor:
    """LogMel features ``(B, M, frames)`` of sounds of ``seconds`` (B,) for ``texts``: encode
    them, sample with guidance (initial noise from ``generator``), undo the scaling."""
    ids, mask = encode_texts(tokenizer, texts, model.encoder.config.max_seq_len)
    cond = model.condition(ids, mask) | model.timing(seconds)
    shape = (len(texts), model.dit.config.n_mels, frames)
    x = guided_sample(model, diffusion, shape, cond, sampling, generator, progress=progress)
    return scale.denormalize(x)


def sound_ends(features: Tensor) -> Tensor:
    """``(B,)`` frames up to the last one that is sound (its loudest bin within
    :data:`SOUND_RANGE` of the clip's loudest)."""
    loudness = features.amax(dim=1)  # (B, L)
    peak = loudness.amax(dim=1, keepdim=True)  # (B, 1)
    sound = loudness > peak - SOUND_RANGE
    last = torch.arange(1, sound.shape[1] + 1).expand_as(sound) * sound
    return last.amax(dim=1)


@torch.no_grad()
def vocode(vocoder: GriffinLimVocoder, features: Tensor, frames: Tensor) -> list[Tensor]:
    """Each clip's first ``frames[i]`` frames as a waveform ``(frames[i] * hop,)``."""
    return [vocoder(features[i, :, : int(n)]) for i, n in enumerate(frames.tolist())]


@torch.no_grad()
def read_sounds(
    classifier: nn.Module, logmel: LogMel, waveforms: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """The audio classifier's class (B,) and its probability (B,) for each waveform, read
    from its LogMel as the audio proof reads a clip."""
    lengths = torch.tensor([len(w) for w in waveforms])
    batch = torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True)  # (B, S)
    logits = classifier(logmel(batch, lengths), logmel.frame_lengths(lengths))
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return best, probs.gather(-1, best[:, None])[:, 0]
