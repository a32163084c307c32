"""DiT, VAE, VideoDiT against diffusers; factorized video attention; AudioDiT throughput.

The peers of (a)-(d), diffusers' ``DiTTransformer2DModel``, ``AutoencoderKL`` and
``LatteTransformer3DModel``, are random-init (seeded) and ours are converted from them with
:func:`vats_diffusion.interop.from_diffusers`, so both sides hold the same weights; the
imported configs are checked to be the ``DiT-S/2``, ``sd`` and (Latte-S/2's fields over)
``latte-tiny`` presets. fp32 on CPU, 2 threads, ``torch.inference_mode``, both at their
defaults (diffusers' attention processor is torch SDPA). Every contender's output is checked against the diffusers eager one before
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
(d) VideoDiT: a Latte-S/2-shaped transformer (Latte's S size, DiT-S's width and depth: dim
    384, 12 layers of a spatial and a temporal block, 6 heads, patch 2; the layout of
    Latte's released checkpoints: adaLN-single, no affine norms, tanh GELU, learned sigma,
    4096-wide T5 captions projected to the width) on one clip of 16 frames of 16×16×4
    latents (64 tokens per frame, 1024 in all; 16 is Latte's ``video_length``, the only
    clip length besides one frame that diffusers' Latte runs), with 32 text positions of
    which 20 are real. diffusers' Latte takes the text mask only as an additive bias
    ``(B·T, 1, S)`` (see :mod:`vats_diffusion.interop.latte`), built once outside the timed
    calls; vats takes the ``(B, S)`` bool mask. Contenders, checks, compile options and
    floors as in (a). Goal: vats >= 1.2x diffusers, eager against eager and compiled
    against compiled.
(e) Factorized against joint space-time attention: (d)'s model, imported from a Latte of
    ``video_length`` 32, on one clip of 8, 16 and 32 frames (512, 1024, 2048 tokens), text
    as in (d): time (wall and CPU seconds), peak tensors and FLOPs of one VideoDiT forward
    as built (spatial attention within each frame, temporal across the frames at each
    position: ``O(T·N²)`` and ``O(N·T²)`` scores for N tokens per frame) against the same
    model, weights shared, with joint attention over all ``T·N`` tokens in every block
    (``O((T·N)²)``). VideoDiT
    has no switch for joint attention, so the benchmark builds it: every block is wrapped so
    that the ``attn_len`` VideoDiT's forward hands ``DiTBlock.forward`` is dropped and the
    block attends over the whole sequence; the rest is VideoDiT's own forward (sin-cos
    positions are added to the tokens, so their order does not matter to full attention).
    Checked first: the two outputs differ (the switch took effect). Printed: a row per
    frame count, then each one's growth per doubling of T (linear: 2x). Goal: factorized
    linear in T. The FLOPs and peaks are exact and repeatable; the times are not, on cores
    other jobs share (a single ``--quick`` round on 2 busy cores gave growths far from
    either line). In that run both peaks were equal at every T, 2.0x per doubling: torch's
    SDPA kernel on CPU works through the scores in blocks and never holds the
    ``T·N × T·N`` matrix, so activations that grow with the token count set the peak of
    both, and joint attention costs time, not memory, here.
(f) AudioDiT forward throughput: the ``sounds`` preset (dim 128, 4 layers, 80 mels, patch
    4) with ``max_frames`` and ``max_seconds`` raised to 30 s (3000 frames of 10 ms, 750
    tokens), on 5 s and 30 s of mel frames at batch 1 and 8, with text (16 positions, rows
    of different real lengths) and duration (start 0 s, total the clip's length)
    conditioning: tokens, frames and seconds of sound per second, with the FLOPs and peak
    tensors of a call. Eager, random init (checked for shape and finite values only: there
    is no peer). No goal: the figure is reported.

Memory: ``peak tensors``, the peak bytes held by CPU tensors allocated during a call
(:func:`common.peak_cpu_memory`, torch profiler: exact and repeatable, every tensor either
library allocates, not the weights, nor oneDNN's or glibc's own buffers), taken on each
eager contender's checking call in (a), (b) and (d) and on a first, profiled call (which
also warms it up) in (c), (e) and (f); and in (c) ``RSS``, how far the process's resident
set rose above its level at the start of each timed call (the kernel's high-water mark,
reset through ``/proc/self/clear_refs`` after ``malloc_trim`` handed the heap's free pages
back: everything the process touched, so also oneDNN's buffers, allocator caching and
fragmentation). (c) and (e) also print each call's CPU seconds, steadier than wall time
when other jobs share the cores.

The floor of (a), (b) and (d): the shared kernel floor (each matrix product, convolution and
attention kernel replayed alone, warm; :func:`common.kernel_floor`), and the FLOPs of the
forward (``torch.utils.flop_counter``, SDPA included) over this machine's fp32 GEMM rate
(a 2048² matmul, best of 3).

Run: ``uv run python tests/benchmarks/bench_diffusion.py`` ((a)-(c): 8 minutes on 2 cores
shared with other jobs, 14 at their busiest; the first compile pays inductor's start-up,
1.5-3.5 minutes), ``--quick`` (one timed round, no compiled contenders, a 16×16×4 tiled
latent: (a)-(c) about 4 minutes; ``--quick --parts video,spacetime,audio`` took 5 minutes
of wall time, 2.5 of CPU, on 2 cores shared with other jobs), ``--full`` (the issue's
128×128×4 tiled latent), ``--repeat`` / ``--warmup`` / ``--tiled-repeat`` to set the rounds,
``--parts`` to run a subset (``dit,vae,tiled,video,spacetime,audio``: (a) to (f)),
``--compile-vae`` to add compiled decoders to (b) (each compile took 2-4 minutes on 2 busy
cores, and the compiled vats decoder used 25 % more CPU time than the eager one).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor, nn
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
from vats_diffusion import (
    AudioDiT,
    DiT,
    VideoDiT,
    VideoPosEmbed,
    audio_dit_preset,
    dit_preset,
    frames_for_seconds,
    vae_preset,
    video_dit_preset,
)
from vats_diffusion.dit_layers import DiTBlock
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
# Latte-S/2: Latte's S size is DiT-S/2's transformer (12 layers, 6 heads of 64, patch 2,
# learned sigma), here with the layout of Latte's released checkpoints: adaLN-single, no
# affine norms, tanh GELU, attention biases, T5-XXL's 4096-wide captions projected to the
# width. video_length is set per part: diffusers' Latte runs clips of that length only.
VIDEO_SIDE = 16  # latent frame side: 64 tokens per frame at patch 2
LATTE_S2 = dict(
    DIT_S2,
    sample_size=VIDEO_SIDE,
    cross_attention_dim=384,
    caption_channels=4096,
    attention_bias=True,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
VIDEO_FRAMES, VIDEO_BATCH = 16, 1  # (d): Latte's default video_length
TEXT_TOKENS, TEXT_REAL = 32, 20  # (d), (e): text positions, of which real (the rest padding)
SPACETIME_FRAMES = (8, 16, 32)  # (e)
AUDIO_SECONDS, AUDIO_BATCHES = (5.0, 30.0), (1, 8)  # (f)
AUDIO_TEXT_TOKENS = 16
# Inductor options of every compiled contender: freezing folds the weights into the graph as
# constants (inference only), so inductor can prepack them for its GEMMs and convolutions.
COMPILE_OPTIONS = {"freezing": True}
PARTS = ("dit", "vae", "tiled", "video", "spacetime", "audio")
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


def time_alternating_rss(
    fns: dict[str, Callable[[], object]], *, repeat: int
) -> tuple[dict[str, float], dict[str, float], dict[str, int | None]]:
    """:func:`common.time_alternating` (no warm-up) with :func:`timed_rss` on every call, each
    under ``inference_mode``: the median wall and CPU seconds of each fn, and its largest
    resident-set rise (None where the kernel cannot tell)."""
    samples: dict[str, list[tuple[float, float, int | None]]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(timed_rss(_infer(fn)))
    wall = {name: statistics.median(s[0] for s in v) for name, v in samples.items()}
    cpu = {name: statistics.median(s[1] for s in v) for name, v in samples.items()}
    rise: dict[str, int | None] = {}
    for name, v in samples.items():
        rises = [r for _, _, r in v if r is not None]
        rise[name] = max(rises) if rises else None
    return wall, cpu, rise


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
    outs: dict[str, Tensor] = {}
    with torch.inference_mode():
        want, flops, peaks[reference] = profiled_call(contenders[reference])
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


def profiled_call(fn: Callable[[], Tensor]) -> tuple[Tensor, int, int]:
    """One ``fn()`` under ``inference_mode``: its output, its FLOPs (:func:`count_flops`) and
    the peak bytes of the tensors it allocated (:func:`common.peak_cpu_memory`)."""
    box: dict[str, tuple[Tensor, int]] = {}
    with torch.inference_mode():
        peak = peak_cpu_memory(lambda: box.__setitem__("out", count_flops(fn)))
    out, flops = box["out"]
    return out, flops, peak


def compare_with_diffusers(
    diffusers_fn: Callable[[], Tensor],
    vats_fn: Callable[[], Tensor],
    *,
    what: str,
    compiled: bool,
    repeat: int,
    warmup: int,
    rate: float,
    per_call: tuple[int, str] | None = None,
    compiled_goal: str | None = ">= 1.2x",
) -> None:
    """The comparison of (a), (b) and (d): diffusers and vats eager, and with ``compiled``
    both compiled (``COMPILE_OPTIONS``, the same on both sides), checked against diffusers
    eager (:func:`check_contenders`), then timed in one alternation. Prints each contender's
    time (with ``per_call = (items per call, their name)``, its rate too), the ratios against
    their goals (eager >= 1.2x; compiled ``compiled_goal``), the kernel floors and the FLOP
    floor.

    Args:
        what: the timed call's name in the printout ("forward", "decode").
    """
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
    print(f"{what} ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):")
    for name in fns:
        rate_note = ""
        if per_call is not None:
            rate_note = f"  ({per_call[0] / times[name]:6.2f} {per_call[1]}/s)"
        mem = f", peak tensors {fmt_bytes(peaks[name]):>10}" if name in peaks else ""
        print(f"  {name:18s} {times[name] * 1e3:8.0f} ms{rate_note}{mem}{notes.get(name, '')}")
    ratio("vats eager / diffusers eager", times["diffusers eager"] / times["vats eager"], ">= 1.2x")
    if compiled:
        ratio(
            "vats compiled / diffusers compiled",
            times["diffusers compiled"] / times["vats compiled"],
            compiled_goal,
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

    q = torch.zeros(DIT_BATCH, cfg.n_heads, 256, 64)
    print(
        f"vats attention backend: {resolve_backend(q, q, q).value}; diffusers attention "
        f"processor: {type(peer.transformer_blocks[0].attn1.processor).__name__}"
        + (f"; compiled with inductor options {COMPILE_OPTIONS}" if compiled else "")
    )
    compare_with_diffusers(
        diffusers_fn,
        vats_fn,
        what="forward",
        compiled=compiled,
        repeat=repeat,
        warmup=warmup,
        rate=rate,
        per_call=(DIT_BATCH, "latents"),
    )


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

    compare_with_diffusers(
        diffusers_fn,
        vats_fn,
        what="decode",
        compiled=compiled,
        repeat=repeat,
        warmup=warmup,
        rate=rate,
        compiled_goal=None,
    )


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
    times, cpu, rss = time_alternating_rss(contenders, repeat=repeat)
    print(
        "  decode, one latent (medians; RSS: the largest rise over the timed calls; error vs "
        "untiled: random weights, so the blend's, not image quality):"
    )
    want = outs["vats untiled"]
    for name in contenders:
        err = "" if name == "vats untiled" else f"; vs untiled: {_max_error(outs[name], want)}"
        print(
            f"  {name:16s} {times[name]:6.1f} s (CPU {cpu[name]:5.1f} s), peak tensors "
            f"{fmt_bytes(peaks[name]):>10}, RSS +{_fmt_rss(rss[name]):>10}{err}"
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


# ---------------------------------------------------------------------- (d) VideoDiT


def build_latte(frames: int) -> tuple[torch.nn.Module, VideoDiT]:
    """diffusers' Latte-S/2 for clips of ``frames`` frames (its ``video_length``; random
    init) and ours imported from it."""
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    peer = LatteTransformer3DModel(**LATTE_S2, video_length=frames).eval()
    ours = from_diffusers(peer).eval()
    preset = video_dit_preset(
        "latte-tiny",
        sample_size=VIDEO_SIDE,
        max_frames=frames,
        dim=384,
        n_layers=12,
        n_heads=6,
        head_dim=64,
        mlp_hidden_dim=4 * 384,
        text_dim=LATTE_S2["caption_channels"],
    )
    require(ours.config == preset, f"the imported config is not Latte-S/2: {ours.config}")
    return peer, ours


def video_inputs(batch: int, frames: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A clip ``(B, 4, T, side, side)``, timesteps ``(B,)``, text states ``(B, S, Dt)`` and
    their mask ``(B, S)`` (``TEXT_REAL`` real tokens, the rest padding)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 4, frames, VIDEO_SIDE, VIDEO_SIDE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, TEXT_TOKENS, LATTE_S2["caption_channels"], generator=g)
    mask = (torch.arange(TEXT_TOKENS) < TEXT_REAL).expand(batch, TEXT_TOKENS)
    return x, t, text, mask


def vats_video_call(
    model: VideoDiT, x: Tensor, t: Tensor, text: Tensor, mask: Tensor
) -> Callable[[], Tensor]:
    """``model``'s forward on these inputs, as a call of no arguments."""

    def call() -> Tensor:
        return model(x, t, text_states=text, text_mask=mask)

    return call


