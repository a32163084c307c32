"""MoE layer forward + backward throughput against HF transformers' Mixtral sparse-MoE block.

Config: dim 512, 8 experts, top-2, expert hidden 1408, 4096 tokens (8 x 512), fp32 on CPU,
2 threads. Both modules hold the same weights (transformers v5 stores Mixtral experts stacked
exactly like vats, so it is a plain copy) and their outputs are checked to agree before
anything is timed. HF's block built on its own (no PreTrainedModel around it) runs its
``eager`` experts loop; inside a PreTrainedModel, transformers 5 picks its ``grouped_mm``
experts implementation where it can, so that figure is printed too.
Goal: ours >= 1.5x HF's block.

Run: ``uv run python tests/benchmarks/bench_moe.py``
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import banner, fmt_bytes, kernel_floor, peak_cpu_memory, print_floor, time_alternating

from vats_core.moe import MoE, MoEConfig

DIM, HIDDEN, EXPERTS, TOP_K = 512, 1408, 8, 2
BATCH, SEQ = 8, 512  # 4096 tokens


def build_pair(grouped_mm: str) -> tuple[MoE, torch.nn.Module, object]:
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoE(
        MoEConfig(dim=DIM, hidden_dim=HIDDEN, n_experts=EXPERTS, top_k=TOP_K, grouped_mm=grouped_mm)
    )
    hf_config = transformers.MixtralConfig(
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    hf_config._experts_implementation = "eager"  # what a standalone block runs by default
    hf = MixtralSparseMoeBlock(hf_config)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
    return ours, hf, hf_config


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor, ours: bool) -> Callable:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        y = out[0] if ours else out
        y.backward(cot)

    return step


def main() -> None:
    import transformers

    banner("MoE forward + backward: vats MoE vs HF MixtralSparseMoeBlock", threads=2)
    print(f"transformers {transformers.__version__}")
    print(
        f"config: dim {DIM}, {EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}, "
        f"{BATCH * SEQ} tokens, float32"
    )
    ours, hf, hf_config = build_pair("auto")
    ours_grouped, _, _ = build_pair("on")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=gen, requires_grad=True)
    cot = torch.randn(BATCH, SEQ, DIM, generator=gen)

    with torch.no_grad():
        y_ours, y_hf = ours(x)[0], hf(x)
        rel = ((y_ours - y_hf).norm() / y_hf.norm()).item()
    print(f"outputs agree: relative error {rel:.2e} (limit 1e-4)")
    assert rel < 1e-4, "outputs differ: the comparison would not be fair"
    grouped = ours._use_grouped_mm(x)
    print(f"ours runs the experts with: {'grouped_mm' if grouped else 'a loop of matmuls'}")

    def hf_grouped() -> None:
        hf_config._experts_implementation = "grouped_mm"
        try:
            fwd_bwd(hf, x, cot, ours=False)()
        finally:
            hf_config._experts_implementation = "eager"

    fns = {
        "hf": fwd_bwd(hf, x, cot, ours=False),
        "ours": fwd_bwd(ours, x, cot, ours=True),
        "ours_grouped_mm": fwd_bwd(ours_grouped, x, cot, ours=True),
        "hf_grouped_mm": hf_grouped,
    }
    seconds = time_alternating(fns, repeat=7, warmup=1)
    peaks = {name: peak_cpu_memory(fn) for name, fn in fns.items()}
    n_tokens = BATCH * SEQ
    labels = {
        "hf": "HF Mixtral block (eager, default)",
        "ours": "vats MoE (auto)",
        "ours_grouped_mm": "vats MoE (grouped_mm=on)",
        "hf_grouped_mm": "HF Mixtral block (grouped_mm)",
    }
    for name, label in labels.items():
        s = seconds[name]
        print(
            f"{label:36s} {n_tokens / s:10.0f} tokens/s  ({s * 1e3:7.1f} ms/step)  "
            f"peak {fmt_bytes(peaks[name])}"
        )
    print(f"ratio ours / HF default: {seconds['hf'] / seconds['ours']:.2f}x (goal >= 1.5x)")
    print(f"ratio ours / HF grouped_mm: {seconds['hf_grouped_mm'] / seconds['ours']:.2f}x")
    floors = {"hf": kernel_floor(fns["hf"]), "vats": kernel_floor(fns["ours"])}
    print_floor("hf", {"hf": seconds["hf"], "vats": seconds["ours"]}, floors)


if __name__ == "__main__":
    main()
