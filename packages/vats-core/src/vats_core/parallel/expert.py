"""Expert parallelism: a MoE layer's routed experts sharded over ranks, tokens sent to them.

GShard (Lepikhin et al. 2020) and DeepSpeed-MoE / torchtitan's expert parallelism: with an
EP degree P, the ranks form groups of P consecutive ranks, and rank p of a group holds
experts [p·E/P, (p+1)·E/P) of every MoE layer (the same slice in every group). Each rank
routes its own tokens with the layer's router, exactly as the single-process
:class:`~vats_core.moe.MoE` does (the same plan: expert-sorted assignments, padding and
over-capacity ones dropped), then:

1. sends each assignment's token to the rank holding its expert (one all-to-all; the
   single-process order, sorted by global expert, is already grouped by destination);
2. the receiver regroups what came from its P peers by local expert and runs its experts
   (:meth:`~vats_core.moe.GroupedExperts.run_groups`, the single-process code);
3. sends the outputs back (the reverse all-to-all), where they are weighted and added
   onto their tokens as in one process.

Only the middle step of :class:`~vats_core.moe.GroupedExperts` changes
(:meth:`~vats_core.moe.GroupedExperts.expert_outputs`); gathering the rows, weighting and
summing them per token are the single-process code.

So a rank's output is the single-process MoE's on the same tokens, and the gradient that
reaches an expert's weights is the sum over every rank's tokens routed to it: the backward
of an all-to-all is the reverse all-to-all (``torch.distributed.nn.functional``).

:func:`shard_experts` swaps each ``MoE.experts`` for a :class:`ShardedExperts` holding the
rank's slice under the same parameter names (``experts.gate_up_proj`` / ``down_proj``, now
(E/P, 2H, D) and (E/P, D, H)), so the model's code and the MoE's forward are unchanged.
:func:`~vats_core.parallel.parallelize` calls it for ``ParallelConfig.expert_parallel``.

The ranks form a (replicas, experts) device mesh (:func:`expert_mesh`): a row is an EP
group, a column the ranks holding the same experts.

Training with DDP or FSDP: both leave the sharded weights alone (they differ per rank;
FSDP shards every other parameter and ignores them), and :func:`average_expert_gradients`
makes their gradients the data-parallel mean; the trainer's gradient norm counts each
expert once (:func:`expert_norm_squared`), and :func:`gather_experts` rebuilds whole
weights for a plain copy of the model.
Gathered checkpoints are the single-process ones: :func:`gather_expert_optimizer_state`
gathers the experts' optimizer state (AdamW's moments, sharded like the weights) as
:func:`gather_experts` gathers the weights, and :func:`local_expert_state` cuts a
single-process checkpoint's weights and moments to the rank's slice, so a run resumes on
one process or on any degree that divides the experts
(:class:`~vats_core.parallel.runtime.DataParallelRun` calls them). Sharded checkpoints
(``torch.distributed.checkpoint``) hold the same names and shapes without gathering:
:func:`global_expert_state` presents each rank's rows as a DTensor of the layer's whole
(E, ...) tensor, sharded over the ``experts`` mesh dim, so each expert is written once, by
its rank, and read back into any other layout (:mod:`vats_core.parallel.sharded`).

Shape legend: N tokens, D model dim, E experts of the layer, L = E/P experts of this rank,
P ranks of the expert-parallel group, S assignments this rank sends, R assignments it
receives, H expert hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Replicate, Shard

from vats_core.moe import GroupedExperts, MoE


class ShardedExperts(GroupedExperts):
    """This rank's slice of a :class:`~vats_core.moe.GroupedExperts`, fed by all-to-all.

    Args:
        experts: the layer's full experts (every rank holds the same initial weights).
        mesh: the (replicas, experts) device mesh of :func:`expert_mesh`.
    """

    def __init__(self, experts: GroupedExperts, mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)  # not GroupedExperts.__init__: it would allocate all E
        self.config = experts.config
        self.mesh = mesh
        self.group = mesh.get_group("experts")  # the expert-parallel group (P ranks)
        # the ranks holding the same experts in the other EP groups
        self.replicas = mesh.get_group("replicas")
        self.ranks = dist.get_world_size(self.group)  # P
        self.rank = dist.get_rank(self.group)  # p
        self.local = experts.config.n_experts // self.ranks  # L
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        # frozen experts stay frozen (a stage that trains other parts of the model)
        self.gate_up_proj = nn.Parameter(
            experts.gate_up_proj.detach()[mine].clone(),
            requires_grad=experts.gate_up_proj.requires_grad,
        )
        self.down_proj = nn.Parameter(
            experts.down_proj.detach()[mine].clone(), requires_grad=experts.down_proj.requires_grad
        )

    def expert_outputs(self, x_SD: Tensor, group_sizes_E: Tensor, *, grouped: bool) -> Tensor:
        """expert(x) for this rank's rows, computed where the experts live.

        Args:
            x_SD: (S, D) rows sorted by global expert.
            group_sizes_E: (E,) rows per expert of the whole layer (all ranks' experts).
            grouped: as :meth:`GroupedExperts.run_groups`.

        Returns:
            (S, D), in ``x_SD``'s row order.
        """
        P, L = self.ranks, self.local

        # 1. Counts: what I send to each rank, per its local expert; what each sends me.
        send_PL = group_sizes_E.reshape(P, L)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.group)
        send_sizes, recv_sizes = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()

        # 2. Rows to the experts' ranks; they arrive by source rank, then by local expert.
        x_RD = _exchange(x_SD, recv_sizes, send_sizes, self.group)
        # Regroup by local expert (stable: source rank order within an expert).
        expert_R = (
            torch.arange(L, device=x_RD.device).repeat(P).repeat_interleave(recv_PL.reshape(-1))
        )
        order_R = torch.sort(expert_R, stable=True).indices
        out_RD = self.run_groups(x_RD.index_select(0, order_R), recv_PL.sum(0), grouped=grouped)
        out_RD = out_RD.index_select(0, torch.argsort(order_R))  # back to arrival order

        # 3. Outputs back to the rows' ranks, in the order they were sent.
        return _exchange(out_RD, send_sizes, recv_sizes, self.group)


def _exchange(
    x: Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup
) -> Tensor:
    """All-to-all of rows (differentiable): ``in_sizes[p]`` rows of ``x`` go to rank p,
    ``out_sizes[p]`` rows come from it. (sum(in_sizes), D) -> (sum(out_sizes), D)."""
    out = x.new_empty((sum(out_sizes), *x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every :class:`~vats_core.moe.MoE` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


_MESH_DIMS = ("replicas", "experts")


def expert_mesh(degree: int, device_type: str) -> DeviceMesh:
    """The (replicas, experts) device mesh of the world for P = ``degree``: the ranks
    ``arange(W).reshape(W/P, P)``. A row, dim ``experts``, is an expert-parallel group (ranks
    [g·P, (g+1)·P)); a column, dim ``replicas``, holds the same experts (p, p + P, p + 2P,
    ...). Every rank must call it (group creation is collective)."""
    world = dist.get_world_size()
    return init_device_mesh(device_type, (world // degree, degree), mesh_dim_names=_MESH_DIMS)


def shard_experts(model: nn.Module, degree: int, device_type: str = "cpu") -> list[ShardedExperts]:
    """Replace every MoE layer's experts by this rank's :class:`ShardedExperts` slice.

    The caller (:func:`~vats_core.parallel.parallelize`) has checked that ``degree``
    divides the world size and every layer's ``n_experts``. In place; returns the shards.
    ``device_type``: that of the model's parameters ("cpu" for gloo, "cuda" for NCCL).
    """
    mesh = expert_mesh(degree, device_type)
    shards = []
    for moe in moe_layers(model):
        moe.experts = ShardedExperts(moe.experts, mesh)
        shards.append(moe.experts)
    return shards


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The names of every sharded expert weight in ``model`` (their values differ per rank)."""
    return [
        f"{name}.{param}" if name else param
        for name, module in model.named_modules()
        if isinstance(module, ShardedExperts)
        for param, _ in module.named_parameters(recurse=False)
    ]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every sharded expert weight of ``model`` (their values differ per EP rank)."""
    return [
        param
        for module in model.modules()
        if isinstance(module, ShardedExperts)
        for param in module.parameters(recurse=False)
    ]


def average_expert_gradients(model: nn.Module) -> None:
    """Make the sharded expert weights' gradients those of a data-parallel run.

    Data parallelism trains on the mean of the ranks' losses, so every gradient must be
    (1/W)·Σ over ranks. DDP averages the replicated weights; an expert's gradient on its
    rank already sums its EP group's tokens (the backward all-to-all brought them), so it
    is summed over the replica group (the other EP groups' copies of the same experts) and
    divided by W. A hook on each expert weight does it as each gradient is computed (every
    micro-batch: linear, so accumulation is unaffected).
    """
    world = dist.get_world_size()
    for module in model.modules():
        if not isinstance(module, ShardedExperts):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad:  # a frozen expert gets no gradient to average
                param.register_hook(_averaging_hook(module.replicas, world))


def _averaging_hook(replicas: dist.ProcessGroup, world: int) -> Callable[[Tensor], Tensor]:
    several = dist.get_world_size(replicas) > 1

    def hook(grad: Tensor) -> Tensor:
        if several:
            grad = grad.clone()
            dist.all_reduce(grad, group=replicas)
        return grad / world

    return hook


def expert_norm_squared(grads: list[Tensor], model: nn.Module) -> tuple[list[Tensor], Tensor]:
    """Split a rank's gradients into the replicated ones and the experts' (sharded); return
    the former and Σ over ranks of the experts' squared norm, counted once per expert
    (every replica group holds the same averaged gradients)."""
    expert_ids = {
        id(p.grad)
        for m in model.modules()
        if isinstance(m, ShardedExperts)
        for p in m.parameters(recurse=False)
        if p.grad is not None
    }
    dense = [g for g in grads if id(g) not in expert_ids]
    experts = [g for g in grads if id(g) in expert_ids]
    squared = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g in experts:
        squared = squared + g.double().square().sum()
    dist.all_reduce(squared)  # every rank takes part, with or without expert gradients
    copies = dist.get_world_size() // next(
        m.ranks for m in model.modules() if isinstance(m, ShardedExperts)
    )
    return dense, squared / copies


def gather_experts(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (the model's state dict on this rank) with every sharded expert weight
    replaced by the whole layer's (E, ...) weight, gathered over the EP group: what loads
    into a plain copy of the model. Every rank must call it."""
    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, ShardedExperts):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}" if name else param_name
            parts = [torch.empty_like(param) for _ in range(module.ranks)]
            dist.all_gather(parts, param.detach().contiguous(), group=module.group)
            out[key] = torch.cat(parts)
    return out


