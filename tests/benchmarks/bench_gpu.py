"""GPU figures: attention forward + backward TFLOP/s per backend, LM training tokens/s and
MFU, decode tokens/s. Run by ``make test-gpu``; without CUDA it says why and exits 0.

1. The device: name, compute capability, memory, the versions (torch, CUDA, cuDNN, triton,
   flash-attn, xformers) and its peak figures: the datasheet's dense bf16 TFLOP/s and
   memory bandwidth (a table by device name; "unknown" elsewhere), and what this device
   reaches on a large bf16 matmul and a large copy, measured here.
2. Attention (``vats_core.attention.attention``), bf16, causal, B·T = 16k tokens, 16 query
   heads and 4 KV heads of 128: forward + backward TFLOP/s for each backend (flash,
   xformers, sdpa, flex) at T = 1k, 2k, 4k, 8k, 16k, full causal and with a 1k sliding
   window. FLOPs count only the (query, key) pairs the mask keeps (FlashAttention's
   convention: forward 4·Dh per pair and head, backward 2.5x the forward), so a backend
   that computes masked-out blocks is not credited for them. A backend that is not
   installed or cannot serve the call prints its reason.
3. LM training: ``vats_text.presets.bench`` (Mixtral-shaped, 8 layers, 8 experts top-2),
   batch 8 x 2048 tokens, AdamW, bf16 autocast, eager and ``torch.compile``: tokens/s and
   MFU = achieved FLOP/s (6 per active weight + PaLM's attention term per token) / the
   datasheet peak.
4. Decode: the same model, batch 1 and 8, 256 new tokens after a 128-token prompt,
   greedy, with the compiled decode step (``generate(..., compile=True)``): tokens/s.

Sized to take a few minutes on an H100 or H200 (the flex and compiled contenders compile
first, untimed). ``--cpu-smoke`` runs every section at toy sizes on the CPU (for the test
that keeps this script working on machines without a GPU: eager only, flex and the
compiled contenders left out, as their CPU compiles take minutes); its figures mean nothing.

Run: ``uv run python tests/benchmarks/bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import lm_flops_per_token

from vats_core.attention import attention, backend_unavailable_reason
from vats_core.moe import COMPILE_SETTINGS
from vats_text.generation import generate
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset

# Datasheet dense bf16 tensor-core TFLOP/s and memory TB/s, by a substring of the name.
PEAKS = {
    "H200": (989.0, 4.8),
    "H100 SXM": (989.0, 3.35),
    "H100 80GB HBM3": (989.0, 3.35),  # how the SXM part names itself
    "H100 PCIe": (756.0, 2.0),
    "H100": (756.0, 2.0),  # other H100s: the PCIe figure, the lower one
    "A100": (312.0, 2.0),
    "L40S": (362.0, 0.86),
    "L4": (121.0, 0.3),
    "A10G": (70.0, 0.6),
}
BACKENDS = ("flash", "xformers", "sdpa", "flex")


@dataclass(frozen=True)
class Sizes:
    """Everything the sections size; the GPU run's, or toy ones for ``--cpu-smoke``."""

    device: str
    dtype: torch.dtype
    seqs: tuple[int, ...]
    tokens: int  # B·T of an attention call
    heads: tuple[int, int, int]  # Hq, Hkv, Dh
    window: int
    lm_preset: str
    lm_batch: tuple[int, int]  # rows, tokens per row
    lm_steps: int
    decode: tuple[tuple[int, ...], int, int]  # batch sizes, prompt, new tokens
    matmul: int
    repeat: int
    backends: tuple[str, ...]  # attention backends timed
    compile: bool  # also time the compiled training step; decode with the compiled step


GPU = Sizes(
    "cuda", torch.bfloat16, (1024, 2048, 4096, 8192, 16384), 16384, (16, 4, 128), 1024,
    "bench", (8, 2048), 10, ((1, 8), 128, 256), 8192, 10, BACKENDS, True,
)  # fmt: skip
SMOKE = Sizes(
    "cpu", torch.float32, (64, 128), 256, (4, 2, 16), 32,
    "tiny", (2, 64), 2, ((1, 2), 8, 4), 256, 1, ("flash", "sdpa"), False,
)  # fmt: skip


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call, synchronizing the device."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_banner(s: Sizes) -> float | None:
    """Print the device, versions and peaks; the datasheet bf16 FLOP/s (None: unknown)."""
    versions = (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}, triton {_version('triton')}, flash-attn "
        f"{_version('flash-attn')}, xformers {_version('xformers')}"
    )
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = props.name
        print(
            f"device: {name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} "
            f"GiB, {props.multi_processor_count} SMs, {torch.cuda.device_count()} visible"
        )
    else:
        name = "cpu (smoke run: toy sizes, the figures mean nothing)"
        print(f"device: {name}")
    print(f"versions: {versions}")
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    n = s.matmul
    a = torch.randn(n, n, device=s.device, dtype=s.dtype)
    matmul = 2 * n**3 / timed(lambda: a @ a, s.repeat)
    big = torch.empty(2**28 if s.device == "cuda" else 2**20, dtype=torch.uint8, device=s.device)
    copy = 2 * big.numel() / timed(lambda: big.clone(), s.repeat)  # read + write
    sheet = f"datasheet {peak[0]:.0f} TFLOP/s bf16 dense, {peak[1]} TB/s" if peak else "unknown"
    print(
        f"peaks: {sheet}; measured here {matmul / 1e12:.0f} TFLOP/s ({n}^3 matmul, "
        f"{s.dtype}), {copy / 1e12:.2f} TB/s (copy)"
    )
    return peak[0] * 1e12 if peak else None


