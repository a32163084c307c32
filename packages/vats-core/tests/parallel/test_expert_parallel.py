"""Expert parallelism over 2 CPU ranks (gloo) computes the single-process MoE: the
outputs, the gradients of each rank's inputs and router, and the expert weights'
gradients (the sum over both ranks' tokens); bad degrees are refused naming the field.
DDP + expert parallelism trains the single-process parameters, and its checkpoints are
the single-process ones: written by 2 ranks, resumed on one process, and the other way;
its sharded (DCP) checkpoints hold every expert once under the single-process name and
shape, and resume the same two ways.

One 2-rank job runs every case; the reference is the plain MoE (or the Trainer) here, on
the same weights and on each rank's tokens in turn.
"""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from vats_core.moe import MoE, MoEConfig
from vats_core.parallel import ParallelConfig, parallelize
from vats_core.parallel.runtime import DataParallelRun, gathered_model_state
from vats_core.parallel.sharded import read_full_weights
from vats_core.training import Trainer
from vats_core.training.state import latest_checkpoint, read_training_checkpoint, step_dir_name
from vats_core.training.trainer import CHECKPOINT_DIR, build_optimizer

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
    gathered weights."""
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
    return {"params": seen, "rows": rows, "gathered": gathered_model_state(model)}


def _checkpoints(sc: ModuleType, out: Path) -> dict[str, Any]:
    """DDP + expert parallelism checkpoints its step 2 (of 4) into ``out/ep-checkpoint``
    (the test resumes it on one process); then loads a single-process run's step-2
    checkpoint (``out/from-one``, written by the test) and continues it to step 4: what the
    rank loaded (its parameters, its optimizer state by name), the step-4 parameters and
    the rows, or the error that stopped the resumed run."""
    ep = ParallelConfig(data_parallel="ddp", expert_parallel=2)
    config = sc.trainer_config(out / "ep-checkpoint", checkpoint_every=2)
    Trainer(parallelize(sc.make_model(), ep), config, data=sc.batch_fn, loss_fn=sc.loss_fn).fit(
        stop_after=2
    )
    model = parallelize(sc.make_model(), ep)
    config = sc.trainer_config(out / "from-one", checkpoint_every=2)
    trainer = Trainer(model, config, data=sc.batch_fn, loss_fn=sc.loss_fn)
    weights, optim, _ = read_training_checkpoint(
        out / "from-one" / CHECKPOINT_DIR / step_dir_name(2)
    )
    DataParallelRun(model).load_state(trainer.optimizer, weights, optim)
    result: dict[str, Any] = {
        "loaded": {"params": sc.full_params(trainer.module), "optimizer": _state_by_name(trainer)}
    }
    try:
        result["rows"] = trainer.fit(resume=True)  # loads the same checkpoint, trains 3 and 4
        result["params"] = sc.full_params(trainer.module)
    except ValueError as e:  # raised by every rank before any collective: none waits
        result["resume_error"] = str(e)
    return result


def _sharded_checkpoints(sc: ModuleType, out: Path) -> dict[str, Any]:
    """DDP + expert parallelism with sharded checkpoints: writes its step 2 (of 4) into
    ``out/ep-sharded`` (the test resumes it on one process), then continues a
    single-process run's sharded step-2 checkpoint (``out/from-one-sharded``, written by
    the test) to step 4: the step-4 parameters and the rows."""
    ep = ParallelConfig(data_parallel="ddp", expert_parallel=2)
    config = sc.trainer_config(out / "ep-sharded", checkpoint_every=2, sharded_checkpoints=True)
    Trainer(parallelize(sc.make_model(), ep), config, data=sc.batch_fn, loss_fn=sc.loss_fn).fit(
        stop_after=2
    )
    config = sc.trainer_config(
        out / "from-one-sharded", checkpoint_every=2, sharded_checkpoints=True
    )
    trainer = Trainer(
        parallelize(sc.make_model(), ep), config, data=sc.batch_fn, loss_fn=sc.loss_fn
    )
    rows = trainer.fit(resume=True)
    return {"rows": rows, "params": sc.full_params(trainer.module)}


def _fsdp(sc: ModuleType, out: Path) -> dict[str, Any]:
    """FSDP + expert parallelism through the Trainer: 4 steps with gathered checkpoints
    at steps 2 and 4 (``out/fsdp-gathered``; the parameters after every step, the rows); a
    sharded run stopped at step 2 (``out/fsdp-sharded``, the test resumes it on one
    process); and copies of the single-process step-2 checkpoints of both formats
    continued to step 4 (the parameters, the rows)."""
    ep = ParallelConfig(data_parallel="fsdp", expert_parallel=2)

    def trainer(out_dir: Path, sharded: bool, on_step: Any = None) -> Trainer:
        config = sc.trainer_config(out_dir, checkpoint_every=2, sharded_checkpoints=sharded)
        model = parallelize(sc.make_model(), ep)
        return Trainer(model, config, data=sc.batch_fn, loss_fn=sc.loss_fn, on_step=on_step)

    seen: dict[int, dict[str, torch.Tensor]] = {}
    record = lambda step, m: seen.__setitem__(step, sc.full_params(m))  # noqa: E731
    result: dict[str, Any] = {
        "params": seen,
        "rows": trainer(out / "fsdp-gathered", False, record).fit(),
    }
    trainer(out / "fsdp-sharded", True).fit(stop_after=2)
    for name, sharded in (("fsdp-from-one", False), ("fsdp-from-one-sharded", True)):
        resumed = trainer(out / name, sharded)
        rows = resumed.fit(resume=True)
        result[name] = {"rows": rows, "params": sc.full_params(resumed.module)}
    return result


def _state_by_name(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The trainer's optimizer state, keyed by parameter name, copied."""
    return _by_name(trainer.module, trainer.optimizer, trainer.optimizer.state_dict())


