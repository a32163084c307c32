"""The trainer on 2 CPU ranks over gloo (DDP and FSDP2) equals single-process training on
the same global batch, resumes across world sizes, and refuses what would silently differ.

One 2-rank job (``dp_scenarios.py``, with the environment torchrun gives its workers)
runs every scenario, so the ranks start once; each test checks one property of its
results against the single-process reference trained here.
"""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vats_core.parallel.sharded import export_pretrained
from vats_core.training import Trainer, iter_metrics

CHECKPOINTS = ("ddp", "fsdp", "ddp-sharded", "fsdp-sharded")  # dp_scenarios.CHECKPOINTS
RUNS = ("ddp", "fsdp", "fsdp+ac")  # training scenarios (dp_scenarios.RUNS)
TOL = 1e-5


def _single_process(
    sc: ModuleType, out_dir: Path, **overrides: Any
) -> tuple[Trainer, dict, list[dict]]:
    """The reference: the same model, data and config on one process."""
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step: int, module: torch.nn.Module) -> None:
        seen[step] = sc.full_params(module)

    trainer = Trainer(
        sc.make_model(),
        sc.trainer_config(out_dir, **overrides),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=on_step,
    )
    rows = trainer.fit()
    return trainer, seen, rows


def _rank_main(rank: int, port: int, sc: ModuleType, out: Path, resume_from_one: Path) -> None:
    """One rank of the job."""
    sc.rank_env(rank, port)
    try:
        sc.main(out, resume_from_one)
    except BaseException:
        (out / f"rank{rank}.log").write_text(traceback.format_exc())
        raise


def _killed_rank_main(rank: int, port: int, sc: ModuleType, out: Path) -> None:
    sc.rank_env(rank, port)
    # a short collective timeout: rank 0 must give up on its dead peer soon
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    try:
        sc.killed_run(out)
    finally:
        torch.distributed.destroy_process_group()


def test_rank_zero_killed_mid_checkpoint_leaves_the_last_complete_one_to_resume_from(
    sc: ModuleType, reference: dict, tmp_path: Path
) -> None:
    procs = sc.start_ranks(_killed_rank_main, sc, tmp_path)
    assert procs[0].exitcode == -signal.SIGKILL
    assert procs[1].exitcode not in (0, None)  # it gave up on its peer: no hang, no success
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000003").exists()
    # the write it interrupted: both ranks' shards and the metadata, never renamed into place
    assert (root / ".tmp-step_00000003" / "sharded" / ".metadata").is_file()
    # a restart (here on one process) resumes from step 2 and reaches the uninterrupted run
    trainer = Trainer(
        sc.make_model(),
        sc.trainer_config(tmp_path, checkpoint_every=1, sharded_checkpoints=True),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
    )
    rows = trainer.fit(resume=True)
    assert [r["step"] for r in rows] == [3, 4]
    _assert_params_close(sc.full_params(trainer.model), reference["params"][4], "killed")
    assert not (root / ".tmp-step_00000003").exists()  # the debris went with the new write


