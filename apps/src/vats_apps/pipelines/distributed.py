"""``train.parallel``: a pipeline's training on several ranks (``torchrun``).

``uv run torchrun --nproc-per-node 2 -m vats_apps pipeline=text_generation
train.parallel=fsdp`` (or ``pipeline=train_vision``, ``pipeline=train_audio``,
``pipeline=train_multimodal``, and the generators ``pipeline=text_to_image``,
``text_to_audio``, ``text_to_video``: :mod:`vats_apps.pipelines.stages`) runs the pipeline
once per rank. Each rank builds the same
model from the same seed, :func:`vats_core.parallel.parallelize` applies the section (the
fields of :class:`~vats_core.parallel.ParallelConfig`; a plain string is the
``data_parallel`` shorthand), and the vats-core trainer splits every global batch over the
ranks. Rank 0 alone prints (:func:`quiet_other_ranks`), writes the cache and scores or
generates; the other ranks train and stop.

A pipeline's training reads as::

    with parallel_training(cfg, {"train.batch_size": b}, meta_models) as (parallel, ranks):
        model = build()  # the same seed on every rank
        trainer = Trainer(parallel_model(model, parallel), ...)
        trainer.fit()
        model = gathered_model(trainer.model, model, parallel)  # None on ranks other than 0

(a later phase that trains other parameters starts from
``replicated_model(trainer.model, model, parallel)`` on every rank, wrapped anew; a module
that holds several parts, as the generators' stage objectives do, gives each back with
:func:`trained_part`), and
its cache key takes :func:`parallel_key`, which is empty for the default section, so
the keys of one-process runs are those they had before the section existed.

The process group is gloo on CPU and NCCL when CUDA is present (each rank on
``cuda:<LOCAL_RANK>``). ``data_parallel`` other than ``none`` on one process (no
torchrun) makes a one-rank group, which equals the plain trainer.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vats_core.parallel import (
    DataParallel,
    ParallelConfig,
    check_parallelizable,
    global_router_losses,
    parallelize,
)
from vats_core.parallel.runtime import gathered_model_state
from vats_text.model import IGNORE_INDEX


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among ``world`` ranks."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> Ranks:
    """The rank and world torchrun gave this process (its environment); (0, 1) without."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def quiet_other_ranks() -> None:
    """Send this process's stdout to /dev/null unless it is rank 0: one rank speaks."""
    if not launched_rank().is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def parallel_config(cfg: DictConfig, key: str = "train.parallel") -> ParallelConfig:
    """``train.parallel`` as a :class:`ParallelConfig` (absent: the default, one process).

    Raises:
        ValueError: an unknown field or a bad value, naming ``train.parallel.<field>``.
    """
    section = OmegaConf.select(cfg, key, default=None)
    if section is None:
        return ParallelConfig()
    if isinstance(section, str):  # train.parallel=fsdp
        section = {"data_parallel": section}
    elif isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    else:
        raise ValueError(
            f"{key}={section!r} is invalid: expected none, ddp, fsdp or a mapping of "
            "ParallelConfig fields"
        )
    try:
        return ParallelConfig.from_dict(section)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process_group(config: ParallelConfig, key: str = "train.parallel") -> Iterator[Ranks]:
    """The default process group this config needs, for the life of the block. A block
    that ends well ends on every rank together (a barrier, then the teardown); a rank whose
    block raises tears its group down at once.

    None when neither torchrun started several ranks nor the config asks for data or
    expert parallelism; a one-rank group (local TCP store) for ``fsdp`` or ``ddp`` without
    torchrun.

    Raises:
        ValueError: several ranks with ``data_parallel='none'`` (each would train its own
            model), naming ``<key>.data_parallel``.
    """
    launched = launched_rank()
    wants_group = config.data_parallel is not DataParallel.NONE or config.expert_parallel > 1
    if launched.world > 1 and config.data_parallel is DataParallel.NONE:
        raise ValueError(
            f"{key}.data_parallel='none' with {launched.world} ranks: each rank would train "
            f"its own model. Set {key}=ddp or {key}=fsdp, or run one process"
        )
    if not wants_group or dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else launched
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=10)
    if "MASTER_ADDR" in os.environ:  # torchrun
        dist.init_process_group(backend, timeout=timeout)
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    except BaseException:
        dist.destroy_process_group()  # this rank's own teardown; the others see it fail
        raise
    # On success every rank leaves together: a rank that tore its group down while rank 0
    # still finished the block (scoring, saving) sometimes aborted in gloo's teardown
    # ("terminate called without an active exception", once in a CI run of the 2-rank
    # text pipeline test). Rank 0's work after training may outlast the group's 10-minute
    # timeout, so gloo waits with its own (monitored_barrier); NCCL keeps the plain barrier.
    if backend == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(hours=2))
    else:
        dist.barrier()
    dist.destroy_process_group()


