"""Causal sliding-window attention, forward + backward, against SDPA given an explicit mask.

Config: window 512, 8 heads, head dim 64, batch 1, float32 on CPU, 2 threads, at
T = 2k, 4k, 8k, 16k. The peer is ``torch.nn.functional.scaled_dot_product_attention``
handed the (T, T) boolean sliding-window mask: what a model without a windowed kernel
does. Ours:

* ``local``: the blocked O(T·window) path (what ``auto`` picks for these calls on CPU);
* ``sdpa``: our SDPA backend (bottom-right alignment, empty-row handling, its own
  mask): O(T²) like the peer, shown to cost the same;
* ``flex``: eager flex_attention (compiled flex has no CPU backward); dense in eager
  mode, so run only at T <= 4k to keep memory bounded.

Then, at one length (4k; ``--quick``: 2k), the same forward + backward under
``torch.compile``: the peer, ``local`` and ``sdpa`` each compiled on its own (flex is left
out: compiled flex has no CPU backward), against the eager peer and one another.

Every contender's output is checked against the peer's before timing (the script exits
non-zero otherwise). Goal: ``local`` grows linearly in T and is >= 4x faster than the peer
at 16k.

Run: ``uv run python tests/benchmarks/bench_attention.py`` (about 4 minutes on 2 cores), or
with ``--quick`` (T = 2k and 4k, 2 rounds).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    CompileWatch,
    banner,
    fmt_bytes,
    peak_cpu_memory,
    ratio,
    require,
    time_alternating,
)

from vats_core.attention import attention
from vats_core.attention.masks import visible_mask

WINDOW, HEADS, HEAD_DIM, BATCH = 512, 8, 64, 1
LENGTHS = (2048, 4096, 8192, 16384)
FLEX_MAX_T = 4096  # eager flex materializes (H, T, T) scores several times in backward
# The peer keeps O(T^2) memory (its (T, T) mask, and more if torch falls back to the
# math kernel); its measured peak at T/2, times 4, must stay under this or it is skipped.
PEER_MEMORY_LIMIT = 12 * 2**30


def fwd_bwd(fn: Callable[..., torch.Tensor], q, k, v, cot) -> Callable[[], None]:
    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(cot)

    return step


def peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = q.shape[2]
    mask = visible_mask(t, t, causal=True, window=WINDOW)  # (T, T) bool, built per call
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def ours(backend: str) -> Callable[..., torch.Tensor]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, causal=True, window=WINDOW, backend=backend)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 2k and 4k, fewer repeats")
    args = parser.parse_args()
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    banner("causal sliding-window attention fwd+bwd: vats backends vs SDPA + (T, T) mask")
    print(
        f"config: window {WINDOW}, {HEADS} heads, head dim {HEAD_DIM}, batch {BATCH}, "
        "float32; 'peer' = F.scaled_dot_product_attention(attn_mask=(T, T) bool)"
    )
    times: dict[str, dict[int, float]] = {}
    peer_peak = 5 * LENGTHS[0] ** 2 // 4  # bool + fp32 (T, T) mask at T/2 before measuring
    header = f"{'T':>6} {'contender':<12} {'time (s)':>9} {'peak mem':>11} {'vs peer':>9}"
    print(header)
    print("-" * len(header))
    for t in lengths:
        gen = torch.Generator().manual_seed(t)
        q, k, v = (
            torch.randn(BATCH, HEADS, t, HEAD_DIM, generator=gen, requires_grad=True)
            for _ in range(3)
        )
        cot = torch.randn(BATCH, HEADS, t, HEAD_DIM, generator=gen)
        contenders: dict[str, Callable[..., torch.Tensor]] = {}
        if 4 * peer_peak <= PEER_MEMORY_LIMIT:
            contenders["peer"] = peer
        else:
            print(f"{t:>6} peer skipped: ~{fmt_bytes(4 * peer_peak)} expected")
        contenders["vats local"] = ours("local")
        contenders["vats sdpa"] = ours("sdpa")
        if t <= FLEX_MAX_T:
            contenders["vats flex"] = ours("flex")

        with torch.no_grad():  # same function as the peer before anything is timed
            want = peer(q, k, v) if "peer" in contenders else ours("sdpa")(q, k, v)
            for name, fn in contenders.items():
                err = (fn(q, k, v) - want).abs().max().item()
                require(err < 1e-4, f"{name} differs from the peer at T={t}: {err:.2e}")

        steps = {name: fwd_bwd(fn, q, k, v, cot) for name, fn in contenders.items()}
        repeat = 2 if args.quick else 5 if t <= 4096 else 3
        timed = time_alternating(steps, repeat=repeat, warmup=1)
        for name, seconds in timed.items():
            times.setdefault(name, {})[t] = seconds
            peak = peak_cpu_memory(steps[name])
            if name == "peer":
                peer_peak = peak
            vs_peer = timed["peer"] / seconds if "peer" in timed else float("nan")
            print(f"{t:>6} {name:<12} {seconds:>9.3f} {fmt_bytes(peak):>11} {vs_peer:>8.2f}x")

    print("\ngrowth: time(T) / time(T/2) (linear ~2, quadratic ~4) and the log-log slope")
    for name, by_t in times.items():
        ts = sorted(by_t)
        growth = " ".join(f"{by_t[b] / by_t[a]:.2f}" for a, b in itertools.pairwise(ts))
        slope = _loglog_slope(ts, [by_t[t] for t in ts])
        verdict = "" if slope is None else "linear" if slope < 1.35 else "super-linear"
        slope_text = "" if slope is None else f"slope {slope:.2f}"
        print(f"  {name:<12} {growth:<16} {slope_text:<11} {verdict}")
    if "peer" in times and 16384 in times["peer"]:
        speedup = times["peer"][16384] / times["vats local"][16384]
        print()
        ratio("vats local / peer at T=16384", speedup, ">= 4x")

    compiled(2048 if args.quick else 4096, repeat=2 if args.quick else 5)


def compiled(t: int, *, repeat: int) -> None:
    """Forward + backward at length ``t``, each contender compiled on its own."""
    gen = torch.Generator().manual_seed(t)
    q, k, v = (
        torch.randn(BATCH, HEADS, t, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(3)
    )
    cot = torch.randn(BATCH, HEADS, t, HEAD_DIM, generator=gen)
    contenders = {
        "peer": peer,
        "peer compiled": torch.compile(peer),
        "local compiled": torch.compile(ours("local")),
        "sdpa compiled": torch.compile(ours("sdpa")),
    }
    steps = {name: fwd_bwd(fn, q, k, v, cot) for name, fn in contenders.items()}
    notes = {}
    with torch.no_grad():
        want = peer(q, k, v)
    for name, step in steps.items():
        watch = CompileWatch()
        t0 = time.perf_counter()
        with watch():
            step()  # compiles forward and backward
        if watch.graphs:
            notes[name] = f"   (first call {time.perf_counter() - t0:.0f} s: {watch.summary()})"
        with torch.no_grad():
            err = (contenders[name](q, k, v) - want).abs().max().item()
        require(err < 1e-4, f"{name} differs from the eager peer at T={t}: {err:.2e}")
    watch = CompileWatch()
    with watch():
        timed = time_alternating(steps, repeat=repeat, warmup=1)
    print(
        f"\ncompiled, T={t}, forward + backward ({repeat} alternating rounds; outputs equal the "
        f"peer's; graphs built while timed: {watch.graphs}):"
    )
    for name, seconds in timed.items():
        print(f"  {name:<15s} {seconds:7.3f} s{notes.get(name, '')}")
    ratio("local compiled / peer (eager)", timed["peer"] / timed["local compiled"])
    ratio("local compiled / peer compiled", timed["peer compiled"] / timed["local compiled"])
    ratio("sdpa compiled / peer compiled", timed["peer compiled"] / timed["sdpa compiled"])


def _loglog_slope(xs: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(T): 1 = linear, 2 = quadratic."""
    if len(xs) < 2:
        return None
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


if __name__ == "__main__":
    main()
