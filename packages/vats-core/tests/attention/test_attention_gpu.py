"""CUDA backends (flash, xformers, sdpa, flex, local) in bf16 against the float64 math reference.

Skipped without CUDA; a backend that is not installed is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch

from vats_core.attention import (
    AttentionBackend,
    attention,
    backend_unavailable_reason,
    resolve_backend,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU_BACKENDS = ("flash", "xformers", "sdpa", "flex", "local")

# (B, Hq, Hkv, Tq, Tk, Dh, causal, window, padding)
CASES = [
    (2, 8, 8, 128, 128, 64, True, None, None),
    (2, 8, 2, 128, 128, 64, True, 32, None),  # GQA + causal window
    (1, 4, 1, 17, 200, 128, True, 64, None),  # MQA, chunk of queries vs a longer cache
    (2, 4, 2, 96, 96, 64, False, 16, None),  # bidirectional window
    (2, 4, 4, 64, 64, 64, False, None, "random"),  # encoder with ragged batch
    (3, 8, 2, 40, 120, 64, True, 48, "left"),  # left-padded batched decoding
    (2, 4, 2, 1, 77, 64, True, None, "left"),  # one decode step
]


def _inputs(case, dtype):
    b, hq, hkv, tq, tk, dh, causal, window, padding = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, tq, dh, device="cuda", generator=g, dtype=dtype)
    k = torch.randn(b, hkv, tk, dh, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(b, hkv, tk, dh, device="cuda", generator=g, dtype=dtype)
    kpm = None
    if padding == "random":
        kpm = torch.rand(b, tk, device="cuda", generator=g) < 0.8
        kpm[-1] = False  # a batch row with no real key: zeros, no NaN
    elif padding == "left":
        lengths = torch.arange(b, device="cuda") * 7 + 5
        kpm = torch.arange(tk, device="cuda")[None] >= (tk - lengths)[:, None]
    return q, k, v, dict(causal=causal, window=window, key_padding_mask=kpm)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_bf16_backend_equals_math(backend, case):
    q, k, v, kw = _inputs(case, torch.bfloat16)
    reason = backend_unavailable_reason(backend, q, k, v, **kw)
    if reason is not None:
        pytest.skip(reason)
    if backend == "local" and kw["window"] is None:
        pytest.skip("local serves windowed calls only")
    out = attention(q, k, v, backend=backend, **kw)
    ref = attention(q.double(), k.double(), v.double(), backend="math", **kw)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["flash", "xformers", "sdpa"])
def test_bf16_gradients_equal_math(backend):
    q, k, v, kw = _inputs(CASES[1], torch.bfloat16)
    if (reason := backend_unavailable_reason(backend, q, k, v, **kw)) is not None:
        pytest.skip(reason)
    grad_out = torch.randn_like(q)

    def grads(name, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, backend=name, **kw)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype))

    for got, want in zip(grads(backend, torch.bfloat16), grads("math", torch.float64), strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)


def test_auto_on_cuda_prefers_fused_kernels():
    q, k, v, kw = _inputs(CASES[1], torch.bfloat16)
    chosen = resolve_backend(q, k, v, **kw)
    for candidate in ("flash", "xformers"):
        if backend_unavailable_reason(candidate, q, k, v, **kw) is None:
            assert chosen == candidate
            return
    assert chosen is AttentionBackend.SDPA


def test_flash_refuses_right_padding_with_causal_mask():
    q, k, v, _ = _inputs(CASES[0], torch.bfloat16)
    kpm = torch.ones(2, 128, dtype=torch.bool, device="cuda")
    kpm[0, 100:] = False  # right padding
    reason = backend_unavailable_reason("flash", q, k, v, causal=True, key_padding_mask=kpm)
    if reason is not None and "not installed" in reason:
        pytest.skip(reason)
    assert reason is not None and "left" in reason
    assert resolve_backend(q, k, v, causal=True, key_padding_mask=kpm) != "flash"
