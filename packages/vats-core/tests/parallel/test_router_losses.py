"""``global_router_losses`` over 2 CPU ranks (gloo): the mean over the ranks of each rank's
terms is the load-balancing and z losses of the whole global batch, value and router
gradient, for rows split unequally in real tokens (padding); without a process group they
are the batch's own losses.

The reference is one MoE here on the whole batch, with the same weights.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vats_core.moe import MoE, MoEConfig
from vats_core.parallel import global_router_losses

B, T, D = 4, 5, 8  # global rows, tokens per row, width
CONFIG = MoEConfig(dim=D, hidden_dim=8, n_experts=4, top_k=2)


def make_moe() -> MoE:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return MoE(CONFIG)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) tokens and their (B, T) mask: rank 0's rows hold more padding."""
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = mask[1, :2] = False
    return x, mask


def _losses_and_grads(moe: MoE, rows: slice) -> dict[str, Any]:
    """Each of this batch part's two terms and its router gradient."""
    x, mask = global_batch()
    _, stats = moe(x[rows], mask[rows])
    out: dict[str, Any] = {}
    # two layers (the same one twice: their mean is its losses) through one all-reduce
    for name, loss in zip(("balancing", "z"), global_router_losses([stats, stats]), strict=True):
        (grad,) = torch.autograd.grad(loss, moe.router.weight, retain_graph=True)
        out[name] = (loss.detach(), grad)
    return out


def _rank_main(rank: int, port: int, sc: ModuleType, out: Path) -> None:
    sc.rank_env(rank, port)
    try:
        torch.distributed.init_process_group("gloo")
        half = B // 2
        result = _losses_and_grads(make_moe(), slice(rank * half, (rank + 1) * half))
        torch.save(result, out / f"router-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.log").write_text(traceback.format_exc())
        raise


def test_the_ranks_mean_is_the_global_batch_losses(sc: ModuleType, tmp_path: Path) -> None:
    procs = sc.start_ranks(_rank_main, sc, tmp_path)
    for rank, p in enumerate(procs):
        log = tmp_path / f"rank{rank}.log"
        assert p.exitcode == 0, f"rank {rank} failed:\n{log.read_text() if log.exists() else ''}"
    ranks = [torch.load(tmp_path / f"router-rank{r}.pt", weights_only=False) for r in range(2)]

    moe = make_moe()
    x, mask = global_batch()
    _, stats = moe(x, mask)
    for name, want in (("balancing", stats.load_balancing_loss), ("z", stats.z_loss)):
        (want_grad,) = torch.autograd.grad(want, moe.router.weight, retain_graph=True)
        loss = (ranks[0][name][0] + ranks[1][name][0]) / 2
        grad = (ranks[0][name][1] + ranks[1][name][1]) / 2
        torch.testing.assert_close(loss, want.detach(), rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6, msg=name)
    # each rank's own losses would not average to the global batch's
    own = [make_moe()(x[rows], mask[rows])[1] for rows in (slice(0, 2), slice(2, 4))]
    mean_own = (own[0].load_balancing_loss + own[1].load_balancing_loss) / 2
    assert abs(mean_own.item() - stats.load_balancing_loss.item()) > 1e-4


def test_without_a_process_group_they_are_the_batch_losses() -> None:
    moe = make_moe()
    x, mask = global_batch()
    _, stats = moe(x, mask)
    balancing, z = global_router_losses([stats])
    assert balancing.item() == pytest.approx(stats.load_balancing_loss.item(), rel=1e-6)
    assert z.item() == pytest.approx(stats.z_loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least one MoE layer"):
        global_router_losses([])
