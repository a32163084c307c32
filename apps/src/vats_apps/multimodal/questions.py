"""Question / answer pairs about the shapes and sounds worlds, for a multimodal LM.

Every sample of the shapes world (an image or a video, :mod:`vats_apps.data.shapes`) and
of the sounds world (an audio clip, :mod:`vats_apps.data.sounds`) comes with label names
(``batch.names(i)``) and a caption (``batch.captions[i]``). This module turns them into
questions with one short lowercase answer, and reads generated captions back into label
names to score them.

Question types (:data:`QUESTION_TYPES`) and their answers::

    image  shape, color, size, position   the table name: "circle", "cyan", "top left"
           background                     the caption's adjective: "noisy", "checkered"
    video  direction                      the caption's words: "left", "up and to the left"
           speed                          the table name: "slow", "fast"
           shape                          the table name
    audio  pitch, timbre, duration        the table name: "very low", "sawtooth", "short"
    all    describe                       the caption itself

Each type has several phrasings; the last one is held out: ``train`` questions use the
others and ``val`` / ``test`` questions only the held-out one, so a validation score
measures understanding the question rather than recalling its string.

Sampling (:func:`make_qa`) is a pure function of ``(split, index)`` through a small
integer hash (no global RNG). Indices are grouped in aligned blocks of n = number of
question types: block ``index // n`` asks every type once, in an order seeded by
``(split, block)``, so types are exactly balanced over every block and do not line up
with the worlds' own class-balanced blocks. The phrasing is the hash of ``(split,
index)`` modulo the number of phrasings of that split.

Scoring a generated description: :func:`parse_caption` finds the name of each caption
attribute (:func:`caption_attributes`) by matching whole words, longest phrase first, each
word used once, so "very low" is never read as "low" nor "up and to the left" as "left".
:func:`score_caption` counts the attributes it got right. Short answers are compared
exactly after :func:`normalize_answer`.

Example::

    batch = ShapesWorld(ShapesConfig()).images(range(4))
    qa = make_qa("image", batch.names(0), batch.captions[0], split="train", index=0)
    qa.question, qa.answer   # ('Describe the background.', 'noisy')
    batch.captions[0]        # 'a small green square in the center on a noisy background'
    score_caption("image", "a small red square in the center", batch.names(0))  # (3, 5)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vats_apps.data.shapes import (
    _DIRECTION_WORDS,  # the caption's own wording, shared so the two cannot drift apart
    _SPEED_WORDS,
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPEEDS,
)
from vats_apps.data.sounds import BACKGROUNDS as SOUND_BACKGROUNDS
from vats_apps.data.sounds import DURATIONS, PITCHES, TIMBRES
from vats_core.config import config_error

MODALITIES: tuple[str, ...] = ("image", "video", "audio")
SPLITS: tuple[str, ...] = ("train", "val", "test")

QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "image": ("shape", "color", "size", "position", "background", "describe"),
    "video": ("direction", "speed", "shape", "describe"),
    "audio": ("pitch", "timbre", "duration", "describe"),
}

# attribute -> table names, per modality, in the order a caption writes them
_TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {
        "size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES,
        "position": POSITIONS, "background": tuple(BACKGROUNDS),
    },
    "video": {
        "size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES,
        "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS), "background": tuple(BACKGROUNDS),
    },
    "audio": {
        "duration": tuple(DURATIONS), "pitch": tuple(PITCHES), "timbre": TIMBRES,
        "background": tuple(SOUND_BACKGROUNDS),
    },
}  # fmt: skip

# The last phrasing of each type is held out for val / test. Each type has its own key word
# ("shape", "colour", "size", "where", "background", "way"/"direction", "fast"/"speed",
# "pitch", "timbre", "long"/"duration"), and a question is told apart by the key word it
# asks with, not by the words around it: the other types' questions are also asked about
# "the shape" ("What is the colour of the shape?", "Which way is the shape moving?", from
# the objects below), so the word "shape" alone does not mean a shape question. Trained on
# questions about "it" only, the LM answered "What is the color of the shape?" with a shape
# 64 times in 64, and its answer to the held-out colour question moved between 81 and
# 100 % with the training seed. Every held-out phrasing joins words the train phrasings
# use in a sentence they never form ("... in the image", "... in the clip", "... the
# sound").
_PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {
        "shape": ("What shape is it?", "Which shape is shown?", "Name the shape.",
                  "What shape do you see?", "What kind of shape is this?",
                  "Which shape is in the picture?", "What is the shape of it?",
                  "What shape is in the image?"),
        "color": ("What color is it?", "What colour is it?", "Which color is shown?",
                  "Name the colour.", "What colour do you see?",
                  "Which colour is in the picture?", "What is the colour of it?",
                  "What color is in the image?"),
        "size": ("How big is it?", "What size is it?", "Which size is shown?", "Name the size.",
                 "How large is it?", "What size do you see?", "How big is it in the picture?",
                 "What is the size of it?", "How big is it in the image?"),
        "position": ("Where is it?", "Where is it placed?", "Which position is it in?",
                     "Name the position.", "Where do you see it?", "Where in the picture is it?",
                     "What is the position of it?", "Where in the image is it?"),
        "background": ("What is the background?", "What background is it on?",
                       "Which background is shown?", "Name the background.",
                       "What background do you see?", "Which background is in the picture?",
                       "What is the background behind it?", "What background is in the image?"),
        "describe": ("Describe the image.", "Describe the picture.", "Write a caption.",
                     "What do you see? Describe it.", "Give a description of the picture.",
                     "Caption this image.", "Give a description of the image."),
    },
    "video": {
        "direction": ("Which way is it moving?", "What direction does it move in?",
                      "Which direction is it going?", "Name the direction.",
                      "Which way does it go?", "In which direction does it move?",
                      "What is the direction of it?", "Which way does it move in the video?", "Which way is it going in the clip?"),
        "speed": ("How fast is it moving?", "What speed does it move at?", "Is it slow or fast?",
                  "Name the speed.", "How fast does it go?", "Which speed is shown?",
                  "What is the speed of it?", "How fast does it move in the video?", "How fast is it in the clip?"),
        "shape": ("What shape is moving?", "Which shape is it?", "Name the shape.",
                  "What shape do you see?", "What kind of shape moves?",
                  "Which shape is in the video?", "What shape is in the clip?"),
        "describe": ("Describe the clip.", "Describe the video.", "Write a caption.",
                     "What happens? Describe it.", "Give a description of the video.",
                     "Caption this clip.", "Give a description of the clip."),
    },
    "audio": {
        "pitch": ("What pitch is it?", "How high is the pitch?", "Which pitch do you hear?",
                  "Name the pitch.", "Is the pitch high or low?",
                  "What is the pitch of the tone?", "What pitch is the sound?"),
        "timbre": ("What timbre is it?", "Which timbre do you hear?", "Name the timbre.",
                   "What kind of timbre is this?", "What is the timbre of the tone?",
                   "Which timbre is it?", "What timbre is the sound?"),
        "duration": ("How long is it?", "Is it short or long?", "What duration do you hear?",
                     "Name the duration.", "How long does it last?",
                     "What is the duration of the tone?", "How long is the sound?"),
        "describe": ("Describe the sound.", "Describe the audio.", "Write a caption.",
                     "What do you hear? Describe it.", "Give a description of the audio.",
                     "Caption this tone.", "Give a description of the sound."),
    },
}  # fmt: skip

# The train phrasings above are also asked about other objects than "it" and with the
# medium named (a few hundred strings in all), so the key word is what stays constant
# across them; the held-out phrasings use neither these objects nor these medium nouns.
_OBJECTS = {"image": ("the object", "the thing"), "video": ("the object", "the thing"),
            "audio": ("the tone", "the note")}  # fmt: skip
# ... and about "the shape" (images and clips), where that does not name what is asked.
_SHAPE_MEDIA = ("image", "video")
_MEDIUM_NOUNS = {"image": ("picture", "photo"), "video": ("video", "animation"),
                 "audio": ("recording", "audio")}  # fmt: skip


def _variants(modality: str, qtype: str, phrasing: str) -> list[str]:
    out = [phrasing]
    if re.search(r"\bit\b", phrasing):
        objects = _OBJECTS[modality]
        if modality in _SHAPE_MEDIA and qtype not in ("shape", "describe"):
            objects += ("the shape",)
        out += [re.sub(r"\bit\b", o, phrasing, count=1) for o in objects]
    medium_named = " in the " in phrasing or phrasing[:-1].endswith(" in")  # not "in in"
    if qtype != "describe" and not medium_named and phrasing[-1] in "?.":
        out += [f"{q[:-1]} in the {n}{q[-1]}" for q in list(out) for n in _MEDIUM_NOUNS[modality]]
    return out


_TRAIN_PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    m: {
        t: tuple(dict.fromkeys(v for p in every[:-1] for v in _variants(m, t, p)))
        for t, every in types.items()
    }
    for m, types in _PHRASINGS.items()
}
for _m, _types in _PHRASINGS.items():  # a held-out phrasing is never a train one
    for _t, _every in _types.items():
        assert _every[-1] not in _TRAIN_PHRASINGS[_m][_t], (_m, _t)

# Training questions come plain or inside one of these (chosen by the sample's hash), so the
# model learns that words around the key word do not change what is asked: on the held-out
# phrasings a model trained on the plain ones alone answered "Which way is it going in the
# clip?" with a speed. Held-out questions are always plain.
TRAIN_WRAPPERS: tuple[str, ...] = (
    "{}", "{}", "{}", "Question: {}", "Please answer. {}", "Look closely. {}", "{} Thanks.",
    "Quick one: {}",
)  # fmt: skip

_SYNONYMS: dict[tuple[str, str], tuple[str, ...]] = {  # more ways a caption may write a name
    ("position", "center"): ("centre", "middle"),
    ("speed", "fast"): ("quick",),
}


@dataclass(frozen=True)
class QA:
    """One question about one sample, with its reference answer."""

    modality: str  # one of MODALITIES
    qtype: str  # one of QUESTION_TYPES[modality]
    question: str  # a natural English phrasing
    answer: str  # short, lowercase; the caption for "describe"


# ---- questions ----------------------------------------------------------------------------


def phrasings(modality: str, qtype: str, split: str = "train") -> tuple[str, ...]:
    """The phrasings of a question type a split may use.

    Args:
        modality: one of :data:`MODALITIES`.
        qtype: one of ``QUESTION_TYPES[modality]``.
        split: ``"train"`` gets every phrasing but the last; ``"val"`` and ``"test"`` get
            only the last (held out), so train and evaluation questions never share a string.

    Returns:
        The phrasings, in a fixed order.
    """
    _check_qtype(_check_modality(modality), qtype)
    if _check_split(split) == "train":
        return _TRAIN_PHRASINGS[modality][qtype]
    return _PHRASINGS[modality][qtype][-1:]


def answer(modality: str, qtype: str, names: Mapping[str, str], caption: str) -> str:
    """The reference answer to a question of type ``qtype`` about one sample.

    Args:
        modality: one of :data:`MODALITIES`.
        qtype: one of ``QUESTION_TYPES[modality]``.
        names: the sample's label names (``batch.names(i)``); must hold every attribute
            of :func:`caption_attributes` with a name from the world's tables.
        caption: the sample's caption (``batch.captions[i]``), the answer to "describe".

    Returns:
        One short lowercase answer in words (see the module docstring).
    """
    _check_qtype(modality, qtype)
    _check_names(modality, names)
    if qtype == "describe":
        if not caption.strip():
            raise config_error("answer", "caption", caption, "a non-empty caption")
        return caption.strip()
    name = names[qtype]
    if qtype == "background":
        return BACKGROUNDS[name]
    if qtype == "direction":
        return _DIRECTION_WORDS.get(name, name)
    return name


def make_qa(
    modality: str,
    names: Mapping[str, str],
    caption: str,
    *,
    split: str,
    index: int,
    types: Sequence[str] | None = None,
) -> QA:
    """A question about one sample, its type and phrasing chosen from ``(split, index)``.

    Args:
        modality: one of :data:`MODALITIES`.
        names: the sample's label names (``batch.names(i)``).
        caption: the sample's caption.
        split: ``"train"``, ``"val"`` or ``"test"``; selects the phrasings and the hash.
        index: the sample's index (>= 0); aligned blocks of ``len(types)`` consecutive
            indices ask every type exactly once.
        types: the question types to draw from (a subset of ``QUESTION_TYPES[modality]``,
            in any order); default all of them.

    Returns:
        The :class:`QA`.
    """
    chosen = _check_types(modality, types)
    split_id = SPLITS.index(_check_split(split))
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise config_error("make_qa", "index", index, "an int >= 0")
    n = len(chosen)
    block, slot = divmod(index, n)
    order = sorted(range(n), key=lambda j: _mix(0, split_id, block, j))  # seeded per block
    qtype = chosen[order[slot]]
    options = phrasings(modality, qtype, split)
    question = options[_mix(1, split_id, index) % len(options)]
    if split == "train":  # words around the question that do not change what it asks
        question = TRAIN_WRAPPERS[_mix(2, index) % len(TRAIN_WRAPPERS)].format(question)
    return QA(modality, qtype, question, answer(modality, qtype, names, caption))


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring: lowercase, single spaces, no trailing period.

    ``"  Top   Left. "`` -> ``"top left"``.
    """
    return " ".join(text.lower().split()).rstrip(".").strip()


