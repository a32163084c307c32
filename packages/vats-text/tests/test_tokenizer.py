"""Tests of vats_text.tokenizer: lossless round trip, special ids, batching, storage."""

from __future__ import annotations

import io
import os
import pickle
import re

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vats_text.corpus import load_corpus
from vats_text.tokenizer import (
    AUDIO_ID,
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    MIN_VOCAB_SIZE,
    PAD_ID,
    UNK_ID,
    VIDEO_ID,
    Tokenizer,
)

VOCAB = 512
# A few hard strings on top of hypothesis' random ones: whitespace runs at the edges,
# tabs/CR/newlines, the sentencepiece meta symbol, control chars, NFKC-sensitive
# characters, CJK, emoji (incl. ZWJ sequences), placeholders and special-looking text.
HARD_STRINGS = [
    "",
    " ",
    "   ",
    "\n",
    " leading",
    "trailing  ",
    "a  b   c\t\td\r\ne\n\n",
    "\u2581",
    "x\u2581\u2581 y\u2581",
    "\x00\x01\x7f\x1b[0m",
    "\uff21\ufb01\u00bd\u2460 e\u0301",
    "日本語のテキスト、中文文本",
    "emoji 🎉👩\u200d💻 done",
    "<image><video><audio>",
    "look: <image>\nDescribe it.",
    "<s> </s> <pad> <unk> <0x41>",
    "def f(x):\n    return x ** 2  # 12345\n",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return load_corpus("train", max_files=40)


@pytest.fixture(scope="module")
def tok(docs: list[str]) -> Tokenizer:
    return Tokenizer.train(docs, vocab_size=VOCAB)


# ------------------------------------------------------------------- round trip


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=30, deadline=None)
@given(text=st.text(alphabet=" \t\n\r\u2581ab<>/é字🎉", max_size=60))
def test_round_trip_whitespace_heavy(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_hard_strings(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_round_trip_real_text(tok: Tokenizer, docs: list[str]) -> None:
    text = "\n\n".join(docs[:50])
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.7 * len(text)  # even ~250 BPE merges compress English


# ----------------------------------------------------------------- special ids


def test_special_ids_are_fixed(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.image_id, tok.video_id, tok.audio_id) == (4, 5, 6)
    fixed = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID, AUDIO_ID)
    assert fixed == tok.special_ids == tuple(range(7))
    pieces = [tok.id_to_piece(i) for i in tok.special_ids]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<audio>"]
    assert tok.vocab_size == len(tok) == VOCAB


def test_placeholders_encode_as_one_id(tok: Tokenizer) -> None:
    assert tok.encode("<image>") == [IMAGE_ID]
    assert tok.encode("<video>") == [VIDEO_ID]
    assert tok.encode("<audio>") == [AUDIO_ID]
    ids = tok.encode("see <image> and<audio>!")
    assert ids.count(IMAGE_ID) == 1 and ids.count(AUDIO_ID) == 1
    assert tok.decode(ids) == "see <image> and<audio>!"


def test_control_tokens_cannot_be_injected_by_text(tok: Tokenizer) -> None:
    ids = tok.encode("<s>hi</s><pad>")
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    assert tok.encode("hi", add_bos=True, add_eos=True) == [BOS_ID, *tok.encode("hi"), EOS_ID]


def test_decode_special_tokens(tok: Tokenizer) -> None:
    body = tok.encode("hello")
    ids = [PAD_ID, BOS_ID, *body, EOS_ID, PAD_ID]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hello</s>"
    assert tok.decode(torch.tensor(ids)) == "hello"


@pytest.mark.parametrize(
    "bad",
    [[-1], [VOCAB], [1, 2, 10**9], [1.0], "abc", [[1, 2]], torch.zeros(2, 2, dtype=torch.long)],
)
def test_decode_rejects_bad_ids(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(ValueError):
        tok.decode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_encode_rejects_non_str(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(ValueError, match="must be a str"):
        tok.encode(bad)  # type: ignore[arg-type]


def test_encode_rejects_lone_surrogate(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("ab\ud800")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode_batch(["ok", "ab\ud800"])


# ---------------------------------------------------------------------- batches

TEXTS = ["Return the value.", "", "a\u2581b <image>", "x"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, False), (True, True)])
def test_encode_batch_padding_and_mask(
    tok: Tokenizer, padding_side: str, add_bos: bool, add_eos: bool
) -> None:
    input_ids, mask = tok.encode_batch(
        TEXTS, padding_side=padding_side, add_bos=add_bos, add_eos=add_eos
    )
    rows = [tok.encode(t, add_bos=add_bos, add_eos=add_eos) for t in TEXTS]
    width = max(len(r) for r in rows)
    assert input_ids.dtype == torch.long and mask.dtype == torch.bool
    assert input_ids.shape == mask.shape == (len(TEXTS), width)
    for b, row in enumerate(rows):
        n = len(row)
        assert mask[b].sum().item() == n
        assert input_ids[b][mask[b]].tolist() == row  # the unpadded ids
        assert (input_ids[b][~mask[b]] == PAD_ID).all()
        real = slice(width - n, width) if padding_side == "left" else slice(0, n)
        assert mask[b, real].all()
    assert tok.decode_batch(input_ids) == TEXTS


def test_encode_batch_lists_match_tensors(tok: Tokenizer) -> None:
    input_ids, mask = tok.encode_batch(TEXTS, padding_side="left")
    ids_list, mask_list = tok.encode_batch(TEXTS, padding_side="left", return_tensors=False)
    assert ids_list == input_ids.tolist() and mask_list == mask.tolist()
    assert tok.decode_batch(ids_list) == TEXTS


def test_encode_batch_all_empty(tok: Tokenizer) -> None:
    input_ids, mask = tok.encode_batch(["", ""])
    assert input_ids.shape == mask.shape == (2, 0)


def test_encode_batch_truncation(tok: Tokenizer) -> None:
    long_text = "the quick brown fox jumps over the lazy dog " * 4
    full = tok.encode(long_text)
    input_ids, _ = tok.encode_batch(
        [long_text, "x"], max_length=6, truncation=True, add_bos=True, add_eos=True
    )
    assert input_ids.shape == (2, 6)
    assert input_ids[0].tolist() == [BOS_ID, *full[:4], EOS_ID]
    with pytest.raises(ValueError, match="truncation=True"):
        tok.encode_batch([long_text], max_length=6)
    with pytest.raises(ValueError, match="no room"):
        tok.encode_batch(["x"], max_length=1, add_bos=True, add_eos=True)


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ("a string", {}, "list or tuple"),
        (["ok", 3], {}, r"texts\[1\] must be a str"),
        (["ok"], {"padding_side": "middle"}, "padding_side"),
        (["ok"], {"max_length": -1}, "max_length"),
    ],
)
def test_encode_batch_bad_input(tok: Tokenizer, texts: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.encode_batch(texts, **kwargs)  # type: ignore[arg-type]


def test_decode_batch_rejects_1d(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="2-D"):
        tok.decode_batch(torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------- storage


def test_save_load_round_trip(tok: Tokenizer, tmp_path) -> None:
    path = tok.save(tmp_path / "sub" / "tok.model")
    assert path.is_file()
    assert os.listdir(path.parent) == ["tok.model"]  # no temporary file left behind
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.model_proto == tok.model_proto
    for text in HARD_STRINGS:
        assert loaded.encode(text) == tok.encode(text)

    written = tok.save_pretrained(tmp_path / "pretrained")
    assert written == tmp_path / "pretrained" / "tokenizer.model"
    again = Tokenizer.from_pretrained(tmp_path / "pretrained")
    assert again.encode_batch(TEXTS)[0].equal(tok.encode_batch(TEXTS)[0])


def test_save_overwrites_atomically(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tok.model"
    path.write_bytes(b"old")
    tok.save(path)
    assert Tokenizer.load(path) == tok


def test_pickle_round_trip(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok and clone.encode("pickled <image>") == tok.encode("pickled <image>")


def test_load_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=re.escape("nope.model")):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("tokenizer.model")):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nodir"):
        Tokenizer.from_pretrained(tmp_path / "nodir")


@pytest.mark.parametrize("content", [b"", b"\x00\xffnot a model" * 10])
def test_load_corrupt_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape("bad.model")):
        Tokenizer.load(path)


def test_load_truncated_model(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "cut.model"
    path.write_bytes(tok.model_proto[: len(tok.model_proto) // 2])
    with pytest.raises(ValueError, match=re.escape("cut.model")):
        Tokenizer.load(path)


def test_rejects_foreign_sentencepiece_model(docs: list[str]) -> None:
    # sentencepiece's defaults (NFKC, a dummy prefix, unk at 0) are not lossless.
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=writer, vocab_size=300, minloglevel=2
    )
    with pytest.raises(ValueError, match="must be the piece"):
        Tokenizer(writer.getvalue())
    # The right special pieces but NFKC normalisation: caught by the round-trip probe.
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_writer=writer,
        vocab_size=400,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        user_defined_symbols=["<image>", "<video>", "<audio>"],
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="does not decode text back exactly"):
        Tokenizer(writer.getvalue())


# --------------------------------------------------------------------- training


def test_training_is_deterministic(docs: list[str], tok: Tokenizer) -> None:
    again = Tokenizer.train(iter(docs), vocab_size=VOCAB)  # a generator works too
    assert again.model_proto == tok.model_proto
    sampled = [Tokenizer.train(docs, vocab_size=VOCAB, input_sentence_size=200) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_train_from_files(docs: list[str], tmp_path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in docs[:200]), encoding="utf-8")
    tok = Tokenizer.train(files=[path], vocab_size=400, out=tmp_path / "out.model")
    assert Tokenizer.load(tmp_path / "out.model") == tok
    assert tok.decode(tok.encode(docs[0])) == docs[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"vocab_size": 400}, "exactly one"),
        ((["a"],), {"files": ["x"], "vocab_size": 400}, "exactly one"),
        (("one string",), {"vocab_size": 400}, "single string"),
        ((["ok", 3],), {"vocab_size": 400}, r"texts\[1\] must be a str"),
        ((["ok"],), {"vocab_size": MIN_VOCAB_SIZE - 1}, "vocab_size"),
        ((["tiny text"],), {"vocab_size": 5000}, "could not train"),
        ((["ok"],), {"vocab_size": 400, "character_coverage": 0.0}, "character_coverage"),
    ],
)
def test_train_bad_input(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tokenizer.train(*args, **kwargs)


def test_train_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("missing.txt")):
        Tokenizer.train(files=[tmp_path / "missing.txt"], vocab_size=400)
