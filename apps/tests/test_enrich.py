"""Prompt enrichment for the generators (images, clips, sounds): reading prompts, terse
training prompts, the LM's batches, the check of what it writes, and the image files."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from PIL import Image

from vats_apps.data import ShapesConfig, ShapesWorld, SoundsConfig, SoundsWorld
from vats_apps.generation import enrich as en
from vats_apps.generation.images import grid, save_images, to_uint8

WORLD = ShapesConfig(image_size=24)
WORLDS = {"image": WORLD, "video": ShapesConfig(image_size=24, frames=4), "audio": SoundsConfig()}
HELD_OUT_WORDS = {"create", "would", "like", "make", "me", "figure", "item", "located",
                  "placed", "against", "over", "backdrop"}  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# ---- reading prompts ----------------------------------------------------------------------


def test_prompts_are_read_with_synonyms_and_unknown_words_ignored():
    got = en.parse_prompt("Please, a BIG cyan thing in the upper left on a checkerboard!")
    assert got == {
        "size": "large",
        "color": "cyan",
        "position": "top left",
        "background": "checker",
    }
    assert en.parse_prompt("a tiny square, centred, striped") == {
        "size": "small", "shape": "square", "position": "center", "background": "stripes",
    }  # fmt: skip
    assert en.parse_prompt("something nice") == {}


def test_a_value_the_world_lacks_is_refused_with_the_worlds_values():
    with pytest.raises(
        ValueError, match=r"shape 'star'.*\['circle', 'square', 'triangle', 'cross'\]"
    ):
        en.check_prompt("a red star", WORLD)
    with pytest.raises(ValueError, match=r"color 'white'"):
        en.check_prompt("a white circle", WORLD)
    assert en.check_prompt("a red circle, gorgeous", WORLD) == {"color": "red", "shape": "circle"}


def test_clip_and_sound_prompts_are_read_with_their_own_synonyms():
    assert en.parse_prompt("a blue circle moving left", "video") == {
        "color": "blue", "shape": "circle", "direction": "left",
    }  # fmt: skip
    assert en.parse_prompt("a big square going up and to the right, quick", "video") == {
        "size": "large", "shape": "square", "direction": "up-right", "speed": "fast",
    }  # fmt: skip
    assert en.parse_prompt("a long low sine tone", "audio") == {
        "duration": "long", "pitch": "low", "timbre": "sine",
    }  # fmt: skip
    # "lower" is a pitch word for sounds, a position word for images
    assert en.parse_prompt("a deep brief saw tone, hissing", "audio") == {
        "duration": "short", "pitch": "low", "timbre": "sawtooth", "background": "hiss",
    }  # fmt: skip
    assert en.parse_prompt("a quiet sine", "audio") == {"timbre": "sine", "background": "quiet"}
    assert en.parse_prompt("a sine", "audio") == {"timbre": "sine"}  # quiet only when said
    with pytest.raises(ValueError, match=r"timbre 'breathy'.*'plucked'\].*audio proof"):
        en.check_prompt("a breathy tone", WORLDS["audio"], medium="audio")
    with pytest.raises(ValueError, match=r"direction 'up-left'"):
        en.check_prompt("a circle moving up-left", WORLDS["video"], medium="video")
    with pytest.raises(ValueError, match="medium='smell'"):
        en.parse_prompt("a red circle", "smell")
    with pytest.raises(ValueError, match="needs a SoundsConfig"):
        en.world_values(WORLD, "audio")


def test_caption_is_the_worlds_caption():
    batch = ShapesWorld(WORLD).images(range(16), "train")
    for i in range(16):
        assert en.caption(batch.names(i)) == batch.captions[i]
    clips = ShapesWorld(WORLDS["video"]).videos(range(16), "train")
    sounds = SoundsWorld(WORLDS["audio"]).clips(range(16), "train")
    for i in range(16):
        assert en.caption(clips.names(i), "video") == clips.captions[i]
        assert en.caption(sounds.names(i), "audio") == sounds.captions[i]


def test_a_prompt_is_read_as_the_worlds_prompts_are_written():
    assert en.read_prompt("  A RED   Circle!!! ") == "a red circle"
    assert en.read_prompt("A big square, top-left.") == "a big square, top-left"
    assert en.read_prompt("?!.") == ""


@pytest.mark.parametrize("medium", en.MEDIA)
def test_known_words_are_every_word_the_models_learn_from(medium: str):
    world = WORLDS[medium]
    known = en.known_words(world, medium)
    seen: set[str] = set()
    for split in ("train", "val"):
        for i in range(1500):
            e = en.example(world, split, i, medium=medium)
            seen |= _words(e.prompt) | _words(e.caption)
    assert seen <= known, sorted(seen - known)
    assert not {"purple", "hexagon", "please", "word", "noun", "phrase"} & known
    assert en.unknown_words("a purple hexagon, PURPLE please", world, medium) == [
        "purple", "hexagon", "please",
    ]  # fmt: skip
    assert en.unknown_words(en.example(world, "val", 3, medium=medium).prompt, world, medium) == []


# ---- terse prompts ------------------------------------------------------------------------


@pytest.mark.parametrize("medium", en.MEDIA)
@pytest.mark.parametrize("split", ["train", "val"])
def test_terse_prompts_name_exactly_the_kept_attributes(split: str, medium: str):
    world = WORLDS[medium]
    counts = dict.fromkeys(en.attributes(medium), 0)
    n = 2000
    for i in range(n):
        e = en.example(world, split, i, medium=medium)
        assert en.parse_prompt(e.prompt, medium) == e.kept, e.prompt
        assert e.kept == {a: e.names[a] for a in e.kept}
        # the target names the whole sample, and is accepted as its enrichment
        assert en.check_enrichment(e.prompt, e.kept, e.caption, world, medium).names == e.names
        for a in e.kept:
            counts[a] += 1
    for a, c in counts.items():  # each attribute kept about half the time
        assert 0.44 < c / n < 0.56, (a, c)


def test_held_out_phrasings_never_appear_in_training():
    train = [en.example(WORLD, "train", i).prompt for i in range(3000)]
    val = [en.example(WORLD, "val", i).prompt for i in range(500)]
    assert not HELD_OUT_WORDS & set().union(*map(_words, train))
    assert all(_words(p) & HELD_OUT_WORDS for p in val)
    assert not set(train) & set(val)
    lead = {"create", "would", "like", "make", "me"}
    for medium, held_out in (
        ("video", HELD_OUT_WORDS | {"travelling", "drifting", "pace"}),
        ("audio", lead | {"beep", "signal", "against", "set"}),
    ):
        world = WORLDS[medium]
        train = [en.example(world, "train", i, medium=medium).prompt for i in range(2000)]
        val = [en.example(world, "val", i, medium=medium).prompt for i in range(500)]
        assert not held_out & set().union(*map(_words, train))
        assert all(_words(p) & held_out for p in val)


def test_examples_are_pure_functions_of_their_arguments():
    a = [en.example(WORLD, "train", i) for i in range(50)]
    assert a == [en.example(WORLD, "train", i) for i in range(50)]
    assert a != [en.example(WORLD, "val", i) for i in range(50)]
    forced = [en.example(WORLD, "val", i, always=("shape", "color")) for i in range(50)]
    assert all({"shape", "color"} <= set(e.kept) for e in forced)
    scenes = {tuple(en.example(WORLD, "train", i).names.values()) for i in range(500)}
    assert len(scenes) > 400  # scenes are drawn anew, not from a short list


def test_terse_prompt_refuses_unknown_attributes_and_splits():
    import random

    names = en.example(WORLD, "train", 0).names
    with pytest.raises(ValueError, match="split='dev'"):
        en.terse_prompt(names, ["color"], random.Random(0), "dev")
    with pytest.raises(ValueError, match="keep="):
        en.terse_prompt(names, ["smell"], random.Random(0), "train")


# ---- the LM's batches ---------------------------------------------------------------------


class _Chars:
    """A stand-in tokenizer: one id per character (BOS 2, EOS 3, PAD 0)."""

    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return [2] * add_bos + [10 + ord(c) % 200 for c in text]


def test_lm_batch_scores_the_caption_and_eos_only():
    tok: Any = _Chars()
    batch = en.lm_batch(tok, ["a red circle", "x"], ["a small red circle", "a b"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i, (p, c) in enumerate([("a red circle", "a small red circle"), ("x", "a b")]):
        head = tok.encode(en.lm_prompt(p), add_bos=True)
        tail = [*tok.encode(" " + c), tok.eos_id]
        n = len(head) + len(tail)
        assert ids[i, :n].tolist() == head + tail
        assert mask[i].tolist() == [True] * n + [False] * (ids.shape[1] - n)  # right padding
        assert labels[i, : len(head)].eq(en.IGNORE).all()
        assert labels[i, len(head) : n].tolist() == tail
        assert labels[i, n:].eq(en.IGNORE).all()
    assert en.lm_prompt("a  red\ncircle") == "Image prompt: a red circle\nCaption:"
    assert en.lm_prompt("a low tone", "audio") == "Sound prompt: a low tone\nCaption:"
    mixed = en.lm_batch(tok, ["x", "x"], ["a b", "a b"], ["video", "audio"])
    assert mixed["input_ids"][0].tolist() != mixed["input_ids"][1].tolist()
    head = tok.encode(en.lm_prompt("x", "video"), add_bos=True)
    assert mixed["input_ids"][0, : len(head)].tolist() == head


# ---- checking what the LM wrote -----------------------------------------------------------


FULL = "a large red circle in the top left corner on a striped background"


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        (FULL, None),
        ("a large blue circle in the top left corner on a striped background", "contradicts"),
        (
            "a large circle in the top left corner on a striped background",
            "drops the prompt's color",
        ),
        ("a large red circle in the top left corner", "does not parse as a caption: no background"),
        ("ees bnuroued", "drops"),
    ],
)
def test_enrichment_is_accepted_only_when_it_keeps_the_prompt(written: str, reason: str | None):
    given = {"color": "red", "shape": "circle"}
    out = en.check_enrichment("a red circle", given, written, WORLD)
    assert out.written == written
    if reason is None:
        assert out.accepted and out.used == written
        assert out.names == en.parse_prompt(FULL)
    else:
        assert not out.accepted and out.used == "a red circle"
        assert out.names == given
        assert reason in out.reason


# ---- image files --------------------------------------------------------------------------


def test_images_are_written_at_their_size_enlarged_and_in_a_grid(tmp_path):
    images = torch.rand(3, 3, 24, 24) * 2 - 1
    files = save_images(images, tmp_path, scale=4)
    assert len(files["images"]) == len(files["enlarged"]) == 3
    raw = torch.from_numpy(__import__("numpy").array(Image.open(files["images"][1])))
    assert torch.equal(raw, to_uint8(images)[1])  # lossless at the image's own size
    big = Image.open(files["enlarged"][1])
    assert big.size == (96, 96)
    assert Image.open(files["grid"]).size == (2 * 96 + 4, 2 * 96 + 4)  # 2 x 2, 4 px gaps
    sheet = grid(images, columns=3, gap=1)
    assert sheet.shape == (3, 24, 3 * 24 + 2)
    assert torch.equal(sheet[:, :, 25:49], images[1])


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("a long low sine tone", None),
        ("a long low sine tone over a soft hiss", None),
        ("a short low sine tone", "contradicts the prompt: duration 'long' -> 'short'"),
        ("a long sine tone", "drops the prompt's pitch"),
        ("a long low tone", "does not parse as a caption: no timbre"),
        ("a long low breathy tone", "the world does not have: timbre 'breathy'"),
    ],
)
def test_sound_enrichment_is_checked_like_an_image_one(written: str, reason: str | None):
    given = {"duration": "long", "pitch": "low"}
    out = en.check_enrichment("a long low tone", given, written, WORLDS["audio"], "audio")
    if reason is None:
        assert out.accepted
        assert out.names["background"] == ("hiss" if "hiss" in written else "quiet")
    else:
        assert not out.accepted and out.used == "a long low tone"
        assert reason in out.reason


def test_enrichment_naming_what_the_world_lacks_is_refused():
    written = "a large white circle in the top left corner on a striped background"
    out = en.check_enrichment("a circle", {"shape": "circle"}, written, WORLD)
    assert not out.accepted and out.used == "a circle"
    assert "the world does not have: color 'white'" in out.reason
