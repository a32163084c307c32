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
"""

from __future__ import annotations

import torch

__all__ = ["in_func_transform", "plain_ops_only"]


def in_func_transform() -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...)."""
    return torch._C._are_functorch_transforms_active()


def plain_ops_only() -> bool:
    """True under torch.compile or inside a torch.func transform: run plain torch ops."""
    return torch.compiler.is_compiling() or in_func_transform()