# ---- caption scoring ----------------------------------------------------------------------


def caption_attributes(modality: str) -> tuple[str, ...]:
    """The attributes a caption of ``modality`` states, in the caption's order."""
    return tuple(_TABLES[_check_modality(modality)])


def parse_caption(modality: str, text: str) -> dict[str, str | None]:
    """Read a (possibly wrong or malformed) caption back into label names.

    Matching is on whole lowercase words, so punctuation, case and word order do not
    matter; longer phrases are matched first and each word is used once, and where an
    attribute is named twice the earlier mention counts. An audio caption that names no
    hiss is ``"quiet"`` (captions of quiet clips say nothing about the background), unless
    nothing at all was found.

    Args:
        modality: one of :data:`MODALITIES`.
        text: the caption, e.g. ``"a small cyan circle moving up and to the left slowly"``.

    Returns:
        Attribute -> table name (``"up-left"``, ``"noise"``, ``"very low"``), or None
        where the text names none, for every attribute of :func:`caption_attributes`.
    """
    attributes = caption_attributes(modality)
    words = re.findall(r"[a-z]+", text.lower())
    used = [False] * len(words)
    found: dict[str, tuple[int, str]] = {}  # attribute -> (word position, name)
    for phrase, attribute, name in _VOCABULARY[modality]:
        k = len(phrase)
        for i in range(len(words) - k + 1):
            if tuple(words[i : i + k]) == phrase and not any(used[i : i + k]):
                used[i : i + k] = [True] * k
                if attribute not in found or i < found[attribute][0]:
                    found[attribute] = (i, name)
    out: dict[str, str | None] = {a: found[a][1] if a in found else None for a in attributes}
    if modality == "audio" and out["background"] is None and found:
        out["background"] = "quiet"
    return out


