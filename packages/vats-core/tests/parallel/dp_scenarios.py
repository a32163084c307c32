"""Data-parallel scenarios run by ``test_data_parallel.py``: a tiny transformer, its data,
and what one rank of a 2-rank gloo job does.

Run as a script on every rank (the test starts two, with the environment torchrun would
set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), it initializes the process group, trains
with DDP and FSDP2 through the vats Trainer and saves what each rank saw to
``<out>/results-rank<r>.pt``. The test imports the same model, data and loss to train the
single-process reference in its own process.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vats_core import AttentionConfig, BlockConfig, MLPConfig, MoEConfig, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config
from vats_core.training import NonFiniteLossError, Trainer, TrainerConfig

DIM, TOKENS, ROWS = 16, 4, 8  # D, T, B (B global rows per micro-batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyConfig(Config):
    dim: int = DIM  # D; another value makes a model whose checkpoints do not fit


class TinyTransformer(PretrainedMixin, nn.Module):
    """(B, T, D) features -> (B, T, 1): a dense block and a MoE block in ``layers``."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        attention = AttentionConfig(dim=dim, n_heads=4, n_kv_heads=2, causal=True)
        self.proj_in = nn.Linear(DIM, dim)
        self.layers = nn.ModuleList(
            [
                TransformerBlock(
                    BlockConfig(attention=attention, mlp=MLPConfig(dim=dim, hidden_dim=32))
                ),
                TransformerBlock(
                    BlockConfig(
                        attention=attention,
                        moe=MoEConfig(dim=dim, hidden_dim=8, n_experts=4, top_k=2),
                    )
                ),
            ]
        )
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for layer in self.layers:
            h, _ = layer(h)
        return self.head(h)


def make_model(dim: int = DIM) -> TinyTransformer:
    torch.manual_seed(0)  # every rank and the reference start from the same weights
    return TinyTransformer(TinyConfig(dim=dim))


