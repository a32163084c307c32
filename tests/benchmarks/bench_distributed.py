"""LM training throughput on 1 and 2 ranks (gloo), the communication share of a step, and
what the figures would be per GPU, on paper.

Config: the demo LM (``vats_text.presets.small``: 4.7 M parameters, 4 layers, 4 experts
top-2), global batch 16 x 128 tokens, AdamW, fp32 on CPU, trained by the vats-core Trainer
on synthetic token rows (a function of the step: every run sees the same batches).

Contenders, each for the same global batches (the trainer splits them over the ranks):

* 1 rank x 1 thread and 1 rank x 2 threads: the plain trainer;
* 2 ranks x 1 thread, DDP and FSDP2 (``vats_core.parallel.parallelize``), ranks forked
  from this process as the tests do, on gloo over loopback TCP.

Tokens/s is the median of the trainer's per-step figure after the warm-up steps (it counts
the global batch). The communication share is measured apart: on the 2 ranks, with nothing
else running, the collectives a step issues for this model's gradient sizes (DDP: one
all-reduce of every gradient; FSDP: per block and for the root, an all-gather of its
parameters for the forward and again for the backward, the last block's once, and a
reduce-scatter of its gradients), timed alone, as a share of the measured step.

What this machine limits: 2 cores, so 2 ranks of 1 thread have no more compute than 1 rank
of 2 threads; data parallelism can only add communication here. The 2-rank figures are
printed as a ratio to the best 1-rank figure, which is their ceiling on these cores (above
1x only where one process leaves a core idle: a 2-thread process waits on its second
thread when the other core is busy); the paper paragraph then puts the measured work and
message sizes on a GPU.

Run: ``uv run python tests/benchmarks/bench_distributed.py`` (about 1-2 minutes on 2 cores),
``--steps N`` to time more steps.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import banner, fmt_bytes, lm_flops_per_token

from vats_core.parallel import ParallelConfig, parallelize, transformer_blocks
from vats_core.training import Trainer, TrainerConfig
from vats_text.data import count_tokens, lm_loss_fn
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset

VOCAB, SEQ, BATCH = 4096, 128, 16  # global batch: BATCH rows of SEQ tokens
WARMUP = 2  # steps not timed (first-call allocations, gloo connection set-up)
# On paper: an H100 SXM (bf16 dense peak, NVLink 4 bandwidth per direction) at a plausible
# MFU for a model this size; stated so the reader can redo the arithmetic.
GPU_PEAK_FLOPS, GPU_LINK_BYTES_S, GPU_MFU = 989e12, 450e9, 0.4


def build() -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(lm_preset("small", vocab_size=VOCAB))


def batch_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def train(kind: str | None, steps: int, out: Path) -> float:
    """Median tokens/s (global) of the timed steps; ``kind`` None: the plain trainer."""
    model = build()
    if kind is not None:
        model = parallelize(model, ParallelConfig(data_parallel=kind))
    config = TrainerConfig(
        max_steps=WARMUP + steps, lr=1e-3, warmup_steps=1, log_every=1, progress=False,
        out_dir=str(out),
    )  # fmt: skip
    trainer = Trainer(
        model, config, data=batch_fn, loss_fn=lm_loss_fn, items_fn=count_tokens, items_name="tokens"
    )
    rows = trainer.fit()
    return statistics.median(r["throughput"] for r in rows[WARMUP:])


def _timed(fn: Any, repeat: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def unit_sizes(model: torch.nn.Module) -> list[int]:
    """Parameter elements of each FSDP unit: every transformer block, then the root (what
    is left: embeddings, final norm)."""
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    return [sum(p.numel() for p in b.parameters()) for b in blocks] + [root]


def comm_seconds() -> dict[str, float]:
    """The collectives of one step of each kind, timed alone on this rank's group."""
    world = dist.get_world_size()
    units = unit_sizes(build())
    grads = torch.zeros(sum(units))
    ddp = _timed(lambda: dist.all_reduce(grads))

    def fsdp_step() -> None:
        for i, n in enumerate(units):
            shard = -(-n // world)  # FSDP pads each unit to a multiple of the world
            full, part = torch.zeros(shard * world), torch.zeros(shard)
            gathers = 1 if i == len(units) - 2 else 2  # the last block stays gathered
            for _ in range(gathers):
                dist.all_gather_into_tensor(full, part)
            dist.reduce_scatter_tensor(part, full)

    return {"ddp": ddp, "fsdp": _timed(fsdp_step)}


def _rank(rank: int, port: int, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo")
    try:
        result = {kind: train(kind, steps, out / f"{kind}-{rank}") for kind in ("ddp", "fsdp")}
        result["comm"] = comm_seconds()
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_ranks(steps: int, out: Path) -> dict[str, Any]:
    importlib.import_module("torch.distributed.fsdp")  # imported once, before the fork

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(r, port, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"FAILED: a rank exited with {[p.exitcode for p in procs]}")
    return torch.load(out / "rank0.pt")


def paper(model: MoELanguageModel, one: float, comm: dict[str, float], step_2: dict) -> None:
    total = model.num_parameters()
    per_token = lm_flops_per_token(model.config, SEQ)
    cpu_rate = per_token * one
    tokens = BATCH * SEQ
    print(
        f"\nOn paper, per GPU. A step's work is {per_token / 1e6:.1f} MFLOP per token "
        f"({per_token * tokens / 1e9:.1f} GFLOP per global batch of {tokens} tokens); one rank "
        f"of this CPU did it at {cpu_rate / 1e9:.1f} GFLOP/s. Its messages: the fp32 "
        f"gradients are {fmt_bytes(4 * total)} ({total / 1e6:.2f} M parameters), which "
        f"a ring all-reduce (DDP) sends 2(W-1)/W times per rank and FSDP moves 3(W-1)/W "
        f"times (two all-gathers and a reduce-scatter). Here gloo on loopback took "
        f"{comm['ddp'] * 1e3:.1f} ms (DDP) and {comm['fsdp'] * 1e3:.1f} ms (FSDP) for them, "
        f"{comm['ddp'] / step_2['ddp'] * 100:.0f} % and {comm['fsdp'] / step_2['fsdp'] * 100:.0f} "
        "% of the 2-rank steps."
    )
    for world in (2, 8):
        rows = tokens // world
        compute = per_token * rows / (GPU_PEAK_FLOPS * GPU_MFU)
        ddp = 2 * (world - 1) / world * 4 * total / GPU_LINK_BYTES_S
        fsdp = 3 * (world - 1) / world * 4 * total / GPU_LINK_BYTES_S
        print(
            f"  {world} H100s (989 TFLOP/s bf16 at {GPU_MFU:.0%} MFU, NVLink 450 GB/s): "
            f"compute {compute * 1e6:.1f} us per step per GPU, DDP all-reduce "
            f"{ddp * 1e6:.1f} us, FSDP {fsdp * 1e6:.1f} us; that is "
            f"{rows / max(compute, ddp) / 1e6:.1f} M tokens/s per GPU with DDP overlapping "
            f"communication ({rows / (compute + ddp) / 1e6:.1f} M without)."
        )
    print(
        "  Both are microseconds: at 4.7 M parameters a GPU step is bound by kernel launches "
        "(hundreds of ~5 us launches per step) and NCCL latency (~10-20 us per collective), "
        "not by FLOPs or bytes, so the figures above are upper bounds; the arithmetic holds "
        "as written for models large enough that compute and messages dominate (MFU and "
        "bandwidth then set tokens/s), which is what bench_gpu.py measures on a real device."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contender")
    args = parser.parse_args()
    banner("LM training on 1 and 2 ranks (gloo)", threads=None)
    model = build()
    print(
        f"model: vats_text small, {model.num_parameters() / 1e6:.2f} M parameters; global batch "
        f"{BATCH} x {SEQ} tokens; {WARMUP} warm-up + {args.steps} timed steps per contender"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one[threads] = train(None, args.steps, out / f"one-{threads}")
        two = two_ranks(args.steps, out)
    best = max(one.values())  # what the 2 cores do for one process: 2 ranks cannot add compute
    print("tokens/s (global batch, median step):")
    print(f"  1 rank  x 1 thread   {one[1]:9.0f}")
    print(f"  1 rank  x 2 threads  {one[2]:9.0f}")
    for kind in ("ddp", "fsdp"):
        print(
            f"  2 ranks x 1 thread   {two[kind]:9.0f}   {kind}: {two[kind] / best:.2f}x the best "
            "1-rank figure (the ceiling on 2 cores is about 1x, more only where one process "
            "leaves a core idle)"
        )
    step_2 = {kind: BATCH * SEQ / two[kind] for kind in ("ddp", "fsdp")}
    print("communication share of a 2-rank step (collectives timed alone):")
    for kind in ("ddp", "fsdp"):
        share = two["comm"][kind] / step_2[kind]
        print(
            f"  {kind:4s} {two['comm'][kind] * 1e3:7.1f} ms of a {step_2[kind] * 1e3:7.1f} ms "
            f"step: {share:.0%}"
        )
    paper(model, best, two["comm"], step_2)


if __name__ == "__main__":
    main()
