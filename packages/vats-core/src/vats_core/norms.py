"""Normalization layers: RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467) and LayerNorm.

Both follow their weights' dtype for the output and compute statistics in at least float32,
as HF Llama / Mixtral / Qwen do, so half-precision models match HF logits.

Shapes: ``(..., D)`` in, ``(..., D)`` out; normalization runs over the last axis.
"""

from __future__ import annotations

import enum
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core._autograd import graph_gradients, plain_ops_only

__all__ = ["LayerNorm", "NormType", "RMSNorm", "build_norm"]


class NormType(enum.StrEnum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


def _check_dims(name: str, dim: int, eps: float) -> None:
    if dim < 1:
        raise ValueError(f"{name}.dim={dim!r} is invalid: expected a positive integer")
    if not eps > 0:
        raise ValueError(f"{name}.eps={eps!r} is invalid: expected a positive number")


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``; no mean subtraction, no bias.

    The normalization runs in ``promote(x.dtype, float32)`` and is cast back to ``x``'s
    dtype *before* the weight multiply (the HF Llama order, which matters for bf16 parity).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        _check_dims("RMSNorm", dim, eps)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects last dim {self.dim}, got shape {tuple(x.shape)}")
        if _fused_applies(x, self.weight):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                # A strided x (queries sliced from a stacked q/k/v product, then transposed)
                # is copied once here: the reduction runs faster on dense rows, the output
                # comes out dense for RoPE and attention, and the backward's reshapes need
                # no copy of it. (Outside the node, so its saved input has x's history.)
                return _RMSNormFunction.apply(x.contiguous(), self.weight, self.eps)
            return _rms_forward(x, self.weight, self.eps)[0]
        return _rms_plain(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether RMSNorm runs the hand-fused path: float32/64 input and weight of one dtype,
    eager. Under torch.compile (which fuses the plain expression itself) and torch.func
    transforms the plain expression runs (vats_core._autograd); half precision keeps HF's
    cast order (normalize in float32, cast, scale)."""
    return x.dtype in _FUSED_DTYPES and weight.dtype == x.dtype and not plain_ops_only()


def _rms_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(weight * x * rstd, rstd)``, ``rstd = 1 / sqrt(mean(x²) + eps)`` of shape (..., 1).

    Three passes over x: one reduction (``vector_norm``: sum of squares in one read, where
    ``x.pow(2).mean()`` writes and reads a squared copy) and two multiplies, the second in
    place.
    """
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    rstd = ms.add_(eps).rsqrt_()
    return (x * rstd).mul_(weight), rstd


def _rms_plain(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The plain expression, in HF's cast order: normalize in at least float32, cast back,
    then scale."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward (float32/64, eager).

    Autograd's graph of the plain expression saves and walks a squared copy, the mean, the
    normalized copy and their gradients: some ten full passes for a backward that needs
    about six. With ``y = w ⊙ x · r``, ``r = (mean(x²) + eps)^(-1/2)`` and incoming ``g``:

    - ``dw = Σ_rows g ⊙ x · r``: a matrix-vector product of ``g ⊙ x`` with ``r``;
    - ``dx = r · (g ⊙ w) - x · r³ · (Σ_d g ⊙ w ⊙ x) / D``: the row sums are ``(g ⊙ x) @ w``,
      another matrix-vector product of the same ``g ⊙ x``.

    Saved: x, w and the per-row ``r`` (no normalized copy). On the shapes-world ViT's
    (64·36, 96) block norms and (64·36·4, 24) query/key norms (AMD EPYC, 2 threads),
    forward + backward took 0.53 and 0.64 ms, against 0.82 and 1.02 ms through autograd's
    graph of the plain expression; that ViT's whole training step (qk_norm on) went from
    97 to 87 ms, alternating the two in one process.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        y, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a graph a second backward can follow
            plain = functools.partial(_rms_plain, eps=ctx.eps)
            return (*graph_gradients(plain, (x, weight), (need_x, need_w), grad_y), None)
        d = x.shape[-1]
        x_ND, g_ND, r_N = x.reshape(-1, d), grad_y.reshape(-1, d), rstd.reshape(-1)
        gx_ND = g_ND * x_ND
        grad_w = torch.mv(gx_ND.t(), r_N) if need_w else None
        grad_x = None
        if need_x:
            coef_N1 = torch.mv(gx_ND, weight).mul_(r_N.pow(3)).div_(-d)[:, None]
            grad_x = (g_ND * weight).mul_(r_N[:, None]).addcmul_(x_ND, coef_N1).view(x.shape)
        return grad_x, grad_w, None


class LayerNorm(nn.Module):
    """Standard LayerNorm (``weight``, optional ``bias``: timm / nn.LayerNorm names)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, bias: bool = True) -> None:
        super().__init__()
        _check_dims("LayerNorm", dim, eps)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects last dim {self.dim}, got shape {tuple(x.shape)}")
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


def build_norm(kind: NormType | str, dim: int, eps: float = 1e-6) -> RMSNorm | LayerNorm:
    """The norm layer named by ``kind`` (LayerNorm gets a bias)."""
    try:
        kind = NormType(kind)
    except ValueError:
        raise ValueError(
            f"norm={kind!r} is invalid: expected one of {[k.value for k in NormType]}"
        ) from None
    if kind is NormType.RMSNORM:
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps)
