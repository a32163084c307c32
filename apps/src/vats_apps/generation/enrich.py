"""Prompt enrichment for the generators: users' prompts read into a world's attributes,
terse training prompts, the LM's template, and the check of what it writes.

Three media share it (:data:`MEDIA`): ``image`` (the shapes world's images: size, colour,
shape, position, background), ``video`` (its clips: size, colour, shape, direction, speed,
background) and ``audio`` (the sounds world's tones: duration, pitch, timbre, background).
A prompt names some of a sample's attributes in any words around them: ``"a red circle"``,
``"draw something big in the upper left on stripes"``, ``"a blue circle moving left"``,
``"a long low sine tone"``. :func:`parse_prompt` reads them with the caption parser of the
multimodal questions (:func:`~vats_apps.multimodal.questions.parse_caption`: whole words,
longest phrase first, the earlier mention wins) after mapping a few common synonyms onto
the world's words (:data:`SYNONYMS`, per medium: "big" is large for a shape, "deep" is low
for a tone). Words it does not know are ignored. :func:`check_prompt` refuses a prompt that
names a value the trained world does not have (a star in a world of circles, squares,
triangles and crosses), naming the attribute and the values it may take.

Enrichment rewrites a terse prompt into the world's full caption (``"a large red circle in
the top left corner on a striped background"``), keeping what the prompt names and filling
the rest. The LM learns it from pairs built here: :func:`example` draws a sample (each
attribute uniform over the world's values, so what the LM fills in is uniform too), keeps a
random subset of its attributes (each with probability 1/2) and writes them as a terse
prompt in one of many phrasings (:func:`terse_prompt`); the target is the world's caption
of the sample. The ``val`` / ``test`` splits use held-out phrasings (other lead-ins, nouns
and wordings of the trailing attributes) that the ``train`` split never writes, so a
held-out score measures rewriting, not recall of the training strings. Every pair is a pure
function of ``(world, split, index, medium)``.

The LM reads ``<Medium> prompt: <prompt>\\nCaption:`` (:func:`lm_prompt`; ``Image``, ``Clip``
or ``Sound``, so that one LM can learn the three) and writes the caption and EOS.
:func:`check_enrichment` accepts what it wrote only when it parses into every attribute,
each a value of the world, and keeps every attribute the user named; anything else falls
back to the user's prompt (the pipeline prints why).

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vats_apps.data import BACKGROUNDS, ShapesConfig, SoundsConfig
from vats_apps.data.shapes import _DIRECTION_WORDS, _caption, _where  # the world's own wording
from vats_apps.data.sounds import _caption as _sound_caption
from vats_apps.multimodal.questions import caption_attributes, parse_caption
from vats_text.generation import generate
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

__all__ = [
    "ATTRIBUTES",
    "MEDIA",
    "SYNONYMS",
    "Enrichment",
    "attributes",
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

World = ShapesConfig | SoundsConfig
MEDIA: tuple[str, ...] = ("image", "video", "audio")
ATTRIBUTES: tuple[str, ...] = caption_attributes("image")  # size, color, shape, position, bg
SPLITS = ("train", "val", "test")
IGNORE = -100  # label of the prompt tokens: the loss covers the caption and EOS only

# Words users write for the world's words (one word each, read before parsing), per medium.
_SHAPE_SYNONYMS = {
    "big": "large", "huge": "large", "little": "small", "tiny": "small", "mid": "medium",
    "checkerboard": "checker", "checked": "checker",
}  # fmt: skip
SYNONYMS: dict[str, dict[str, str]] = {
    "image": _SHAPE_SYNONYMS | {"upper": "top", "lower": "bottom", "centered": "center",
                                "centred": "center"},
    "video": _SHAPE_SYNONYMS | {"quick": "fast", "rapidly": "quickly", "leftward": "left",
                                "rightward": "right", "upward": "up", "downward": "down"},
    "audio": {"brief": "short", "sustained": "long", "deep": "low", "saw": "sawtooth",
              "hissing": "hiss", "noisy": "hiss", "silent": "quiet", "clean": "quiet"},
}  # fmt: skip
_LABELS = {"image": "Image", "video": "Clip", "audio": "Sound"}  # the LM template's word
_WORLD_HINT = {  # where a pipeline's world is configured
    "image": "the vision proof's train.image.data, parts.vision.image.data here",
    "video": "the vision proof's train.video.data, parts.vision.video.data here",
    "audio": "the audio proof's train.data, parts.audio.data here",
}


def _medium(medium: str) -> str:
    if medium not in MEDIA:
        raise ValueError(f"medium={medium!r} is invalid: expected one of {list(MEDIA)}")
    return medium


def attributes(medium: str = "image") -> tuple[str, ...]:
    """The attributes a caption of ``medium`` states, in the caption's order."""
    return caption_attributes(_medium(medium))


