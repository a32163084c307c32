"""MoE language model against HF transformers Mixtral: decode, prefill, training, KV memory.

Two shapes, each a random-init HF ``MixtralForCausalLM`` converted with
``vats_text.interop.from_transformers``, so both sides hold the same weights:

* ``d512`` (issue 3): vocab 8192, dim 512, 8 layers, 8 query / 2 KV heads, 8 experts top-2,
  expert hidden 1408, sliding window 1024 on every layer; prompt 32, 128 new tokens. Every
  figure below runs on it.
* ``d384``: vocab 8192, dim 384, 6 layers, 6 / 2 heads, 8 experts top-2, expert hidden 1024,
  window 256; prompt 24, 96 new tokens. The decode figures only: a second shape, so a gain
  tuned to one shape cannot hide.

Before anything is timed the logits of both models are checked to agree, and every decode
contender's greedy tokens to equal HF eager's (the script exits non-zero otherwise).
fp32 on CPU, 2 threads, HF at its defaults (its ``sdpa`` attention and the experts
implementation transformers picks), vats at its defaults.

Figures, each with the ratio it is read against and the goal (issue 15):
  1. greedy decode tokens/s at batch 1 and batch 8, in one alternation of four contenders:
     HF eager ``generate``; HF ``generate`` with a static cache and its forward compiled
     (``cache_implementation="static"`` and a ``CompileConfig``, as transformers documents
     it; ``_compile_all_devices`` lets it compile on CPU); vats eager ``generate``; vats
     ``generate(compile=True)``. Goals: vats compiled >= 2x HF eager at batch 1, >= 1.5x at
     batch 8; the eager ratio, vats compiled / HF compiled and HF compiled / HF eager are
     reported. Compiles (and any recompile) happen in warm-up calls before the alternation;
     compile time, graph count and graph breaks are printed (the time is shorter when
     inductor's on-disk cache holds a graph from an earlier run). The dynamo caches are
     reset before each figure, so each batch size compiles as in a fresh process.
  2. prefill latency of a 1024-token prompt, eager both (goal: vats <= HF).
  3. training tokens/s, batch 8 x 256, forward + backward + AdamW (torch's fused kernel on
     every side: HF Trainer's default, and vats' trainer's): HF eager, vats eager, and vats
     under ``torch.compile(model)`` (compile time excluded, printed apart); peak memory of
     each. Goal: vats (compiled or eager) >= 1.2x HF eager with peak memory <= HF's. The
     first step's losses are checked to agree.
  4. vats only: KV-cache bytes while generating 8k tokens with window 512 (a smaller model,
     same code path): flat once past the window.

Prefill and training print the kernel floor of each side (its matrix products and
attention run alone; see ``common.kernel_floor``). Decoding reads every weight it uses once
per step, so its speed is bounded by memory bandwidth. After each decode figure the script
prints that floor: the bytes a step must read (every non-expert weight except the
embedding table, the experts the router actually chose, the KV cache) over the rate at
which a plain sum reads this model's weights here. HF eager's time over it is the most any
implementation could gain (HF's time includes its prefill, so the bound errs high).

Run: ``uv run python tests/benchmarks/bench_text.py`` (9-14 minutes on 2 cores, up to 5 of
them compiling), ``--quick`` (a quarter of the tokens, one round, 2k tokens for the cache
curve), ``--config d384`` (one shape), ``--figures decode,training`` (some figures).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
    stream_rate,
    time_alternating,
)

from vats_core.moe import COMPILE_SETTINGS, GroupedExperts
from vats_text.generation import generate
from vats_text.interop import from_transformers
from vats_text.model import MoELanguageModel, MoELMConfig

FIGURES = ("decode", "prefill", "training", "kv")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark model and its decode lengths."""

    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_hidden: int
    window: int  # sliding window of every layer (Mixtral's sliding_window)
    prompt: int  # decode prompt length
    new: int  # decode new tokens (--quick: a quarter)
    figures: tuple[str, ...]  # which of FIGURES run on this shape

    def describe(self) -> str:
        return (
            f"vocab {self.vocab}, dim {self.dim}, {self.layers} layers, {self.heads}/"
            f"{self.kv_heads} heads, {self.experts} experts top-{self.top_k}, expert hidden "
            f"{self.expert_hidden}, window {self.window}"
        )


SHAPES = {
    "d512": Shape(8192, 512, 8, 8, 2, 8, 2, 1408, 1024, 32, 128, FIGURES),
    "d384": Shape(8192, 384, 6, 6, 2, 8, 2, 1024, 256, 24, 96, ("decode",)),
}


