"""``nn.Linear`` whose CPU inference puts the bias (and a GELU) inside the GEMM.

``F.linear`` with a bias on CPU runs ``addmm``: it first copies the bias into every row of a
freshly allocated output, then accumulates the matmul onto it. An activation after it is one
more pass over another fresh tensor. Those passes, and the first-touch page faults of the new
memory they walk, cost a ViT-S/16 forward about a sixth of its time at batch 16 (2 threads).
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor fuses CPU linears
into) applies the bias and the activation to each tile as the GEMM writes it.

It has no autograd formula, and at a few rows (decoding) its call overhead loses to MKL's gemv,
so :func:`linear` takes it only where it pays and is exact to float rounding:

- float32 on CPU, oneDNN built in and enabled (``torch.backends.mkldnn``);
- nothing needs a gradient (eval under ``no_grad``/``inference_mode``, or frozen weights and
  inputs);
- a bias or a fused activation to apply, at least :data:`MIN_ROWS` rows;
- not while torch.compile traces (inductor does its own fusion).

Everywhere else it is ``F.linear`` (then the activation): same results within float32 rounding
(different GEMM kernels sum in different orders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_ROWS", "Linear", "linear"]

# Below this many rows (tokens) MKL's plain call is faster than oneDNN's (measured at 1-128
# rows, 384-512 wide: oneDNN 0.54-0.97x); ViT and prefill batches have thousands.
MIN_ROWS = 256

# linear()'s activations -> oneDNN's post-op (name, algorithm).
_POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> bool:
    if torch.compiler.is_compiling():  # first: the checks below would break the graph
        return False
    if bias is None and activation is None:
        return False  # nothing to fuse: MKL's plain GEMM is as fast or faster
    operands = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in operands):
        return False  # (mismatches fall to F.linear, which names them)
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1]


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """``act(F.linear(x, weight, bias))``, fused on CPU inference (see the module docstring).

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)``.
        bias: ``(out,)`` or None.
        activation: None, ``"gelu"`` (exact, erf) or ``"gelu_tanh"``.

    Returns:
        ``(..., out)``.
    """
    if activation not in _POST_OPS:
        raise ValueError(f"linear: activation must be one of {list(_POST_OPS)}, got {activation!r}")
    if _use_onednn(x, weight, bias, activation):
        name, algorithm = _POST_OPS[activation]
        # oneDNN takes any strides for x and weight but reads the bias as dense (a strided
        # bias gave wrong sums): a no-op for a parameter.
        bias = None if bias is None else bias.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, [], algorithm)
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) calling :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
