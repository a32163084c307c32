"""MoE layer forward + backward throughput against HF transformers' Mixtral sparse-MoE block.

Config: dim 512, 8 experts, top-2, expert hidden 1408, 4096 tokens (8 x 512), fp32 on CPU,
2 threads. Every contender holds the same weights (transformers v5 stores Mixtral experts
stacked exactly like vats, so it is a plain copy) and its output is checked against HF's
eager block before anything is timed (the script exits non-zero otherwise).

Contenders, in one alternation:

* eager: vats ``MoE`` with ``grouped_mm="auto"`` (on CPU fp32 eager: one
  ``torch._grouped_mm`` per projection) and ``grouped_mm="off"`` (the loop of one matmul per
  expert); HF's block with its ``eager`` experts (its loop; what a block built on its own
  runs) and with ``grouped_mm`` (what transformers 5 picks inside a PreTrainedModel);
* compiled: ``torch.compile`` of the vats layer (on CPU the loop runs compiled: the CPU
  grouped_mm kernel does not trace) and of HF's ``grouped_mm`` block (under compile in
  fp32 its experts run a custom-op loop). Compiled before the alternation; compile time,
  graph count and graph breaks are printed.

Goal: vats (auto) >= 1.5x HF's default block. The other ratios are reported.

Run: ``uv run python tests/benchmarks/bench_moe.py`` (1-2 minutes on 2 cores), or with
``--quick`` (2 rounds).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    CompileWatch,
    banner,
    fmt_bytes,
    kernel_floor,
    peak_cpu_memory,
    print_floor,
    ratio,
    relative_error,
    require,
    time_alternating,
)

from vats_core.moe import COMPILE_SETTINGS, MoE, MoEConfig

DIM, HIDDEN, EXPERTS, TOP_K = 512, 1408, 8, 2
BATCH, SEQ = 8, 512  # 4096 tokens


def build_vats(grouped_mm: str) -> MoE:
    torch.manual_seed(0)  # every contender starts from these weights
    return MoE(
        MoEConfig(dim=DIM, hidden_dim=HIDDEN, n_experts=EXPERTS, top_k=TOP_K, grouped_mm=grouped_mm)
    )


def build_hf(experts_implementation: str, weights: MoE) -> torch.nn.Module:
    """HF's Mixtral block on its own, running ``experts_implementation``, holding ``weights``."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    config._experts_implementation = experts_implementation
    hf = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        hf.gate.weight.copy_(weights.router.weight)
        hf.experts.gate_up_proj.copy_(weights.experts.gate_up_proj)
        hf.experts.down_proj.copy_(weights.experts.down_proj)
    return hf


def fwd_bwd(module: Callable, x: torch.Tensor, cot: torch.Tensor, params) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out  # vats returns (y, router stats)
        y.backward(cot)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeat = 2 if args.quick else 7

    banner("MoE forward + backward: vats MoE vs HF MixtralSparseMoeBlock")
    print(
        f"config: dim {DIM}, {EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}, "
        f"{BATCH * SEQ} tokens, float32"
    )
    vats_auto, vats_loop = build_vats("auto"), build_vats("off")
    modules: dict[str, torch.nn.Module] = {
        "HF eager experts": build_hf("eager", vats_auto),
        "HF grouped_mm": build_hf("grouped_mm", vats_auto),
        "vats auto": vats_auto,
        "vats loop": vats_loop,
        "HF compiled": build_hf("grouped_mm", vats_auto),
        "vats compiled": build_vats("auto"),
    }
    callables: dict[str, Callable] = dict(modules)
    callables["HF compiled"] = torch.compile(modules["HF compiled"])
    compiled_vats = torch.compile(modules["vats compiled"])

    def vats_compiled(x: torch.Tensor):
        # as vats' trainer runs it: the expert groups trace as data-dependent sizes
        with torch._dynamo.config.patch(**COMPILE_SETTINGS):
            return compiled_vats(x)

    callables["vats compiled"] = vats_compiled

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=gen, requires_grad=True)
    cot = torch.randn(BATCH, SEQ, DIM, generator=gen)
    grouped = vats_auto._use_grouped_mm(x)
    print(f"vats auto runs the experts with: {'grouped_mm' if grouped else 'a loop of matmuls'}")

    fns = {
        name: fwd_bwd(callables[name], x, cot, list(modules[name].parameters())) for name in modules
    }
    notes: dict[str, str] = {}
    with torch.no_grad():
        want = modules["HF eager experts"](x)
    for name, fn in fns.items():
        watch = CompileWatch()
        t0 = time.perf_counter()
        with watch():
            fn()  # the compiled ones compile forward and backward here
        if watch.graphs:
            notes[name] = f"   (first call {time.perf_counter() - t0:.0f} s: {watch.summary()})"
        with torch.no_grad():
            out = callables[name](x)
        err = relative_error(out[0] if isinstance(out, tuple) else out, want)
        require(err < 1e-4, f"{name} output differs from HF eager's: relative error {err:.1e}")
    print("outputs of all six equal HF eager's (relative error < 1e-4)")

    watch = CompileWatch()
    with watch():
        seconds = time_alternating(fns, repeat=repeat, warmup=1)
    peaks = {name: peak_cpu_memory(fn) for name, fn in fns.items()}
    n_tokens = BATCH * SEQ
    print(
        f"forward + backward ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):"
    )
    for name, s in seconds.items():
        print(
            f"  {name:17s} {n_tokens / s:8.0f} tokens/s ({s * 1e3:6.1f} ms/step), "
            f"peak {fmt_bytes(peaks[name]):>10}{notes.get(name, '')}"
        )
    speed = {name: n_tokens / s for name, s in seconds.items()}
    ratio("vats auto / HF eager experts", speed["vats auto"] / speed["HF eager experts"], ">= 1.5x")
    ratio("vats auto / HF grouped_mm", speed["vats auto"] / speed["HF grouped_mm"])
    ratio("vats loop / HF eager experts", speed["vats loop"] / speed["HF eager experts"])
    ratio("vats compiled / HF compiled", speed["vats compiled"] / speed["HF compiled"])
    ratio("vats compiled / vats auto", speed["vats compiled"] / speed["vats auto"])
    floors = {"hf": kernel_floor(fns["HF eager experts"]), "vats": kernel_floor(fns["vats auto"])}
    print_floor("hf", {"hf": seconds["HF eager experts"], "vats": seconds["vats auto"]}, floors)


if __name__ == "__main__":
    main()