def expert_positions(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[int, ShardedExperts]:
    """The position of every sharded expert weight among the optimizer's parameters (param
    group order: how ``optimizer.state_dict()`` keys its state), and the layer holding it."""
    owner = {
        id(p): m
        for m in model.modules()
        if isinstance(m, ShardedExperts)
        for p in m.parameters(recurse=False)
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def gather_expert_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """``state`` (``optimizer.state_dict()`` on this rank) with every sharded expert
    weight's per-expert tensors (AdamW's ``exp_avg``, ``exp_avg_sq``: leading dim L) replaced
    by the whole layer's (E, ...), gathered over the EP group as :func:`gather_experts`
    gathers the weights: the state a single-process run holds. Scalars (``step``) are the
    same on every rank and kept. Every rank must call it; ``state`` is not modified (its
    tensors are the optimizer's own)."""
    per_param = dict(state["state"])
    for position, module in sorted(expert_positions(model, optimizer).items()):
        if position not in per_param:  # before the first step: no state on any rank
            continue
        entry = dict(per_param[position])
        for key in sorted(entry):  # the same collectives, in the same order, on every rank
            value = entry[key]
            if not _per_expert(value, module.local):
                continue
            parts = [torch.empty_like(value) for _ in range(module.ranks)]
            dist.all_gather(parts, value.detach().contiguous(), group=module.group)
            entry[key] = torch.cat(parts)  # (E, ...)
        per_param[position] = entry
    return {**state, "state": per_param}


def local_expert_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The inverse of :func:`gather_experts` and :func:`gather_expert_optimizer_state`:
    single-process state dicts (whole experts) cut to what this rank loads. Every sharded
    expert weight, and its optimizer tensors with a leading dim of E, keep rows
    [p·L, (p+1)·L) (p: the rank in its EP group); everything else is kept as is. The
    inputs are not modified; no communication."""
    weights = local_expert_weights(model, model_state)
    per_param = dict(optim_state["state"])
    for position, module in expert_positions(model, optimizer).items():
        if position in per_param:  # absent before the first step
            per_param[position] = {
                k: _mine(v, module, k) if _per_expert(v, module.config.n_experts) else v
                for k, v in per_param[position].items()
            }
    return weights, {**optim_state, "state": per_param}


def local_expert_weights(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` (a single-process state dict, or its shapes as meta tensors) with every
    sharded expert weight cut to this rank's rows; a key missing, or one that does not
    hold the layer's E experts along dim 0 (another model config), is left as is to the
    caller's check of names and shapes. Not modified; no communication."""
    out = dict(weights)
    for key, module in _expert_layers(model).items():
        if key in out and _per_expert(out[key], module.config.n_experts):
            out[key] = _mine(out[key], module, key)
    return out


def _expert_layers(model: nn.Module) -> dict[str, ShardedExperts]:
    """The name of every sharded expert weight in ``model`` -> the layer holding it."""
    return {
        f"{name}.{param}" if name else param: module
        for name, module in model.named_modules()
        if isinstance(module, ShardedExperts)
        for param, _ in module.named_parameters(recurse=False)
    }


def global_expert_state(
    model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``torch.distributed.checkpoint`` saves and loads for an expert-parallel model.

    ``model_state`` and ``optim_state`` are this rank's name-keyed state dicts
    (``get_model_state_dict`` / ``get_optimizer_state_dict`` of ``model``, the plain
    module); every sharded expert weight and its per-expert optimizer tensors (AdamW's
    moments, leading dim L) come back as :class:`~torch.distributed.tensor.DTensor` views of
    the layer's whole (E, ...) tensor over the same storage: sharded along dim 0 over the
    ``experts`` mesh dim, replicated over ``replicas``. So DCP writes each expert once,
    under the name and global shape of the single-process state, and reads into this
    rank's rows from whatever layout wrote them (one process, another degree, FSDP).
    Everything else is kept as is; the inputs are not modified; no communication.
    """
    layers = _expert_layers(model)
    weights = {k: _as_global(v, layers[k]) if k in layers else v for k, v in model_state.items()}
    per_param = {
        name: (
            {
                k: _as_global(v, layers[name]) if _per_expert(v, layers[name].local) else v
                for k, v in entry.items()
            }
            if name in layers
            else entry
        )
        for name, entry in optim_state["state"].items()
    }
    return weights, {**optim_state, "state": per_param}


def is_expert_view(value: Any) -> bool:
    """Whether ``value`` is a view :func:`global_expert_state` made (a DTensor on the
    expert mesh, not one of FSDP's)."""
    return isinstance(value, DTensor) and value.device_mesh.mesh_dim_names == _MESH_DIMS


def _as_global(local: Tensor, module: ShardedExperts) -> DTensor:
    """This rank's (L, ...) rows as a DTensor of the layer's (E, ...) tensor, sharing
    ``local``'s storage (what DCP loads into it lands in ``local``)."""
    shape = (module.config.n_experts, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()  # a contiguous (E, ...) tensor
    return DTensor.from_local(
        local.detach(),
        module.mesh,
        (Replicate(), Shard(0)),
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def _per_expert(value: Any, experts: int) -> bool:
    return isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == experts


def _mine(whole: Tensor, module: ShardedExperts, what: str) -> Tensor:
    """Rows [p·L, (p+1)·L) of a whole layer's (E, ...) tensor, as a tensor of their own (a
    view would keep the whole E rows alive)."""
    if whole.ndim < 1 or whole.shape[0] != module.config.n_experts:
        raise ValueError(
            f"{what} has shape {tuple(whole.shape)}: a single-process state dict holds all "
            f"{module.config.n_experts} experts of the layer along dim 0"
        )
    return whole[module.rank * module.local : (module.rank + 1) * module.local].clone()
