"""``ParallelConfig``: how :func:`~vats_core.parallel.parallelize` spreads a model over ranks."""

from __future__ import annotations

import dataclasses
import enum

from vats_core.config import Config, check


class DataParallel(enum.StrEnum):
    """How the ranks of the default process group share the training of one model."""

    NONE = "none"  # one process (or ranks that do not talk to each other): the model as is
    DDP = "ddp"  # every rank holds the whole model; gradients all-reduced (averaged) each step
    FSDP = "fsdp"  # FSDP2: parameters, gradients and optimizer state sharded across ranks


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig(Config):
    """What :func:`~vats_core.parallel.parallelize` applies, in torchtitan's order.

    Activation checkpointing, then ``torch.compile``, then data parallelism. Each of the
    first two is applied to every transformer block (see
    :func:`~vats_core.parallel.transformer_blocks`), so the memory and the compiled graphs
    both follow the model's repeated unit.
    """

    # DDP and FSDP need an initialized default process group (torchrun, or
    # torch.distributed.init_process_group); FSDP with one rank is allowed.
    data_parallel: DataParallel = DataParallel.NONE
    # Keep only each block's input in the forward and recompute the block's activations in
    # the backward: activation memory O(blocks) instead of O(blocks * block internals), for
    # about one extra forward of compute. The numbers are those of the plain model.
    activation_checkpointing: bool = False
    # torch.compile each transformer block (the same code for every block, so one graph is
    # traced and reused). The loss and anything outside the blocks stay eager; to compile
    # the whole forward + loss on one process use TrainerConfig.compile instead.
    compile: bool = False
    # Expert parallelism degree P: every MoE layer's routed experts are split over groups of
    # P ranks (rank p holds experts [p*E/P, (p+1)*E/P)) and tokens travel to their expert by
    # all-to-all (vats_core.parallel.expert). 1 = every rank holds every expert. P must
    # divide the world size and every MoE layer's n_experts; combines with data_parallel
    # 'ddp' or 'fsdp' (FSDP shards the other parameters), or 'none' for a hand-written loop.
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        ep = self.expert_parallel
        check(ep >= 1, self, "expert_parallel", ep, "an int >= 1 (1 = no expert parallelism)")
