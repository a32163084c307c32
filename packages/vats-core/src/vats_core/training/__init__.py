"""The generic trainer: see :mod:`vats_core.training.trainer` for the loop and an example.

- :class:`TrainerConfig`, :class:`Trainer`, :class:`NonFiniteLossError`
- :func:`lr_at`: linear warmup + cosine decay, a pure function of the step
- :class:`MuonAdamW`: Muon on chosen weight matrices, AdamW on the rest
  (``TrainerConfig.muon``)
- data: :class:`BatchSource` (the protocol), :class:`FunctionBatches`,
  :class:`TensorBatches`
"""

from vats_core.training.config import TrainerConfig
from vats_core.training.data import BatchSource, FunctionBatches, TensorBatches
from vats_core.training.muon import MuonAdamW
from vats_core.training.schedule import lr_at
from vats_core.training.state import seed_everything
from vats_core.training.trainer import (
    NonFiniteLossError,
    Trainer,
    build_optimizer,
    iter_metrics,
)

__all__ = [
    "BatchSource",
    "FunctionBatches",
    "MuonAdamW",
    "NonFiniteLossError",
    "TensorBatches",
    "Trainer",
    "TrainerConfig",
    "build_optimizer",
    "iter_metrics",
    "lr_at",
    "seed_everything",
]
