"""Question / answer pairs for the multimodal LM: phrasings and held-out splits, answers,
balanced deterministic sampling, and reading captions (real, corrupted, gibberish) back
into label names."""

from __future__ import annotations

import collections
import functools

import pytest

from vats_apps.data import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    DURATIONS,
    PITCHES,
    POSITIONS,
    SHAPES,
    SIZES,
    SOUND_BACKGROUNDS,
    SPEEDS,
    TIMBRES,
    ShapesConfig,
    ShapesWorld,
    SoundsConfig,
    SoundsWorld,
)
from vats_apps.data.shapes import _caption as shape_caption
from vats_apps.data.sounds import _caption as sound_caption
from vats_apps.multimodal.questions import (
    MODALITIES,
    QA,
    QUESTION_TYPES,
    TRAIN_WRAPPERS,
    answer,
    caption_attributes,
    make_qa,
    normalize_answer,
    parse_caption,
    phrasings,
    score_caption,
)

TABLES = {
    "shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": POSITIONS,
    "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS), "pitch": tuple(PITCHES),
    "timbre": TIMBRES, "duration": tuple(DURATIONS),
}  # fmt: skip
BG = {"image": tuple(BACKGROUNDS), "video": tuple(BACKGROUNDS), "audio": tuple(SOUND_BACKGROUNDS)}
IMAGE = {"shape": "star", "color": "cyan", "size": "large", "position": "top left",
         "background": "checker"}  # fmt: skip
VIDEO = {**IMAGE, "direction": "down-right", "speed": "slow"}
AUDIO = {"pitch": "very low", "timbre": "plucked", "duration": "long", "background": "hiss"}


def _table(modality: str, attribute: str) -> tuple[str, ...]:
    return BG[modality] if attribute == "background" else TABLES[attribute]


@functools.cache
def _samples(modality: str, bounce: bool = False) -> list[tuple[dict[str, str], str]]:
    """(names, caption) of generated samples drawing from every entry of the tables."""
    if modality == "audio":
        world = SoundsWorld(SoundsConfig(pitches=tuple(PITCHES), timbres=TIMBRES))
        batch = world.clips(range(60), "val")
    else:
        config = ShapesConfig(
            shapes=SHAPES, colors=tuple(COLORS), directions=tuple(DIRECTIONS),
            backgrounds=tuple(BACKGROUNDS), frames=4, image_size=24, bounce=bounce,
        )  # fmt: skip
        world = ShapesWorld(config)
        make = world.images if modality == "image" else world.videos
        batch = make(range(240 if modality == "image" else 96), "test")
    return [(batch.names(i), batch.captions[i]) for i in range(len(batch))]


# ---- phrasings and answers ----------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_phrasings_held_out_and_distinct(modality: str) -> None:
    for qtype in QUESTION_TYPES[modality]:
        train, val, test = (phrasings(modality, qtype, s) for s in ("train", "val", "test"))
        every = train + val
        assert len(every) >= 4 and len(set(every)) == len(every)
        assert val == test and len(val) >= 1 and not set(train) & set(val)
        assert all(p[0].isupper() and p[-1] in "?." for p in every)
    assert phrasings(modality, "describe", "train")[0] in (
        "Describe the image.", "Describe the clip.", "Describe the sound.",
    )  # fmt: skip
    if modality == "image":
        colors = " ".join(phrasings("image", "color", "train"))
        assert "colour" in colors and "color" in colors.replace("colour", "")
    for qtype in QUESTION_TYPES[modality]:
        train = phrasings(modality, qtype, "train")
        assert not any(" in in " in p for p in train)
        # "the shape" is asked about where it is not the question's key word, so that the
        # word alone does not mark a shape question
        about_shape = [p for p in train if "the shape" in p]
        if qtype != "shape":
            wanted = modality != "audio" and qtype != "describe"
            assert bool(about_shape) == wanted, (qtype, about_shape[:3])
    if modality == "image":
        assert "What is the colour of the shape?" in phrasings("image", "color", "train")
        assert "Which way is the shape moving?" in phrasings("video", "direction", "train")