# ---- reading prompts ----------------------------------------------------------------------


def parse_prompt(text: str, medium: str = "image") -> dict[str, str]:
    """The attributes ``text`` names, as table names (``{"color": "red", "shape": "star"}``);
    attributes it does not name are absent. Any name of the global tables counts, whether
    or not a given world has it (see :func:`check_prompt`). A sound's background is
    ``"quiet"`` only where the text says so (a caption says nothing of it)."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    synonyms = SYNONYMS[_medium(medium)]
    words = [synonyms.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    parsed = parse_caption(medium, " ".join(words))
    if medium == "audio" and parsed["background"] == "quiet" and "quiet" not in words:
        del parsed["background"]  # the parser's default for captions, not the user's word
    return {a: v for a, v in parsed.items() if v is not None}


def world_values(world: World, medium: str = "image") -> dict[str, tuple[str, ...]]:
    """The values each attribute of ``medium`` takes in ``world``."""
    if _medium(medium) == "audio":
        if not isinstance(world, SoundsConfig):
            raise ValueError(f"medium='audio' needs a SoundsConfig, got {type(world).__name__}")
        return {
            "duration": world.durations,
            "pitch": world.pitches,
            "timbre": world.timbres,
            "background": world.backgrounds,
        }
    if not isinstance(world, ShapesConfig):
        raise ValueError(f"medium={medium!r} needs a ShapesConfig, got {type(world).__name__}")
    return {a: world.label_values(a) for a in attributes(medium)}


def check_prompt(
    text: str, world: World, where: str = "prompt", medium: str = "image"
) -> dict[str, str]:
    """:func:`parse_prompt`, refusing a value ``world`` does not have.

    Raises:
        ValueError: naming ``where``, the attribute, its value and the world's values.
    """
    names = parse_prompt(text, medium)
    values = world_values(world, medium)
    for attribute, name in names.items():
        if name not in values[attribute]:
            raise ValueError(
                f"{where}={text!r} asks for the {attribute} {name!r}, which the model never "
                f"saw: its world has the {attribute}s {list(values[attribute])}. Use one of "
                f"those, or train on a world that has it ({_WORLD_HINT[medium]}; every "
                "stage retrains)"
            )
    return names


def read_prompt(text: str) -> str:
    """A user's prompt as the world's prompts and captions are written: lowercase, single
    spaces, no punctuation around it (``" A RED Circle!!! "`` -> ``"a red circle"``). The
    LM and the text encoder learned from such text; capitals and trailing marks are words
    they never saw."""
    return " ".join(text.lower().split()).strip(" .,;:!?")


def known_words(world: World, medium: str = "image") -> frozenset[str]:
    """Every word of the prompts and captions the models of ``medium`` learn from in
    ``world``: the terse prompts' lead-ins, articles, nouns and phrasings (train and
    held-out), each value's names and wordings, and the captions' own words."""
    spec, values = _MEDIA[_medium(medium)], world_values(world, medium)
    texts = ["an", *SYNONYMS[medium]]
    for w in (spec.train, spec.held_out):
        texts += [*w.lead_ins, *w.articles, *w.nouns, *w.joins]
        texts += [re.sub(r"{\w+}", " ", f) for forms in w.tails.values() for f in forms]
    base = {a: v[0] for a, v in values.items()}
    for attribute, names in values.items():
        for name in names:
            texts += [name, caption({**base, attribute: name}, medium)]
            texts += [f for forms in _value_words(spec, attribute, name).values() for f in forms]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))


def unknown_words(text: str, world: World, medium: str = "image") -> list[str]:
    """The words of ``text`` that no prompt or caption of ``world`` uses
    (:func:`known_words`), in the order they come, once each."""
    known = known_words(world, medium)
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text.lower()) if w not in known))


def caption(names: Mapping[str, str], medium: str = "image") -> str:
    """The world's caption of a sample (what the world writes for it; clips that do not
    bounce)."""
    if _medium(medium) == "audio":
        return _sound_caption(dict(names))
    return _caption(dict(names), False)


# ---- terse prompts ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wordings:
    """The ways one split writes a terse prompt of one medium."""

    lead_ins: tuple[str, ...]  # before the noun phrase
    articles: tuple[str, ...]
    nouns: tuple[str, ...]  # the noun when the prompt leaves the noun attribute open
    # attribute after the noun -> its forms; a "{slot}" ("{word}", "{noun}", "{phrase}",
    # "{pace}") is filled from _Medium.words
    tails: dict[str, tuple[str, ...]]
    joins: tuple[str, ...]  # between the noun phrase and each trailing part


@dataclass(frozen=True)
class _Medium:
    """How prompts of one medium are written."""

    adjectives: tuple[str, ...]  # attributes written before the noun, in this order
    noun: str | None  # the attribute that is the noun (None: always one of the nouns)
    # attribute -> value -> slot -> ways to write it; a value without an entry is written
    # as its name
    words: dict[str, dict[str, dict[str, tuple[str, ...]]]]
    train: _Wordings
    held_out: _Wordings


def _word_table(table: dict[str, tuple[str, ...]]) -> dict[str, dict[str, tuple[str, ...]]]:
    return {value: {"word": forms} for value, forms in table.items()}


_SIZE_WORDS = _word_table({
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
})  # fmt: skip
_POSITION_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "center": {"word": ("center", "middle", "centre")}
}
for _p in ("top left", "top right", "bottom left", "bottom right"):
    _POSITION_WORDS[_p] = {
        "word": (_p, _p.replace(" ", "-"), _p.replace("top", "upper").replace("bottom", "lower"))
    }
for _p in ("top", "bottom", "left", "right", "center", "top left", "top right", "bottom left",
           "bottom right"):  # fmt: skip
    _POSITION_WORDS.setdefault(_p, {"word": (_p,)})["phrase"] = (_where(_p),)
_BACKGROUND_NOUNS = {"plain": "a plain ground", "noise": "noise", "stripes": "stripes",
                     "checker": "a checkerboard"}  # fmt: skip
_BACKGROUND_WORDS = {
    b: {"word": (BACKGROUNDS[b],), "noun": (_BACKGROUND_NOUNS[b],)} for b in _BACKGROUND_NOUNS
}
_DIRECTION_FORMS = {
    d: {"word": (w, d.replace("-", " "))} for d, w in _DIRECTION_WORDS.items()
}  # the diagonals; the others are written as their names
_SPEED_FORMS = {  # "word": how it moves, "pace": what pace
    "slow": {"word": ("slowly", "slow"), "pace": ("slow",)},
    "fast": {"word": ("quickly", "fast"), "pace": ("fast", "quick")},
}
_SHAPE_BACKGROUNDS_TRAIN = ("on a {word} background", "{word} background",
                            "with a {word} background", "on {noun}")  # fmt: skip
_SHAPE_BACKGROUNDS_HELD_OUT = ("against a {word} backdrop", "over a {word} backdrop")

_MEDIA: dict[str, _Medium] = {
    "image": _Medium(
        adjectives=("size", "color"),
        noun="shape",
        words={"size": _SIZE_WORDS, "position": _POSITION_WORDS, "background": _BACKGROUND_WORDS},
        train=_Wordings(
            lead_ins=("", "", "", "draw ", "an image of ", "a picture of ", "show ",
                      "generate ", "paint "),
            articles=("a ", "a ", "one ", ""),
            nouns=("shape", "thing", "object"),
            tails={"position": ("{phrase}", "in the {word}", "at the {word}", "{word}"),
                   "background": _SHAPE_BACKGROUNDS_TRAIN},
            joins=(" ", " ", ", "),
        ),
        held_out=_Wordings(
            lead_ins=("create ", "i would like ", "make me "),
            articles=("a ", ""),
            nouns=("figure", "item"),
            tails={"position": ("located in the {word}", "placed at the {word}"),
                   "background": _SHAPE_BACKGROUNDS_HELD_OUT},
            joins=(" ", ", "),
        ),
    ),
    "video": _Medium(
        adjectives=("size", "color"),
        noun="shape",
        words={"size": _SIZE_WORDS, "direction": _DIRECTION_FORMS, "speed": _SPEED_FORMS,
               "background": _BACKGROUND_WORDS},
        train=_Wordings(
            lead_ins=("", "", "", "animate ", "a clip of ", "an animation of ", "show ",
                      "generate "),
            articles=("a ", "a ", "one ", ""),
            nouns=("shape", "thing", "object"),
            tails={"direction": ("moving {word}", "going {word}", "heading {word}"),
                   "speed": ("{word}", "moving {word}"),
                   "background": _SHAPE_BACKGROUNDS_TRAIN},
            joins=(" ", " ", ", "),
        ),
        held_out=_Wordings(
            lead_ins=("create ", "i would like ", "make me "),
            articles=("a ", ""),
            nouns=("figure", "item"),
            tails={"direction": ("travelling {word}", "drifting {word}"),
                   "speed": ("at a {pace} pace",),
                   "background": _SHAPE_BACKGROUNDS_HELD_OUT},
            joins=(" ", ", "),
        ),
    ),
    "audio": _Medium(
        adjectives=("duration", "pitch", "timbre"),
        noun=None,
        words={
            "duration": _word_table({"short": ("short", "brief"), "long": ("long", "sustained")}),
            "background": {
                "hiss": {"phrase": ("over a soft hiss", "with a hiss", "over hiss"),
                         "noun": ("a hiss", "hiss", "a soft hiss")},
                "quiet": {"phrase": ("quiet", "in quiet", "on a quiet background"),
                          "noun": ("quiet", "a quiet background")},
            },
        },
        train=_Wordings(
            lead_ins=("", "", "", "play ", "a recording of ", "generate ", "synthesize "),
            articles=("a ", "a ", "one ", ""),
            nouns=("tone", "sound", "note"),
            tails={"background": ("{phrase}", "with {noun}")},
            joins=(" ", " ", ", "),
        ),
        held_out=_Wordings(
            lead_ins=("create ", "i would like ", "make me "),
            articles=("a ", ""),
            nouns=("beep", "signal"),
            tails={"background": ("against {noun}", "set against {noun}")},
            joins=(" ", ", "),
        ),
    ),
}  # fmt: skip


def _value_words(spec: _Medium, attribute: str, value: str) -> dict[str, tuple[str, ...]]:
    return spec.words.get(attribute, {}).get(value, {"word": (value,)})


def terse_prompt(
    names: Mapping[str, str],
    keep: Sequence[str],
    rng: random.Random,
    split: str,
    medium: str = "image",
) -> str:
    """A short prompt naming the attributes ``keep`` of the sample ``names``, worded by
    ``rng`` from the phrasings of ``split`` (``val`` / ``test``: the held-out ones)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {list(SPLITS)}")
    spec, own = _MEDIA[_medium(medium)], attributes(medium)
    unknown = [a for a in keep if a not in own]
    if unknown:
        raise ValueError(f"keep={list(keep)!r} is invalid: expected attributes of {own}")
    w = spec.train if split == "train" else spec.held_out
    words = [
        rng.choice(_value_words(spec, a, names[a])["word"]) for a in spec.adjectives if a in keep
    ]
    noun = spec.noun
    words.append(names[noun] if noun is not None and noun in keep else rng.choice(w.nouns))
    article = rng.choice(w.articles)
    if article == "a " and words[0][0] in "aeiou":
        article = "an "
    head = rng.choice(w.lead_ins) + article + " ".join(words)
    tail = []
    for attribute, forms in w.tails.items():
        if attribute not in keep:
            continue
        slots = _value_words(spec, attribute, names[attribute])
        usable = [f for f in forms if all(k in slots for k in re.findall(r"{(\w+)}", f))]
        form = rng.choice(usable)
        tail.append(form.format(**{k: rng.choice(v) for k, v in slots.items() if k in form}))
    rng.shuffle(tail)
    return head + "".join(rng.choice(w.joins) + part for part in tail)


