"""When vats may run its hand-written autograd nodes.

vats-core writes a few hot paths as ``torch.autograd.Function`` nodes with their own
backward (linear products on the faster GEMM library, RMSNorm, RoPE, the MoE expert loop),
and some inference paths call oneDNN kernels that have no autograd formula or write with
``out=`` into strided views. Two kinds of tracing need the plain torch expression instead:

- torch.compile: inductor fuses the plain ops itself, and dynamo cannot follow some of the
  tricks;
- torch.func transforms (``grad``, ``vmap``, ``jacrev``, ...): they require every
  ``autograd.Function`` to define ``setup_context`` and a vmap rule, and they have no
  batching rule for oneDNN's linear. Plain torch ops carry both, so per-sample gradients
  and Jacobians work through vats modules as through any torch module.

A third case is a backward that is itself differentiated (``create_graph=True``: gradient
penalties, meta-learning). The nodes' fast backwards write with ``out=`` and call oneDNN,
which autograd cannot follow, so under ``create_graph`` each node's backward instead
returns its gradients as a graph of plain ops (:func:`graph_gradients`, or a plain
formula), and the second backward runs through that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["graph_gradients", "in_func_transform", "plain_ops_only"]


def in_func_transform() -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...)."""
    return torch._C._are_functorch_transforms_active()


def plain_ops_only() -> bool:
    """True under torch.compile or inside a torch.func transform: run plain torch ops."""
    return torch.compiler.is_compiling() or in_func_transform()


def graph_gradients(
    plain: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    needs: Sequence[bool],
    grad_output: Tensor,
) -> tuple[Tensor | None, ...]:
    """For a node's backward under ``create_graph=True`` (grad mode on inside it): the
    gradients of ``plain(*inputs)`` (the node's forward in plain torch ops) against
    ``grad_output``, for the inputs where ``needs`` is True (None elsewhere), as a graph a
    second backward can differentiate. ``inputs`` are the node's saved inputs, which still
    carry their history."""
    if not any(needs):
        return tuple(None for _ in needs)
    # Differentiate against aliases: where one input derives from another (a MoE's combine
    # weights come from a router that reads the same tokens), gradients against the
    # inputs themselves would also flow along that history, which the outer backward
    # walks itself. An alias's history is one view node, outside the plain graph.
    aliases = [t.view_as(t) if need else t for t, need in zip(inputs, needs, strict=True)]
    wanted = [t for t, need in zip(aliases, needs, strict=True) if need]
    got = iter(
        torch.autograd.grad(
            plain(*aliases), wanted, grad_output, create_graph=True, allow_unused=True
        )
    )
    return tuple(next(got) if need else None for need in needs)