def score_caption(modality: str, text: str, names: Mapping[str, str]) -> tuple[int, int]:
    """How many caption attributes ``text`` gets right.

    Args:
        modality: one of :data:`MODALITIES`.
        text: a generated caption.
        names: the sample's true label names (``batch.names(i)``).

    Returns:
        ``(right, total)``, total = ``len(caption_attributes(modality))``.
    """
    _check_names(modality, names)
    parsed = parse_caption(modality, text)
    return sum(parsed[a] == names[a] for a in parsed), len(parsed)


# ---- helpers ------------------------------------------------------------------------------


def _build_vocabulary(modality: str) -> list[tuple[tuple[str, ...], str, str]]:
    """(words, attribute, name) for every way a caption may write a name, longest first."""
    out: dict[tuple[str, ...], tuple[str, str]] = {}
    for attribute, table in _TABLES[modality].items():
        for name in table:
            forms = {name.replace("-", " "), *_SYNONYMS.get((attribute, name), ())}
            if attribute == "background" and modality != "audio":
                forms.add(BACKGROUNDS[name])
            if attribute == "direction":
                forms.add(_DIRECTION_WORDS.get(name, name))
            if attribute == "speed":
                forms.add(_SPEED_WORDS[name])
            for form in forms:
                key = tuple(form.split())
                if out.setdefault(key, (attribute, name)) != (attribute, name):
                    raise RuntimeError(f"{modality} caption phrase {form!r} names two labels")
    return sorted(((k, *v) for k, v in out.items()), key=lambda e: -len(e[0]))


