"""Feed-forward layers: SwiGLU (Shazeer, 2020, arXiv:2002.05202) and the GELU MLP of ViT.

Parameter names follow the checkpoints we import: ``gate_proj`` / ``up_proj`` /
``down_proj`` (HF Llama, Mixtral, Qwen) and ``fc1`` / ``fc2`` (timm).

Shapes: ``(..., D)`` in, ``(..., D_out)`` out (``D_out = D`` unless ``out_dim`` is set, as
in the projectors that map one model's features into another's width); F is the hidden
width.
"""

from __future__ import annotations

import dataclasses
import enum

import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.config import Config, check_positive

__all__ = ["Activation", "GeluMLP", "MLPConfig", "SwiGLU", "build_mlp"]


class Activation(enum.StrEnum):
    SWIGLU = "swiglu"  # down(silu(gate(x)) * up(x))
    GELU = "gelu"  # fc2(gelu(fc1(x))), exact erf GELU
    GELU_TANH = "gelu_tanh"  # the tanh approximation (GPT-2, some DiTs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(Config):
    """Feed-forward settings."""

    dim: int  # model width D (input and output)
    hidden_dim: int  # hidden width F (for SwiGLU: of each of gate and up)
    activation: Activation = Activation.SWIGLU
    bias: bool = False  # biases on every projection (timm ViTs use them, Llama does not)
    out_dim: int | None = None  # output width; None = dim (a block's MLP)

    def __post_init__(self) -> None:
        check_positive(self, "dim", "hidden_dim", "out_dim")

    @property
    def output_dim(self) -> int:
        """The output width with the default applied."""
        return self.dim if self.out_dim is None else self.out_dim


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.output_dim, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D_out)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the exact or the tanh GELU."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.approximate = "tanh" if config.activation is Activation.GELU_TANH else "none"
        self.fc1 = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.fc2 = nn.Linear(config.hidden_dim, config.output_dim, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D_out)``."""
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def build_mlp(config: MLPConfig) -> SwiGLU | GeluMLP:
    """The MLP named by ``config.activation``."""
    if config.activation is Activation.SWIGLU:
        return SwiGLU(config)
    return GeluMLP(config)
