"""Audio encoder against HF transformers' Whisper encoder, on Whisper-base's shape.

HF ``WhisperEncoder`` (random init: d_model 512, 6 layers, 8 heads, FFN 2048, 80 mels, 1500
positions) and ours converted from it with :func:`vats_audio.interop.from_transformers`, so
both hold the same weights (the imported config is checked to be the ``whisper-base``
preset). fp32 on CPU, 2 threads, ``torch.inference_mode``, HF at its defaults (its ``sdpa``
attention), vats at its defaults.

(a) 30 s: a batch of 4 clips of 3000 frames (what HF takes). Four contenders in one
    alternation: HF eager, HF compiled, vats eager (``forward_features``), vats compiled;
    compiled = ``torch.compile`` with inductor ``freezing`` (the inference recipe of
    DESIGN.md), the same options on both sides, compiled and warmed before the alternation
    (compile time and graph counts printed apart). Every contender's output is checked
    against HF eager's ``last_hidden_state`` before anything is timed (the script exits
    non-zero otherwise). Goal: vats eager >= 1.0x HF eager. Kernel floors and peak memory
    of the eager sides are printed.
(b) real lengths: a batch of 8 clips of 2 to 10 s (200 to 1000 frames). vats runs them as one
    padded batch with ``lengths`` (padded to the longest clip, 10 s; each clip's tokens equal
    its lone run, checked first); HF needs every clip padded to 30 s (HF's output on that
    padded input is checked against vats' on the same input). Eager both. The ratio,
    the work ratio it is read against and the peak memory of both are printed.
(c) the front end: log-mel features of the same 8 clips (as 16 kHz waveforms), HF's
    ``WhisperFeatureExtractor`` (numpy; pads every clip to 30 s) against vats' ``LogMel``
    (one padded batch on the real lengths), checked equal first: see
    :func:`bench_front_end`.

Run: ``uv run python tests/benchmarks/bench_audio.py`` (about 4-5 minutes on 2 cores, about
2 of them compiling), or with ``--quick`` (one timed round, no compiled contenders, under 2
minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

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

import vats_audio
from vats_audio.interop import from_transformers
from vats_audio.presets import audio_preset

N_MELS, FRAMES_30S, SAMPLE_RATE, HOP = 80, 3000, 16000, 160
BATCH_30S = 4
CLIP_SECONDS = (2.0, 3.0, 4.0, 5.0, 6.5, 7.0, 8.5, 10.0)  # (b): 8 clips of 2..10 s
# Inductor options of both compiled contenders: freezing folds the weights into the graph as
# constants (inference only), so inductor can prepack them for its GEMMs.
COMPILE_OPTIONS = {"freezing": True}


def whisper_base() -> tuple[torch.nn.Module, vats_audio.AudioEncoder]:
    """Random-init HF WhisperEncoder of Whisper-base's shape, and ours converted from it."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        d_model=512,
        encoder_layers=6,
        encoder_attention_heads=8,
        encoder_ffn_dim=2048,
        num_mel_bins=N_MELS,
        max_source_positions=FRAMES_30S // 2,
    )
    torch.manual_seed(0)
    peer = WhisperEncoder(config).eval()
    ours = from_transformers(peer).eval()
    require(
        ours.config == audio_preset("whisper-base"),
        "the imported config is not the whisper-base preset",
    )
    return peer, ours


def log_mel_like(batch: int, frames: int) -> Tensor:
    """Random features in the range Whisper's log-mel takes (about [-1, 1.5])."""
    return (torch.randn(batch, N_MELS, frames) * 0.5).clamp(-1.0, 1.5)


