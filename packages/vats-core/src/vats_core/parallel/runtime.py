"""What the trainer does differently when ranks train one model together.

:class:`~vats_core.training.Trainer` builds a :class:`DataParallelRun` when a default
process group is initialized (``torchrun``) and keeps the single-process path untouched
otherwise. The rules, chosen so that a data-parallel run is the single-process run:

Data. Every rank holds the same batch source, seeded alike, and draws the same global
micro-batch of B rows; rank r of W keeps rows ``[r·B/W, (r+1)·B/W)`` of every tensor
(:meth:`DataParallelRun.shard`). So the global batch is the single-process batch row for
row, and the data position is the same on every rank and does not depend on W: a
checkpoint's position resumes on any world size. The price is that every rank builds the
whole micro-batch, which costs little for in-memory streams (a streaming reader of large
samples would rather read only its rows). B must be a multiple of W.

Gradients. DDP all-reduces and FSDP reduce-scatters the mean of the ranks' gradients. For
a loss that is a mean over the rank's rows, with B/W rows on every rank, the mean of the
ranks' gradients is the gradient of the mean over all B rows: the single-process
gradient. A loss that weighs rows unequally (a token mean over padded rows, a MoE balance
loss over a rank's tokens) is averaged per rank instead, as in any plain data-parallel
trainer. With gradient accumulation only the last micro-batch of a step communicates.

Metrics. The loss and ``loss_fn``'s extra metrics are averaged over ranks (one all-reduce
per step), so what rank 0 logs is the global mean; throughput counts the whole global
batch. Only rank 0 prints, writes ``metrics.jsonl`` and writes checkpoints.

Expert parallelism (with DDP or FSDP): the sharded experts' gradients are averaged by
their own hooks (:mod:`vats_core.parallel.expert`), the gradient norm counts each expert
once (:meth:`DataParallelRun.grad_norm`), and :func:`gathered_model_state` gathers the
experts whole. Its checkpoints are the single-process ones: :meth:`DataParallelRun.gathered_state`
also gathers the experts' optimizer moments (AdamW's, sharded like the weights), and
:meth:`DataParallelRun.load_state` gives each rank its experts' rows of a single-process
checkpoint's weights and moments; so an expert-parallel run resumes on one process, and a
single-process run under expert parallelism (any degree). Its sharded checkpoints
(``TrainerConfig.sharded_checkpoints``) store every expert once with the layer's whole
shape (:func:`~vats_core.parallel.expert.global_expert_state`) and resume the same ways.
With FSDP the optimizer's kernels see FSDP's DTensors beside the plain expert weights
(:meth:`DataParallelRun.optimizer_context`).

Checkpoints. By default gathered in the single-process format (model weights and an
optimizer state keyed by parameter position), so they resume on any world size and load
into a plain model. FSDP gathers the shards to rank 0 (CPU) with
``torch.distributed.checkpoint``'s state-dict helpers; a model too large for one host
wants ``TrainerConfig.sharded_checkpoints`` (:mod:`vats_core.parallel.sharded`) instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vats_core.checkpoint import check_pretrained_state


class DataParallelRun:
    """The data-parallel part of a training run; see the module docstring.

    Args:
        model: what :func:`~vats_core.parallel.parallelize` returned: a
            ``DistributedDataParallel``, an FSDP2 module, or (one rank only) a plain module.
    """

    def __init__(self, model: nn.Module) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DataParallelRun needs an initialized default process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.model = model
        self.kind = _kind(model)
        if self.kind == "none" and self.world_size > 1:
            raise ValueError(
                f"a process group of {self.world_size} ranks is initialized but "
                f"{type(model).__name__} is not data-parallel: each rank would train its own "
                "copy on its own rows. Wrap it first: vats_core.parallel.parallelize(model, "
                "ParallelConfig(data_parallel='fsdp' or 'ddp'))"
            )
        # the model itself, for the optimizer, checkpoints, eval_fn and on_step
        self.module: nn.Module = model.module if self.kind == "ddp" else model
        self.expert_parallel = has_sharded_experts(self.module)

    def optimizer_context(self) -> contextlib.AbstractContextManager[Any]:
        """Around what runs the optimizer's kernels on the parameters: the gradient
        clipping and the step, and the loading of a checkpoint (which makes AdamW's state
        with a zero-lr step). With FSDP and expert-parallel layers the parameters are FSDP's
        DTensors and this rank's plain expert weights: the foreach and fused kernels, which
        take them in one list, then treat the plain ones as replicated (each rank updates
        its own; no communication)."""
        if self.kind == "fsdp" and self.expert_parallel:
            from torch.distributed.tensor.experimental import implicit_replication

            return implicit_replication()
        return contextlib.nullcontext()

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of the model's gradients, the same on every rank: FSDP's
        shards and the expert-parallel shards counted once each."""
        if not self.expert_parallel:
            return self.full(torch.nn.utils.get_total_norm(grads))
        from vats_core.parallel.expert import expert_norm_squared

        dense, experts_squared = expert_norm_squared(grads, self.module)
        dense_norm = self.full(torch.nn.utils.get_total_norm(dense)).double()
        return (dense_norm.square() + experts_squared.to(dense_norm.device)).sqrt().float()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Any) -> Any:
        """This rank's rows of a global micro-batch: every tensor with a batch axis is cut
        along dim 0 into W equal parts; 0-d tensors and non-tensors are kept whole.

        Raises:
            ValueError: the tensors disagree on their leading size B, or W does not divide B.
        """
        sizes = sorted({t.shape[0] for t in _tensors(batch) if t.ndim >= 1})
        if len(sizes) > 1:
            raise ValueError(
                "to split a batch across ranks, every tensor in it must have the batch (row) "
                f"axis first with the same size; got leading sizes {sizes}"
            )
        if not sizes:
            return batch
        (rows,) = sizes
        if rows % self.world_size:
            raise ValueError(
                f"the micro-batch has {rows} rows, which {self.world_size} ranks cannot share "
                "equally: use a batch size that is a multiple of the world size (an unequal "
                "split would weigh the ranks' rows differently from one process)"
            )
        per_rank = rows // self.world_size
        start = self.rank * per_rank
        return _map_rows(batch, slice(start, start + per_rank))

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: communicate its gradients or keep
        accumulating them locally (every micro-batch of a step but the last)."""
        if self.kind == "ddp":
            assert isinstance(self.model, DistributedDataParallel)
            return contextlib.nullcontext() if enabled else self.model.no_sync()
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        return contextlib.nullcontext()

    def mean(self, values: list[torch.Tensor | float]) -> list[float]:
        """The mean over ranks of each scalar, in one all-reduce."""
        device = self._comm_device()
        local = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=device).detach() for v in values]
        )
        dist.all_reduce(local)  # SUM: gloo has no AVG
        return (local / self.world_size).tolist()

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """A plain tensor of ``t``'s global value (FSDP's gradient norm is a DTensor)."""
        full_tensor = getattr(t, "full_tensor", None)
        return full_tensor() if callable(full_tensor) else t

    def barrier(self) -> None:
        dist.barrier()

    def gathered_state(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model and optimizer state dicts in the single-process format; every rank must
        call it (FSDP and the expert-parallel layers gather), only rank 0's are complete
        (others may be empty)."""
        model_state = gathered_model_state(self.model)
        experts: dict[str, Any] = {}
        if self.expert_parallel:  # this rank's moments, the experts' gathered whole
            from vats_core.parallel.expert import gather_expert_optimizer_state

            experts = gather_expert_optimizer_state(self.module, optimizer, optimizer.state_dict())
        if self.kind != "fsdp":
            return model_state, experts or optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(self.model, optimizer, options=options)
        optim_state = _by_position(optim_state, _names(self.module, optimizer))
        if experts and optim_state:  # rank 0's (the others' are empty): whole experts
            from vats_core.parallel.expert import expert_positions

            for i in expert_positions(self.module, optimizer):
                if i in experts["state"]:  # absent before the first step
                    optim_state["state"][i] = experts["state"][i]
        return model_state, optim_state

    def load_state(
        self,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, torch.Tensor],
        optim_state: dict[str, Any],
        source: str | os.PathLike[str] = "the checkpoint",
    ) -> None:
        """Load single-process state dicts (read by every rank) into the parallel model;
        each expert-parallel layer takes its rank's experts (no communication).

        Raises:
            ValueError: the weights do not fit the model (keys, shapes; ``source`` names
                them), before anything is loaded.
        """
        if self.expert_parallel:
            from vats_core.parallel.expert import local_expert_state

            model_state, optim_state = local_expert_state(
                self.module, optimizer, model_state, optim_state
            )
        # this rank's shapes (FSDP's DTensors report the whole ones); fills in tied names
        check_pretrained_state(self.module, model_state, source)
        if self.kind != "fsdp":
            self.module.load_state_dict(model_state, strict=True)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.model, model_state, options=options)
        by_name = _by_name(optim_state, _names(self.module, optimizer))
        set_optimizer_state_dict(self.model, optimizer, by_name, options=options)

    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU ones
        backend = dist.get_backend()
        return (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else (torch.device("cpu"))
        )


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict of a parallelized model (what ``parallelize``
    returned), to load into a plain copy of it: every rank must call it (FSDP gathers its
    shards, to rank 0's CPU); only rank 0's is sure to be complete (FSDP's other ranks get
    an empty dict)."""
    kind = _kind(model)
    module = model.module if kind == "ddp" else model
    if kind != "fsdp":
        state = module.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if has_sharded_experts(module):
        from vats_core.parallel.expert import gather_experts

        state = gather_experts(module, state)  # every rank gets the whole experts
    return state


def has_sharded_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds expert-parallel layers (:func:`~vats_core.parallel.parallelize`
    with ``expert_parallel`` > 1); imports nothing when none was ever made."""
    if "vats_core.parallel.expert" not in sys.modules:  # never imported: nothing is sharded
        return False
    from vats_core.parallel.expert import ShardedExperts

    return any(isinstance(m, ShardedExperts) for m in module.modules())


def _kind(model: nn.Module) -> str:
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    from torch.distributed.fsdp import FSDPModule

    return "fsdp" if isinstance(model, FSDPModule) else "none"


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, tuple | list):
        for value in batch:
            yield from _tensors(value)


def _map_rows(batch: Any, rows: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[rows] if batch.ndim >= 1 else batch
    if isinstance(batch, Mapping):
        return {k: _map_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_map_rows(v, rows) for v in batch)
    return batch


def _names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the order of its param groups (the
    positions the single-process ``optimizer.state_dict()`` keys by)."""
    name_of = {id(p): name for name, p in module.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_position(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch.distributed.checkpoint's name-keyed optimizer state -> torch's position-keyed."""
    if not state:  # ranks other than 0 under cpu_offload
        return {}
    position = {name: i for i, name in enumerate(names)}
    groups = [
        {**group, "params": [position[name] for name in group["params"]]}
        for group in state["param_groups"]
    ]
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": groups,
    }


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`_by_position`."""
    groups = [
        {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
    ]
    return {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": groups,
    }
