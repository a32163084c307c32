"""Expert parallelism over 2 CPU ranks (gloo) computes the single-process MoE: the
outputs, the gradients of each rank's inputs and router, and the expert weights'
gradients (the sum over both ranks' tokens); bad degrees are refused naming the field.

One 2-rank job runs every case; the reference is the plain MoE here, on the same weights
and on each rank's tokens in turn.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from vats_core.moe import MoE, MoEConfig
from vats_core.parallel import ParallelConfig, parallelize
from vats_core.parallel.runtime import gathered_model_state
from vats_core.training import Trainer

TOL = 1e-5
D, B, T = 8, 3, 5
# name -> the MoE; each exercises another part of the shared plan
CASES = {
    "dropless": MoEConfig(dim=D, hidden_dim=8, n_experts=4, top_k=2),
    "capacity+shared": MoEConfig(
        dim=D,
        hidden_dim=8,
        n_experts=4,
        top_k=2,
        capacity_factor=0.75,  # drops assignments: the plan is the rank's own, as in one process
        n_shared_experts=1,
        shared_expert_gate=True,
    ),
    "sigmoid+grouped_mm": MoEConfig(
        dim=D, hidden_dim=8, n_experts=8, top_k=3, score_func="sigmoid", grouped_mm="on"
    ),
}


def make_moe(config: MoEConfig) -> MoE:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return MoE(config)


def inputs(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tokens (rank 1 with padding), and the output gradient it applies."""
    g = torch.Generator().manual_seed(100 + rank)
    mask = torch.ones(B, T, dtype=torch.bool)
    if rank == 1:
        mask[0, 3:] = False
    return {
        "x": torch.randn(B, T, D, generator=g),
        "mask": mask,
        "grad_y": torch.randn(B, T, D, generator=g),
    }


def _forward_backward(moe: nn.Module, rank: int) -> dict[str, Any]:
    data = inputs(rank)
    x = data["x"].clone().requires_grad_()
    y, stats = moe(x, data["mask"])
    (y * data["grad_y"]).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad.clone() for n, p in moe.named_parameters()},
        "tokens_per_expert": stats.tokens_per_expert,
        "dropped": stats.dropped_tokens,
    }


def _errors() -> dict[str, str]:
    errors = {}
    for name, moe, config in [
        ("world", make_moe(CASES["dropless"]), ParallelConfig(expert_parallel=3)),
        (
            "experts",
            make_moe(MoEConfig(dim=D, hidden_dim=8, n_experts=3, top_k=2)),
            ParallelConfig(expert_parallel=2),
        ),
        (
            "fsdp",
            make_moe(CASES["dropless"]),
            ParallelConfig(expert_parallel=2, data_parallel="fsdp"),
        ),
        ("no_moe", nn.Sequential(nn.Linear(D, D)), ParallelConfig(expert_parallel=2)),
    ]:
        try:
            parallelize(moe, config)
        except ValueError as e:
            errors[name] = str(e)
        # refused before any change
        assert all(
            type(m.experts).__name__ == "GroupedExperts"
            for m in moe.modules()
            if isinstance(m, MoE)
        )
    return errors


def _train(sc: ModuleType, out: Path) -> dict[str, Any]:
    """dp_scenarios' tiny transformer (a dense and a MoE block) trained by the Trainer with
    DDP + expert parallelism: the parameters after every step, the logged rows, the
    gathered weights, and the refusal of checkpoints."""
    model = parallelize(sc.make_model(), ParallelConfig(data_parallel="ddp", expert_parallel=2))
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainer = Trainer(
        model,
        sc.trainer_config(out),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: seen.__setitem__(step, sc.full_params(m)),
    )
    rows = trainer.fit()
    result = {"params": seen, "rows": rows, "gathered": gathered_model_state(model)}
    try:
        Trainer(
            parallelize(sc.make_model(), ParallelConfig(data_parallel="ddp", expert_parallel=2)),
            sc.trainer_config(out / "ckpt", checkpoint_every=2),
            data=sc.batch_fn,
            loss_fn=sc.loss_fn,
        )
    except ValueError as e:
        result["checkpoint_error"] = str(e)
    return result


