"""DiT and VAE against diffusers' ``DiTTransformer2DModel`` and ``AutoencoderKL``.

Both peers are random-init (seeded) and ours are converted from them with
:func:`vats_diffusion.interop.from_diffusers`, so both sides hold the same weights; the
imported configs are checked to be the ``DiT-S/2`` and ``sd`` presets. fp32 on CPU, 2
threads, ``torch.inference_mode``, both at their defaults (diffusers' attention processor is
torch SDPA). Every contender's output is checked against the diffusers eager one before
anything is timed (the script exits non-zero otherwise; the max error is printed).

(a) DiT: a DiT-S/2-shaped transformer (dim 384, 12 layers, 6 heads, patch 2, learned sigma,
    1000 classes) on 32×32×4 latents, batch 8 (256 tokens each), class-conditional forward.
    diffusers keeps a copy of the timestep / class embedders in every block and vats one, so
    block 0's copy is written into every block before importing (what every checkpoint
    converted from the original DiT holds). Four contenders in one alternation: diffusers
    eager, diffusers compiled, vats eager, vats compiled; compiled = ``torch.compile`` with
    inductor ``freezing`` (the inference recipe of DESIGN.md), the same options on both
    sides, compiled and warmed before the alternation (compile time and graph counts printed
    apart). Goal: vats >= 1.2x diffusers, eager against eager and compiled against compiled.
(b) VAE decode: an SD-shaped ``AutoencoderKL`` (block channels 128, 256, 512, 512, 2 layers
    per block, 4 latent channels; decoder 49.5 M parameters) decoding a 32×32×4 latent to
    256×256 pixels, batch 1, eager both (``--compile-vae`` adds compiled contenders).
    Goal: vats >= 1.2x diffusers.
(c) Tiled decode: vats ``decode(z, tile_size=..., tile_overlap=...)`` against diffusers
    ``enable_tiling()`` on one latent, at the same tile size and overlap (the geometry
    diffusers uses at the issue's size: tiles of half the latent's side, a quarter of a tile
    of overlap, so 3 x 3 tiles): time, peak memory, the area each decodes and its error
    against the untiled decode (random weights, so a measure of the blend, not of image
    quality); the untiled vats decode and the peak of one tile decoded alone are printed for
    scale. The issue's size is a 128×128×4 latent (1024² pixels, 512-px tiles; ``--full``:
    16 times the default's work, so about half an hour on 2 busy cores); the default is
    32×32×4 (256², 128-px tiles) and ``--quick`` 16×16×4, the same tile layout at 1/16 and
    1/64 of the work.

Memory: ``peak tensors``, the peak bytes held by CPU tensors allocated during a call
(:func:`common.peak_cpu_memory`, torch profiler: exact and repeatable, every tensor either
library allocates, not the weights, nor oneDNN's or glibc's own buffers), taken on each
eager contender's checking call in (a) and (b) and on a first, profiled call in (c); and in
(c) ``RSS``, how far the process's resident set rose above its level at the start of each
timed call (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` after
``malloc_trim`` handed the heap's free pages back: everything the process touched, so also
oneDNN's buffers, allocator caching and fragmentation). (c) also prints each call's CPU
seconds, steadier than wall time when other jobs share the cores.

The floor of (a) and (b): the shared kernel floor (each matrix product, convolution and
attention kernel replayed alone, warm; :func:`common.kernel_floor`), and the FLOPs of the
forward (``torch.utils.flop_counter``, SDPA included) over this machine's fp32 GEMM rate
(a 2048² matmul, best of 3).

Run: ``uv run python tests/benchmarks/bench_diffusion.py`` (8 minutes on 2 cores shared with
other jobs, 14 at their busiest; the first compile pays inductor's start-up, 1.5-3.5
minutes), ``--quick`` (one timed round, no compiled contenders, a 16×16×4 tiled latent:
about 4 minutes), ``--full`` (the issue's 128×128×4 tiled latent), ``--repeat`` /
``--warmup`` / ``--tiled-repeat`` to set the rounds, ``--parts`` to run a subset,
``--compile-vae`` to add compiled decoders to (b) (each compile took 2-4 minutes on 2 busy
cores, and the compiled vats decoder used 25 % more CPU time than the eager one).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

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

from vats_core.attention import resolve_backend
from vats_diffusion import DiT, dit_preset, vae_preset
from vats_diffusion.interop import from_diffusers
from vats_diffusion.vae import tile_spans

DIT_BATCH = 8
# DiT-S/2 (Peebles & Xie, Table 1) in diffusers' terms: 6 heads of 64, 12 layers, 32×32×4
# latents, patch 2, learned sigma (8 output channels), 1000 classes.
DIT_S2 = dict(
    num_attention_heads=6,
    attention_head_dim=64,
    num_layers=12,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    sample_size=32,
    num_embeds_ada_norm=1000,
)
# SD 1.x/2.x's AutoencoderKL shape; sample_size 512 is SD's, the tile size of enable_tiling.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
# Inductor options of every compiled contender: freezing folds the weights into the graph as
# constants (inference only), so inductor can prepack them for its GEMMs and convolutions.
COMPILE_OPTIONS = {"freezing": True}
PARTS = ("dit", "vae", "tiled")
TOLERANCE = 1e-4  # relative error, Frobenius, against diffusers eager


def _infer(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            fn()

    return call


# ---------------------------------------------------------------------- work and rates


def _sdpa_flops(q: list[int], k: list[int], v: list[int], *args, **kwargs) -> int:
    """Scores and weighted values: ``2·B·H·L·S·(E + Ev)`` (flop_counter has no CPU SDPA)."""
    return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()``'s result and the FLOPs of its matrix products, convolutions and attention."""
    mapping = {
        torch.ops.aten.scaled_dot_product_attention: _sdpa_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def gemm_rate(n: int = 2048, repeat: int = 3) -> float:
    """FLOP/s of an fp32 ``n × n`` matmul on this machine's threads: best of ``repeat``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_flop_floor(flops: int, rate: float, times: dict[str, float]) -> None:
    floor = flops / rate
    rates = ", ".join(f"{name} {flops / s / 1e9:.0f}" for name, s in times.items())
    print(
        f"  work {flops / 1e9:.1f} GFLOP per call (matrix products, convolutions, attention); "
        f"at this machine's fp32 GEMM rate, {rate / 1e9:.0f} GFLOP/s, that is {floor * 1e3:.0f} ms"
    )
    print(f"  achieved GFLOP/s: {rates}")


# ---------------------------------------------------------------------- resident memory


_LIBC = None


def _malloc_trim() -> None:
    """Hand glibc's free heap pages back to the kernel, so that RSS starts at what is in use."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def timed_rss(fn: Callable[[], object]) -> tuple[float, float, int | None]:
    """One ``fn()``: its wall seconds, the process's CPU seconds (all threads; steadier than
    wall time on a shared machine), and how far the resident set rose above its start level
    (bytes; None where the kernel cannot reset its high-water mark)."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        start: int | None = _status_kib("VmRSS")
    except OSError:
        start = None
    cpu = time.process_time()
    seconds = _seconds(fn)
    cpu = time.process_time() - cpu
    rise = None if start is None else (_status_kib("VmHWM") - start) * 1024
    return seconds, cpu, rise


def _fmt_rss(n: int | None) -> str:
    return "n/a" if n is None else fmt_bytes(n)


def _max_error(got: Tensor, want: Tensor) -> str:
    """``max |got - want|``, also relative to ``max |want|``, and the Frobenius relative error."""
    diff = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return (
        f"max abs error {diff:.1e} ({diff / scale:.1e} of max |out|), "
        f"relative (Frobenius) {relative_error(got, want):.1e}"
    )


def check_contenders(
    contenders: dict[str, Callable[[], Tensor]], reference: str
) -> tuple[dict[str, str], int, dict[str, int]]:
    """Run every contender once, check its output against ``reference``'s and print the
    errors. Compiled ones compile here, outside the timed calls; the eager ones' calls are
    profiled for their peak tensor memory (:func:`common.peak_cpu_memory`), the reference's
    also counted for FLOPs.

    Returns:
        notes on the compiles, the reference call's FLOPs, the eager contenders' peaks.
    """
    notes: dict[str, str] = {}
    peaks: dict[str, int] = {}
    outs: dict[str, tuple[Tensor, int]] = {}
    with torch.inference_mode():
        ref = contenders[reference]
        peaks[reference] = peak_cpu_memory(lambda: outs.__setitem__(reference, count_flops(ref)))
        want, flops = outs[reference]
        for name, fn in contenders.items():
            if name == reference:
                continue
            watch = CompileWatch()
            t0 = time.perf_counter()
            if "compiled" in name:
                with watch():
                    got = fn()
            else:
                peaks[name] = peak_cpu_memory(lambda name=name, fn=fn: outs.__setitem__(name, fn()))
                got = outs[name]
            if watch.graphs:
                notes[name] = f"   (first call {time.perf_counter() - t0:.0f} s: {watch.summary()})"
            err = relative_error(got, want)
            print(f"  {name:18s} vs {reference}: {_max_error(got, want)}")
            require(err < TOLERANCE, f"{name} differs from {reference}: relative error {err:.1e}")
    return notes, flops, peaks


# ---------------------------------------------------------------------- (a) DiT


def build_dit() -> tuple[torch.nn.Module, DiT]:
    """diffusers DiT-S/2 (random init, one embedder copied into every block) and ours."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    peer = DiTTransformer2DModel(**DIT_S2).eval()
    state = peer.state_dict()  # views of the parameters: copying into them edits the model
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("transformer_blocks.0.norm1.emb."):
                for i in range(1, peer.config.num_layers):
                    state[key.replace(".0.", f".{i}.", 1)].copy_(value)
    ours = from_diffusers(peer).eval()
    preset = dit_preset("DiT-S/2", head_dim=64, mlp_hidden_dim=4 * 384)
    require(ours.config == preset, f"the imported config is not DiT-S/2: {ours.config}")
    return peer, ours


def bench_dit(*, repeat: int, warmup: int, compiled: bool, rate: float) -> None:
    from diffusers import __version__ as diffusers_version

    peer, ours = build_dit()
    cfg = ours.config
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"\n-- (a) DiT-S/2 vs diffusers {diffusers_version} DiTTransformer2DModel: dim {cfg.dim}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads, patch {cfg.patch_size}, "
        f"{n_params / 1e6:.1f} M parameters; batch {DIT_BATCH} of 32x32x4 latents "
        f"({(32 // cfg.patch_size) ** 2} tokens), class-conditional forward"
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(DIT_BATCH, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (DIT_BATCH,), generator=g)
    y = torch.randint(0, 1000, (DIT_BATCH,), generator=g)

    def diffusers_fn() -> Tensor:
        return peer(x, timestep=t, class_labels=y, return_dict=False)[0]

    def vats_fn() -> Tensor:
        return ours(x, t, class_labels=y)

    contenders: dict[str, Callable[[], Tensor]] = {
        "diffusers eager": diffusers_fn,
        "vats eager": vats_fn,
    }
    if compiled:
        contenders["diffusers compiled"] = torch.compile(diffusers_fn, options=COMPILE_OPTIONS)
        contenders["vats compiled"] = torch.compile(vats_fn, options=COMPILE_OPTIONS)
    q = torch.zeros(DIT_BATCH, cfg.n_heads, 256, 64)
    print(
        f"vats attention backend: {resolve_backend(q, q, q).value}; diffusers attention "
        f"processor: {type(peer.transformer_blocks[0].attn1.processor).__name__}"
        + (f"; compiled with inductor options {COMPILE_OPTIONS}" if compiled else "")
    )
    notes, flops, peaks = check_contenders(contenders, "diffusers eager")
    fns = {name: _infer(fn) for name, fn in contenders.items()}
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat, warmup=warmup)
    print(f"forward ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):")
    for name in fns:
        ips = DIT_BATCH / times[name]
        mem = f", peak tensors {fmt_bytes(peaks[name]):>10}" if name in peaks else ""
        print(
            f"  {name:18s} {times[name] * 1e3:8.0f} ms  ({ips:6.2f} latents/s){mem}"
            f"{notes.get(name, '')}"
        )
    ratio("vats eager / diffusers eager", times["diffusers eager"] / times["vats eager"], ">= 1.2x")
    if compiled:
        ratio(
            "vats compiled / diffusers compiled",
            times["diffusers compiled"] / times["vats compiled"],
            ">= 1.2x",
        )
        ratio("vats compiled / diffusers eager", times["diffusers eager"] / times["vats compiled"])
        ratio(
            "diffusers compiled / diffusers eager",
            times["diffusers eager"] / times["diffusers compiled"],
        )
    eager = {"diffusers": times["diffusers eager"], "vats": times["vats eager"]}
    floors = {"diffusers": kernel_floor(diffusers_fn), "vats": kernel_floor(vats_fn)}
    print_floor("diffusers", eager, floors)
    print_flop_floor(flops, rate, times)


