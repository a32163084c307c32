"""Normalization layers: RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467) and LayerNorm.

Both follow their weights' dtype for the output and compute statistics in at least float32,
as HF Llama / Mixtral / Qwen do, so half-precision models match HF logits.

Shapes: ``(..., D)`` in, ``(..., D)`` out; normalization runs over the last axis.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    For float32 and float64 that is one ``F.rms_norm`` call with the weight.
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
        if x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        h = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (self.dim,), eps=self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


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
