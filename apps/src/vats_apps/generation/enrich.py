"""Prompt enrichment for text to image: users' prompts read into the shapes world's
attributes, terse training prompts, the LM's template, and the check of what it writes.

A prompt names some of an image's attributes (:data:`ATTRIBUTES`: size, colour, shape,
position, background), in any words around them: ``"a red circle"``, ``"draw something
big in the upper left on stripes"``. :func:`parse_prompt` reads them with the caption
parser of the multimodal questions (:func:`~vats_apps.multimodal.questions.parse_caption`:
whole words, longest phrase first, the earlier mention wins) after mapping a few common
synonyms onto the world's words (:data:`SYNONYMS`: "big" is large, "upper" is top, ...).
Words it does not know are ignored. :func:`check_prompt` refuses a prompt that names a
value the trained world does not have (a star in a world of circles, squares, triangles
and crosses), naming the attribute and the values it may take.

Enrichment rewrites a terse prompt into the world's full caption (``"a large red circle in
the top left corner on a striped background"``), keeping what the prompt names and filling
the rest. The LM learns it from pairs built here: :func:`example` draws a scene (each
attribute uniform over the world's values, so what the LM fills in is uniform too), keeps a
random subset of its attributes (each with probability 1/2) and writes them as a terse
prompt in one of many phrasings (:func:`terse_prompt`); the target is the scene's caption.
The ``val`` / ``test`` splits use held-out phrasings (other lead-ins, position and
background wordings and nouns) that the ``train`` split never writes, so a held-out score
measures rewriting, not recall of the training strings. Every pair is a pure function of
``(world, split, index)``.

The LM reads ``Prompt: <prompt>\\nCaption:`` (:func:`lm_prompt`) and writes the caption
and EOS. :func:`check_enrichment` accepts what it wrote only when it parses into every
attribute, each a value of the world, and keeps every attribute the user named; anything
else falls back to the user's prompt (the pipeline prints why).

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vats_apps.data import BACKGROUNDS, ShapesConfig
from vats_apps.data.shapes import _caption, _where  # the world's own wording
from vats_apps.multimodal.questions import caption_attributes, parse_caption
from vats_text.generation import generate
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

__all__ = [
    "ATTRIBUTES",
    "SYNONYMS",
    "Enrichment",
    "caption",
    "check_enrichment",
    "check_prompt",
    "enrich",
    "example",
    "lm_batch",
    "lm_prompt",
    "parse_prompt",
    "terse_prompt",
    "world_values",
]

ATTRIBUTES: tuple[str, ...] = caption_attributes("image")  # size, color, shape, position, bg
SPLITS = ("train", "val", "test")
IGNORE = -100  # label of the prompt tokens: the loss covers the caption and EOS only

# Words users write for the world's words (one word each, read before parsing).
SYNONYMS: dict[str, str] = {
    "big": "large", "huge": "large", "little": "small", "tiny": "small", "mid": "medium",
    "upper": "top", "lower": "bottom", "centered": "center", "centred": "center",
    "checkerboard": "checker", "checked": "checker",
}  # fmt: skip


# ---- reading prompts ----------------------------------------------------------------------


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes ``text`` names, as table names (``{"color": "red", "shape": "star"}``);
    attributes it does not name are absent. Any name of the global tables counts, whether
    or not a given world has it (see :func:`check_prompt`)."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = [SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    parsed = parse_caption("image", " ".join(words))
    return {a: v for a, v in parsed.items() if v is not None}


def world_values(world: ShapesConfig) -> dict[str, tuple[str, ...]]:
    """The values each attribute takes in ``world``."""
    return {a: world.label_values(a) for a in ATTRIBUTES}


def check_prompt(text: str, world: ShapesConfig, where: str = "prompt") -> dict[str, str]:
    """:func:`parse_prompt`, refusing a value ``world`` does not have.

    Raises:
        ValueError: naming ``where``, the attribute, its value and the world's values.
    """
    names = parse_prompt(text)
    values = world_values(world)
    for attribute, name in names.items():
        if name not in values[attribute]:
            raise ValueError(
                f"{where}={text!r} asks for the {attribute} {name!r}, which the model never "
                f"saw: its world has the {attribute}s {list(values[attribute])}. Use one of "
                "those, or train on a world that has it (the vision proof's "
                "train.image.data, parts.vision.image.data here; every stage retrains)"
            )
    return names


def caption(names: Mapping[str, str]) -> str:
    """The world's caption of a scene (what the shapes world writes for an image)."""
    return _caption(dict(names), False)


