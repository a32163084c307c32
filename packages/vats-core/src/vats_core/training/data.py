"""Resumable batch sources for :class:`~vats_core.training.Trainer`.

The trainer draws micro-batches from a :class:`BatchSource`: an object with
``next_batch()`` and a ``state_dict()`` / ``load_state_dict()`` pair that captures its
position, so a resumed run sees exactly the batches the uninterrupted run would have
seen. Two ways to provide one:

- a plain function ``batch_fn(step, micro) -> batch``: the batch is derived from the
  0-based optimizer step and micro-batch index (it may also draw from the global torch
  RNG, which the trainer checkpoints); the trainer wraps it in :class:`FunctionBatches`;
- :class:`TensorBatches`: shuffled fixed-size minibatches over in-memory tensors
  (packed token sequences, images and labels), reshuffled every epoch.

Anything else with the three methods works too (a streaming reader that stores its file
offset, say). State dicts must hold only tensors, numbers, strings, bools, None, lists,
tuples and dicts, because checkpoints are read back with ``torch.load(weights_only=True)``.

Shapes: N examples, B batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer needs from its data: the next micro-batch and a resumable position."""

    def next_batch(self) -> Any:
        """Return the next micro-batch (a Tensor, or a tuple/list/dict of Tensors)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position, enough for :meth:`load_state_dict` to continue exactly here."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        ...


class FunctionBatches:
    """Adapt ``batch_fn(step, micro) -> batch`` to :class:`BatchSource`.

    Args:
        batch_fn: called with the 0-based optimizer step and micro-batch index.
        grad_accum_steps: micro-batches per step (must match the trainer's).
    """

    def __init__(self, batch_fn: Callable[[int, int], Any], grad_accum_steps: int) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps} is invalid: expected >= 1")
        self.batch_fn = batch_fn
        self.grad_accum_steps = grad_accum_steps
        self.index = 0  # micro-batches drawn so far

    def next_batch(self) -> Any:
        step, micro = divmod(self.index, self.grad_accum_steps)
        self.index += 1
        return self.batch_fn(step, micro)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "grad_accum_steps": self.grad_accum_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["grad_accum_steps"] != self.grad_accum_steps:
            raise ValueError(
                f"the checkpoint was written with grad_accum_steps={state['grad_accum_steps']}, "
                f"this run uses {self.grad_accum_steps}: the data position would not match"
            )
        self.index = int(state["index"])


class TensorBatches:
    """Shuffled minibatches of B examples over tensors that share their first axis N.

    Every epoch draws a fresh permutation from a generator seeded with
    ``seed + epoch``, so the position is just ``(epoch, cursor)``. The last
    ``N % B`` examples of each epoch's permutation are skipped (every batch is full).

    Args:
        tensors: one Tensor (N, ...) or a dict name -> Tensor (N, ...); batches have
            the same structure, each tensor sliced to (B, ...).
        batch_size: B, in [1, N].
        shuffle: permute every epoch; False walks the examples in order.
        seed: base seed of the permutations.
    """

    def __init__(
        self,
        tensors: torch.Tensor | Mapping[str, torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        named = {"": tensors} if isinstance(tensors, torch.Tensor) else dict(tensors)
        if not named or not all(
            isinstance(t, torch.Tensor) and t.ndim >= 1 for t in named.values()
        ):
            raise ValueError(
                "tensors must be a Tensor or a non-empty dict of Tensors with ndim >= 1"
            )
        sizes = {name: t.shape[0] for name, t in named.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must share their first axis, got sizes {sizes}")
        n = next(iter(sizes.values()))
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size={batch_size} is invalid: expected an int in [1, {n}]")
        self._single = isinstance(tensors, torch.Tensor)
        self._tensors = named
        self.num_examples = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # batches already taken from this epoch
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def next_batch(self) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.cursor == self.batches_per_epoch:
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        start = self.cursor * self.batch_size
        index = self._order[start : start + self.batch_size]  # (B,)
        self.cursor += 1
        batch = {name: t[index] for name, t in self._tensors.items()}
        return batch[""] if self._single else batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at a saved position.

        Raises:
            ValueError: the position was saved with another ``batch_size`` (the global
                batch would change: other batches, another gradient noise, a run that no
                longer matches the one resumed). Positions saved before the batch size was
                recorded are taken as they are.
        """
        saved = state.get("batch_size", self.batch_size)
        if saved != self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is invalid for this resume: the checkpoint's "
                f"data position was written with batch_size={saved}, and a changed global "
                "batch would not continue that run. Resume with the same batch_size (the "
                "number of ranks may change; the global batch may not)"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)


def default_batch_items(batch: Any) -> int:
    """Examples in a batch, for throughput: the leading size of its first tensor.

    Pass ``items_fn`` to the trainer to count something else (tokens: ``numel`` of
    the input ids).
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return 1
    for value in values:
        if isinstance(value, torch.Tensor | Mapping | list | tuple):
            return default_batch_items(value)
    return 1
