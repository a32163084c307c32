"""Packed-sequence data: layout, determinism, resumable batches, loss and eval helpers."""

from __future__ import annotations

import math

import pytest
import torch

from vats_core.testing import check_raises
from vats_core.training import BatchSource
from vats_text.data import (
    PackedBatches,
    count_tokens,
    evaluate_lm,
    lm_loss_fn,
    pack_documents,
    pack_texts,
    unigram_cross_entropy,
)
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset
from vats_text.tokenizer import BOS_ID, EOS_ID, Tokenizer

_TEXTS = [
    f"Return the sum of {i} and the rest of the list, or raise ValueError." for i in range(60)
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(_TEXTS * 3, vocab_size=300)


def test_pack_documents_layout():
    docs = [list(range(10, 17)), list(range(20, 25)), list(range(30, 39))]  # 21 tokens
    stream = torch.tensor([t for d in docs for t in d])
    rows = pack_documents(docs, seq_len=5)
    assert rows.shape == (5, 5) and rows.dtype == torch.long  # (21 - 1) // 4
    for r in range(rows.shape[0]):
        assert torch.equal(rows[r], stream[4 * r : 4 * r + 5])
    # Consecutive rows share one token, so each stream token after the first is a target
    # (position >= 1 of a row) exactly once, up to the dropped tail.
    targets = torch.cat([row[1:] for row in rows])
    assert torch.equal(targets, stream[1 : 1 + targets.numel()])
    assert torch.equal(rows[1:, 0], rows[:-1, -1])


def test_pack_documents_errors():
    check_raises(lambda: pack_documents([[1, 2, 3]], seq_len=1), ValueError, "seq_len")
    check_raises(lambda: pack_documents([[1, 2]], seq_len=5), ValueError, "fewer than one row")
    check_raises(lambda: pack_documents([], seq_len=5), ValueError, "fewer than one row")


def test_pack_texts_separators_and_determinism(tokenizer):
    rows = pack_texts(tokenizer, _TEXTS, seq_len=129)
    again = pack_texts(tokenizer, list(_TEXTS), seq_len=129)
    assert torch.equal(rows, again)
    first = tokenizer.encode(_TEXTS[0])
    assert rows[0, 0] == BOS_ID and rows[0, 1 : 1 + len(first)].tolist() == first
    assert rows[0, 1 + len(first)] == EOS_ID and rows[0, 2 + len(first)] == BOS_ID
    no_bos = pack_texts(tokenizer, _TEXTS, seq_len=129, add_bos=False)
    assert int((no_bos == BOS_ID).sum()) == 0 and int((no_bos == EOS_ID).sum()) > 0
    check_raises(lambda: pack_texts(tokenizer, "one string", seq_len=8), ValueError, "string")


def test_packed_batches_resume_exactly():
    rows = torch.arange(70).reshape(10, 7)
    source = PackedBatches(rows, batch_size=3, seed=5)
    assert isinstance(source, BatchSource)
    seen = [source.next_batch() for _ in range(4)]  # crosses an epoch (3 batches / epoch)
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in seen)
    state = source.state_dict()
    assert state["epoch"] == 1 and state["position"] == 1 and state["seed"] == 5
    expected = [source.next_batch()["input_ids"] for _ in range(5)]

    resumed = PackedBatches(rows, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    got = [resumed.next_batch()["input_ids"] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    # Every row once per epoch (minus the N % B remainder), reshuffled per epoch.
    fresh = PackedBatches(rows, batch_size=5, seed=1)
    epoch0 = torch.cat([fresh.next_batch()["input_ids"] for _ in range(2)])
    epoch1 = torch.cat([fresh.next_batch()["input_ids"] for _ in range(2)])
    assert sorted(epoch0[:, 0].tolist()) == sorted(epoch1[:, 0].tolist()) == list(range(0, 70, 7))
    assert not torch.equal(epoch0, epoch1)

    check_raises(
        lambda: PackedBatches(rows[:9], batch_size=3).load_state_dict(state),
        ValueError,
        "same batches",
    )
    check_raises(lambda: PackedBatches(rows.float(), 2), ValueError, "integer")
    check_raises(lambda: PackedBatches(rows, 11), ValueError, "batch_size")


def test_loss_fn_eval_and_unigram():
    torch.manual_seed(0)
    model = MoELanguageModel(lm_preset("tiny")).eval()
    rows = torch.randint(7, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows[:2], "labels": rows[:2]}
    loss, metrics = lm_loss_fn(model, batch)
    assert loss.ndim == 0
    assert set(metrics) == {"ce", "aux", "z"} and float(metrics["aux"]) > 0
    assert count_tokens(batch) == 32

    by_one = evaluate_lm(model, rows, batch_size=1)
    by_four = evaluate_lm(model, rows, batch_size=4)
    assert by_one["loss"] == pytest.approx(by_four["loss"], rel=1e-6)
    assert by_one["ppl"] == pytest.approx(math.exp(by_one["loss"]), rel=1e-9)
    with torch.no_grad():
        whole = model(rows, labels=rows).ce_loss
    assert by_one["loss"] == pytest.approx(float(whole), rel=1e-5)

    dense = MoELanguageModel(lm_preset("tiny", n_experts=0))
    _, metrics = lm_loss_fn(dense, batch)
    assert float(metrics["aux"]) == 0.0 and float(metrics["z"]) == 0.0

    train = torch.tensor([[1, 1, 2, 2]])
    val = torch.tensor([[9, 1, 2, 3]])  # targets 1, 2, 3 (the first token is never one)
    counts = torch.tensor([0.0, 2, 2, 0]) + 1  # vocab 4, add-one
    expected = -(counts / counts.sum()).log()[[1, 2, 3]].mean()
    assert unigram_cross_entropy(train, val, vocab_size=4) == pytest.approx(float(expected))
