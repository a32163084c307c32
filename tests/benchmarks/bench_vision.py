"""ViT-2D against timm's ViT-S/16, and ViT-3D factorized against joint space-time attention.

Part 1, ViT-2D: timm ``vit_small_patch16_224`` (random init: 224², patch 16, dim 384, 12
layers, 6 heads, class token, learned positions) and ours converted from it with
:func:`vats_vision.interop.from_timm`, so both hold the same weights; their outputs are
checked equal before anything is timed. fp32 on CPU, 2 threads, batch 16:

* inference: ``model(x)`` under ``torch.inference_mode``; ours inside
  ``vats_core.linear.packed_weights()`` (weights packed once for oneDNN, as a serving or
  evaluation loop runs: the goal's figure), and also without it (plain weights);
* training: forward, cross-entropy, backward and an AdamW step (one optimizer each, torch's
  fused kernel on both sides as HF's Trainer and vats' trainer use it).

Part 2, ViT-3D: forward time (``inference_mode``) and peak CPU memory against the clip
length (8, 16, 32, 64 frames of 224², tubelets 2×16×16, so 4..32 tubelets of 196 patches)
for our factorized ViT3D against a joint space-time encoder at equal dims (same tubelet
embedding, same vats-core blocks and 3D RoPE, one attention over all T'·196 tokens).
Goal: factorized grows linearly in T (attention O(T'·S² + S·T'²) against O((T'·S)²)).

Run: ``uv run python tests/benchmarks/bench_vision.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from common import banner, fmt_bytes, kernel_floor, peak_cpu_memory, print_floor, time_alternating

from vats_core.attention import resolve_backend
from vats_core.block import TransformerBlock
from vats_core.linear import packed_weights
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


# ---------------------------------------------------------------------- ViT-2D vs timm


def bench_vit2d() -> None:
    import timm

    print(f"\n-- ViT-2D vs timm {version('timm')} vit_small_patch16_224, fp32, batch {BATCH}")
    torch.manual_seed(0)
    peer = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = from_timm(peer).eval()
    x = torch.randn(BATCH, 3, 224, 224)
    with torch.inference_mode():
        ref, got = peer(x[:2]), ours(x[:2])
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"outputs differ: relative error {err:.2e}"
    q = torch.zeros(1, 6, 197, 64)
    chosen = resolve_backend(q, q, q)
    print(f"outputs match (max relative error {err:.1e}); our attention backend: {chosen.value}")

    def infer(model: nn.Module, region: packed_weights | None = None):
        def call() -> None:
            with torch.inference_mode(), region or contextlib.nullcontext():
                model(x)

        return call

    packing = packed_weights()  # one region over all the calls
    fns = {
        "timm": infer(peer),
        "vats": infer(ours, packing),
        "vats, plain weights": infer(ours),
    }
    times = time_alternating(fns, repeat=5)
    _report("inference, packed weights", times)
    _report(
        "inference, plain weights", {"timm": times["timm"], "vats": times["vats, plain weights"]}
    )
    floors = {name: kernel_floor(fns[name]) for name in ("timm", "vats")}
    print_floor("timm", times, floors)

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
    times = time_alternating(fns, repeat=5)  # (as many as the inference figure takes)
    _report("training (fwd + bwd + AdamW)", times)
    print_floor("timm", times, {name: kernel_floor(fn) for name, fn in fns.items()})


def _report(what: str, times: dict[str, float]) -> None:
    peer, ours = BATCH / times["timm"], BATCH / times["vats"]
    print(
        f"{what:30s} timm {peer:6.2f} img/s   vats {ours:6.2f} img/s   "
        f"ratio {ours / peer:.2f}x (goal >= 1.2x)"
    )


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


def bench_vit3d() -> None:
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
    for frames in FRAMES:
        x = torch.randn(1, 3, frames, cfg.image_size, cfg.image_size)

        def run(model: nn.Module, x: Tensor = x):
            def call() -> None:
                with torch.inference_mode():
                    model(x)

            return call

        times = time_alternating({"fact": run(factorized), "joint": run(joint)}, repeat=3)
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
    banner("bench_vision: ViT-2D vs timm, ViT-3D factorized vs joint")
    bench_vit2d()
    bench_vit3d()


if __name__ == "__main__":
    main()