def bench_video(*, repeat: int, warmup: int, compiled: bool, rate: float) -> None:
    from diffusers import __version__ as diffusers_version

    peer, ours = build_latte(VIDEO_FRAMES)
    cfg = ours.config
    n_params = sum(p.numel() for p in ours.parameters())
    per_frame = (VIDEO_SIDE // cfg.patch_size) ** 2
    print(
        f"\n-- (d) VideoDiT (Latte-S/2) vs diffusers {diffusers_version} LatteTransformer3DModel: "
        f"dim {cfg.dim}, {cfg.n_layers} layers (a spatial and a temporal block each), "
        f"{cfg.n_heads} heads, patch {cfg.patch_size}, {n_params / 1e6:.1f} M parameters; "
        f"batch {VIDEO_BATCH} clip of {VIDEO_FRAMES} frames of {VIDEO_SIDE}x{VIDEO_SIDE}x4 "
        f"latents ({per_frame} tokens per frame, {VIDEO_FRAMES * per_frame} in all), "
        f"{TEXT_TOKENS} text positions of width {cfg.text_dim}, {TEXT_REAL} real"
    )
    x, t, text, mask = video_inputs(VIDEO_BATCH, VIDEO_FRAMES)
    # diffusers' Latte takes the text mask only as an additive bias, one row per frame
    # (interop/latte.py); built here once, outside the timed calls.
    bias = ((1 - mask.float()) * -10000.0).repeat_interleave(VIDEO_FRAMES, 0)[:, None]

    def diffusers_fn() -> Tensor:
        return peer(
            x,
            timestep=t,
            encoder_hidden_states=text,
            encoder_attention_mask=bias,
            return_dict=False,
        )[0]

    q = torch.zeros(VIDEO_BATCH * VIDEO_FRAMES, cfg.n_heads, per_frame, 64)
    print(
        f"vats attention backend (spatial): {resolve_backend(q, q, q).value}; diffusers "
        f"attention processor: {type(peer.transformer_blocks[0].attn1.processor).__name__}"
        + (f"; compiled with inductor options {COMPILE_OPTIONS}" if compiled else "")
    )
    compare_with_diffusers(
        diffusers_fn,
        vats_video_call(ours, x, t, text, mask),
        what="forward",
        compiled=compiled,
        repeat=repeat,
        warmup=warmup,
        rate=rate,
        per_call=(VIDEO_BATCH * VIDEO_FRAMES, "frames"),
    )


# ---------------------------------------------------------------------- (e) space-time


class WholeClipBlock(nn.Module):
    """A VideoDiT block whose self-attention runs over all of the clip's tokens: it drops the
    ``attn_len`` VideoDiT passes (one frame's tokens, or one position's frames), so
    :meth:`DiTBlock.forward` attends over the whole sequence. Everything else is the block's
    own: weights, modulation, cross-attention, MLP."""

    def __init__(self, block: DiTBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, cond: Tensor, *, attn_len: int | None = None, **options) -> Tensor:
        # A shim, not an API: every other keyword of DiTBlock.forward goes through unchanged.
        del attn_len  # the whole clip
        return self.block(x, cond, **options)


def joint_attention(model: VideoDiT) -> VideoDiT:
    """``model`` with joint space-time attention: the same parameter tensors (not copies) and
    the same forward, every block wrapped in :class:`WholeClipBlock`. VideoDiT has no switch
    for it; with sin-cos positions (added to the tokens) the order the forward puts the
    tokens in does not change what full attention computes."""
    require(
        model.config.pos_embed is VideoPosEmbed.SINCOS,
        "joint attention needs sin-cos positions (RoPE tables cover one frame or one line)",
    )
    with torch.device("meta"):
        joint = VideoDiT(model.config)
    joint.load_state_dict(model.state_dict(), assign=True)
    joint.spatial_blocks = nn.ModuleList(WholeClipBlock(b) for b in joint.spatial_blocks)
    joint.temporal_blocks = nn.ModuleList(WholeClipBlock(b) for b in joint.temporal_blocks)
    held = [*joint.parameters(), *joint.buffers()]
    require(not any(p.is_meta for p in held), "the joint model holds meta tensors")
    return joint.eval()


def _growth(values: list[float]) -> str:
    return ", ".join(f"{b / a:.2f}x" for a, b in itertools.pairwise(values))


def bench_spacetime(*, frames_list: tuple[int, ...], repeat: int) -> None:
    _, factorized = build_latte(max(frames_list))
    joint = joint_attention(factorized)
    cfg = factorized.config
    per_frame = (VIDEO_SIDE // cfg.patch_size) ** 2
    print(
        f"\n-- (e) factorized vs joint space-time attention: (d)'s Latte-S/2 imported at "
        f"video_length {max(frames_list)}, batch 1, {VIDEO_SIDE}x{VIDEO_SIDE}x4 latents "
        f"({per_frame} tokens per frame), text as (d); joint = the same weights and forward with "
        f"every block's self-attention over all T*{per_frame} tokens (peak: peak tensors); "
        f"forward only, "
        f"{repeat} alternating round(s) per clip length"
    )
    print(
        f"{'frames':>6} {'tokens':>6} | {'factorized':>10} {'joint':>9} {'joint/fact':>10} | "
        f"{'fact CPU':>8} {'joint CPU':>9} | {'fact peak':>10} {'joint peak':>10} | "
        f"{'fact work':>9} {'joint work':>10}"
    )
    rows: dict[str, dict[str, list[float]]] = {
        name: {"time": [], "CPU time": [], "peak tensors": [], "work": []}
        for name in ("factorized", "joint")
    }
    for frames in frames_list:
        inputs = video_inputs(1, frames)
        fns = {"factorized": vats_video_call(factorized, *inputs)}
        fns["joint"] = vats_video_call(joint, *inputs)
        outs: dict[str, Tensor] = {}
        for name, fn in fns.items():  # the profiled call: output, work, peak; the warm-up
            outs[name], flops, peak = profiled_call(fn)
            rows[name]["work"].append(flops)
            rows[name]["peak tensors"].append(peak)
        diff = relative_error(outs["joint"], outs["factorized"])
        require(diff > 1e-3, f"joint and factorized agree at {frames} frames ({diff:.1e})")
        wall, cpu, _ = time_alternating_rss(fns, repeat=repeat)
        for name in fns:
            rows[name]["time"].append(wall[name])
            rows[name]["CPU time"].append(cpu[name])
        fact, jnt = rows["factorized"], rows["joint"]
        print(
            f"{frames:6d} {frames * per_frame:6d} | {wall['factorized'] * 1e3:8.0f}ms "
            f"{wall['joint'] * 1e3:7.0f}ms {wall['joint'] / wall['factorized']:9.2f}x | "
            f"{cpu['factorized']:7.1f}s {cpu['joint']:8.1f}s | "
            f"{fmt_bytes(fact['peak tensors'][-1]):>10} {fmt_bytes(jnt['peak tensors'][-1]):>10} | "
            f"{fact['work'][-1] / 1e9:6.1f} GF {jnt['work'][-1] / 1e9:7.1f} GF"
        )
    steps = " -> ".join(str(f) for f in frames_list)
    print(f"  growth per doubling of the frames ({steps}; linear in T = 2.00x, quadratic = 4.00x):")
    for name, row in rows.items():
        growth = "; ".join(f"{what} {_growth(values)}" for what, values in row.items())
        print(f"  {name:10s} {growth}")
    print(
        "  (CPU: the process's CPU seconds per call, all threads: steadier than wall time when "
        "other jobs share the cores; work: FLOPs of matrix products and attention)"
    )


# ---------------------------------------------------------------------- (f) AudioDiT


def bench_audio(*, repeat: int) -> None:
    longest = max(AUDIO_SECONDS)
    sounds = audio_dit_preset("sounds")
    frames = frames_for_seconds(longest, sounds.sample_rate, sounds.hop_length, sounds.patch_size)
    cfg = sounds.replace(max_frames=frames, max_seconds=longest)
    torch.manual_seed(0)
    model = AudioDiT(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    hop_ms = 1e3 * cfg.hop_length / cfg.sample_rate
    print(
        f"\n-- (f) AudioDiT forward: the 'sounds' preset (dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads, {cfg.n_mels} mels, patch {cfg.patch_size} frames, "
        f"{n_params / 1e6:.1f} M parameters) with max_frames {cfg.max_frames} and max_seconds "
        f"{cfg.max_seconds:g}; frames of {hop_ms:g} ms; text ({AUDIO_TEXT_TOKENS} positions of "
        f"width {cfg.text_dim}, rows with {AUDIO_TEXT_TOKENS} down to fewer real ones) and "
        f"duration (start 0 s, total the clip's) conditioning; eager, {repeat} alternating "
        f"round(s)"
    )
    g = torch.Generator().manual_seed(5)
    calls: dict[str, Callable[[], Tensor]] = {}
    shapes: dict[str, tuple[float, int, int]] = {}  # (seconds, batch, frames)
    for seconds in AUDIO_SECONDS:
        for batch in AUDIO_BATCHES:
            n = cfg.frames_for(seconds)
            x = torch.randn(batch, cfg.n_mels, n, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            text = torch.randn(batch, AUDIO_TEXT_TOKENS, cfg.text_dim, generator=g)
            real = AUDIO_TEXT_TOKENS - torch.arange(batch) % AUDIO_TEXT_TOKENS  # (B,)
            mask = torch.arange(AUDIO_TEXT_TOKENS) < real[:, None]  # (B, S)
            total = torch.full((batch,), seconds)

            def call(x=x, t=t, text=text, mask=mask, total=total) -> Tensor:
                return model(
                    x,
                    t,
                    text_states=text,
                    text_mask=mask,
                    seconds_start=0.0,
                    seconds_total=total,
                )

            name = f"{seconds:g} s x {batch}"
            calls[name], shapes[name] = call, (seconds, batch, n)
    peaks: dict[str, int] = {}
    work: dict[str, int] = {}
    for name, fn in calls.items():  # the profiled call: work, peak; the warm-up
        out, work[name], peaks[name] = profiled_call(fn)
        _, batch, n = shapes[name]
        require(
            out.shape == (batch, cfg.n_mels, n) and bool(torch.isfinite(out).all()),
            f"AudioDiT's prediction for {name} is not finite or not {(batch, cfg.n_mels, n)}",
        )
    times = time_alternating(
        {name: _infer(fn) for name, fn in calls.items()}, repeat=repeat, warmup=0
    )
    print(
        f"{'audio':>6} {'batch':>5} {'frames':>6} {'tokens':>6} | {'forward':>9} "
        f"{'tokens/s':>9} {'frames/s':>9} {'audio s/s':>9} | {'work':>8} {'peak tensors':>12}"
    )
    for name, elapsed in times.items():
        seconds, batch, n = shapes[name]
        tokens = n // cfg.patch_size
        print(
            f"{seconds:5g}s {batch:5d} {n:6d} {tokens:6d} | {elapsed * 1e3:7.0f}ms "
            f"{batch * tokens / elapsed:9.0f} {batch * n / elapsed:9.0f} "
            f"{batch * seconds / elapsed:9.1f} | {work[name] / 1e9:5.1f} GF "
            f"{fmt_bytes(peaks[name]):>12}"
        )
    print(
        "  (frames and tokens per clip; tokens/s, frames/s and audio s/s over the whole batch: "
        "audio s/s = seconds of sound predicted per second of forward)"
    )


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
        help="untimed calls before the timed rounds of (a), (b) and (d), after the checking call "
        "every contender makes first (default: 1 for the DiT, 0 for the VAE's and the "
        "VideoDiT's seconds-long calls)",
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
    banner(
        "bench_diffusion: vats DiT, VAE and VideoDiT vs diffusers (same weights), factorized "
        "video attention, AudioDiT throughput"
    )
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
    if "video" in parts:
        warmup = 0 if args.warmup is None else args.warmup
        bench_video(repeat=repeat, warmup=warmup, compiled=compiled, rate=rate)
    if "spacetime" in parts:
        bench_spacetime(frames_list=SPACETIME_FRAMES, repeat=repeat)
    if "audio" in parts:
        bench_audio(repeat=repeat)


if __name__ == "__main__":
    main()
