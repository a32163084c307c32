"""``parallelize(model, config)``: parallelism applied from outside the model.

The order is torchtitan's (``parallelize_llama``): activation checkpointing, then
``torch.compile``, then data parallelism (DDP or FSDP2), each per transformer block. FSDP
goes last so its hooks wrap the compiled, checkpointed block: it gathers a block's
parameters before the block runs and frees them after, in the forward and again in the
backward, where the recomputation runs. One difference from torchtitan: the checkpoint
wraps the compiled block rather than being traced into its graph (the recomputation
reruns the compiled graph), because dynamo's checkpoint operator fails on the MoE's
data-dependent expert group sizes in torch 2.10 ("Node output referenced nonexistent
value"); the numbers are the same.

Model files know nothing of this: they never import ``torch.distributed``. What the rule
below calls a transformer block is found from the module tree, so every vats model
(``MoELanguageModel.layers``, the ViTs' and DiTs' ``blocks``, the video DiT's
``spatial_blocks`` / ``temporal_blocks``) is handled without per-model code.

Nothing here renames a parameter: checkpointing and compile replace a block's ``forward``
on the instance and FSDP2 works in place, so ``state_dict`` keys, ``save_pretrained`` and
``lr_scales`` prefixes are those of the plain model. Only DDP returns a wrapper (its
``.module`` is the model).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vats_core.config import config_error
from vats_core.moe import COMPILE_SETTINGS, MoE
from vats_core.parallel.config import DataParallel, ParallelConfig

# torch.compile backend of the blocks; tests swap in "aot_eager" (dynamo + AOTAutograd, no
# code generation) to check the plumbing in seconds, as for the trainer's compiled step.
_COMPILE_BACKEND: str | Callable[..., Any] = "inductor"
# Marks a block whose forward parallelize replaced, so a second call is refused.
_WRAPPED = "_vats_parallel_forward"


def _is_block_list(name: str) -> bool:
    return name in ("layers", "blocks") or name.endswith("_blocks")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated units, in module order: the rule parallelize uses.

    A transformer block is an element of an ``nn.ModuleList`` child named ``layers``,
    ``blocks`` or ``*_blocks`` (``spatial_blocks``, ``down_blocks``), at any depth. Lists
    inside a block are not searched (a block is one unit: its attention and MLP are
    checkpointed, compiled and sharded together), but the lists of every sub-model are (a
    multimodal model's encoder ``blocks`` and language-model ``layers``).

    Returns:
        The blocks; empty when the model has no such list.
    """
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and _is_block_list(name):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def parallelize(
    model: nn.Module, config: ParallelConfig, *, find_unused_parameters: bool = False
) -> nn.Module:
    """Apply ``config`` to ``model``: the model to hand to the trainer comes back.

    1. activation checkpointing of every transformer block (``config.activation_checkpointing``);
    2. ``torch.compile`` of every block (``config.compile``);
    3. expert parallelism (``config.expert_parallel`` > 1): every MoE layer keeps this
       rank's slice of its experts and exchanges tokens by all-to-all
       (:mod:`vats_core.parallel.expert`); DDP and FSDP leave the sharded expert weights
       (whole on each rank, replicated over the ranks holding the same experts, as
       torchtitan's experts outside FSDP) to the expert-parallel gradient averaging;
    4. data parallelism over the default process group: FSDP2 shards each block and then
       the root (the parameters outside the blocks: embeddings, final norm, head) with
       ``fully_shard``; DDP wraps the model in ``DistributedDataParallel``.

    Steps 1-3 and FSDP change the model in place and keep its parameter names (expert
    parallelism shrinks the expert weights to this rank's (E/P, ...) slice); DDP returns
    a wrapper whose ``.module`` is the model. Build the optimizer after this call (FSDP
    replaces the parameters with sharded DTensors). A deep copy made after steps 1-2 runs
    its own weights; copy a model (an EMA) before DDP or FSDP, which a copy cannot carry.

    Every rank must call it with the same model (same init: seed before building it) and
    config. The model's parameters must all be on one device, the rank's own (CPU for gloo,
    ``cuda:<local rank>`` for NCCL).

    ``find_unused_parameters``: some trainable parameters may get no gradient in a step (a
    multimodal model trains the projector of the step's medium only). DDP then walks the
    step's autograd graph to find them (DDP's flag of that name); a parameter no rank used
    keeps no gradient, as on one process. FSDP needs nothing: it reduces the gradients
    there are.

    Raises:
        ValueError: before anything is changed, naming the ``ParallelConfig`` field for DDP
            or FSDP with no initialized process group, for checkpointing or compile
            asked of a model without transformer blocks, and for an ``expert_parallel``
            degree that does not divide the world size or a MoE layer's ``n_experts``
            (or a model without MoE layers); also for a model already
            parallelized or whose parameters span several devices.
    """
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config must be a ParallelConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = transformer_blocks(model)
    device = _check(model, config, blocks)

    step = _block_forward(config.activation_checkpointing, config.compile)
    if step is not None:
        for block in blocks:
            # A method of the instance: a deep copy (an EMA made later) rebinds it to the copy.
            block.forward = types.MethodType(step, block)  # type: ignore[method-assign]
            setattr(block, _WRAPPED, True)
    if config.expert_parallel > 1:
        from vats_core.parallel.expert import shard_experts

        shard_experts(model, config.expert_parallel, device.type)
    if config.data_parallel is DataParallel.FSDP:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        ignored: set[nn.Parameter] | None = None
        if config.expert_parallel > 1:
            from vats_core.parallel.expert import average_expert_gradients, expert_parameters

            # FSDP shards every other parameter; each rank's experts stay whole (replicated
            # over the ranks holding the same experts), their gradients averaged by hooks.
            ignored = set(expert_parameters(model))
            average_expert_gradients(model)
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by the backward: keep
            # them gathered instead of freeing and re-gathering them (torchtitan does too).
            fully_shard(
                block,
                mesh=mesh,
                reshard_after_forward=i < len(blocks) - 1,
                ignored_params=ignored,
            )
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return model
    if config.data_parallel is DataParallel.DDP:
        from torch.nn.parallel import DistributedDataParallel

        if config.expert_parallel > 1:
            from vats_core.parallel.expert import average_expert_gradients, expert_parameter_names

            # DDP must neither broadcast rank 0's experts over the others' nor average
            # gradients of different experts: it skips the sharded weights, whose gradients
            # the hooks average over their replicas instead. (torch's documented way to
            # exclude parameters from DDP.)
            names = expert_parameter_names(model)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
            average_expert_gradients(model)
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    return model


