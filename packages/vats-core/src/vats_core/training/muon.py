"""Muon on chosen weight matrices, AdamW on everything else, as one torch optimizer.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers in neural networks")
replaces each hidden weight matrix's momentum update by its nearest semi-orthogonal matrix
(a few Newton-Schulz iterations), so every direction of the update moves at the same rate
instead of the few that dominate the gradient. It is meant for the 2-D weights of hidden
layers; embeddings, output projections, convolutions, biases and norm gains stay on AdamW.
The update is torch's ``optim.Muon`` with ``adjust_lr_fn="match_rms_adamw"`` (Liu et al.,
2025, "Muon is scalable for LLM training": the orthogonal update scaled by
``0.2·sqrt(max(rows, cols))`` to AdamW's typical RMS, so one learning rate and one schedule
serve both halves), with one difference: torch runs the Newton-Schulz iterations in
bfloat16, which is fast on GPUs and, on a CPU without bf16 matrix units, slower than the
whole forward and backward of a small model (1.1 to 1.9 s against 0.02 s for AdamW, per
step of the 5 M-parameter text-to-image DiT, 2 threads of a machine shared with a test
run). Here they run in bfloat16 on CUDA and in float32 elsewhere.

:class:`MuonAdamW` is a single :class:`torch.optim.Optimizer`: one ``param_groups`` list
(AdamW's groups first, then Muon's) and one ``state``, so the trainer's learning-rate
schedule, gradient zeroing, ``state_dict`` checkpoints and exact resume treat it as any
other optimizer. Muon needs each matrix whole, so it refuses FSDP's sharded parameters
(DTensors); DDP and one process are fine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MuonAdamW", "orthogonalized"]


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz iteration
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalized(grad: Tensor, steps: int = NS_STEPS) -> Tensor:
    """``grad (m, n)`` pushed towards the nearest semi-orthogonal matrix (its singular values
    towards 1) by Muon's Newton-Schulz iteration, in bfloat16 on CUDA, float32 elsewhere;
    returned in ``grad``'s dtype."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the short side: (m, m) Gram matrices
        x = x.mT
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(grad.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """AdamW on ``adamw_groups``, Muon on ``muon_groups`` (2-D, non-DTensor parameters).

    Args:
        adamw_groups: param groups for ``torch.optim.AdamW`` (their own ``weight_decay`` and
            extra keys, such as the trainer's ``lr_scale``, are kept).
        muon_groups: param groups Muon updates (``weight_decay`` decoupled, as AdamW's);
            every parameter a plain 2-D tensor.
        lr: the learning rate of both (the trainer sets each group's ``lr`` every step).
        betas, eps, fused: AdamW's.
        momentum: Muon's (Nesterov) momentum.

    Raises:
        ValueError: no Muon parameter, or one that is not a plain 2-D tensor.
    """

    def __init__(
        self,
        adamw_groups: Sequence[dict[str, Any]],
        muon_groups: Sequence[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        fused: bool | None = None,
        momentum: float = 0.95,
    ) -> None:
        muon_params = [p for group in muon_groups for p in group["params"]]
        if not muon_params:
            raise ValueError("MuonAdamW: muon_groups hold no parameter")
        for p in muon_params:
            if _is_dtensor(p):
                raise ValueError(
                    "MuonAdamW: Muon orthogonalizes each weight matrix whole and cannot update "
                    "FSDP's sharded parameters (DTensor): train with data_parallel=ddp, or "
                    "without muon"
                )
            if p.ndim != 2:
                raise ValueError(
                    f"MuonAdamW: Muon updates 2-D weight matrices only, got a parameter of "
                    f"shape {tuple(p.shape)}"
                )
        self._adamw = torch.optim.AdamW(
            [dict(g) for g in adamw_groups], lr=lr, betas=betas, eps=eps, fused=fused
        )
        muon = [{"weight_decay": 0.0, **g, "momentum": momentum, "muon": True} for g in muon_groups]
        super().__init__(self._adamw.param_groups + muon, {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner AdamW at this optimizer's AdamW groups and state (after a load,
        which replaces both)."""
        self._adamw.param_groups = [g for g in self.param_groups if not g.get("muon")]
        self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One AdamW step on its groups, one Muon step on the others: the momentum
        ``B = μB + g``, the Nesterov direction ``g + μB`` orthogonalized, decoupled weight
        decay, and the step ``lr · 0.2·sqrt(max(rows, cols))`` (AdamW's RMS)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adamw.step()
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            lr, mu, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = orthogonalized(p.grad.add(buf, alpha=mu))
                if decay:
                    p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict` (the groups must match: AdamW's
        and Muon's in this optimizer's order)."""
        super().load_state_dict(state_dict)
        self._link()


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)