def batch_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
    """The global micro-batch: a function of the position only, the same on every rank."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(ROWS, TOKENS, DIM, generator=g)
    y = x.sum(-1, keepdim=True).tanh()
    return {"x": x, "y": y}


SEEN: list[torch.Tensor] = []  # the first feature of every row this process trained on


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    SEEN.append(batch["x"][:, 0, 0].clone())
    pred = model(batch["x"])
    return F.mse_loss(pred, batch["y"]), {"pred_mean": pred.mean()}


def trainer_config(out_dir: Path, **overrides: Any) -> TrainerConfig:
    fields: dict[str, Any] = dict(
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        grad_accum_steps=2,
        grad_clip=0.5,  # active: the norm of the first steps is above it
        log_every=1,
        out_dir=str(out_dir),
        progress=False,
    )
    return TrainerConfig(**(fields | overrides))


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value on CPU (FSDP's shards gathered: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().cpu().clone()
    return out


# what the job trains: name -> ParallelConfig fields
RUNS = {
    "ddp": {"data_parallel": "ddp"},
    "fsdp": {"data_parallel": "fsdp"},
    "fsdp+ac": {"data_parallel": "fsdp", "activation_checkpointing": True},
}


def _train(name: str, out_dir: Path) -> dict[str, Any]:
    from vats_core.parallel import ParallelConfig, parallelize

    model = parallelize(make_model(), ParallelConfig(**RUNS[name]))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step: int, module: nn.Module) -> None:
        seen[step] = full_params(module)

    trainer = Trainer(
        model, trainer_config(out_dir), data=batch_fn, loss_fn=loss_fn, on_step=on_step
    )
    rows = trainer.fit()
    return {"params": seen, "rows": rows, "module_is_model": trainer.module is model}


# the checkpoint scenarios: name -> (data_parallel, sharded_checkpoints)
CHECKPOINTS = {
    "ddp": ("ddp", False),
    "fsdp": ("fsdp", False),
    "ddp-sharded": ("ddp", True),
    "fsdp-sharded": ("fsdp", True),
}


def checkpoint_config(name: str, out_dir: Path) -> TrainerConfig:
    return trainer_config(out_dir, checkpoint_every=2, sharded_checkpoints=CHECKPOINTS[name][1])


def _resume(name: str, out_dir: Path) -> dict[str, Any]:
    """Continue a run checkpointed at step 2 (by 1 or 2 ranks) to step 4."""
    from vats_core.parallel import ParallelConfig, parallelize

    model = parallelize(make_model(), ParallelConfig(data_parallel=CHECKPOINTS[name][0]))
    trainer = Trainer(model, checkpoint_config(name, out_dir), data=batch_fn, loss_fn=loss_fn)
    rows = trainer.fit(resume=True)
    return {"params": full_params(trainer.module), "rows": rows}


def _checkpoint(name: str, out_dir: Path) -> None:
    """Train 2 of 4 steps and checkpoint (the test resumes it on one process)."""
    from vats_core.parallel import ParallelConfig, parallelize

    model = parallelize(make_model(), ParallelConfig(data_parallel=CHECKPOINTS[name][0]))
    config = checkpoint_config(name, out_dir)
    Trainer(model, config, data=batch_fn, loss_fn=loss_fn).fit(stop_after=2)


def _errors(out_dir: Path) -> dict[str, str]:
    from vats_core.parallel import ParallelConfig, parallelize

    errors = {}
    try:
        Trainer(make_model(), trainer_config(out_dir), data=batch_fn, loss_fn=loss_fn)
    except ValueError as e:
        errors["plain_model"] = str(e)

    def odd_rows(step: int, micro: int) -> dict[str, torch.Tensor]:
        batch = batch_fn(step, micro)
        return {k: v[:3] for k, v in batch.items()}  # 3 rows cannot be split over 2 ranks

    model = parallelize(make_model(), ParallelConfig(data_parallel="ddp"))
    trainer = Trainer(model, trainer_config(out_dir / "odd"), data=odd_rows, loss_fn=loss_fn)
    try:
        trainer.fit()
    except ValueError as e:
        errors["odd_rows"] = str(e)

    calls = [0]

    def nan_on_rank_one_at_step_three(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics = loss_fn(model, batch)
        calls[0] += 1  # 2 micro-batches per step: call 5 is step 3's first
        if calls[0] == 5 and rank == 1:
            loss = loss * float("nan")
        return loss, metrics

    rank = torch.distributed.get_rank()
    model = parallelize(make_model(), ParallelConfig(data_parallel="fsdp"))
    config = trainer_config(out_dir / "nan", checkpoint_every=1, sharded_checkpoints=True)
    trainer = Trainer(model, config, data=batch_fn, loss_fn=nan_on_rank_one_at_step_three)
    try:
        trainer.fit()  # every rank must stop, none may wait for the others forever
    except NonFiniteLossError as e:
        errors[f"nan_rank{rank}"] = f"step {e.step}: {e}"
    return errors


def killed_run(out_dir: Path) -> None:
    """FSDP, a sharded checkpoint every step; rank 0 is killed with SIGKILL in the middle of
    the step-3 checkpoint: every rank's shards and DCP's metadata are on disk, the trainer
    state and the rename into place are not."""
    from vats_core.parallel import ParallelConfig, parallelize
    from vats_core.training import trainer as trainer_module

    finish = trainer_module.finish_checkpoint

    def die_at_step_three(root: Path, step: int, *args: Any) -> Path:
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return finish(root, step, *args)

    trainer_module.finish_checkpoint = die_at_step_three  # this process only (rank 0 calls it)
    model = parallelize(make_model(), ParallelConfig(data_parallel="fsdp"))
    config = trainer_config(out_dir, checkpoint_every=1, sharded_checkpoints=True)
    Trainer(model, config, data=batch_fn, loss_fn=loss_fn).fit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, port: int) -> None:
    """The environment torchrun gives its workers (init_process_group reads it)."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def start_ranks(target: Any, *args: Any) -> list[Any]:
    """Two ranks forked from this process, ``target(rank, port, *args)`` in each. The
    parent has imported torch, FSDP and DCP already: the ranks start in a second instead
    of paying ~25 s of imports each on a loaded 2-core machine."""
    importlib.import_module("torch.distributed.fsdp")  # imported once, here, for both ranks
    importlib.import_module("torch.distributed.checkpoint")

    port = free_port()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
            p.join()
    return procs


def main(out: Path, resume_from_one: Path) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        results: dict[str, Any] = {"world_size": torch.distributed.get_world_size()}
        for name in RUNS:
            SEEN.clear()
            results[name] = _train(name, out / name)
            torch.save(SEEN, out / f"{name}-rows-rank{rank}.pt")  # every rank's own
        for name in CHECKPOINTS:
            _checkpoint(name, out / f"{name}-checkpoint")
            # a single-process run's step-2 checkpoint (written by the test), continued here
            results[f"{name}-resumed"] = _resume(name, resume_from_one / name)
        results["errors"] = _errors(out / "errors")
        torch.save(results, out / f"results-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def launched_fsdp(backend: str, out: Path) -> None:
    """One rank of a job torchrun starts (the 2-GPU check, over NCCL, each rank on
    cuda:LOCAL_RANK; gloo runs it on CPU): FSDP2 through the Trainer for 4 steps; rank 0
    saves the full parameters and the logged rows to ``<out>/launched.pt``."""
    from vats_core.parallel import ParallelConfig, parallelize

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend)
    try:
        model = parallelize(make_model().to(device), ParallelConfig(data_parallel="fsdp"))
        trainer = Trainer(model, trainer_config(out / "run"), data=batch_fn, loss_fn=loss_fn)
        rows = trainer.fit()
        params = full_params(trainer.module)  # every rank gathers
        if torch.distributed.get_rank() == 0:
            torch.save({"params": params, "rows": rows}, out / "launched.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "launched":  # dp_scenarios.py launched <backend> <out>
        launched_fsdp(sys.argv[2], Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
