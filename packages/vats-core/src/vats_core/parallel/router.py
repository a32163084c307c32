"""The MoE router losses of a global batch whose rows are split over ranks.

A MoE layer's load-balancing loss E·Σᵢ fᵢ·Pᵢ is not a mean over tokens: fᵢ and Pᵢ are
each a mean over the batch's real tokens, so the ranks' mean of each rank's loss on its own
rows is neither the global batch's loss nor its gradient, however the rows are shared. The
z-loss is a mean over real tokens, which ranks hold unequally once rows are padded.
:func:`global_router_losses` gives each rank terms whose mean over the ranks is the losses
of the whole global batch, value and gradient, as one process computes them on it: one
all-reduce of every layer's routing counts and real tokens (integers, no gradient), then
each rank's own scores and z over those (:func:`vats_core.moe.router_losses_of_part`). The
routing share fᵢ of the global batch is what "global-batch load balancing" (Qiu et al.
2025, arXiv:2501.11873) synchronizes for the same reason.

A loss function reads them in place of the model's own router losses, which average over
the rank's rows only; a model file never calls this (model files do not import
``torch.distributed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vats_core.moe import RouterStats, router_losses_of_part


def global_router_losses(stats: Sequence[RouterStats]) -> tuple[Tensor, Tensor]:
    """This rank's terms of the global batch's load-balancing and z losses, each a mean over
    the MoE layers (as ``LMOutput.aux_loss`` and ``z_loss`` take them).

    Every rank of the default process group must call it at the same point of its step (one
    all-reduce); without a process group they are the batch's own losses.

    Args:
        stats: the MoE layers' :class:`~vats_core.moe.RouterStats` for this rank's rows, in
            layer order (``LMOutput.router_stats``); at least one.

    Returns:
        ``(balancing, z)``, times the world size: their mean over the ranks (what averaging
        the ranks' gradients takes) is the global batch's losses.
    """
    if not stats:
        raise ValueError("global_router_losses needs the RouterStats of at least one MoE layer")
    sums = [s.sums for s in stats]
    counts = torch.cat([torch.cat([p.assignments_E, p.tokens[None]]) for p in sums])
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(counts)  # SUM over the ranks
    per_layer = counts.split([p.assignments_E.shape[0] + 1 for p in sums])  # (E + 1,) each
    terms = [router_losses_of_part(p, c[:-1], c[-1]) for p, c in zip(sums, per_layer, strict=True)]
    balancing = torch.stack([b for b, _ in terms]).mean()
    z = torch.stack([z for _, z in terms]).mean()
    return world * balancing, world * z
