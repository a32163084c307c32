"""Packed-sequence language-model data for the vats-core :class:`~vats_core.training.Trainer`.

Packing (as in GPT-2/3 and most LM pretraining): every document is tokenized, optionally
preceded by BOS, followed by EOS, and the documents are concatenated into one token stream
in corpus order. The stream is cut into rows of ``seq_len`` tokens, so no compute is spent
on padding and no document boundary needs a mask (EOS tells the model a new document
starts; attention runs across the boundary, as in GPT pretraining).

Rows and labels follow the HF convention the model uses (``labels`` aligned with
``input_ids``, the model shifts): each row is ``input_ids`` and ``labels`` at once, and
position ``t`` predicts token ``t + 1`` of the same row. Consecutive rows share one token
(row ``r`` is ``stream[r·(seq_len-1) : r·(seq_len-1) + seq_len]``), so every token of the
stream after the first is a prediction target exactly once; the tail that does not fill a
row is dropped. Everything is deterministic: the same texts, tokenizer and ``seq_len``
give the same rows, and :class:`PackedBatches` draws the same batches for the same seed,
resumably.

Example::

    tok = Tokenizer.train(load_corpus("train"), vocab_size=4096)
    train_rows = pack_texts(tok, load_corpus("train"), seq_len=256)  # (R, 256) long
    val_rows = pack_texts(tok, load_corpus("validation"), seq_len=256)
    trainer = Trainer(model, TrainerConfig(max_steps=500), data=PackedBatches(train_rows, 16),
                      loss_fn=lm_loss_fn, eval_fn=lambda m: evaluate_lm(m, val_rows),
                      items_fn=count_tokens, items_name="tokens")

Shapes: R rows, B batch, T = seq_len tokens per row, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vats_core.config import is_int
from vats_core.training import TensorBatches
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

__all__ = [
    "PackedBatches",
    "count_tokens",
    "evaluate_lm",
    "lm_loss_fn",
    "pack_documents",
    "pack_texts",
    "unigram_cross_entropy",
]


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int) -> Tensor:
    """Concatenate token documents and cut the stream into rows that overlap by one token.

    Args:
        documents: token id lists, already carrying their BOS / EOS separators.
        seq_len: tokens per row T (>= 2: a row must hold an input and a target).

    Returns:
        ``(R, T)`` long tensor, ``R = (N - 1) // (T - 1)`` for a stream of N tokens.

    Raises:
        ValueError: ``seq_len < 2``, or a stream too short to fill one row.
    """
    if not is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected an int >= 2")
    pieces = [torch.as_tensor(list(doc), dtype=torch.long) for doc in documents]
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)  # (N,)
    stride = seq_len - 1
    n_rows = (stream.numel() - 1) // stride if stream.numel() else 0
    if n_rows < 1:
        raise ValueError(
            f"the documents hold {stream.numel()} tokens, fewer than one row of seq_len="
            f"{seq_len}: use more text or a shorter seq_len"
        )
    # Windows of T tokens every T - 1: the last token of a row is the first of the next.
    return stream[: n_rows * stride + 1].unfold(0, seq_len, stride).contiguous()  # (R, T)


def pack_texts(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    seq_len: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
) -> Tensor:
    """Tokenize documents (``[BOS] doc EOS``) and :func:`pack_documents` them.

    Args:
        tokenizer: the vats tokenizer.
        texts: documents, in the order they are packed.
        seq_len: tokens per row.
        add_bos: start every document with BOS (gives generation from BOS a context
            the model saw in training).
        add_eos: end every document with EOS (the document separator; keep it on unless
            the texts already end with one).

    Returns:
        ``(R, seq_len)`` long tensor.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of documents, got a single string")
    docs = (tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts)
    return pack_documents(docs, seq_len)