# ---- terse prompts ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wordings:
    """The ways one split writes a terse prompt."""

    lead_ins: tuple[str, ...]  # before the noun phrase
    articles: tuple[str, ...]
    nouns: tuple[str, ...]  # stands for the shape when the prompt leaves it open
    positions: tuple[str, ...]  # "{}" = a position name or synonym; "where" = the caption's
    backgrounds: tuple[str, ...]  # "{}" = the caption's adjective, "{noun}" a noun
    joins: tuple[str, ...]  # between the noun phrase and each trailing part


_SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
_POSITION_WORDS = {"center": ("center", "middle", "centre")}
for _p in ("top left", "top right", "bottom left", "bottom right"):
    _POSITION_WORDS[_p] = (
        _p,
        _p.replace(" ", "-"),
        _p.replace("top", "upper").replace("bottom", "lower"),
    )
_BACKGROUND_NOUNS = {"plain": "a plain ground", "noise": "noise", "stripes": "stripes",
                     "checker": "a checkerboard"}  # fmt: skip
_TRAIN = _Wordings(
    lead_ins=("", "", "", "draw ", "an image of ", "a picture of ", "show ", "generate ",
              "paint "),
    articles=("a ", "a ", "one ", ""),
    nouns=("shape", "thing", "object"),
    positions=("where", "in the {}", "at the {}", "{}"),
    backgrounds=("on a {} background", "{} background", "with a {} background", "on {noun}"),
    joins=(" ", " ", ", "),
)  # fmt: skip
_HELD_OUT = _Wordings(
    lead_ins=("create ", "i would like ", "make me "),
    articles=("a ", ""),
    nouns=("figure", "item"),
    positions=("located in the {}", "placed at the {}"),
    backgrounds=("against a {} backdrop", "over a {} backdrop"),
    joins=(" ", ", "),
)