def _rank_main(rank: int, port: int, sc: ModuleType, out: Path) -> None:
    sc.rank_env(rank, port)
    try:
        torch.distributed.init_process_group("gloo")
        results: dict[str, Any] = {}
        for name, config in CASES.items():
            moe = parallelize(make_moe(config), ParallelConfig(expert_parallel=2))
            results[name] = _forward_backward(moe, rank)
            results[name]["expert_shape"] = tuple(moe.experts.gate_up_proj.shape)
        results["errors"] = _errors()
        frozen = make_moe(CASES["dropless"]).requires_grad_(False)
        frozen.router.requires_grad_(True)
        frozen = parallelize(frozen, ParallelConfig(data_parallel="ddp", expert_parallel=2))
        results["trainable"] = sorted(n for n, p in frozen.named_parameters() if p.requires_grad)
        results["ddp"] = _train(sc, out / f"train-{rank}")
        torch.save(results, out / f"ep-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.log").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def job(sc: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ep")
    procs = sc.start_ranks(_rank_main, sc, out)
    for rank, p in enumerate(procs):
        log = out / f"rank{rank}.log"
        assert p.exitcode == 0, f"rank {rank} failed:\n{log.read_text() if log.exists() else ''}"
    return [torch.load(out / f"ep-rank{r}.pt", weights_only=False) for r in range(2)]


def _reference(config: MoEConfig) -> list[dict[str, Any]]:
    """Each rank's tokens through one plain MoE, one backward per rank."""
    runs = []
    for rank in range(2):
        runs.append(_forward_backward(make_moe(config), rank))
    return runs


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=TOL, msg=what)


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_input_gradients_equal_the_single_process_moe(
    job: list[dict], case: str
) -> None:
    ref = _reference(CASES[case])
    for rank in range(2):
        got, want = job[rank][case], ref[rank]
        _close(got["y"], want["y"], f"{case} rank {rank} output")
        _close(got["x_grad"], want["x_grad"], f"{case} rank {rank} input grad")
        assert torch.equal(got["tokens_per_expert"], want["tokens_per_expert"])
        assert torch.equal(got["dropped"], want["dropped"])
        # the router and shared expert are replicated: each rank's gradient is its own tokens'
        for name, grad in want["grads"].items():
            if not name.startswith("experts."):
                _close(got["grads"][name], grad, f"{case} rank {rank} {name}")
    if case == "capacity+shared":
        assert int(ref[0]["dropped"]) > 0  # the capacity limit was exercised


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_its_experts_and_their_gradient_sums_both_ranks_tokens(
    job: list[dict], case: str
) -> None:
    config = CASES[case]
    ref = _reference(config)
    local = config.n_experts // 2
    for rank in range(2):
        got = job[rank][case]
        assert got["expert_shape"] == (local, 2 * config.hidden_dim, D)
        mine = slice(rank * local, (rank + 1) * local)
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            want = ref[0]["grads"][name][mine] + ref[1]["grads"][name][mine]
            assert want.abs().sum() > 0  # tokens reached these experts
            _close(got["grads"][name], want, f"{case} rank {rank} {name}")


def test_frozen_experts_stay_frozen_once_sharded(job: list[dict]) -> None:
    for rank in range(2):
        assert job[rank]["trainable"] == ["module.router.weight"]  # (DDP's wrapper)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("world", ["ParallelConfig.expert_parallel=3", "world size 2"]),
        ("experts", ["ParallelConfig.expert_parallel=2", "n_experts=3"]),
        ("fsdp", ["ParallelConfig.expert_parallel=2", "data_parallel='fsdp'"]),  # not built yet
        ("no_moe", ["ParallelConfig.expert_parallel=2", "no MoE layer"]),
    ],
)
def test_degrees_and_models_that_do_not_fit_are_refused_naming_the_field(
    job: list[dict], case: str, says: list[str]
) -> None:
    message = job[0]["errors"][case]
    assert all(part in message for part in says), message


def test_ddp_with_expert_parallel_trains_the_single_process_parameters(
    sc: ModuleType, job: list[dict], tmp_path: Path
) -> None:
    """Four steps (2 micro-batches each, clipping active) on 2 ranks, each holding 2 of the
    MoE block's 4 experts: every parameter, the loss and the gradient norm equal the
    single-process run's; the gathered weights are the whole model's."""
    want: dict[int, dict[str, torch.Tensor]] = {}
    rows = Trainer(
        sc.make_model(),
        sc.trainer_config(tmp_path),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: want.__setitem__(step, sc.full_params(m)),
    ).fit()
    expert = "layers.1.ffn.experts."
    for rank in range(2):
        got = job[rank]["ddp"]
        for step in (1, 4):
            assert got["params"][step].keys() == want[step].keys()
            for name, value in want[step].items():
                if name.startswith(expert):
                    value = value[2 * rank : 2 * rank + 2]  # this rank's experts
                _close(got["params"][step][name], value, f"rank {rank} step {step} {name}")
        for g, w in zip(got["rows"], rows, strict=True):
            for key in ("loss", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (rank, g["step"], key)
        for name, value in want[4].items():
            _close(got["gathered"][name], value, f"rank {rank} gathered {name}")
    assert not torch.equal(
        want[4][expert + "down_proj"], sc.make_model().state_dict()[expert + "down_proj"]
    )


def test_checkpoints_of_expert_parallel_training_are_refused_before_any_step(
    job: list[dict],
) -> None:
    message = job[0]["ddp"]["checkpoint_error"]
    assert "TrainerConfig.checkpoint_every=2" in message and "expert_parallel" in message


def test_expert_parallel_needs_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"expert_parallel=2 .*no default process group"):
        parallelize(make_moe(CASES["dropless"]), ParallelConfig(expert_parallel=2))
    with pytest.raises(ValueError, match=r"expert_parallel=0 .*an int >= 1"):
        ParallelConfig(expert_parallel=0)