def _by_name(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """A position-keyed optimizer state dict keyed by the names of ``optimizer``'s
    parameters (param-group order), its tensors copied."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(state["state"]) == list(range(len(names)))  # every parameter has a state
    return {
        names[i]: {k: v.detach().clone() for k, v in entry.items()}
        for i, entry in state["state"].items()
    }


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
        results["checkpoints"] = _checkpoints(sc, out)
        results["sharded"] = _sharded_checkpoints(sc, out)
        results["fsdp"] = _fsdp(sc, out)
        torch.save(results, out / f"ep-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.log").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def job(sc: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's results; ``out`` (the ranks' directory) in rank 0's."""
    out = tmp_path_factory.mktemp("ep")
    # a single-process run stopped at step 2, for the ranks to resume
    for name, sharded in (("from-one", False), ("from-one-sharded", True)):
        config = sc.trainer_config(out / name, checkpoint_every=2, sharded_checkpoints=sharded)
        Trainer(sc.make_model(), config, data=sc.batch_fn, loss_fn=sc.loss_fn).fit(stop_after=2)
        shutil.copytree(out / name, out / f"fsdp-{name}")  # resumed by the FSDP run too
    procs = sc.start_ranks(_rank_main, sc, out)
    for rank, p in enumerate(procs):
        log = out / f"rank{rank}.log"
        assert p.exitcode == 0, f"rank {rank} failed:\n{log.read_text() if log.exists() else ''}"
    results = [torch.load(out / f"ep-rank{r}.pt", weights_only=False) for r in range(2)]
    results[0]["out"] = out
    return results


@pytest.fixture(scope="module")
def reference(sc: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-process run of 4 steps, uninterrupted, checkpointed at steps 2 and 4:
    its parameters after every step, its rows, and its checkpoint root."""
    out = tmp_path_factory.mktemp("single")
    params, rows = _recorded_fit(sc, out)
    return {"params": params, "rows": rows, "checkpoints": out / CHECKPOINT_DIR}


def _recorded_fit(
    sc: ModuleType, out: Path, *, resume: bool = False, sharded: bool = False
) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """A single-process run under ``out`` (checkpointed every 2 steps, sharded with
    ``sharded``, resumed from its latest checkpoint with ``resume``): its parameters after
    every step it ran, its rows."""
    params: dict[int, dict[str, torch.Tensor]] = {}
    rows = Trainer(
        sc.make_model(),
        sc.trainer_config(out, checkpoint_every=2, sharded_checkpoints=sharded),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: params.__setitem__(step, sc.full_params(m)),
    ).fit(resume=resume)
    return params, rows


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
        ("no_moe", ["ParallelConfig.expert_parallel=2", "no MoE layer"]),
    ],
)
def test_degrees_and_models_that_do_not_fit_are_refused_naming_the_field(
    job: list[dict], case: str, says: list[str]
) -> None:
    message = job[0]["errors"][case]
    assert all(part in message for part in says), message


EXPERTS = "layers.1.ffn.experts."  # the MoE block's 4 experts; rank r holds [2r, 2r + 2)


def _mine(name: str, whole: torch.Tensor, rank: int) -> torch.Tensor:
    """What rank ``rank`` holds of a single-process tensor: its experts, or all of it."""
    return whole[2 * rank : 2 * rank + 2] if name.startswith(EXPERTS) and whole.ndim else whole


def _assert_rows(got: list[dict], want: list[dict], steps: list[int], what: str) -> None:
    """The logged loss and gradient norm of ``steps`` equal the reference's."""
    assert [g["step"] for g in got] == steps, what
    by_step = {w["step"]: w for w in want}
    for g in got:
        for key in ("loss", "grad_norm"):
            w = by_step[g["step"]][key]
            assert g[key] == pytest.approx(w, rel=1e-5, abs=1e-6), (what, g["step"], key)


def test_ddp_with_expert_parallel_trains_the_single_process_parameters(
    sc: ModuleType, job: list[dict], reference: dict
) -> None:
    """Four steps (2 micro-batches each, clipping active) on 2 ranks, each holding 2 of the
    MoE block's 4 experts: every parameter, the loss and the gradient norm equal the
    single-process run's; the gathered weights are the whole model's."""
    want = reference["params"]
    for rank in range(2):
        got = job[rank]["ddp"]
        for step in (1, 4):
            assert got["params"][step].keys() == want[step].keys()
            for name, value in want[step].items():
                value = _mine(name, value, rank)
                _close(got["params"][step][name], value, f"rank {rank} step {step} {name}")
        _assert_rows(got["rows"], reference["rows"], [1, 2, 3, 4], f"rank {rank}")
        for name, value in want[4].items():
            _close(got["gathered"][name], value, f"rank {rank} gathered {name}")
    assert not torch.equal(
        want[4][EXPERTS + "down_proj"], sc.make_model().state_dict()[EXPERTS + "down_proj"]
    )


def test_an_expert_parallel_checkpoint_is_the_single_process_one_and_resumes_on_one_process(
    sc: ModuleType, job: list[dict], reference: dict, tmp_path: Path
) -> None:
    """2 ranks (2 of the 4 experts each) checkpoint step 2 of 4: its weights and optimizer
    state (AdamW's moments of all 4 experts) are the single-process run's at step 2, and one
    process (a plain model) continues it to the uninterrupted run's step 4."""
    written = job[0]["out"] / "ep-checkpoint"
    path = latest_checkpoint(written / CHECKPOINT_DIR)
    assert path is not None and path.name == step_dir_name(2)
    weights, optim, state = read_training_checkpoint(path)
    want_weights, want_optim, _ = read_training_checkpoint(
        reference["checkpoints"] / step_dir_name(2)
    )
    assert state["step"] == 2
    _assert_single_process_state(weights, optim, want_weights, want_optim)
    # the experts' moments differ from row to row: a misplaced slice would show
    for key, moment in _single_process_by_name(sc, optim)[EXPERTS + "gate_up_proj"].items():
        if moment.ndim:
            assert moment.shape[0] == 4, key
            assert (moment[:2] - moment[2:]).abs().max() > 0.1 * moment.abs().max(), key

    run = tmp_path / "run"
    shutil.copytree(written, run)
    params, rows = _recorded_fit(sc, run, resume=True)
    assert sorted(params) == [3, 4]
    assert params[4].keys() == reference["params"][4].keys()
    for name, value in reference["params"][4].items():
        _close(params[4][name], value, f"resumed on one process, step 4 {name}")
    _assert_rows(rows, reference["rows"], [3, 4], "resumed on one process")


def _assert_single_process_state(
    weights: dict[str, torch.Tensor], optim: dict[str, Any], want_weights: dict, want_optim: dict
) -> None:
    """A gathered checkpoint's weights and optimizer state equal the single-process run's."""
    assert weights.keys() == want_weights.keys()
    for name, value in want_weights.items():
        _close(weights[name], value, f"checkpoint {name}")
    assert optim["param_groups"] == want_optim["param_groups"]
    assert optim["state"].keys() == want_optim["state"].keys()
    for i, entry in want_optim["state"].items():
        assert optim["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            # to the tensor's scale: the experts' exp_avg_sq is ~1e-9, under TOL
            scale = float(value.abs().max())
            torch.testing.assert_close(
                optim["state"][i][key], value, rtol=0, atol=TOL * scale, msg=f"state {i} {key}"
            )


def test_a_single_process_checkpoint_loads_each_rank_s_experts_under_expert_parallel(
    sc: ModuleType, job: list[dict], reference: dict
) -> None:
    """A single-process run's step-2 checkpoint, loaded by 2 ranks (``load_state``): each
    holds its experts' rows of the weights and of AdamW's moments, the rest whole."""
    path = job[0]["out"] / "from-one" / CHECKPOINT_DIR / step_dir_name(2)
    whole, optim, _ = read_training_checkpoint(path)
    want_optim = _single_process_by_name(sc, optim)
    for rank in range(2):
        loaded = job[rank]["checkpoints"]["loaded"]
        assert loaded["params"].keys() == reference["params"][2].keys()
        for name, value in loaded["params"].items():
            assert torch.equal(value, _mine(name, whole[name], rank)), (rank, name)
        assert loaded["params"][EXPERTS + "down_proj"].shape[0] == 2
        assert loaded["optimizer"].keys() == want_optim.keys()
        for name, entry in want_optim.items():
            assert loaded["optimizer"][name].keys() == entry.keys()
            for key, value in entry.items():
                mine = _mine(name, value, rank)
                assert torch.equal(loaded["optimizer"][name][key], mine), (rank, name, key)


def test_a_single_process_checkpoint_resumes_under_expert_parallel(
    job: list[dict], reference: dict
) -> None:
    """The same checkpoint resumed by the Trainer on 2 ranks reaches the uninterrupted
    single-process run's parameters and losses at step 4."""
    for rank in range(2):
        got = job[rank]["checkpoints"]
        assert "resume_error" not in got, got["resume_error"]
        for name, value in reference["params"][4].items():
            value = _mine(name, value, rank)
            _close(got["params"][name], value, f"rank {rank} resumed, step 4 {name}")
        _assert_rows(got["rows"], reference["rows"], [3, 4], f"rank {rank} resumed")


def _single_process_by_name(sc: ModuleType, state: dict[str, Any]) -> dict[str, dict]:
    """A single-process optimizer state dict keyed by parameter name (the positions are
    those of the optimizer the trainer builds for a plain model)."""
    model = sc.make_model()
    optimizer = build_optimizer(model, sc.trainer_config(Path("unused")))
    return _by_name(model, optimizer, state)


def test_an_expert_parallel_sharded_checkpoint_holds_whole_experts_and_resumes_on_one_process(
    sc: ModuleType, job: list[dict], reference: dict, tmp_path: Path
) -> None:
    """2 ranks (2 of the 4 experts each) write step 2 of 4 as a sharded checkpoint: each
    expert weight and AdamW moment is stored once with the layer's whole shape, the weights
    are the single-process run's at step 2, and one process continues it to the
    uninterrupted run's step 4 (losses and parameters)."""
    import torch.distributed.checkpoint as dcp

    written = job[0]["out"] / "ep-sharded"
    root = written / CHECKPOINT_DIR
    path = latest_checkpoint(root)
    assert path is not None and path.name == step_dir_name(2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", step_dir_name(2)]  # no debris
    metadata = dcp.FileSystemReader(path / "sharded").read_metadata().state_dict_metadata
    for key in ("model.", "optimizer.state."):
        for suffix in ("gate_up_proj", "down_proj"):
            name = key + EXPERTS + suffix
            for full in [name] if key == "model." else [f"{name}.exp_avg", f"{name}.exp_avg_sq"]:
                entry = metadata[full]
                assert entry.size[0] == 4, (full, entry.size)  # all 4 experts, not a rank's 2
                # one chunk per rank: rows [0, 2) and [2, 4)
                assert sorted(c.offsets[0] for c in entry.chunks) == [0, 2], full
    weights = read_full_weights(path, sc.make_model())
    want, _, _ = read_training_checkpoint(reference["checkpoints"] / step_dir_name(2))
    assert weights.keys() == want.keys()
    for name, value in want.items():
        _close(weights[name], value, f"sharded checkpoint {name}")

    run = tmp_path / "run"
    shutil.copytree(written, run)
    params, rows = _recorded_fit(sc, run, resume=True, sharded=True)
    assert sorted(params) == [3, 4]
    for name, value in reference["params"][4].items():
        _close(params[4][name], value, f"resumed on one process, step 4 {name}")
    _assert_rows(rows, reference["rows"], [3, 4], "resumed on one process")


def test_a_single_process_sharded_checkpoint_resumes_under_expert_parallel(
    job: list[dict], reference: dict
) -> None:
    """A single-process run's sharded step-2 checkpoint, resumed by the Trainer on 2 ranks
    (each reading its experts' rows of the weights and moments), reaches the uninterrupted
    run's parameters and losses at step 4."""
    for rank in range(2):
        got = job[rank]["sharded"]
        for name, value in reference["params"][4].items():
            value = _mine(name, value, rank)
            _close(got["params"][name], value, f"rank {rank} resumed sharded, step 4 {name}")
        _assert_rows(got["rows"], reference["rows"], [3, 4], f"rank {rank} resumed sharded")


def test_fsdp_with_expert_parallel_trains_the_single_process_parameters(
    job: list[dict], reference: dict
) -> None:
    """FSDP2 shards the dense parameters over both ranks, each holding 2 of the 4 experts
    whole: every parameter after steps 1 and 4 (2 micro-batches each, clipping active),
    the loss and the gradient norm equal the single-process run's."""
    want = reference["params"]
    for rank in range(2):
        got = job[rank]["fsdp"]
        for step in (1, 4):
            assert got["params"][step].keys() == want[step].keys()
            for name, value in want[step].items():
                value = _mine(name, value, rank)
                _close(got["params"][step][name], value, f"rank {rank} step {step} {name}")
        _assert_rows(got["rows"], reference["rows"], [1, 2, 3, 4], f"fsdp rank {rank}")


def test_fsdp_expert_parallel_checkpoints_are_the_single_process_ones_and_resume_on_one_process(
    sc: ModuleType, job: list[dict], reference: dict, tmp_path: Path
) -> None:
    """Its gathered step-2 checkpoint holds the single-process run's weights and optimizer
    state; its sharded one, continued by one process, reaches the uninterrupted step 4."""
    out = job[0]["out"]
    path = out / "fsdp-gathered" / CHECKPOINT_DIR / step_dir_name(2)
    weights, optim, _ = read_training_checkpoint(path)
    want_weights, want_optim, _ = read_training_checkpoint(
        reference["checkpoints"] / step_dir_name(2)
    )
    _assert_single_process_state(weights, optim, want_weights, want_optim)

    shutil.copytree(out / "fsdp-sharded", tmp_path / "run")
    params, rows = _recorded_fit(sc, tmp_path / "run", resume=True, sharded=True)
    assert sorted(params) == [3, 4]
    for name, value in reference["params"][4].items():
        _close(params[4][name], value, f"resumed on one process, step 4 {name}")
    _assert_rows(rows, reference["rows"], [3, 4], "fsdp sharded, resumed on one process")


@pytest.mark.parametrize("run", ["fsdp-from-one", "fsdp-from-one-sharded"])
def test_single_process_checkpoints_resume_under_fsdp_with_expert_parallel(
    job: list[dict], reference: dict, run: str
) -> None:
    for rank in range(2):
        got = job[rank]["fsdp"][run]
        for name, value in reference["params"][4].items():
            value = _mine(name, value, rank)
            _close(got["params"][name], value, f"{run} rank {rank} step 4 {name}")
        _assert_rows(got["rows"], reference["rows"], [3, 4], f"{run} rank {rank}")


def test_expert_parallel_needs_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"expert_parallel=2 .*no default process group"):
        parallelize(make_moe(CASES["dropless"]), ParallelConfig(expert_parallel=2))
    with pytest.raises(ValueError, match=r"expert_parallel=0 .*an int >= 1"):
        ParallelConfig(expert_parallel=0)