def terse_prompt(
    names: Mapping[str, str], keep: Sequence[str], rng: random.Random, split: str
) -> str:
    """A short prompt naming the attributes ``keep`` of the scene ``names``, worded by
    ``rng`` from the phrasings of ``split`` (``val`` / ``test``: the held-out ones)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {list(SPLITS)}")
    unknown = [a for a in keep if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"keep={list(keep)!r} is invalid: expected attributes of {ATTRIBUTES}")
    w = _TRAIN if split == "train" else _HELD_OUT
    words = []
    if "size" in keep:
        words.append(rng.choice(_SIZE_WORDS[names["size"]]))
    if "color" in keep:
        words.append(names["color"])
    words.append(names["shape"] if "shape" in keep else rng.choice(w.nouns))
    article = rng.choice(w.articles)
    if article == "a " and words[0][0] in "aeiou":
        article = "an "
    head = rng.choice(w.lead_ins) + article + " ".join(words)
    tail = []
    if "position" in keep:
        position = names["position"]
        form = rng.choice(w.positions)
        if form == "where":
            tail.append(_where(position))
        else:
            tail.append(form.format(rng.choice(_POSITION_WORDS.get(position, (position,)))))
    if "background" in keep:
        background = names["background"]
        form = rng.choice(w.backgrounds)
        tail.append(form.format(BACKGROUNDS[background], noun=_BACKGROUND_NOUNS[background]))
    rng.shuffle(tail)
    return head + "".join(rng.choice(w.joins) + part for part in tail)


@dataclass(frozen=True)
class Example:
    """One enrichment pair: a scene, the attributes the prompt keeps, prompt and caption."""

    names: dict[str, str]  # the scene: every attribute
    kept: dict[str, str]  # the attributes the prompt names
    prompt: str
    caption: str


def example(
    world: ShapesConfig,
    split: str,
    index: int,
    *,
    always: Sequence[str] = (),
    keep_prob: float = 0.5,
    phrasing: str | None = None,
) -> Example:
    """Pair ``index`` of ``split``: a uniform scene of ``world``, each attribute kept with
    probability ``keep_prob`` (those of ``always`` always), as a terse prompt worded as
    ``phrasing`` writes them (a split; default ``split``) and the caption. A pure function
    of its arguments."""
    key = f"{world.seed}/{split}/{index}/{keep_prob}/{','.join(always)}"
    rng = random.Random(key if phrasing is None else f"{key}/{phrasing}")
    values = world_values(world)
    names = {a: rng.choice(values[a]) for a in ATTRIBUTES}
    keep = [a for a in ATTRIBUTES if a in always or rng.random() < keep_prob]
    prompt = terse_prompt(names, keep, rng, split if phrasing is None else phrasing)
    return Example(names, {a: names[a] for a in keep}, prompt, caption(names))


# ---- the LM -------------------------------------------------------------------------------


def lm_prompt(prompt: str) -> str:
    """The enrichment LM's input for a user's prompt (whitespace runs become one space)."""
    return f"Prompt: {' '.join(prompt.split())}\nCaption:"


def lm_batch(
    tokenizer: Tokenizer, prompts: Sequence[str], captions: Sequence[str]
) -> dict[str, Tensor]:
    """A training batch: ``BOS lm_prompt(prompt) caption EOS`` per row, right-padded, labels
    on the caption and EOS only.

    Returns:
        ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B, T)}``.
    """
    rows, labels = [], []
    for prompt, text in zip(prompts, captions, strict=True):
        head = tokenizer.encode(lm_prompt(prompt), add_bos=True)
        tail = [*tokenizer.encode(" " + text), tokenizer.eos_id]
        rows.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(la)] = torch.tensor(la)
        mask[i, : len(r)] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


@torch.no_grad()
def enrich(
    model: MoELanguageModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    generator: torch.Generator | None,
    temperature: float,
    min_p: float | None,
    max_new_tokens: int,
    chunk: int = 64,
) -> list[str]:
    """What the LM writes for each prompt (sampled from ``generator``; ``temperature`` 0 is
    greedy), stripped; batched with left padding, ``chunk`` rows at a time."""
    out: list[str] = []
    for start in range(0, len(prompts), chunk):
        part = [lm_prompt(p) for p in prompts[start : start + chunk]]
        ids, mask = tokenizer.encode_batch(part, padding_side="left", add_bos=True)
        tokens = generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            min_p=min_p,
            eos_token_id=tokenizer.eos_id,
            stop_strings="\n",
            tokenizer=tokenizer,
            generator=generator,
        )
        new = tokens[:, ids.shape[1] :].tolist()
        out += [tokenizer.decode(row).split("\n")[0].strip() for row in new]
    return out


@dataclass(frozen=True)
class Enrichment:
    """The outcome of enriching one prompt."""

    prompt: str  # the user's
    written: str  # what the LM wrote ("" with enrichment off)
    used: str  # what the text encoder reads: ``written`` if accepted, else ``prompt``
    names: dict[str, str]  # the attributes ``used`` names
    reason: str | None  # why ``written`` was refused (None: accepted, or enrichment off)
    tries: int = 1  # samples drawn (see vats_apps.generation.model.enrich_all)

    @property
    def accepted(self) -> bool:
        return self.used == self.written and self.reason is None


def check_enrichment(
    prompt: str, given: Mapping[str, str], written: str, world: ShapesConfig
) -> Enrichment:
    """Accept ``written`` when it parses into every attribute with a value of ``world`` and
    keeps each of ``given`` (the user's attributes); else fall back to ``prompt``, with the
    reason."""
    parsed = parse_prompt(written)
    values = world_values(world)
    reason = None
    missing = [a for a in ATTRIBUTES if a not in parsed]
    outside = [f"{a} {v!r}" for a, v in parsed.items() if v not in values[a]]
    dropped = [a for a in given if a not in parsed]
    changed = [
        f"{a} {given[a]!r} -> {parsed[a]!r}" for a in given if parsed.get(a, given[a]) != given[a]
    ]
    if changed:
        reason = "it contradicts the prompt: " + ", ".join(changed)
    elif dropped:
        reason = "it drops the prompt's " + ", ".join(dropped)
    elif missing:
        reason = "it does not parse as a caption: no " + ", ".join(missing)
    elif outside:
        reason = "it names what the world does not have: " + ", ".join(outside)
    if reason is not None:
        return Enrichment(prompt, written, prompt, dict(given), reason)
    return Enrichment(prompt, written, written, parsed, None)