# ---------------------------------------------------------------------- (b) VAE decode


def build_vae() -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers AutoencoderKL of SD's shape (random init) and ours."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    peer = AutoencoderKL(**SD_VAE).eval()
    ours = from_diffusers(peer).eval()
    require(ours.config == vae_preset("sd"), f"the imported config is not sd: {ours.config}")
    return peer, ours


def bench_vae_decode(peer, ours, *, repeat: int, warmup: int, compiled: bool, rate: float) -> None:
    n_params = sum(p.numel() for p in ours.decoder.parameters())
    print(
        f"\n-- (b) VAE decode vs diffusers AutoencoderKL: block channels "
        f"{ours.config.block_out_channels}, {ours.config.layers_per_block} layers per block, "
        f"decoder {n_params / 1e6:.1f} M parameters; one 32x32x4 latent -> 256x256 pixels"
    )
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))

    def diffusers_fn() -> Tensor:
        return peer.decode(z, return_dict=False)[0]

    def vats_fn() -> Tensor:
        return ours.decode(z)

    contenders: dict[str, Callable[[], Tensor]] = {
        "diffusers eager": diffusers_fn,
        "vats eager": vats_fn,
    }
    if compiled:
        contenders["diffusers compiled"] = torch.compile(diffusers_fn, options=COMPILE_OPTIONS)
        contenders["vats compiled"] = torch.compile(vats_fn, options=COMPILE_OPTIONS)
    notes, flops, peaks = check_contenders(contenders, "diffusers eager")
    fns = {name: _infer(fn) for name, fn in contenders.items()}
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat, warmup=warmup)
    eager = ("diffusers eager", "vats eager")
    print(f"decode ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):")
    for name in fns:
        mem = f", peak tensors {fmt_bytes(peaks[name]):>10}" if name in peaks else ""
        print(f"  {name:18s} {times[name] * 1e3:8.0f} ms{mem}{notes.get(name, '')}")
    ratio("vats eager / diffusers eager", times["diffusers eager"] / times["vats eager"], ">= 1.2x")
    if compiled:
        ratio(
            "vats compiled / diffusers compiled",
            times["diffusers compiled"] / times["vats compiled"],
        )
        ratio("vats compiled / diffusers eager", times["diffusers eager"] / times["vats compiled"])
    floors = {"diffusers": kernel_floor(diffusers_fn), "vats": kernel_floor(vats_fn)}
    print_floor("diffusers", {"diffusers": times[eager[0]], "vats": times[eager[1]]}, floors)
    print_flop_floor(flops, rate, times)


