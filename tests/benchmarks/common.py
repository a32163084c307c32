"""Shared helpers for the benchmark scripts: machine banner, alternating timing, peak memory,
and the floors a speed-up is bounded by.

Timings on shared machines drift by ±15 % run to run, so every script runs ours and
the peer's in one process, alternating, and reports the median of each plus the ratio.
Compiled contenders are compiled (and warmed) before the alternation starts, so no timed
call compiles; :class:`CompileWatch` says how many graphs each compile made and whether any
timed call recompiled.

A ratio against a peer is bounded by what the machine can do at all. Two floors make that
bound visible: :func:`kernel_floor` (the time of a call's matrix products and attention
kernels, each run alone and warm: for compute-bound work such as training) and
:func:`stream_rate` (how fast a plain read streams weights from memory: for decoding, which
must read the weights it uses once per step). Peer time / floor is the
most any implementation of the same arithmetic could gain on this machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


def banner(title: str, threads: int | None = 2) -> None:
    """Fix the thread count and print what the figures were measured on: the CPU, the core
    and thread counts, and the versions of python, torch and the peers."""
    if threads is not None:
        torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"== {title}")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, {_last_level_cache()}, torch threads "
        f"{torch.get_num_threads()}, kernels for {torch.backends.cpu.get_cpu_capability()}; "
        "fp32 on CPU"
    )
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for peer in ("transformers", "timm"):
        try:
            versions.append(f"{peer} {version(peer)}")
        except PackageNotFoundError:
            versions.append(f"{peer} (not installed)")
    print("versions: " + ", ".join(versions))


def _last_level_cache() -> str:
    """ "L3 480 MiB": what decides whether a model's weights stay cache-resident."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        last = max(caches.glob("index*"), key=lambda p: int((p / "level").read_text()))
        level, size = (last / "level").read_text().strip(), (last / "size").read_text().strip()
    except (OSError, ValueError):
        return "cache size unknown"
    if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) >= 1024:
        size = f"{int(size[:-1]) // 1024} MiB"
    return f"L{level} {size}"


def lm_flops_per_token(config: object, seq_len: int) -> float:
    """Training FLOPs per token of a ``MoELMConfig`` LM at ``seq_len``: 6 per active weight
    (forward 2, backward 4) plus PaLM's attention term 12·L·D·T (scores and values, forward
    and backward; causal masking and sliding windows not discounted), the count MFU
    figures are usually quoted against."""
    from vats_text.model import MoELanguageModel

    with torch.device("meta"):
        active = MoELanguageModel(config).num_parameters(active=True)  # type: ignore[arg-type]
    return 6 * active + 12 * config.n_layers * config.dim * seq_len  # type: ignore[attr-defined]


def require(ok: bool, message: str) -> None:
    """Stop the script with a non-zero exit status when a fairness check fails (not an
    ``assert``: ``python -O`` would skip it)."""
    if not ok:
        raise SystemExit(f"FAILED: {message}")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in the Frobenius norm, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def ratio(label: str, value: float, goal: str | None = None, *, width: int = 36) -> None:
    """Print one ratio line, with the goal it is read against, or "no goal" (reported only)."""
    print(f"  {label:<{width}s} {value:5.2f}x  ({f'goal {goal}' if goal else 'no goal'})")


class CompileWatch:
    """Counts the graphs torch.compile builds and the graph breaks it takes.

    ``with watch("label"):`` around a call records what compiled during it; ``summary`` reads
    as "2 graphs, 0 graph breaks". Reading the counters is free, so a timed loop can be
    watched too: any graph it builds is a recompile the figure should not contain.
    """

    def __init__(self) -> None:
        self.graphs = 0
        self.breaks = 0

    @staticmethod
    def _counts() -> tuple[int, int]:
        counters = torch._dynamo.utils.counters
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    @contextlib.contextmanager
    def __call__(self) -> Iterator[CompileWatch]:
        graphs, breaks = self._counts()
        try:
            yield self
        finally:
            now_graphs, now_breaks = self._counts()
            self.graphs += now_graphs - graphs
            self.breaks += now_breaks - breaks

    def summary(self) -> str:
        return f"{self.graphs} graph{'s' * (self.graphs != 1)}, {self.breaks} graph breaks"