@dataclass(frozen=True)
class Example:
    """One enrichment pair: a sample, the attributes the prompt keeps, prompt and caption."""

    names: dict[str, str]  # the sample: every attribute
    kept: dict[str, str]  # the attributes the prompt names
    prompt: str
    caption: str


def example(
    world: World,
    split: str,
    index: int,
    *,
    always: Sequence[str] = (),
    keep_prob: float = 0.5,
    phrasing: str | None = None,
    medium: str = "image",
) -> Example:
    """Pair ``index`` of ``split``: a uniform sample of ``world``, each attribute kept with
    probability ``keep_prob`` (those of ``always`` always), as a terse prompt worded as
    ``phrasing`` writes them (a split; default ``split``) and the caption. A pure function
    of its arguments."""
    key = f"{world.seed}/{split}/{index}/{keep_prob}/{','.join(always)}"
    if medium != "image":  # the image pairs keep the keys they always had
        key = f"{medium}/{key}"
    rng = random.Random(key if phrasing is None else f"{key}/{phrasing}")
    values = world_values(world, medium)
    own = attributes(medium)
    names = {a: rng.choice(values[a]) for a in own}
    keep = [a for a in own if a in always or rng.random() < keep_prob]
    prompt = terse_prompt(names, keep, rng, split if phrasing is None else phrasing, medium)
    return Example(names, {a: names[a] for a in keep}, prompt, caption(names, medium))


