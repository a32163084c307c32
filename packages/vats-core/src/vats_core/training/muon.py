"""Muon on chosen weight matrices, AdamW on everything else, as one torch optimizer.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers in neural networks")
replaces each hidden weight matrix's momentum update by its nearest semi-orthogonal matrix
(a few Newton-Schulz iterations), so every direction of the update moves at the same rate
instead of the few that dominate the gradient. It is meant for the 2-D weights of hidden
layers; embeddings, output projections, convolutions, biases and norm gains stay on AdamW.
The update here is torch's ``optim.Muon`` with ``adjust_lr_fn="match_rms_adamw"`` (Liu et
al., 2025, "Muon is scalable for LLM training"): the orthogonal update is scaled to AdamW's
typical RMS, so one learning rate and one schedule serve both halves.

:class:`MuonAdamW` is a single :class:`torch.optim.Optimizer`: one ``param_groups`` list
(AdamW's groups first, then Muon's) and one ``state``, so the trainer's learning-rate
schedule, gradient zeroing, ``state_dict`` checkpoints and exact resume treat it as any
other optimizer. Muon needs each matrix whole, so it refuses FSDP's sharded parameters
(DTensors); DDP and one process are fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MuonAdamW"]


class MuonAdamW(torch.optim.Optimizer):
    """AdamW on ``adamw_groups``, Muon on ``muon_groups`` (2-D, non-DTensor parameters).

    Args:
        adamw_groups: param groups for ``torch.optim.AdamW`` (their own ``weight_decay`` and
            extra keys, such as the trainer's ``lr_scale``, are kept).
        muon_groups: param groups for ``torch.optim.Muon``; every parameter a plain 2-D
            tensor.
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
        self._muon = torch.optim.Muon(
            [dict(g) for g in muon_groups],
            lr=lr,
            momentum=momentum,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        super().__init__(self._adamw.param_groups + self._muon.param_groups, {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the two inner optimizers at this one's groups and state (after a load,
        which replaces both)."""
        n = len(self._adamw.param_groups)
        self._adamw.param_groups = self.param_groups[:n]
        self._muon.param_groups = self.param_groups[n:]
        self._adamw.state = self.state
        self._muon.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One AdamW step on its groups, one Muon step on its groups."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adamw.step()
        self._muon.step()
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
