"""ViT-2D against timm's ViT-S/16, and ViT-3D factorized against joint space-time attention.

Part 1, ViT-2D: timm ``vit_small_patch16_224`` (random init: 224², patch 16, dim 384, 12
layers, 6 heads, class token, learned positions) and ours converted from it with
:func:`vats_vision.interop.from_timm`, so both hold the same weights. fp32 on CPU, 2 threads,
batch 16.

* inference, equal work: timm's ``model(x)`` runs every token through every block, so the
  vats contender is ``forward_head(forward_features(x))``, which does too (vats'
  ``forward`` runs only the class token through the last block: the same logits for about
  7 % less work, printed apart, not against a goal). Eager against eager, and compiled
  (``torch.compile`` with inductor ``freezing``, the inference recipe of DESIGN.md, the same
  options on both sides) against compiled, all four in one alternation under
  ``torch.inference_mode``. Every contender's logits are checked against timm eager's before
  anything is timed (the script exits non-zero otherwise); compiles happen before the
  alternation and their time is printed apart. Goal: vats compiled >= 1.2x timm eager.
* training: forward, cross-entropy, backward and an AdamW step (one optimizer each, torch's
  fused kernel on both sides as HF's Trainer and vats' trainer use it), eager both.

Part 2, ViT-3D: forward time (``inference_mode``) and peak CPU memory against the clip
length (8, 16, 32, 64 frames of 224², tubelets 2×16×16, so 4..32 tubelets of 196 patches)
for our factorized ViT3D against a joint space-time encoder at equal dims (same tubelet
embedding, same vats-core blocks and 3D RoPE, one attention over all T'·196 tokens).
Goal: factorized grows linearly in T (attention O(T'·S² + S·T'²) against O((T'·S)²)).

Run: ``uv run python tests/benchmarks/bench_vision.py`` (2-3 minutes on 2 cores, up to one
of them compiling) or with ``--quick`` (fewer repeats, clips of 8 and 16 frames).
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
from torch import Tensor, nn

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
from vats_core.block import TransformerBlock
from vats_core.rope import grid_positions_3d
from vats_vision.interop import from_timm
from vats_vision.vit3d import ViT3D, ViT3DConfig

BATCH = 16
FRAMES = (8, 16, 32, 64)
VIDEO = dict(
    image_size=224,
    num_frames=16,
    patch_size=16,
    tubelet_size=2,
    dim=384,
    n_heads=6,
    n_layers=2,
    class_token=False,
    pool="avg",
)
# Inductor options of both compiled contenders: freezing folds the weights into the graph as
# constants (inference only), so inductor can prepack them for its GEMMs.
COMPILE_OPTIONS = {"freezing": True}


# ---------------------------------------------------------------------- ViT-2D vs timm


def bench_vit2d(*, repeat: int) -> None:
    import timm

    print(f"\n-- ViT-2D vs timm {version('timm')} vit_small_patch16_224, fp32, batch {BATCH}")
    torch.manual_seed(0)
    peer = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = from_timm(peer).eval()
    x = torch.randn(BATCH, 3, 224, 224)

    def every_token(images: Tensor) -> Tensor:
        """vats logits through every token of every block: timm's ``model(x)`` work."""
        return ours.forward_head(ours.forward_features(images))

    contenders: dict[str, Callable[[Tensor], Tensor]] = {
        "timm eager": peer,
        "timm compiled": torch.compile(peer, options=COMPILE_OPTIONS),
        "vats eager": every_token,
        "vats compiled": torch.compile(every_token, options=COMPILE_OPTIONS),
        "vats forward": ours,  # class token only in the last block
    }
    notes = {}
    with torch.inference_mode():
        want = peer(x)
        for name, fn in contenders.items():
            watch = CompileWatch()
            t0 = time.perf_counter()
            with watch():
                got = fn(x)  # compiled ones compile here, outside the timed calls
            if watch.graphs:
                notes[name] = f"   (first call {time.perf_counter() - t0:.0f} s: {watch.summary()})"
            err = relative_error(got, want)
            require(err < 1e-4, f"{name} logits differ from timm eager's: relative error {err:.1e}")
    q = torch.zeros(1, 6, 197, 64)
    print(
        f"logits of all five equal timm eager's (relative error < 1e-4); vats attention backend: "
        f"{resolve_backend(q, q, q).value}; compiled with inductor options {COMPILE_OPTIONS}"
    )

    def infer(fn: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                fn(x)

        return call

    fns = {name: infer(fn) for name, fn in contenders.items()}
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat)
    print(f"inference ({repeat} alternating rounds; graphs built while timed: {watch.graphs}):")
    ips = {name: BATCH / s for name, s in times.items()}
    notes["vats forward"] = "   (model(x): class token only in the last block, less work)"
    for name in fns:
        print(f"  {name:14s} {ips[name]:7.2f} img/s{notes.get(name, '')}")
    ratio("vats compiled / timm eager", ips["vats compiled"] / ips["timm eager"], ">= 1.2x")
    ratio("vats eager / timm eager", ips["vats eager"] / ips["timm eager"])
    ratio("vats compiled / timm compiled", ips["vats compiled"] / ips["timm compiled"])
    ratio("timm compiled / timm eager", ips["timm compiled"] / ips["timm eager"])
    ratio("vats forward / timm eager (less work)", ips["vats forward"] / ips["timm eager"])
    floors = {"timm": kernel_floor(fns["timm eager"]), "vats": kernel_floor(fns["vats eager"])}
    print_floor("timm", {"timm": times["timm eager"], "vats": times["vats eager"]}, floors)

    y = torch.randint(0, 1000, (BATCH,))

    def train(model: nn.Module):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {"timm": train(peer), "vats": train(ours)}
    times = time_alternating(fns, repeat=repeat)  # (as many as the inference figure takes)
    peaks = {name: peak_cpu_memory(fn) for name, fn in fns.items()}
    ips = {name: BATCH / s for name, s in times.items()}
    print(
        f"training, fwd + cross-entropy + bwd + fused AdamW, eager ({repeat} alternating rounds):"
    )
    for name in fns:
        print(f"  {name:14s} {ips[name]:7.2f} img/s, peak {fmt_bytes(peaks[name]):>10}")
    ratio("vats / timm", ips["vats"] / ips["timm"])
    print_floor("timm", times, {name: kernel_floor(fn) for name, fn in fns.items()})
    peer.eval()
    ours.eval()


