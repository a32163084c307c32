"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

With ``TrainerConfig.sharded_checkpoints`` every rank writes its own shards of the model
and optimizer state in parallel (nothing is gathered on one rank), in a ``sharded/``
directory of the step directory::

    step_00000200/
        sharded/.metadata      which tensor, which chunk, which file (written by rank 0)
        sharded/__0_0.distcp   rank 0's shards
        sharded/__1_0.distcp   rank 1's shards
        trainer_state.pt       step, elapsed time, data position, RNG, schedule (rank 0)

The state is keyed by parameter name (``model.<name>``, ``optimizer.state.<name>.<key>``),
not by rank or shard, and DCP reads any chunk layout into any other: a checkpoint written
by 2 FSDP ranks loads on 1 process, a plain model's on 2 FSDP ranks, or on DDP. It is
written into the same temporary step directory the single-file format uses and renamed
into place only once every rank's shards, the metadata and the trainer state are on disk,
so it is complete or absent. An expert-parallel model's experts are stored with the
layer's whole shape, each by the rank holding it
(:func:`~vats_core.parallel.expert.global_expert_state`), so its checkpoints are those of
the plain model too.

:func:`export_pretrained` turns a step directory of either format into a
``save_pretrained`` directory (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vats_core.checkpoint import check_pretrained_state, load_safetensors, save_pretrained
from vats_core.parallel.runtime import has_sharded_experts
from vats_core.training.state import MODEL_FILE, SHARDED_DIR, is_sharded

# torch.distributed.checkpoint is imported where it is used: importing it takes seconds.

_MODEL_KEY = "model"
_OPTIMIZER_KEY = "optimizer"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" one process even when asked for one (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the model and optimizer state to ``directory/sharded``; every rank calls it.

    Args:
        directory: the checkpoint's (temporary) step directory, the same on every rank.
        model: what parallelize returned (FSDP, DDP or plain); a plain model on one process
            works without a process group.
        optimizer: the trainer's optimizer over ``model``'s parameters.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = _dcp_state(
        model, get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    )
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=directory / SHARDED_DIR, no_dist=not _distributed())


def load_sharded(step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer``, whatever world size
    wrote it; every rank calls it. The weights' names and shapes are checked against the
    model first (:func:`check_sharded`), before anything is read into it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    check_sharded(step_dir, model)
    # DCP reads in place: the state dicts of this model and optimizer are the destination
    # (get_optimizer_state_dict creates AdamW's moments with a zero-lr step if none exist).
    state = _dcp_state(
        model, get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    )
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=step_dir / SHARDED_DIR, no_dist=not _distributed())
    if has_sharded_experts(_plain(model)):
        state = _local(state)  # the expert-parallel layers' views -> their rows
    set_model_state_dict(model, state[_MODEL_KEY])
    set_optimizer_state_dict(model, optimizer, state[_OPTIMIZER_KEY])


def _dcp_state(
    model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> dict[str, Any]:
    """What DCP saves or loads in place: the name-keyed state dicts, with an
    expert-parallel model's expert tensors as views of their whole layer
    (:func:`~vats_core.parallel.expert.global_expert_state`), so that the checkpoint holds
    the single-process names and shapes whatever the degree."""
    if has_sharded_experts(_plain(model)):
        from vats_core.parallel.expert import global_expert_state

        model_state, optim_state = global_expert_state(_plain(model), model_state, optim_state)
    return {_MODEL_KEY: model_state, _OPTIMIZER_KEY: optim_state}


def _local(state: Any) -> Any:
    """``state`` with every expert view that :func:`_dcp_state` made replaced by this
    rank's rows (the parameter's or moment's own storage); FSDP's DTensors are kept."""
    from vats_core.parallel.expert import is_expert_view

    if isinstance(state, dict):
        return {k: _local(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_local(v) for v in state]
    return state.to_local() if is_expert_view(state) else state


def check_sharded(step_dir: Path, model: nn.Module) -> None:
    """Raise ValueError if the checkpoint's weights do not fit ``model`` (missing or
    unexpected names, other shapes): a checkpoint of another model config."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(step_dir / SHARDED_DIR).read_metadata()
    prefix = _MODEL_KEY + "."
    saved = {
        key[len(prefix) :]: torch.empty(entry.size, device="meta")
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(entry, "size")
    }
    module = _plain(model)
    if has_sharded_experts(module):  # this rank's rows of a whole layer's experts
        from vats_core.parallel.expert import local_expert_weights

        saved = local_expert_weights(module, saved)
    check_pretrained_state(module, saved, step_dir / SHARDED_DIR)


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP's wrapped model: the names DCP keys by


def read_full_weights(step_dir: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """The full weights of a step directory (either format) for a plain ``model`` of the
    same config, on CPU, checked against it; one process, no process group needed."""
    import torch.distributed.checkpoint as dcp

    step_dir = Path(step_dir)
    if not is_sharded(step_dir):
        tensors = load_safetensors(step_dir / MODEL_FILE)
        check_pretrained_state(model, tensors, step_dir / MODEL_FILE)
        return tensors
    check_sharded(step_dir, model)
    weights = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    with _quiet_single_process():
        dcp.load({_MODEL_KEY: weights}, checkpoint_id=step_dir / SHARDED_DIR, no_dist=True)
    return weights


def export_pretrained(
    step_dir: str | os.PathLike[str], model: nn.Module, directory: str | os.PathLike[str]
) -> Path:
    """Write a training checkpoint's weights as a ``save_pretrained`` directory.

    Args:
        step_dir: a step directory of a training run (sharded or single-file), e.g. the
            one ``checkpoints/latest`` names.
        model: a plain (not parallelized) :class:`~vats_core.checkpoint.PretrainedMixin`
            model built from the run's config; its weights are replaced by the checkpoint's.
        directory: where ``config.json`` and ``model.safetensors`` go.

    Raises:
        ValueError: the checkpoint's weights do not fit ``model``.
    """
    weights = read_full_weights(step_dir, model)
    model.load_state_dict(weights, strict=True)
    return save_pretrained(model, directory)