_VOCABULARY = {m: _build_vocabulary(m) for m in MODALITIES}


def _mix(*values: int) -> int:
    """A small deterministic 64-bit hash of non-negative ints (splitmix64 rounds)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ v) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & mask
        h ^= h >> 29
    return h


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise config_error("questions", "modality", modality, f"one of {list(MODALITIES)}")
    return modality


def _check_qtype(modality: str, qtype: str) -> str:
    allowed = QUESTION_TYPES[_check_modality(modality)]
    if qtype not in allowed:
        raise config_error("questions", "qtype", qtype, f"for {modality}: one of {list(allowed)}")
    return qtype


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise config_error("questions", "split", split, f"one of {list(SPLITS)}")
    return str(split)


def _check_types(modality: str, types: Sequence[str] | None) -> tuple[str, ...]:
    allowed = QUESTION_TYPES[_check_modality(modality)]
    if types is None:
        return allowed
    chosen = (types,) if isinstance(types, str) else tuple(types)
    ok = len(chosen) > 0 and len(set(chosen)) == len(chosen) and set(chosen) <= set(allowed)
    if not ok:
        raise config_error(
            "make_qa",
            "types",
            types,
            f"distinct question types for {modality} from {list(allowed)}",
        )
    return chosen


def _check_names(modality: str, names: Mapping[str, str]) -> None:
    for attribute, table in _TABLES[_check_modality(modality)].items():
        if attribute not in names:
            raise config_error(
                "questions", "names", dict(names),
                f"{modality} label names with keys {list(_TABLES[modality])} (no {attribute!r})",
            )  # fmt: skip
        if names[attribute] not in table:
            raise config_error(
                "questions", f"names[{attribute!r}]", names[attribute], f"one of {list(table)}"
            )