def test_answers_are_short_lowercase_words() -> None:
    assert answer("image", "shape", IMAGE, "x") == "star"
    assert answer("image", "position", IMAGE, "x") == "top left"
    assert answer("image", "background", IMAGE, "x") == "checkered"
    assert answer("video", "direction", VIDEO, "x") == "down and to the right"
    assert answer("video", "direction", {**VIDEO, "direction": "left"}, "x") == "left"
    assert answer("video", "speed", VIDEO, "x") == "slow"
    assert answer("audio", "pitch", AUDIO, "x") == "very low"
    assert answer("audio", "duration", AUDIO, "x") == "long"
    assert answer("audio", "describe", AUDIO, " a long sound ") == "a long sound"
    for modality in MODALITIES:  # every answer of every sample is already normalized
        for names, caption in _samples(modality)[:40]:
            for qtype in QUESTION_TYPES[modality]:
                a = answer(modality, qtype, names, caption)
                assert normalize_answer(a) == a and a
                if qtype != "describe":
                    assert (a in caption or qtype == "speed") and len(a.split()) <= 5


def test_normalize_answer() -> None:
    assert normalize_answer("  Up and  to the\tLEFT. ") == "up and to the left"
    assert normalize_answer("noisy") == "noisy"
    assert normalize_answer(normalize_answer(" Top Left .")) == "top left"


def test_bad_input_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="'image', 'video', 'audio'"):
        phrasings("text", "shape")
    with pytest.raises(ValueError, match="'pitch', 'timbre'"):
        answer("audio", "shape", AUDIO, "x")
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        phrasings("image", "shape", "dev")
    with pytest.raises(ValueError, match="'direction'"):
        answer("video", "shape", IMAGE, "x")  # image names lack the motion
    with pytest.raises(ValueError, match="'circle'"):
        score_caption("image", "x", {**IMAGE, "shape": "blob"})
    with pytest.raises(ValueError, match="caption"):
        answer("image", "describe", IMAGE, "  ")
    for types in ((), ("shape", "shape"), ("pitch",)):
        with pytest.raises(ValueError, match="'describe'"):
            make_qa("image", IMAGE, "x", split="train", index=0, types=types)
    for index in (-1, 1.5, True):
        with pytest.raises(ValueError, match="index"):
            make_qa("image", IMAGE, "x", split="train", index=index)


# ---- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_make_qa_balanced_deterministic_and_split(modality: str) -> None:
    names, caption = _samples(modality)[0]
    types = QUESTION_TYPES[modality]
    n, blocks = len(types), 120
    for split in ("train", "test"):
        qas = [make_qa(modality, names, caption, split=split, index=i) for i in range(n * blocks)]
        for b in range(blocks):  # every aligned block asks every type once
            assert sorted(q.qtype for q in qas[b * n : (b + 1) * n]) == sorted(types)
        for q in qas:
            assert isinstance(q, QA) and q.modality == modality
            allowed_q = phrasings(modality, q.qtype, split)
            if split == "train":  # a train question may sit inside a wrapper
                assert any(w.format(p) == q.question for w in TRAIN_WRAPPERS for p in allowed_q)
            else:
                assert q.question in allowed_q
            assert q.answer == answer(modality, q.qtype, names, caption)
        # the hash reaches every allowed phrasing, about evenly
        core = {
            w.format(p): p
            for w in TRAIN_WRAPPERS
            for t in types
            for p in phrasings(modality, t, split)
        }
        used = collections.Counter((q.qtype, core.get(q.question, q.question)) for q in qas)
        allowed = {(t, p) for t in types for p in phrasings(modality, t, split)}
        assert set(used) <= allowed
        if split == "train":  # hundreds of train phrasings: most are drawn
            assert len(used) >= 0.5 * len(allowed)
        else:
            assert set(used) == allowed and min(used.values()) >= 0.4 * len(qas) / len(allowed)
    again = make_qa(modality, names, caption, split="train", index=123_457)
    assert again == make_qa(modality, names, caption, split="train", index=123_457)
    orders = {
        s: [make_qa(modality, names, caption, split=s, index=i).qtype for i in range(4 * n)]
        for s in ("train", "val", "test")
    }  # fmt: skip
    assert orders["train"] != orders["val"] != orders["test"]  # splits hash apart
    assert orders["train"][:n] != orders["train"][n : 2 * n]  # blocks are shuffled apart