def check_parallelizable(model: nn.Module, config: ParallelConfig) -> None:
    """Raise what :func:`parallelize` would refuse, changing nothing.

    A model built on the meta device (no memory, no init) is enough, so a pipeline can
    check ``config`` against the world and the model's shape before any expensive work.

    Raises:
        ValueError: as :func:`parallelize`.
    """
    _check(model, config, transformer_blocks(model))


def _check(model: nn.Module, config: ParallelConfig, blocks: list[nn.Module]) -> torch.device:
    """Every refusal of :func:`parallelize`, before it changes anything; the model's device."""
    dp = config.data_parallel
    if dp is not DataParallel.NONE and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise config_error(
            config,
            "data_parallel",
            dp.value,
            "'none' when no default process group is initialized (launch with torchrun, or "
            "call torch.distributed.init_process_group before parallelize)",
        )
    _check_expert_parallel(model, config)
    for field in ("activation_checkpointing", "compile"):
        if getattr(config, field) and not blocks:
            raise config_error(
                config,
                field,
                True,
                f"False for {type(model).__name__}, which has no transformer blocks (an "
                "nn.ModuleList named layers, blocks or *_blocks)",
            )
    if (
        config.compile
        and _COMPILE_BACKEND == "inductor"
        and not importlib.util.find_spec("setuptools")
    ):
        raise config_error(
            config,
            "compile",
            True,
            "False here: torch.compile's CPU code generation needs setuptools (pip install "
            "setuptools)",
        )
    if _is_parallelized(model, blocks):
        raise ValueError(
            f"{type(model).__name__} was already parallelized: call parallelize once, on the "
            "plain model"
        )
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(
            f"{type(model).__name__} must have parameters on exactly one device to be "
            f"parallelized, found {sorted(map(str, devices)) or 'no parameters'}"
        )
    (device,) = devices
    if (
        dp is not DataParallel.NONE
        and device.type == "cuda"
        and device.index != torch.cuda.current_device()
    ):
        raise ValueError(
            f"{type(model).__name__} is on {device} but this rank's current CUDA device "
            f"is cuda:{torch.cuda.current_device()}: call "
            "torch.cuda.set_device(local_rank) and move the model there first"
        )
    return device