# ---- the LM -------------------------------------------------------------------------------


def lm_prompt(prompt: str, medium: str = "image") -> str:
    """The enrichment LM's input for a user's prompt of ``medium`` (whitespace runs become
    one space)."""
    return f"{_LABELS[_medium(medium)]} prompt: {' '.join(prompt.split())}\nCaption:"


def lm_batch(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    captions: Sequence[str],
    media: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """A training batch: ``BOS lm_prompt(prompt, medium) caption EOS`` per row (``media``:
    each row's medium, default every row an image), right-padded, labels on the caption and
    EOS only.

    Returns:
        ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B, T)}``.
    """
    rows, labels = [], []
    media = ["image"] * len(prompts) if media is None else media
    for prompt, text, medium in zip(prompts, captions, media, strict=True):
        head = tokenizer.encode(lm_prompt(prompt, medium), add_bos=True)
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
    medium: str = "image",
) -> list[str]:
    """What the LM writes for each prompt of ``medium`` (sampled from ``generator``;
    ``temperature`` 0 is greedy), stripped; batched with left padding, ``chunk`` rows at a
    time."""
    out: list[str] = []
    for start in range(0, len(prompts), chunk):
        part = [lm_prompt(p, medium) for p in prompts[start : start + chunk]]
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
    prompt: str,
    given: Mapping[str, str],
    written: str,
    world: World,
    medium: str = "image",
) -> Enrichment:
    """Accept ``written`` when it parses into every attribute of ``medium`` with a value of
    ``world`` and keeps each of ``given`` (the user's attributes); else fall back to
    ``prompt``, with the reason."""
    parsed = parse_prompt(written, medium)
    if medium == "audio" and parsed and "background" not in parsed:
        parsed["background"] = "quiet"  # a caption names a hiss or nothing
    values = world_values(world, medium)
    reason = None
    missing = [a for a in attributes(medium) if a not in parsed]
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
