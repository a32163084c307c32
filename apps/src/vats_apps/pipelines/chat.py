"""``vats pipeline=chat image=a.png prompt="What colour is the shape?"``: ask the multimodal
LM about your own image, clip or sound and watch the answer stream.

``image=`` a picture (any format Pillow reads, resized to the image encoder's input size),
``video=`` an animated GIF (or APNG / WebP) or a directory of frames (sampled to the video
encoder's frame count), ``audio=`` a WAV (resampled to the audio encoder's rate, mixed to
mono); any of them, or none. The files are read and checked before anything else, so a
file that is not what its argument says fails at once with the reason.

A prompt that does not write the placeholders gets them in front, in the template the
model was trained on (``<image>\\nWhat colour is the shape?\\n``). The model is the one
``vats pipeline=train_multimodal`` trains and caches (same config sections); when no cache
entry matches, it is trained first, with a message that says so.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vats_apps.multimodal import KINDS
from vats_apps.multimodal.inputs import build_inputs
from vats_apps.multimodal.media import load_audio, load_image, load_video
from vats_apps.pipelines import train_audio, train_multimodal, train_vision
from vats_core.config import is_int


def read_media(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The files named by ``image`` / ``video`` / ``audio`` as the encoders take them."""
    subs = train_multimodal.part_configs(cfg)
    image_world = train_vision.world_config(subs["vision"], "image")
    video_world = train_vision.world_config(subs["vision"], "video")
    sound_world = train_audio.world_config(subs["audio"])
    media: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        path = OmegaConf.select(cfg, kind)
        if path is None:
            continue
        if not isinstance(path, str):
            raise ValueError(f"{kind}={path!r} is invalid: expected a path")
        if kind == "image":
            media[kind] = load_image(path, image_world.image_size) * 2 - 1  # (C, S, S)
        elif kind == "video":
            frames = load_video(path, video_world.image_size, video_world.frames)  # (F, C, S, S)
            media[kind] = frames.permute(1, 0, 2, 3) * 2 - 1  # (C, F, S, S)
        else:
            media[kind] = load_audio(path, sound_world.sample_rate)  # (S,)
    return media


def chat_prompt(text: str, kinds: list[str]) -> str:
    """``text`` with the placeholders of ``kinds`` in front where it writes none."""
    missing = [k for k in kinds if f"<{k}>" not in text]
    if not missing:
        return text if text.endswith("\n") else text + "\n"
    head = "".join(f"<{k}>" for k in missing)
    return f"{head}\n{text.strip()}\n"  # train_multimodal.prompt's template


def run(cfg: DictConfig) -> dict[str, Any]:
    """Read the files, load (or train) the model, stream the answer."""
    text = cfg.prompt
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompt={text!r} is invalid: ask a question, e.g. prompt='Describe it.'")
    gen = cfg.generation
    if not is_int(gen.max_new_tokens) or gen.max_new_tokens < 1:
        raise ValueError(f"generation.max_new_tokens={gen.max_new_tokens!r}: expected an int >= 1")
    media = read_media(cfg)  # bad files fail here, before any model is loaded or trained
    train_multimodal.check_config(cfg)
    trained = train_multimodal.load_or_train(cfg)
    model, tokenizer = trained.model, trained.tokenizer
    full = chat_prompt(text, list(media))
    batch = build_inputs(
        model,
        tokenizer,
        [full],
        max_new_tokens=int(gen.max_new_tokens),
        **{f"{k}s": [v] for k, v in media.items()},
    )
    generator = torch.Generator().manual_seed(int(cfg.pipeline.seed))
    print(f">>> {text}")
    pieces = []
    for piece in model.stream(
        tokenizer,
        batch.input_ids,
        max_new_tokens=int(gen.max_new_tokens),
        temperature=float(gen.temperature),
        generator=generator,
        **batch.media(),
    ):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return {
        "prompt": full,
        "answer": "".join(pieces),
        "media": list(media),
        "cache": str(trained.path),
    }