# ---------------------------------------------------------------------- ViT-3D


class JointViT3D(nn.Module):
    """The joint space-time baseline: one attention over all ``T'·gh·gw`` tokens per block.

    Shares the factorized model's tubelet embedding and 3D RoPE; its blocks are plain
    vats-core ``TransformerBlock``s with the same attention / MLP / norm config.
    """

    def __init__(self, factorized: ViT3D) -> None:
        super().__init__()
        cfg = factorized.config
        self.patch_embed = factorized.patch_embed
        self.rotary = factorized.rotary
        self.blocks = nn.ModuleList(TransformerBlock(cfg.block_config) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T, H, W) -> (B, D)``."""
        grid = self.patch_embed(x)  # (B, D, T', gh, gw)
        _, _, t, gh, gw = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)  # (B, T'·gh·gw, D), (t, row, col) order
        rope = self.rotary(grid_positions_3d(t, gh, gw), tokens.dtype)
        for block in self.blocks:
            tokens, _ = block(tokens, rope=rope)
        return self.norm(tokens).mean(1)


def bench_vit3d(*, frames_list: tuple[int, ...], repeat: int) -> None:
    cfg = ViT3DConfig(**VIDEO)
    print(
        f"\n-- ViT-3D factorized vs joint space-time attention: {cfg.image_size}², tubelets "
        f"{cfg.tubelet_size}x{cfg.patch_size}x{cfg.patch_size}, dim {cfg.dim}, "
        f"{cfg.n_heads} heads, {cfg.n_layers} layers, batch 1, forward only"
    )
    torch.manual_seed(0)
    factorized = ViT3D(cfg).eval()
    joint = JointViT3D(factorized).eval()
    spatial = (cfg.image_size // cfg.patch_size) ** 2
    print(
        f"{'frames':>6} {'tokens':>6} | {'factorized':>10} {'joint':>9} {'joint/fact':>10} | "
        f"{'fact mem':>10} {'joint mem':>10}"
    )
    base = None
    for frames in frames_list:
        x = torch.randn(1, 3, frames, cfg.image_size, cfg.image_size)

        def run(model: nn.Module, x: Tensor = x):
            def call() -> None:
                with torch.inference_mode():
                    model(x)

            return call

        times = time_alternating({"fact": run(factorized), "joint": run(joint)}, repeat=repeat)
        mem_f, mem_j = peak_cpu_memory(run(factorized)), peak_cpu_memory(run(joint))
        base = base or times["fact"] / frames
        print(
            f"{frames:6d} {frames // cfg.tubelet_size * spatial:6d} | "
            f"{times['fact'] * 1e3:8.0f}ms {times['joint'] * 1e3:7.0f}ms "
            f"{times['joint'] / times['fact']:9.2f}x | {fmt_bytes(mem_f):>10} {fmt_bytes(mem_j):>10}"
            f"   (factorized ms/frame {times['fact'] / frames * 1e3:.1f}, "
            f"{times['fact'] / frames / base:.2f}x of 8 frames')"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter clips")
    args = parser.parse_args()
    banner("bench_vision: ViT-2D vs timm, ViT-3D factorized vs joint")
    bench_vit2d(repeat=2 if args.quick else 5)
    bench_vit3d(frames_list=FRAMES[:2] if args.quick else FRAMES, repeat=1 if args.quick else 3)


if __name__ == "__main__":
    main()