def build_pair(shape: Shape) -> tuple[torch.nn.Module, MoELanguageModel]:
    """Random HF Mixtral at ``shape``, and ours imported from it."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.expert_hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        sliding_window=shape.window,
        max_position_embeddings=32768,
        eos_token_id=None,  # neither side stops early: every run decodes all its tokens
        pad_token_id=0,
    )
    hf = transformers.MixtralForCausalLM(config).eval()
    ours = from_transformers(hf)
    return hf, ours


def check_logits(hf: torch.nn.Module, ours: MoELanguageModel, vocab: int) -> None:
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rel = relative_error(ours(ids).logits, hf(ids).logits)
    require(rel < 1e-4, f"logits disagree: relative error {rel:.2e}")
    print(f"logits agree (eager, 2 x 64 tokens): relative error {rel:.1e}")


# ---------------------------------------------------------------------------- decoding


def decode(
    hf, ours, *, batch: int, prompt_len: int, new: int, vocab: int, repeat: int, rate: float
) -> None:
    from transformers import CompileConfig, GenerationConfig

    prompt = torch.randint(
        3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(2)
    )
    common = dict(
        do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0
    )
    eager_config = GenerationConfig(**common)
    # HF's documented recipe (static cache, forward compiled by generate). Its default mode,
    # "reduce-overhead", means CUDA graphs, which a CPU run has none of; no mode, and the
    # inductor options vats' decode step compiles with: both sides get the same compiler.
    compile_config = CompileConfig(mode=None, options={"cpp_wrapper": True})
    compile_config._compile_all_devices = True  # generate compiles on CUDA-like devices only
    static_config = GenerationConfig(
        **common, cache_implementation="static", compile_config=compile_config
    )
    outs: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            outs[name] = fn()

        return call

    fns = {
        "HF eager": run("HF eager", lambda: hf.generate(prompt, generation_config=eager_config)),
        "HF compiled": run(
            "HF compiled", lambda: hf.generate(prompt, generation_config=static_config)
        ),
        "vats eager": run("vats eager", lambda: generate(ours, prompt, max_new_tokens=new)),
        "vats compiled": run(
            "vats compiled", lambda: generate(ours, prompt, max_new_tokens=new, compile=True)
        ),
    }
    print(
        f"greedy decode, batch {batch}, {prompt_len}-token prompt, {new} new tokens "
        f"({repeat} alternating rounds after warm-up):"
    )
    torch._dynamo.reset()  # this batch size compiles as in a fresh process
    notes = {name: warm_up(fn, compiled=name.endswith("compiled")) for name, fn in fns.items()}
    for name in fns:
        same = torch.equal(outs[name], outs["HF eager"])
        require(same, f"{name} greedy tokens differ from HF eager's (batch {batch})")
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat, warmup=0)
    for name in fns:
        require(torch.equal(outs[name], outs["HF eager"]), f"{name} tokens changed while timed")
    tps = {name: batch * new / s for name, s in times.items()}
    for name in fns:
        print(f"  {name:14s} {tps[name]:7.1f} tok/s{notes[name]}")
    print(f"  greedy tokens identical in all four: True; graphs built while timed: {watch.graphs}")
    goal = ">= 2x" if batch == 1 else ">= 1.5x" if batch == 8 else None
    ratio("vats compiled / HF eager", tps["vats compiled"] / tps["HF eager"], goal)
    ratio("vats eager / HF eager", tps["vats eager"] / tps["HF eager"])
    ratio("vats compiled / HF compiled", tps["vats compiled"] / tps["HF compiled"])
    ratio("HF compiled / HF eager", tps["HF compiled"] / tps["HF eager"])
    floor_s = decode_floor(ours, prompt, new, rate)
    print(
        f"  so no implementation decodes more than {batch / floor_s / tps['HF eager']:.2f}x HF eager"
    )


def warm_up(fn: Callable[[], None], *, compiled: bool) -> str:
    """Call ``fn`` until a call compiles nothing (once when eager); a note on what it took."""
    if not compiled:
        fn()
        return ""
    watch = CompileWatch()
    t0 = time.perf_counter()
    with watch():
        fn()
    first = time.perf_counter() - t0
    calls = 1
    while calls < 4:
        again = CompileWatch()
        with again(), watch():
            fn()
        calls += 1
        if again.graphs == 0:
            break
    recompiled = f", {calls - 2} later call(s) recompiled" if calls > 2 else ""
    return f"   (first call {first:.0f} s: {watch.summary()}{recompiled})"


def decode_floor(ours: MoELanguageModel, prompt: torch.Tensor, new: int, rate: float) -> float:
    """Seconds a decode step must take at least: the bytes it reads over ``rate`` (B/s).

    Greedy-decodes ``new`` tokens eagerly and, for each step, counts the distinct experts
    each MoE layer's router chose; their weights plus every other weight a step multiplies
    by (not the embedding table, of which it reads B rows) plus the KV cache it attends
    over are the bytes that step reads at the least.
    """
    experts = [m for m in ours.modules() if isinstance(m, GroupedExperts)]
    per_expert = sum(p[0].numel() * p.element_size() for m in experts for p in m.parameters())
    per_expert //= len(experts)
    embedding = ours.embed_tokens.weight
    dense = sum(p.numel() * p.element_size() for p in ours.parameters())
    dense -= sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    if embedding is not ours.lm_head.weight:  # a tied table is read whole by the LM head
        dense -= embedding.numel() * embedding.element_size()
    b, t = prompt.shape
    rows = b * embedding[0].numel() * embedding.element_size()  # the tokens' embeddings
    step_bytes, step_chosen = [], []
    with torch.inference_mode():
        caches = ours.setup_caches(b, t + new)
        out = ours(prompt, caches=caches, logits_to_keep=1)
        for i in range(new - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = ours(token, caches=caches, logits_to_keep=1)
            chosen = sum(int((s.tokens_per_expert > 0).sum()) for s in out.router_stats)
            cache = sum(
                buf[:, :, : min(t + i + 1, buf.shape[2])].numel() * buf.element_size()
                for c in caches
                for buf in (c.k, c.v)
            )
            step_bytes.append(dense + rows + chosen * per_expert + cache)
            step_chosen.append(chosen / len(experts))
    mean_bytes = sum(step_bytes) / len(step_bytes)
    mean_chosen = sum(step_chosen) / len(step_chosen)
    print(
        f"  memory floor: a step reads >= {mean_bytes / 1e6:.0f} MB (about {mean_chosen:.1f} "
        f"experts per layer); at {rate / 1e9:.1f} GB/s (a plain sum's read rate) that is "
        f">= {mean_bytes / rate * 1e3:.1f} ms a step, at most {b / (mean_bytes / rate):.0f} tok/s"
    )
    return mean_bytes / rate


# ---------------------------------------------------------------------------- prefill


def prefill(hf, ours, *, length: int, vocab: int, repeat: int) -> None:
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(3))

    def run_hf() -> None:
        with torch.inference_mode():
            hf(ids, use_cache=True, logits_to_keep=1)

    def run_ours() -> None:
        with torch.inference_mode():
            ours(ids, caches=ours.setup_caches(1, length), logits_to_keep=1)

    fns = {"hf": run_hf, "vats": run_ours}
    times = time_alternating(fns, repeat=repeat, warmup=1)
    print(
        f"prefill {length} tokens, eager ({repeat} alternating rounds): HF "
        f"{times['hf'] * 1e3:.0f} ms, vats {times['vats'] * 1e3:.0f} ms"
    )
    ratio("HF / vats (latency)", times["hf"] / times["vats"], ">= 1.00x: vats <= HF")
    print_floor("hf", times, {name: kernel_floor(fn) for name, fn in fns.items()})


# ---------------------------------------------------------------------------- training


def training(hf, ours, *, batch: int, seq: int, vocab: int, repeat: int) -> None:
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(ours)  # the compiled contender gets its own weights and optimizer
    models = {"HF eager": hf, "vats eager": ours, "vats compiled": torch.compile(twin)}
    for model in (hf, ours, twin):
        model.train()
    opts = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for name, model in models.items()
    }
    losses: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        model, opt = models[name], opts[name]

        # vats' compiled step runs as the trainer's compile=True runs it: under the MoE's
        # compile settings, so the expert groups trace as data-dependent sizes in one graph.
        settings = COMPILE_SETTINGS if name == "vats compiled" else {}

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(**settings):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.setdefault(name, loss.item())  # the first step's: same weights everywhere

        return run

    fns = {name: step(name) for name in models}
    watch = CompileWatch()
    t0 = time.perf_counter()
    with watch():
        fns["vats compiled"]()  # traces and compiles forward and backward
    compile_s = time.perf_counter() - t0
    fns["HF eager"]()
    fns["vats eager"]()
    for name in ("vats eager", "vats compiled"):
        err = abs(losses[name] - losses["HF eager"]) / abs(losses["HF eager"])
        require(err < 1e-4, f"{name} first-step loss differs from HF's: relative error {err:.1e}")
    after = CompileWatch()
    with after():
        times = time_alternating(fns, repeat=repeat, warmup=1)  # warm-up: AdamW's state
    peaks = {name: peak_cpu_memory(fn) for name, fn in fns.items()}
    floors = {"hf": kernel_floor(fns["HF eager"]), "vats": kernel_floor(fns["vats eager"])}
    for model in (hf, ours, twin):
        model.eval()
    tok = batch * seq
    tps = {name: tok / s for name, s in times.items()}
    print(
        f"training {batch}x{seq}, fwd+bwd+fused AdamW ({repeat} alternating rounds; "
        f"first-step losses agree, {losses['HF eager']:.4f}):"
    )
    for name in fns:
        note = ""
        if name == "vats compiled":
            note = (
                f"   (first step {compile_s:.0f} s with compiling: {watch.summary()}; "
                f"graphs built while timed: {after.graphs})"
            )
        print(f"  {name:14s} {tps[name]:7.0f} tok/s, peak {fmt_bytes(peaks[name]):>10}{note}")
    ratio("vats eager / HF eager", tps["vats eager"] / tps["HF eager"], ">= 1.2x")
    ratio("vats compiled / HF eager", tps["vats compiled"] / tps["HF eager"], ">= 1.2x")
    for name in ("vats eager", "vats compiled"):
        share = peaks[name] / peaks["HF eager"]
        print(f"  {'peak memory ' + name + ' / HF eager':<36s} {share:5.2f}   (goal <= 1.00)")
    print_floor("hf", {"hf": times["HF eager"], "vats": times["vats eager"]}, floors)


# ---------------------------------------------------------------------------- KV cache


def kv_cache_curve(*, total: int, window: int, vocab: int) -> None:
    """Bytes held by the caches while decoding ``total`` tokens one at a time (small model)."""
    config = MoELMConfig(
        vocab_size=vocab,
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        layer_windows=[window] * 2,
        n_experts=4,
        top_k=2,
        expert_hidden_dim=256,
    )
    torch.manual_seed(0)
    model = MoELanguageModel(config).eval()
    caches = model.setup_caches(1, total)

    def held() -> int:
        return sum(b.numel() * b.element_size() for c in caches for b in c.buffers())

    per_token = 2 * config.n_layers * config.kv_heads * config.dh * 4  # K and V, fp32
    marks = sorted({window // 2, window, 2 * window, total // 4, total // 2, total})
    token = torch.tensor([[5]])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for n in range(1, total + 1):
            logits = model(token, caches=caches).logits  # (1, 1, V)
            token = logits[:, -1].argmax(-1, keepdim=True)
            if n in marks:
                print(
                    f"  after {n:5d} tokens: caches hold {fmt_bytes(held())} "
                    f"(a full cache would hold {fmt_bytes(n * per_token)})"
                )
    print(f"  ({total} decode steps in {time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------- main


def run_shape(name: str, shape: Shape, figures: set[str], quick: bool) -> None:
    figures = figures & set(shape.figures)
    if not figures - {"kv"}:
        return
    hf, ours = build_pair(shape)
    print(
        f"\n-- {name}: {shape.describe()}; {sum(p.numel() for p in ours.parameters()) / 1e6:.0f} M "
        f"parameters; HF attention {hf.config._attn_implementation}, HF experts "
        f"{hf.get_experts_implementation()}"
    )
    check_logits(hf, ours, shape.vocab)
    repeat = 1 if quick else 3
    if "decode" in figures:
        new = shape.new // 4 if quick else shape.new
        # Every weight matrix once, each expert on its own: what the decode steps read.
        matrices = [
            w for p in ours.parameters() for w in (p if p.dim() == 3 else [p]) if w.dim() == 2
        ]
        rate = stream_rate(matrices)
        for batch in (1, 8):
            decode(
                hf,
                ours,
                batch=batch,
                prompt_len=shape.prompt,
                new=new,
                vocab=shape.vocab,
                repeat=repeat,
                rate=rate,
            )
    if "prefill" in figures:
        # A prefill is under a second, and HF's time moves by 10-20 % between rounds here:
        # 7 alternating rounds.
        prefill(hf, ours, length=1024, vocab=shape.vocab, repeat=2 if quick else 7)
    if "training" in figures:
        training(hf, ours, batch=8, seq=256, vocab=shape.vocab, repeat=repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument(
        "--config",
        action="append",
        choices=sorted(SHAPES),
        help="shape(s) to run (repeatable); default: all",
    )
    parser.add_argument(
        "--figures",
        default=",".join(FIGURES),
        help=f"comma-separated subset of {','.join(FIGURES)}",
    )
    args = parser.parse_args()
    figures = set(args.figures.split(","))
    if not figures <= set(FIGURES):
        parser.error(f"--figures: unknown {sorted(figures - set(FIGURES))}")
    import transformers

    transformers.logging.set_verbosity_error()  # generation-config chatter, not results
    banner("bench_text: vats MoELanguageModel vs HF MixtralForCausalLM (same weights)")
    for name in args.config or list(SHAPES):
        run_shape(name, SHAPES[name], figures, args.quick)

    if "kv" in figures:
        total = 2048 if args.quick else 8192
        print(f"\nKV cache while generating {total} tokens, window 512 (vats; dim 128, 2 layers):")
        kv_cache_curve(total=total, window=512, vocab=8192)


if __name__ == "__main__":
    main()
