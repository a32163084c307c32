"""Determinism: the same inputs on the same machine and thread count give bit-identical
outputs in every process. Nothing in vats-core chooses kernels by timing or keeps
per-process state that changes results, so two fresh processes that run the same training
steps (attention with GQA, RoPE and QK-norm, a MoE with grouped_mm and with the loop,
AdamW) print the same digest of every output, gradient and updated weight."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import sys

    import torch

    from vats_core.attention import AttentionConfig
    from vats_core.block import BlockConfig, TransformerBlock
    from vats_core.moe import MoEConfig
    from vats_core.rope import RopeConfig, RotaryEmbedding

    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    dim, t = 256, 64  # products of 16M+ multiply-adds, where BLAS libraries go parallel
    blocks = torch.nn.ModuleList(
        TransformerBlock(
            BlockConfig(
                attention=AttentionConfig(dim=dim, n_heads=4, n_kv_heads=2, qk_norm=True,
                                          causal=True, window=16),
                moe=MoEConfig(dim=dim, hidden_dim=512, n_experts=4, top_k=2,
                              grouped_mm=grouped_mm),
            )
        )
        for grouped_mm in ("on", "off")
    )
    rope = RotaryEmbedding(RopeConfig(head_dim=dim // 4))(torch.arange(t))
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=1e-3)
    digest = hashlib.sha256()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, t, dim, generator=gen)
        for block in blocks:
            x, stats = block(x, rope=rope)
            x = x + 0.01 * stats.load_balancing_loss
        loss = x.square().mean()
        loss.backward()
        digest.update(x.detach().numpy().tobytes())
        for p in blocks.parameters():
            digest.update(p.grad.numpy().tobytes())
        optimizer.step()
        optimizer.zero_grad()
    for p in blocks.parameters():
        digest.update(p.detach().numpy().tobytes())
    print(digest.hexdigest())
    """
)


def _digest(threads: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_two_fresh_processes_give_bit_identical_training_steps() -> None:
    first, second = _digest(2), _digest(2)  # two threads: parallel reductions included
    assert len(first) == 64
    assert first == second