@pytest.fixture(scope="module")
def job(sc: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the 2-rank job once; its rank-0 results and where it wrote."""
    out = tmp_path_factory.mktemp("dp")
    resume_from_one = out / "from-one"
    for name in CHECKPOINTS:  # a single-process run stopped at step 2, for the ranks to resume
        config = sc.checkpoint_config(name, resume_from_one / name)
        Trainer(sc.make_model(), config, data=sc.batch_fn, loss_fn=sc.loss_fn).fit(stop_after=2)
    procs = sc.start_ranks(_rank_main, sc, out, resume_from_one)
    for rank, p in enumerate(procs):
        log = out / f"rank{rank}.log"
        assert p.exitcode == 0, f"rank {rank} failed:\n{log.read_text() if log.exists() else ''}"
    results = torch.load(out / "results-rank0.pt", weights_only=False)
    results["rank1"] = torch.load(out / "results-rank1.pt", weights_only=False)
    return {"out": out, "results": results, "from_one": resume_from_one}


@pytest.fixture(scope="module")
def reference(sc: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _, params, rows = _single_process(sc, tmp_path_factory.mktemp("single"))
    return {"params": params, "rows": rows}


def _assert_params_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOL, msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", RUNS)
def test_parameters_equal_single_process_after_one_and_four_steps(
    sc: ModuleType, job: dict, reference: dict, kind: str
) -> None:
    got = job["results"][kind]
    assert job["results"]["world_size"] == 2
    assert sorted(got["params"]) == [1, 2, 3, 4]
    for step in (1, 4):
        # training moved the weights: equality is not that of two untouched copies
        assert not torch.equal(
            reference["params"][step]["head.weight"], sc.make_model().head.weight
        )
        _assert_params_close(got["params"][step], reference["params"][step], f"{kind} step {step}")


@pytest.mark.parametrize("kind", RUNS)
def test_each_rank_trains_on_its_half_of_every_global_batch(
    sc: ModuleType, job: dict, kind: str
) -> None:
    ranks = [torch.load(job["out"] / f"{kind}-rows-rank{r}.pt") for r in range(2)]
    # 4 steps x 2 micro-batches, in order; rank r took rows [4r, 4r + 4) of each
    want = [sc.batch_fn(step, micro)["x"][:, 0, 0] for step in range(4) for micro in range(2)]
    assert [len(rows) for rows in ranks] == [len(want)] * 2
    for i, global_rows in enumerate(want):
        assert all(rows[i].shape == (sc.ROWS // 2,) for rows in ranks)
        torch.testing.assert_close(
            torch.cat([ranks[0][i], ranks[1][i]]), global_rows, rtol=0, atol=0
        )


@pytest.mark.parametrize("kind", RUNS)
def test_logged_loss_and_metrics_are_global_means(job: dict, reference: dict, kind: str) -> None:
    got, want = job["results"][kind]["rows"], reference["rows"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", "pred_mean", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (kind, g["step"], key)


@pytest.mark.parametrize("kind", RUNS)
def test_only_rank_zero_writes_metrics(job: dict, kind: str) -> None:
    rows = list(iter_metrics(job["out"] / kind / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # once each: rank 1 wrote none
    assert job["results"][kind]["module_is_model"] is (kind != "ddp")  # DDP's .module


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_two_rank_checkpoint_resumes_on_one_process(
    sc: ModuleType, job: dict, reference: dict, kind: str, tmp_path: Path
) -> None:
    """Stopped at step 2 on 2 ranks, continued to step 4 on one process: the same weights
    and losses as the uninterrupted single-process run."""
    run = job["out"] / f"{kind}-checkpoint"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainer = Trainer(
        sc.make_model(),
        sc.checkpoint_config(kind, run),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: seen.__setitem__(step, sc.full_params(m)),
    )
    rows = trainer.fit(resume=True)
    assert [r["step"] for r in rows] == [3, 4]
    _assert_params_close(seen[4], reference["params"][4], f"{kind} 2 -> 1")
    for g, w in zip(rows, reference["rows"][2:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_one_process_checkpoint_resumes_on_two_ranks(job: dict, reference: dict, kind: str) -> None:
    got = job["results"][f"{kind}-resumed"]
    assert [r["step"] for r in got["rows"]] == [3, 4]
    _assert_params_close(got["params"], reference["params"][4], f"{kind} 1 -> 2")
    for g, w in zip(got["rows"], reference["rows"][2:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6)


def test_plain_model_on_two_ranks_is_refused(job: dict) -> None:
    message = job["results"]["errors"]["plain_model"]
    assert "2 ranks" in message and "parallelize" in message


def test_rows_not_divisible_by_world_size_are_refused(job: dict) -> None:
    message = job["results"]["errors"]["odd_rows"]
    assert "3 rows" in message and "multiple of the world size" in message


def test_sharded_checkpoints_hold_each_ranks_shards_and_nothing_gathered(job: dict) -> None:
    for name, files in [
        ("fsdp-sharded", {"__0_0.distcp", "__1_0.distcp", ".metadata"}),
        ("ddp-sharded", {".metadata"}),  # replicated: DCP writes each tensor once
    ]:
        step = job["out"] / f"{name}-checkpoint" / "checkpoints" / "step_00000002"
        assert files <= {p.name for p in (step / "sharded").iterdir()}, name
        assert not (step / "model.safetensors").exists() and (step / "trainer_state.pt").is_file()
    gathered = job["out"] / "fsdp-checkpoint" / "checkpoints" / "step_00000002"
    assert {"model.safetensors", "config.json", "optimizer.pt"} <= {
        p.name for p in gathered.iterdir()
    }


@pytest.mark.parametrize("name", ["fsdp", "fsdp-sharded"])
def test_a_two_rank_checkpoint_exports_to_save_pretrained(
    sc: ModuleType, job: dict, reference: dict, name: str, tmp_path: Path
) -> None:
    step = job["out"] / f"{name}-checkpoint" / "checkpoints" / "step_00000002"
    export_pretrained(step, sc.make_model(), tmp_path / "export")
    loaded = sc.TinyTransformer.from_pretrained(tmp_path / "export")
    _assert_params_close(sc.full_params(loaded), reference["params"][2], f"{name} export")


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(job: dict) -> None:
    # rank 1 alone saw the NaN; the loss all-reduce carried it to rank 0
    assert job["results"]["errors"]["nan_rank0"].startswith("step 3: non-finite loss")
    assert job["results"]["rank1"]["errors"]["nan_rank1"].startswith("step 3: non-finite loss")
    root = job["out"] / "errors" / "nan" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"  # the last good step


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_fsdp_over_nccl_equals_the_single_gpu_trainer(
    sc: ModuleType, tmp_path: Path
) -> None:
    """FSDP2 over NCCL on 2 GPUs, launched by torchrun (CUDA cannot be forked), after 4
    steps: the parameters and losses of the plain trainer on one GPU."""
    script = Path(sc.__file__)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(script), "launched", "nccl", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = torch.load(tmp_path / "launched.pt", weights_only=False)
    torch.cuda.set_device(0)
    trainer = Trainer(
        sc.make_model().cuda(),
        sc.trainer_config(tmp_path / "one"),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
    )
    rows = trainer.fit()
    _assert_params_close(got["params"], sc.full_params(trainer.model), "2-GPU FSDP")
    for g, w in zip(got["rows"], rows, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6)
