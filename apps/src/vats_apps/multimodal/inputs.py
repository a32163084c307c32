"""Prompts with media placeholders -> the padded id batch :class:`MultimodalLM` takes.

A prompt is text in which each medium is written as one placeholder, ``<image>``,
``<video>`` or ``<audio>`` (the vats tokenizer encodes each to one id). :func:`build_inputs`
tokenizes every prompt (BOS first), expands each placeholder into as many copies as its
medium yields LM tokens (:meth:`MultimodalLM.media_token_counts`, read off the shapes),
optionally appends the answer and EOS with the labels that score only them, and pads the
rows: on the left for generation (each row's newest token in the last column), on the
left for training too by default, so every row's answer ends in the last column.

Media are matched to placeholders in reading order: the first image given belongs to the
first ``<image>`` of the first prompt that has one. Every mismatch (a placeholder with no
medium left, media left over, a prompt too long for the LM once expanded) raises a
``ValueError`` before anything is encoded.

Shapes: B prompts, T tokens (padding included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from vats_apps.multimodal.model import KINDS, Media, MultimodalLM
from vats_text.model import IGNORE_INDEX
from vats_text.tokenizer import Tokenizer

__all__ = ["MultimodalBatch", "build_inputs"]


@dataclasses.dataclass
class MultimodalBatch:
    """What :meth:`MultimodalLM.forward` / ``generate`` take, and the answers' labels."""

    input_ids: Tensor  # (B, T) long, placeholders expanded
    attention_mask: Tensor  # (B, T) bool, True = real token
    labels: Tensor | None  # (B, T) long: answer tokens and EOS, -100 elsewhere; None w/o answers
    images: list[Tensor] | None  # the media in placeholder order
    videos: list[Tensor] | None
    audios: list[Tensor] | None

    def media(self) -> dict[str, list[Tensor] | None]:
        """``{"images": ..., "videos": ..., "audios": ...}`` (keyword arguments of the model)."""
        return {"images": self.images, "videos": self.videos, "audios": self.audios}


def build_inputs(
    model: MultimodalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    answers: Sequence[str] | None = None,
    images: Media | None = None,
    videos: Media | None = None,
    audios: Media | None = None,
    padding_side: str = "left",
    max_new_tokens: int = 0,
) -> MultimodalBatch:
    """Tokenize, expand the placeholders, add answers and labels, pad.

    Args:
        model: gives each medium's token count and the LM's context length.
        tokenizer: the LM's tokenizer.
        prompts: B texts with one placeholder per medium item.
        answers: B answers (training): appended with EOS; only they are labelled.
        images, videos, audios: the media, in placeholder order (a list, or a stacked
            tensor).
        padding_side: ``"left"`` (generation, and training with answers ending together) or
            ``"right"``.
        max_new_tokens: room to leave for generation when checking the context length.

    Returns:
        :class:`MultimodalBatch` on the CPU.

    Raises:
        ValueError: no prompts, answers of another count, a placeholder with no medium, a
            medium with no placeholder, media that do not fit their encoders, or a row longer
            than the LM's ``max_seq_len`` (the excess is named).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    if answers is not None and (
        isinstance(answers, str)
        or len(answers) != len(prompts)
        or not all(isinstance(a, str) for a in answers)
    ):
        raise ValueError(f"answers must be {len(prompts)} strings, one per prompt")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is invalid: expected 'left' or 'right'")
    given = {"image": images, "video": videos, "audio": audios}
    counts = model.media_token_counts(images=images, videos=videos, audios=audios)
    cfg = model.config
    ids_of = {kind: cfg.token_id(kind) for kind in KINDS}
    kind_of = {v: k for k, v in ids_of.items()}
    next_item = dict.fromkeys(KINDS, 0)
    rows, label_rows = [], []
    for b, prompt in enumerate(prompts):
        row: list[int] = []
        media_tokens = 0
        for token in tokenizer.encode(prompt, add_bos=True):
            kind = kind_of.get(token)
            if kind is None:
                row.append(token)
                continue
            item, have = next_item[kind], counts.get(kind, [])
            if item >= len(have):
                raise ValueError(
                    f"prompt {b} holds a <{kind}> placeholder with no {kind} for it: "
                    f"{len(have)} {kind} item(s) given for more placeholders"
                )
            row.extend([token] * have[item])
            media_tokens += have[item]
            next_item[kind] = item + 1
        labels = [IGNORE_INDEX] * len(row)
        if answers is not None:
            answer = [*tokenizer.encode(answers[b]), tokenizer.eos_id]
            row, labels = row + answer, labels + answer
        limit = cfg.lm.max_seq_len
        if cfg.lm.has_global_layer and len(row) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {b} is {len(row)} tokens once its media are expanded ({media_tokens} "
                f"of them media){f' + {max_new_tokens} to generate' if max_new_tokens else ''}: "
                f"{len(row) + max_new_tokens - limit} more than the LM's max_seq_len={limit}"
            )
        rows.append(row)
        label_rows.append(labels)
    for kind in KINDS:
        left = len(counts.get(kind, [])) - next_item[kind]
        if left:
            raise ValueError(
                f"{len(counts[kind])} {kind} item(s) given but the prompts hold "
                f"{next_item[kind]} <{kind}> placeholder(s): {left} {kind} item(s) have no "
                "placeholder"
            )
    input_ids, mask = _pad(rows, tokenizer.pad_id, padding_side)
    labels = _pad(label_rows, IGNORE_INDEX, padding_side)[0] if answers is not None else None
    media = {
        kind: None if (items := given[kind]) is None else model.media_items(kind, items)
        for kind in KINDS
    }
    return MultimodalBatch(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        images=media["image"],
        videos=media["video"],
        audios=media["audio"],
    )


def _pad(rows: list[list[int]], value: int, side: str) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = True
    return ids, mask