def time_alternating(
    fns: dict[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_cpu_memory(fn: Callable[[], object]) -> int:
    """Peak bytes held by CPU tensors allocated while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        fn()
    # Replay each op's own allocations (not its children's) in time order to find the
    # high-water mark.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Kernels that do the arithmetic of a model step (the rest is memory-bound glue). linear,
# matmul and scaled_dot_product_attention reach the recorder whole under inference_mode
# (there they do not decompose); the recorder does not see inside an op it records.
_COMPUTE_OPS = {
    torch.ops.aten.linear,
    torch.ops.aten.matmul,
    torch.ops.aten.scaled_dot_product_attention,
    torch.ops.aten.mm,
    torch.ops.aten.addmm,
    torch.ops.aten.bmm,
    torch.ops.aten.baddbmm,
    torch.ops.aten._grouped_mm,
    torch.ops.aten.convolution,
    torch.ops.aten.convolution_backward,
    # Under inference_mode convolutions arrive whole, before they become `convolution`.
    torch.ops.aten.conv1d,
    torch.ops.aten.conv2d,
    torch.ops.aten.conv3d,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
}


def _signature(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_signature(y) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _signature(v)) for k, v in x.items()))
    return x


class _RecordCompute(TorchDispatchMode):
    """Counts each distinct compute-kernel call (op, shapes, strides, dtypes, other args) and
    keeps a copy of the first one's arguments, real values included (random data could
    differ in speed: denormals, infinities)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[object, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func.overloadpacket in _COMPUTE_OPS:
            key = (func, _signature(args), _signature(kwargs))
            if key in self.calls:
                self.calls[key][0] += 1
            else:
                copy = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
                self.calls[key] = [1, copy]
        return func(*args, **kwargs)


def kernel_floor(fn: Callable[[], object], *, repeat: int = 3) -> float:
    """Seconds one ``fn()`` would take if only its matrix products and attention kernels
    cost anything and each ran at the speed it reaches alone, warm, on the same arguments.

    The matrix products, convolutions, grouped GEMMs and CPU flash attention (forward and
    backward) that ``fn`` dispatches are recorded, then each
    distinct call is replayed ``repeat`` times after a warm-up and its best time counted
    once per occurrence. Everything else (elementwise passes, norms, copies, the
    optimizer, Python) counts as free, so the floor is optimistic: no implementation that
    performs these products on this machine's kernels runs faster. ``fn`` must run eagerly
    (a compiled graph's kernels are not seen one by one); a compiled model does the same
    products, so the eager floor bounds it too.
    """
    recorder = _RecordCompute()
    with recorder:
        fn()
    total = 0.0
    for (func, _, _), (count, (args, kwargs)) in recorder.calls.items():
        func(*args, **kwargs)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - t0)
        total += count * best
    return total


def stream_rate(matrices: Iterable[torch.Tensor], *, repeat: int = 3) -> float:
    """Bytes per second at which this machine reads ``matrices`` from memory.

    One pass reads every matrix once with a plain ``sum`` (a decode step must read its
    weights at least once; no GEMM library reads them faster than a reduction does); the
    best of ``repeat`` passes is returned. Give it the weights the decode step reads: when
    they fit in the last-level cache (the banner prints its size) this is the cache's read
    rate, which is then the step's bound too.
    """
    matrices = [m.detach() for m in matrices]
    nbytes = sum(m.numel() * m.element_size() for m in matrices)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeat + 1):  # the first pass warms up
            t0 = time.perf_counter()
            for m in matrices:
                m.sum()
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def print_floor(peer: str, seconds: dict[str, float], floors: dict[str, float]) -> None:
    """Print each side's kernel floor, how close it runs to it, and the ratio ceiling.

    ``seconds`` and ``floors`` map the same names (the peer's and ``"vats"``) to the
    measured time of a call and its :func:`kernel_floor`.
    """
    parts = ", ".join(
        f"{name} {floors[name] * 1e3:.0f} ms ({floors[name] / seconds[name]:.0%} of its time)"
        for name in floors
    )
    ceiling = seconds[peer] / min(floors.values())
    print(f"  kernel floor (matrix products and attention alone, warm): {parts}")
    print(f"  so no implementation of these products runs more than {ceiling:.2f}x {peer} here")