def test_make_qa_types_restricts() -> None:
    qas = [
        make_qa("image", IMAGE, "c", split="val", index=i, types=("color", "position"))
        for i in range(40)
    ]  # fmt: skip
    assert collections.Counter(q.qtype for q in qas) == {"color": 20, "position": 20}
    assert {q.question for q in qas} == {
        *phrasings("image", "color", "val"), *phrasings("image", "position", "val"),
    }  # fmt: skip
    one = make_qa("audio", AUDIO, "c", split="train", index=7, types="timbre")
    assert one.qtype == "timbre" and one.answer == "plucked"


# ---- caption parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "bounce"), [("image", False), ("video", False),
                                                  ("video", True), ("audio", False)])  # fmt: skip
def test_parse_caption_round_trips_real_captions(modality: str, bounce: bool) -> None:
    samples = _samples(modality, bounce)
    attributes = caption_attributes(modality)
    for attribute in attributes:  # the samples name every entry of every table
        seen = {names[attribute] for names, _ in samples}
        assert seen == set(_table(modality, attribute)), attribute
    for names, caption in samples:
        truth = {a: names[a] for a in attributes}
        assert parse_caption(modality, caption) == truth, caption
        assert parse_caption(modality, f"  {caption.upper()}. ") == truth
        assert score_caption(modality, caption, names) == (len(attributes), len(attributes))


@pytest.mark.parametrize("modality", MODALITIES)
def test_one_swapped_attribute_is_exactly_one_wrong(modality: str) -> None:
    attributes = caption_attributes(modality)
    for k, (names, _) in enumerate(_samples(modality)[:24]):
        for attribute in attributes:
            table = _table(modality, attribute)
            wrong = {
                **names,
                attribute: table[(table.index(names[attribute]) + 1 + k) % len(table)],
            }
            if wrong == names:
                continue
            text = sound_caption(wrong) if modality == "audio" else shape_caption(wrong, False)
            parsed = parse_caption(modality, text)
            assert parsed == {a: wrong[a] for a in attributes}, text
            assert score_caption(modality, text, names) == (len(attributes) - 1, len(attributes))


def test_longer_names_are_not_read_as_shorter_ones() -> None:
    parse = parse_caption
    assert parse("audio", "a short very low sine tone")["pitch"] == "very low"
    assert parse("audio", "a short low sine tone")["pitch"] == "low"
    assert parse("audio", "very high, then high")["pitch"] == "very high"
    assert parse("image", "a red star in the top left corner")["position"] == "top left"
    assert parse("image", "a red star on the left")["position"] == "left"
    assert parse("video", "moving up and to the left")["direction"] == "up-left"
    assert parse("video", "moving up-right fast")["direction"] == "up-right"
    assert parse("video", "moving left slowly") == {
        "size": None, "color": None, "shape": None, "direction": "left", "speed": "slow",
        "background": None,
    }  # fmt: skip


@pytest.mark.parametrize("modality", MODALITIES)
def test_gibberish_and_partial_captions(modality: str) -> None:
    attributes = caption_attributes(modality)
    names = {"image": IMAGE, "video": VIDEO, "audio": AUDIO}[modality]
    for text in ("", "lorem ipsum dolor sit amet", "zzq the of a and !!", "circles everywhere"):
        assert set(parse_caption(modality, text).values()) == {None}
        assert score_caption(modality, text, names) == (0, len(attributes))
    if modality == "audio":  # no hiss named: quiet, once the text describes something
        assert parse_caption("audio", "a plucked tone") == {
            "duration": None, "pitch": None, "timbre": "plucked", "background": "quiet",
        }  # fmt: skip
        assert score_caption("audio", "a long plucked tone", AUDIO) == (2, 4)
    else:
        assert score_caption(modality, "a large cyan star", names) == (3, len(attributes))