def _infer(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            fn()

    return call


# ---------------------------------------------------------------------- (a) 30 s batch


def bench_30s(peer, ours, *, repeat: int, compiled: bool) -> None:
    print(
        f"\n-- (a) 30 s: batch {BATCH_30S} x {FRAMES_30S} frames, Whisper-base encoder "
        f"(d512, 6 layers, 8 heads), transformers {version('transformers')}, "
        f"HF attention {peer.config._attn_implementation!r}"
    )
    x = log_mel_like(BATCH_30S, FRAMES_30S)

    def hf(features: Tensor) -> Tensor:
        return peer(features).last_hidden_state

    def vats(features: Tensor) -> Tensor:
        return ours.forward_features(features)

    contenders: dict[str, Callable[[Tensor], Tensor]] = {"HF eager": hf, "vats eager": vats}
    if compiled:
        contenders["HF compiled"] = torch.compile(hf, options=COMPILE_OPTIONS)
        contenders["vats compiled"] = torch.compile(vats, options=COMPILE_OPTIONS)
    notes = {}
    with torch.inference_mode():
        want = hf(x)
        for name, fn in contenders.items():
            watch = CompileWatch()
            t0 = time.perf_counter()
            with watch():
                got = fn(x)  # compiled ones compile here, outside the timed calls
            if watch.graphs:
                notes[name] = f"   (first call {time.perf_counter() - t0:.0f} s: {watch.summary()})"
            err = relative_error(got, want)
            require(err < 1e-4, f"{name} differs from HF eager: relative error {err:.1e}")
    print(
        f"outputs of all {len(contenders)} equal HF eager's last_hidden_state (relative error "
        f"< 1e-4)" + (f"; compiled with inductor options {COMPILE_OPTIONS}" if compiled else "")
    )
    fns = {name: _infer(lambda fn=fn: fn(x)) for name, fn in contenders.items()}
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat)
    print(f"forward ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):")
    seconds_of_audio = BATCH_30S * 30.0
    for name in fns:
        print(
            f"  {name:14s} {times[name] * 1e3:8.0f} ms  ({seconds_of_audio / times[name]:6.1f} s of "
            f"audio per s){notes.get(name, '')}"
        )
    ratio("vats eager / HF eager", times["HF eager"] / times["vats eager"], ">= 1.0x")
    if compiled:
        ratio("vats compiled / HF compiled", times["HF compiled"] / times["vats compiled"])
        ratio("vats compiled / HF eager", times["HF eager"] / times["vats compiled"])
        ratio("HF compiled / HF eager", times["HF eager"] / times["HF compiled"])
    peaks = {name: peak_cpu_memory(fns[name]) for name in ("HF eager", "vats eager")}
    print(
        f"  peak memory, eager: HF {fmt_bytes(peaks['HF eager'])}, "
        f"vats {fmt_bytes(peaks['vats eager'])}"
    )
    floors = {"HF": kernel_floor(fns["HF eager"]), "vats": kernel_floor(fns["vats eager"])}
    print_floor("HF", {"HF": times["HF eager"], "vats": times["vats eager"]}, floors)


# ---------------------------------------------------------------------- (b) real lengths


def _work(frames: list[int], d: int = 512, layers: int = 6, hidden: int = 2048) -> float:
    """Multiply-adds of the encoder on clips of these input frame counts (convs, the
    projections and MLP per token, attention scores and values per token pair)."""
    total = 0.0
    for t in frames:
        n = (t + 1) // 2
        total += t * N_MELS * d * 3 + n * d * d * 3  # conv1, conv2
        total += layers * (n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d)
    return total