def kept_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs a causal mask keeps, with an optional sliding window."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def attention_section(s: Sizes) -> None:
    hq, hkv, dh = s.heads
    print(f"\nattention forward + backward, TFLOP/s ({s.dtype}, causal, Hq {hq} Hkv {hkv} Dh {dh})")
    print(f"  {'T':>6s} {'window':>7s} " + " ".join(f"{b:>9s}" for b in s.backends))
    reasons: dict[str, str] = {}  # backend -> why it did not run (first reason seen)
    for seq in s.seqs:
        for window in (None, s.window):
            cells = [_attention_cell(s, name, seq, window, reasons) for name in s.backends]
            label = "-" if window is None else str(window)
            print(f"  {seq:>6d} {label:>7s} " + " ".join(f"{c:>9s}" for c in cells))
    for name, why in reasons.items():
        print(f"  {name}: - where it could not run: {why}")


def _attention_cell(
    s: Sizes, backend: str, seq: int, window: int | None, reasons: dict[str, str]
) -> str:
    """TFLOP/s of one backend's forward + backward at (seq, window), or "-" and why not."""
    hq, hkv, dh = s.heads
    batch = max(1, s.tokens // seq)
    q = torch.randn(batch, hq, seq, dh, device=s.device, dtype=s.dtype, requires_grad=True)
    k = torch.randn(batch, hkv, seq, dh, device=s.device, dtype=s.dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    why = backend_unavailable_reason(backend, q, k, v, causal=True, window=window)
    if why is not None:
        reasons.setdefault(backend, why)
        return "-"

    def step() -> None:
        out = attention(q, k, v, causal=True, window=window, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)

    forward = 4 * dh * hq * batch * kept_pairs(seq, window)  # FLOPs of the kept pairs
    try:
        seconds = timed(step, s.repeat)
    except Exception as err:  # a kernel that fails here is reported, the table goes on
        reasons.setdefault(backend, f"failed: {type(err).__name__}: {str(err).splitlines()[0]}")
        return "err"
    return f"{3.5 * forward / seconds / 1e12:.1f}"  # backward = 2.5x forward


def lm_section(s: Sizes, peak: float | None) -> MoELanguageModel:
    rows, seq = s.lm_batch
    config = lm_preset(s.lm_preset)
    torch.manual_seed(0)
    model = MoELanguageModel(config).to(s.device)
    per_token = lm_flops_per_token(config, seq)
    ids = torch.randint(0, config.vocab_size, (rows, seq), device=s.device)
    print(
        f"\nLM training: preset {s.lm_preset}, {model.num_parameters() / 1e6:.0f} M parameters "
        f"({model.num_parameters(active=True) / 1e6:.0f} M active), batch {rows} x {seq}, "
        f"AdamW, {'bf16 autocast' if s.device == 'cuda' else 'fp32'}; {per_token / 1e6:.0f} MFLOP per token"
    )
    for compiled in (False, True) if s.compile else (False,):
        rate = tokens_per_second(model, ids, compiled, s)
        mfu = f"MFU {per_token * rate / peak:.1%}" if peak else "MFU unknown (no datasheet peak)"
        label = "compiled" if compiled else "eager"
        print(f"  {label:8s} {rate:10.0f} tokens/s  {mfu}")
    return model.eval()


def tokens_per_second(
    model: MoELanguageModel, ids: torch.Tensor, compiled: bool, s: Sizes
) -> float:
    """Training tokens/s of AdamW steps on ``ids`` under bf16 autocast (on CUDA)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=s.device == "cuda")

    def loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(ids, labels=ids).loss

    forward_loss = torch.compile(loss) if compiled else loss

    def step() -> None:
        amp = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.device == "cuda")
        with amp, torch._dynamo.config.patch(**COMPILE_SETTINGS):
            forward_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compiles (untimed)
    return ids.numel() / timed(step, s.lm_steps)


def decode_section(s: Sizes, model: MoELanguageModel) -> None:
    batches, prompt, new = s.decode
    step = "compiled" if s.compile else "eager"
    print(f"\ndecode: greedy, {prompt}-token prompt, {new} new tokens, {step} decode step")
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=s.device)

        def run(ids: torch.Tensor = ids) -> None:
            with torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.device == "cuda"):
                generate(model, ids, max_new_tokens=new, compile=s.compile)

        try:
            seconds = timed(run, max(1, s.repeat // 5))  # the first call compiles (untimed)
        except Exception as err:  # reported, and the other batch sizes still run
            print(f"  batch {batch:2d}: failed: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        print(f"  batch {batch:2d}: {batch * new / seconds:10.0f} tokens/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="toy sizes on the CPU: check the script runs"
    )
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            f"bench_gpu: skipped: no CUDA device is visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}); run it on a machine with an NVIDIA GPU"
        )
        return 0
    sizes = SMOKE if args.cpu_smoke else GPU
    print("== GPU benchmark" + (" (CPU smoke run)" if args.cpu_smoke else ""))
    peak = device_banner(sizes)
    attention_section(sizes)
    model = lm_section(sizes, peak)
    decode_section(sizes, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