# ---------------------------------------------------------------------- (c) tiled decode


def bench_tiled(peer, ours, *, latent: int, repeat: int) -> None:
    f = ours.downsample_factor
    tile_latent = latent // 2  # diffusers' geometry at the issue's size: 64 of 128
    tile_px = tile_latent * f
    overlap_px = tile_px // 4  # diffusers' tile_overlap_factor, 0.25
    # enable_tiling() reads these attributes (set from config.sample_size at construction).
    peer.tile_sample_min_size, peer.tile_latent_min_size = tile_px, tile_latent
    stride = int(tile_latent * (1 - peer.tile_overlap_factor))
    peer_tiles = [min(tile_latent, latent - s) for s in range(0, latent, stride)]
    ours_tiles = [b - a for a, b in tile_spans(latent, tile_latent, overlap_px // f)]
    print(
        f"\n-- (c) tiled decode of one {latent}x{latent}x4 latent -> {latent * f}x{latent * f} "
        f"pixels: tiles of {tile_px} px ({tile_latent} latent), overlap {overlap_px} px, "
        f"{repeat} timed call(s) each\n"
        f"  tiles per side (latent rows): diffusers {peer_tiles} (stride {stride}, the last ones "
        f"cut short), vats {ours_tiles} (laid out evenly, equal, shrunk to the overlap)"
    )
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(3))

    def diffusers_tiled() -> Tensor:
        peer.enable_tiling()
        try:
            return peer.decode(z, return_dict=False)[0]
        finally:
            peer.disable_tiling()

    def vats_tiled() -> Tensor:
        return ours.decode(z, tile_size=tile_px, tile_overlap=overlap_px)

    def vats_untiled() -> Tensor:
        return ours.decode(z)

    contenders = {
        "diffusers tiled": diffusers_tiled,
        "vats tiled": vats_tiled,
        "vats untiled": vats_untiled,
    }
    outs: dict[str, Tensor] = {}
    peaks: dict[str, int] = {}
    for name, fn in contenders.items():  # the profiled call: tensor peak, output, warm-up
        with torch.inference_mode():
            peaks[name] = peak_cpu_memory(lambda name=name, fn=fn: outs.__setitem__(name, fn()))
    with torch.inference_mode():
        one_tile = peak_cpu_memory(lambda: ours.decode(z[..., :tile_latent, :tile_latent]))
    samples: dict[str, list[tuple[float, float, int | None]]] = {n: [] for n in contenders}
    for _ in range(repeat):  # alternating, as time_alternating, with the RSS rise per call
        for name, fn in contenders.items():
            samples[name].append(timed_rss(_infer(fn)))
    times = {name: statistics.median(s[0] for s in v) for name, v in samples.items()}
    cpu = {name: statistics.median(s[1] for s in v) for name, v in samples.items()}
    print(
        "  decode, one latent (medians; RSS: the largest rise over the timed calls; error vs "
        "untiled: random weights, so the blend's, not image quality):"
    )
    want = outs["vats untiled"]
    for name in contenders:
        rises = [r for _, _, r in samples[name] if r is not None]
        rss = max(rises) if rises else None
        err = "" if name == "vats untiled" else f"; vs untiled: {_max_error(outs[name], want)}"
        print(
            f"  {name:16s} {times[name]:6.1f} s (CPU {cpu[name]:5.1f} s), peak tensors "
            f"{fmt_bytes(peaks[name]):>10}, RSS +{_fmt_rss(rss):>10}{err}"
        )
    area = latent * latent
    print(
        f"  one {tile_px}-px tile decoded alone: peak tensors {fmt_bytes(one_tile)} (what a tiled "
        f"decode holds at once, whatever the image size, plus the output)\n"
        f"  decoded area / untiled area: diffusers {sum(peer_tiles) ** 2 / area:.2f}, vats "
        f"{sum(ours_tiles) ** 2 / area:.2f}"
    )
    ratio("vats tiled / diffusers tiled", times["diffusers tiled"] / times["vats tiled"])
    ratio("vats tiled / diffusers tiled (CPU)", cpu["diffusers tiled"] / cpu["vats tiled"])
    ratio("vats untiled / vats tiled", times["vats tiled"] / times["vats untiled"])
    ratio("peak tensors: diffusers / vats tiled", peaks["diffusers tiled"] / peaks["vats tiled"])
    ratio("peak tensors: untiled / vats tiled", peaks["vats untiled"] / peaks["vats tiled"])


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round, no compile, a 16x16x4 tiled latent"
    )
    parser.add_argument(
        "--full", action="store_true", help="the issue's 128x128x4 tiled latent (~30 min)"
    )
    parser.add_argument("--repeat", type=int, help="timed alternating rounds (default 3, quick 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls before the timed rounds, after the checking call every contender "
        "makes first (default: 1 for the DiT, 0 for the VAE's seconds-long decodes)",
    )
    parser.add_argument("--tiled-latent", type=int, help="side of the tiled latent (multiple of 8)")
    parser.add_argument(
        "--tiled-repeat", type=int, default=1, help="timed calls per tiled contender"
    )
    parser.add_argument("--no-compile", action="store_true", help="eager contenders only")
    parser.add_argument(
        "--compile-vae", action="store_true", help="also time compiled VAE decoders (b)"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    latent = args.tiled_latent or (16 if args.quick else 128 if args.full else 32)
    bad_warmup = args.warmup is not None and args.warmup < 0
    if repeat < 1 or args.tiled_repeat < 1 or bad_warmup or latent < 16 or latent % 8:
        parser.error(
            "need --repeat and --tiled-repeat >= 1, --warmup >= 0, and --tiled-latent a "
            "multiple of 8 >= 16"
        )
    compiled = not (args.quick or args.no_compile)

    import diffusers

    diffusers.logging.set_verbosity_error()
    banner("bench_diffusion: vats DiT and VAE vs diffusers (same weights)")
    print(f"peer: diffusers {version('diffusers')}")
    rate = gemm_rate()
    if "dit" in parts:
        warmup = 1 if args.warmup is None else args.warmup
        bench_dit(repeat=repeat, warmup=warmup, compiled=compiled, rate=rate)
    if parts & {"vae", "tiled"}:
        peer, ours = build_vae()
        if "vae" in parts:
            bench_vae_decode(
                peer,
                ours,
                repeat=repeat,
                warmup=0 if args.warmup is None else args.warmup,
                compiled=compiled and args.compile_vae,
                rate=rate,
            )
        if "tiled" in parts:
            bench_tiled(peer, ours, latent=latent, repeat=args.tiled_repeat)


if __name__ == "__main__":
    main()