def bench_real_lengths(peer, ours, *, repeat: int) -> None:
    frames = [round(s * SAMPLE_RATE / HOP) for s in CLIP_SECONDS]
    longest = max(frames)
    print(
        f"\n-- (b) real lengths: {len(frames)} clips of {CLIP_SECONDS[0]:g} to "
        f"{CLIP_SECONDS[-1]:g} s ({frames[0]} to {longest} frames); vats: one batch padded to "
        f"the longest with lengths; HF: every clip padded to 30 s ({FRAMES_30S} frames)"
    )
    torch.manual_seed(1)
    x = log_mel_like(len(frames), longest)
    lengths = torch.tensor(frames)
    x = x.masked_fill(torch.arange(longest) >= lengths[:, None, None], 0.0)
    padded = F.pad(x, (0, FRAMES_30S - longest))  # (B, M, 3000): what HF takes
    with torch.inference_mode():
        feats = ours.forward_features(x, lengths)
        for i in (0, len(frames) - 1):
            n = frames[i]
            alone = ours.forward_features(x[i : i + 1, :, :n])[0]
            err = relative_error(feats[i, : (n + 1) // 2], alone)
            require(err < 1e-5, f"vats clip {i} in the batch differs from its lone run: {err:.1e}")
        err = relative_error(ours.forward_features(padded[:1]), peer(padded[:1]).last_hidden_state)
        require(err < 1e-4, f"vats differs from HF on the 30 s padded input: {err:.1e}")
    print(
        "vats' padded batch equals its lone runs (first and last clip); vats equals HF on the "
        "30 s padded input"
    )
    fns = {
        "HF padded to 30 s": _infer(lambda: peer(padded)),
        "vats real lengths": _infer(lambda: ours.forward_features(x, lengths)),
    }
    times = time_alternating(fns, repeat=repeat)
    peaks = {name: peak_cpu_memory(fn) for name, fn in fns.items()}
    audio = sum(CLIP_SECONDS)
    print(f"forward, eager ({repeat} alternating rounds):")
    for name in fns:
        print(
            f"  {name:18s} {times[name] * 1e3:8.0f} ms  ({audio / times[name]:6.1f} s of audio "
            f"per s), peak {fmt_bytes(peaks[name]):>10}"
        )
    hf_work = _work([FRAMES_30S] * len(frames))
    vats_work = _work([longest] * len(frames))
    real_work = _work(frames)
    print(
        f"  work (multiply-adds): HF {hf_work / 1e9:.0f} G, vats {vats_work / 1e9:.0f} G "
        f"(the clips alone: {real_work / 1e9:.0f} G); HF / vats work = {hf_work / vats_work:.2f}"
    )
    ratio(
        "vats real lengths / HF padded to 30 s",
        times["HF padded to 30 s"] / times["vats real lengths"],
        f">= {0.9 * hf_work / vats_work:.1f}x (0.9 of the work ratio)",
    )
    ratio(
        "HF peak memory / vats peak memory", peaks["HF padded to 30 s"] / peaks["vats real lengths"]
    )


# ---------------------------------------------------------------------- (c) front end


def bench_front_end(*, repeat: int) -> None:
    """Log-mel features of the (b) clips: HF's extractor (every clip padded to 30 s, numpy)
    against vats' LogMel (one padded batch on the clips' real lengths, torch). The features
    are checked equal first, on every frame whose window lies inside its clip."""
    from transformers import WhisperFeatureExtractor

    torch.manual_seed(2)
    waves = [torch.randn(round(s * SAMPLE_RATE)) * 0.1 for s in CLIP_SECONDS]
    extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    arrays = [w.numpy() for w in waves]
    logmel = vats_audio.LogMel(vats_audio.LogMelConfig(n_mels=N_MELS))
    lengths = torch.tensor([w.shape[0] for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (B, S_max)
    print(f"\n-- (c) front end: log-mel of the {len(waves)} clips of (b) from 16 kHz waveforms")
    theirs = torch.from_numpy(
        extractor(arrays, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    )
    with torch.no_grad():
        ours = logmel(batch, lengths=lengths)
    worst = 0.0
    for i, n in enumerate(lengths.tolist()):
        inside = (n - logmel.config.n_fft // 2) // logmel.config.hop_length  # frames inside
        err = (ours[i, :, :inside] - theirs[i, :, :inside]).abs().max().item()
        worst = max(worst, err)
    require(worst < 1e-3, f"LogMel differs from the extractor by {worst:.1e} (> 1e-3)")
    print(f"  features agree on every frame inside its clip (max abs difference {worst:.1e})")

    def vats() -> None:
        with torch.no_grad():
            logmel(batch, lengths=lengths)

    fns: dict[str, Callable[[], object]] = {
        "HF WhisperFeatureExtractor (pads to 30 s)": lambda: extractor(
            arrays, sampling_rate=SAMPLE_RATE, return_tensors="np"
        ),
        "vats LogMel (real lengths)": vats,
    }
    times = time_alternating(fns, repeat=repeat)
    for name, seconds in times.items():
        print(f"  {name:42s} {seconds * 1e3:8.1f} ms")
    hf, ours_s = times.values()
    ratio("vats LogMel / HF extractor (speed)", hf / ours_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one timed round, no compiled contenders"
    )
    args = parser.parse_args()
    banner("bench_audio: Whisper-base-shaped audio encoder vs HF WhisperEncoder")
    peer, ours = whisper_base()
    repeat = 1 if args.quick else 5
    bench_30s(peer, ours, repeat=repeat, compiled=not args.quick)
    bench_real_lengths(peer, ours, repeat=repeat)
    bench_front_end(repeat=2 if args.quick else 5)


if __name__ == "__main__":
    main()