def device() -> torch.device:
    """The device a rank's model lives on: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_batch(batch_size: int, key: str = "train.batch_size") -> None:
    """Refuse a global batch the launched ranks cannot share equally (before the process
    group exists: a refused rank must not leave its peers waiting on it).

    Raises:
        ValueError: naming ``key``.
    """
    world = launched_rank().world
    if batch_size % world:
        raise ValueError(
            f"{key}={batch_size} is invalid with {world} ranks: expected a multiple of {world} "
            "(the global batch is split equally over the ranks)"
        )


def check_model(config: ParallelConfig, meta_model: nn.Module, key: str = "train.parallel") -> None:
    """``parallelize``'s refusals of ``config`` for this model and world, checked on the
    model built on the meta device, before any work.

    Raises:
        ValueError: prefixed with ``key``.
    """
    try:
        check_parallelizable(meta_model, config)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def parallel_model(
    model: nn.Module, config: ParallelConfig, *, find_unused_parameters: bool = False
) -> nn.Module:
    """``model`` moved to this rank's device and parallelized (a no-op config: as is);
    ``find_unused_parameters`` as :func:`~vats_core.parallel.parallelize` takes it."""
    if config == ParallelConfig():
        return model
    return parallelize(model.to(device()), config, find_unused_parameters=find_unused_parameters)


def parallel_key(cfg: DictConfig, key: str = "train.parallel") -> dict[str, Any]:
    """What ``train.parallel`` adds to a cache key's settings: nothing for the default
    section (one process: the key it had before the section existed), else the resolved
    :class:`ParallelConfig` (split sums round differently from one process's).

    Raises:
        ValueError: as :func:`parallel_config`.
    """
    config = parallel_config(cfg, key)
    return {} if config == ParallelConfig() else {"parallel": config.to_dict()}


@contextlib.contextmanager
def parallel_training(
    cfg: DictConfig,
    batch_sizes: Mapping[str, int],
    meta_models: Callable[[], Iterable[nn.Module]],
    key: str = "train.parallel",
) -> Iterator[tuple[ParallelConfig, Ranks]]:
    """``train.parallel`` read and checked against the world, then its process group for
    the life of the block: what a pipeline wraps its training in.

    In order, before any work: the section (:func:`parallel_config`), each global batch
    (``{config key: size}``, :func:`check_batch`), the process group
    (:func:`process_group`), and the models ``meta_models()`` builds, on the meta device
    (:func:`check_model`).

    Yields:
        ``(config, ranks)``.

    Raises:
        ValueError: naming the key of the field that does not fit.
    """
    parallel = parallel_config(cfg, key)
    for batch_key, size in batch_sizes.items():
        check_batch(size, batch_key)
    check_optimizers(cfg, parallel, key)
    with process_group(parallel, key) as ranks:
        with torch.device("meta"):  # the models' shapes, for the checks: no memory, no init
            for model in meta_models():
                check_model(parallel, model, key)
        yield parallel, ranks


def check_optimizers(cfg: DictConfig, parallel: ParallelConfig, key: str) -> None:
    """Muon (a ``trainer.muon`` anywhere under ``train`` or ``parts``: the stages this run
    may train) orthogonalizes whole weight matrices, which FSDP shards: refused together,
    naming the field, before any stage trains."""
    if parallel.data_parallel is not DataParallel.FSDP:
        return

    def walk(node: object, where: str) -> None:
        if not isinstance(node, DictConfig):
            return
        trainer = node.get("trainer")
        if isinstance(trainer, DictConfig) and trainer.get("muon"):
            raise ValueError(
                f"{where}.trainer.muon={list(trainer.muon)} with {key}.data_parallel='fsdp': "
                f"Muon updates each weight matrix whole and FSDP shards them. Set "
                f"{where}.trainer.muon=[] or {key}=ddp"
            )
        for name, child in node.items():
            walk(child, f"{where}.{name}")

    for root in ("train", "parts"):
        walk(cfg.get(root), root)


def gathered_model(
    trained: nn.Module, model: nn.Module, config: ParallelConfig
) -> nn.Module | None:
    """After training: one plain model holding the weights the ranks trained.

    ``trained`` is what :func:`parallel_model` made of ``model`` (the trainer's model).
    With the default config it is ``model``, returned as is. Else every rank must call
    this (FSDP gathers the shards); rank 0 gets a fresh ``type(model)(model.config)``
    with the gathered weights, on the CPU, and the other ranks None.
    """
    if config == ParallelConfig():
        return model
    state = gathered_model_state(trained)
    if dist.is_initialized() and dist.get_rank() != 0:  # (no group: checkpointing or compile alone)
        return None
    plain = type(model)(model.config)  # type: ignore[operator]
    plain.load_state_dict(state)
    return plain


def replicated_model(trained: nn.Module, model: nn.Module, config: ParallelConfig) -> nn.Module:
    """After a phase of training: one plain model holding the weights the ranks trained, on
    every rank, for a next phase that :func:`parallel_model` wraps anew (DDP fixes the
    parameters it reduces, those that required grad, when it wraps the model: a phase that
    freezes other parts needs a fresh wrapper, on a model no old wrapper hooks into).

    The default config returns ``model`` as is. Else :func:`gathered_model`, then rank 0's
    weights broadcast to a fresh ``type(model)(model.config)`` on each other rank, on the
    rank's device. Every rank must call it.
    """
    if config == ParallelConfig():
        return model
    gathered = gathered_model(trained, model, config)
    plain = gathered if gathered is not None else type(model)(model.config)  # type: ignore[operator]
    if not dist.is_initialized():  # one process, checkpointing or compile alone
        return plain
    plain = plain.to(device())  # (NCCL broadcasts CUDA tensors)
    for tensor in plain.state_dict().values():  # the parameters' and buffers' own storage
        dist.broadcast(tensor, src=0)
    return plain


def trained_part(
    trained: nn.Module,
    name: str,
    fresh: Callable[[], nn.Module],
    config: ParallelConfig,
    *,
    everywhere: bool,
) -> nn.Module | None:
    """After training a module that holds several parts (a stage's objective: ``model``,
    ``align``): its part ``name``, one plain module holding the weights the ranks trained.

    ``trained`` is what :func:`parallel_model` made of the module. With the default config
    it is the module itself: its part comes back as is. Else every rank must call this
    (FSDP gathers the shards): rank 0 gets ``fresh()`` (a plain module of the part's config)
    with the gathered weights, on the CPU; the other ranks get None, or with
    ``everywhere`` (a later stage trains from the part on every rank) a ``fresh()`` of their
    own holding rank 0's weights (broadcast), on the CPU too, where the stages' batches are
    made.
    """
    if config == ParallelConfig():
        return trained.get_submodule(name)
    state = gathered_model_state(trained)
    grouped = dist.is_initialized()  # (not with checkpointing or compile alone)
    main = not grouped or dist.get_rank() == 0
    if not (main or everywhere):
        return None
    part = fresh()
    if main:
        prefix = f"{name}."
        part.load_state_dict(
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        )
    if everywhere and grouped:
        part = part.to(device())  # (NCCL broadcasts CUDA tensors)
        for tensor in part.state_dict().values():  # the parameters' and buffers' own storage
            dist.broadcast(tensor, src=0)
        part = part.cpu()
    return part


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) bool: the labels an LM's shifted loss scores."""
    return labels[:, 1:] != IGNORE_INDEX


def global_lm_loss(
    out: Any, labels: torch.Tensor, scored: torch.Tensor, rows: torch.Tensor, config: Any
) -> torch.Tensor:
    """An LM's training loss on this rank's rows, weighed so that the mean over ranks (what
    the trainer takes of the gradients) is the global batch's loss.

    The cross-entropy is a mean over the rank's scored tokens, and rows differ in how many
    they score: it is multiplied by the rank's share of the global batch's ``scored``
    tokens over its share of its ``rows`` (both 0-d, exactly 1 on one process). The MoE
    router losses, weighted by ``config.aux_loss_weight`` and ``config.z_loss_weight``, are
    the global batch's (:func:`~vats_core.parallel.global_router_losses`): the
    load-balancing loss is no mean over tokens, and the rank's own would pull the router
    toward its rows' balance.
    """
    token_share = scored_tokens(labels).sum() / scored
    row_share = labels.shape[0] / rows
    loss = out.ce_loss * (token_share / row_share)
    if out.router_stats:
        balancing, z = global_router_losses(out.router_stats)
        loss = loss + config.aux_loss_weight * balancing + config.z_loss_weight * z
    return loss