class PackedBatches(TensorBatches):
    """Resumable shuffled batches of packed rows: a :class:`~vats_core.training.BatchSource`.

    Each epoch visits the rows in a fresh permutation drawn from ``seed + epoch`` (see
    :class:`~vats_core.training.TensorBatches`, which this extends); a batch is
    ``{"input_ids": (B, T), "labels": (B, T)}`` with labels equal to the inputs (the model
    shifts). ``state_dict()`` holds ``epoch``, ``position`` (batches taken this epoch),
    ``seed`` and the data's shape, which :meth:`load_state_dict` checks so a checkpoint is
    never resumed on different data.

    Args:
        rows: ``(R, T)`` integer tensor from :func:`pack_texts` / :func:`pack_documents`.
        batch_size: B, in ``[1, R]``.
        shuffle: permute the rows every epoch (False: in order, for evaluation).
        seed: base seed of the permutations.
    """

    def __init__(
        self, rows: Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.is_floating_point():
            raise ValueError(f"rows must be an (R, T) integer tensor, got {_describe(rows)}")
        super().__init__(rows, batch_size, shuffle=shuffle, seed=seed)
        self.rows = rows

    def next_batch(self) -> dict[str, Tensor]:
        input_ids = super().next_batch()
        assert isinstance(input_ids, Tensor)
        return {"input_ids": input_ids, "labels": input_ids}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.cursor,
            "seed": self.seed,
            "num_rows": self.num_examples,
            "seq_len": int(self.rows.shape[1]),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        here = (self.num_examples, int(self.rows.shape[1]), self.batch_size)
        saved = (state["num_rows"], state["seq_len"], state["batch_size"])
        if tuple(saved) != here:
            raise ValueError(
                f"the saved data position is for (rows, seq_len, batch_size)={tuple(saved)}, "
                f"this data is {here}: resuming would not see the same batches"
            )
        super().load_state_dict(
            {"epoch": state["epoch"], "cursor": state["position"], "seed": state["seed"]}
        )


def lm_loss_fn(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The Trainer's ``loss_fn`` for :class:`~vats_text.model.MoELanguageModel`.

    Args:
        model: the language model.
        batch: ``{"input_ids", "labels"}`` and optionally ``"attention_mask"``, each (B, T).

    Returns:
        ``(loss, {"ce", "aux", "z"})``: the model's training loss (cross-entropy plus the
        weighted router losses) and its unweighted parts (aux and z are 0 for a dense model).
    """
    out = model(
        batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
    )
    zero = out.loss.detach().new_zeros(())
    metrics = {
        "ce": out.ce_loss.detach(),
        "aux": zero if out.aux_loss is None else out.aux_loss.detach(),
        "z": zero if out.z_loss is None else out.z_loss.detach(),
    }
    return out.loss, metrics


def count_tokens(batch: Mapping[str, Tensor]) -> int:
    """The Trainer's ``items_fn`` for token throughput: tokens in the batch's inputs."""
    return int(batch["input_ids"].numel())


@torch.no_grad()
def evaluate_lm(
    model: MoELanguageModel, rows: Tensor, *, batch_size: int = 16, max_rows: int | None = None
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) and perplexity over packed rows.

    Every row contributes its T - 1 targets; the mean is over all targets (so the result
    does not depend on ``batch_size``). The caller sets eval mode (the Trainer does).

    Args:
        model: the language model.
        rows: ``(R, T)`` from :func:`pack_texts`.
        batch_size: rows per forward.
        max_rows: evaluate only the first rows (a fixed subset, for speed).

    Returns:
        ``{"loss": ce, "ppl": exp(ce)}``.
    """
    if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 2:
        raise ValueError(f"rows must be an (R >= 1, T >= 2) tensor, got {_describe(rows)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an int >= 1")
    if max_rows is not None:
        rows = rows[:max_rows]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size].to(device)  # (B, T)
        out = model(ids, labels=ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(out.ce_loss) * n
        count += n
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0))}


def unigram_cross_entropy(train_rows: Tensor, eval_rows: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of a unigram model on ``eval_rows``' targets: the baseline a LM
    must beat.

    Token frequencies are counted on ``train_rows`` with add-one (Laplace) smoothing, so a
    token never seen in training still has a finite cost; scored on the same targets as
    :func:`evaluate_lm` (every token of each row but the first).
    """
    counts = torch.bincount(train_rows.flatten().long(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()  # (V,)
    targets = eval_rows[:, 1:].flatten().long()
    return float(-log_probs[targets].mean())


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