def _check_expert_parallel(model: nn.Module, config: ParallelConfig) -> None:
    """The refusals of ``expert_parallel``: a degree that does not divide the world or a
    MoE layer's experts, no MoE layer, no process group."""
    ep = config.expert_parallel
    if ep == 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise config_error(
            config,
            "expert_parallel",
            ep,
            "1 when no default process group is initialized (launch with torchrun)",
        )
    world = torch.distributed.get_world_size()
    if world % ep:
        raise config_error(
            config, "expert_parallel", ep, f"a divisor of the world size {world} ({world} ranks)"
        )
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise config_error(
            config, "expert_parallel", ep, f"1 for {type(model).__name__}, which has no MoE layer"
        )
    for name, moe in layers:
        n = moe.config.n_experts
        if n % ep:
            raise config_error(
                config, "expert_parallel", ep, f"a divisor of {name}'s n_experts={n}"
            )


def _is_parallelized(model: nn.Module, blocks: list[nn.Module]) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or any(hasattr(b, _WRAPPED) for b in blocks):
        return True
    if "vats_core.parallel.expert" in sys.modules:  # never imported: no expert is sharded
        from vats_core.parallel.expert import ShardedExperts

        if any(isinstance(m, ShardedExperts) for m in model.modules()):
            return True
    if "torch.distributed.fsdp" in sys.modules:  # never imported: nothing is sharded
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(m, FSDPModule) for m in model.modules())
    return False


def _block_forward(activation_checkpointing: bool, compile: bool) -> Callable[..., Any] | None:
    """``step(block, *args, **kwargs)``: the block's own forward, checkpointed and/or compiled.

    It calls ``type(block).forward``, the class's method, so it holds no reference to any
    one block: one compiled function serves every block of a class (dynamo treats the
    block's parameters as inputs, so blocks of the same shapes share one graph).
    """
    if not (activation_checkpointing or compile):
        return None

    def eager(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return type(block).forward(block, *args, **kwargs)

    run = _compiled(eager) if compile else eager
    if not activation_checkpointing:
        return run

    def step(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Non-reentrant: keyword arguments, outputs of any structure (a MoE block's
        # RouterStats) and inputs that need no gradient all work; the RNG state is
        # restored for the recomputation, so dropout masks repeat exactly.
        return checkpoint(run, block, *args, use_reentrant=False, **kwargs)

    return step


def _compiled(forward: Callable[..., Any]) -> Callable[..., Any]:
    compiled = torch.compile(forward, backend=_COMPILE_BACKEND)

    @functools.wraps(forward)
    def run(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # (MoE expert groups: data-dependent sizes inside the graph, not a graph break)
        with torch._dynamo.config.patch(**COMPILE_SETTINGS):
            return compiled(block, *args, **kwargs)

    return run
