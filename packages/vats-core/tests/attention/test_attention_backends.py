"""Every CPU attention backend computes the same function as the float64 math reference.

Shape legend: B batch, Hq / Hkv query / key-value heads, Tq / Tk query / key length,
Dh head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vats_core.attention import attention

CPU_BACKENDS = ("math", "sdpa", "local", "flex")


def visible(i: int, j: int, tq: int, tk: int, causal: bool, window: int | None) -> bool:
    """The rule of the interface, written out independently of the library."""
    p = i + tk - tq
    if causal and j > p:
        return False
    if window is not None:
        if causal and not p - window < j:
            return False
        if not causal and not abs(p - j) < window:
            return False
    return True


def brute_force(q, k, v, causal, window, kpm, scale=None):
    """Loop-per-query float64 attention: the reference for the reference."""
    b, hq, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = scale or 1 / math.sqrt(dh)
    out = torch.zeros(b, hq, tq, dh, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(tq):
                keys = [
                    j
                    for j in range(tk)
                    if visible(i, j, tq, tk, causal, window) and (kpm is None or kpm[bi, j])
                ]
                if not keys:
                    continue
                s = (k[bi, kh, keys].double() @ q[bi, h, i].double()) * scale
                out[bi, h, i] = s.softmax(0) @ v[bi, kh, keys].double()
    return out


@st.composite
def attention_case(draw, max_t: int = 40):
    """Random shapes, GQA ratio, window, causal flag and padding (incl. fully padded rows)."""
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    tk = draw(st.integers(1, max_t))
    tq = draw(st.integers(1, tk))
    dh = draw(st.sampled_from([4, 8, 16]))
    causal = draw(st.booleans())
    window = draw(st.sampled_from([None, 1, "small", "wide"]))
    if window == "small":
        window = draw(st.integers(2, 8))
    elif window == "wide":
        window = tk + draw(st.integers(0, 5))
    padding = draw(st.sampled_from(["none", "random", "left", "one_row_empty"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * groups, tq, dh, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, tk, dh, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, tk, dh, generator=g, dtype=torch.float64)
    kpm = None
    if padding == "random":
        kpm = torch.rand(b, tk, generator=g) < 0.7
    elif padding == "left":
        lengths = torch.randint(0, tk + 1, (b,), generator=g)
        kpm = torch.arange(tk)[None] >= (tk - lengths)[:, None]
    elif padding == "one_row_empty":
        kpm = torch.ones(b, tk, dtype=torch.bool)
        kpm[-1] = False
    return q, k, v, causal, window, kpm


def _run(backend, q, k, v, causal, window, kpm, dtype=torch.float32):
    return attention(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        causal=causal,
        window=window,
        key_padding_mask=kpm,
        backend=backend,
    )


@settings(max_examples=30, deadline=None)
@given(attention_case(max_t=12))
def test_math_equals_brute_force_loop(case):
    q, k, v, causal, window, kpm = case
    out = _run("math", q, k, v, causal, window, kpm, dtype=torch.float64)
    torch.testing.assert_close(out, brute_force(q, k, v, causal, window, kpm))


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@settings(max_examples=30, deadline=None)
@given(case=attention_case())
def test_backend_equals_math(backend, case):
    q, k, v, causal, window, kpm = case
    if backend == "local" and window is None:
        window = 3  # local serves windowed calls only
    ref = _run("math", q, k, v, causal, window, kpm, dtype=torch.float64)
    out = _run(backend, q, k, v, causal, window, kpm)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=8, deadline=None)  # eager flex is slow: a few small cases
@given(case=attention_case(max_t=24))
def test_flex_equals_math(case):
    q, k, v, causal, window, kpm = case
    ref = _run("math", q, k, v, causal, window, kpm, dtype=torch.float64)
    out = _run("flex", q, k, v, causal, window, kpm)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@settings(max_examples=15, deadline=None)
@given(case=attention_case(max_t=24))
def test_gradients_equal_math(backend, case):
    q, k, v, causal, window, kpm = case
    if backend == "local" and window is None:
        window = 5
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(name):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _run(name, *leaves, causal, window, kpm, dtype=torch.float64)
        return torch.autograd.grad(out, leaves, grad_out)

    for got, want in zip(grads(backend), grads("math"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def _visibility(backend, tq, tk, causal, window):
    """(Tq, Tk) bool: which keys each query attended to, read off uniform attention.

    With q = 0 every visible key gets the same weight and v = one-hot(key index), so
    output[i, j] > 0 exactly when key j was visible to query i.
    """
    q = torch.zeros(1, 1, tq, tk)
    k = torch.randn(1, 1, tk, tk)
    v = torch.eye(tk)[None, None]
    out = attention(q, k, v, causal=causal, window=window, backend=backend)
    return out[0, 0] > 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tq,tk", [(12, 12), (5, 12)])
def test_causal_window_boundary_is_exact(backend, tq, tk):
    window = 4
    seen = _visibility(backend, tq, tk, causal=True, window=window)
    for i in range(tq):
        p = i + tk - tq  # bottom-right: query i sits at key position p
        row = seen[i].nonzero().flatten().tolist()
        assert row == list(range(max(0, p - window + 1), p + 1)), (i, row)
        if p - window >= 0:
            assert not seen[i, p - window]  # i - window: just outside
        if p - window + 1 >= 0:
            assert seen[i, p - window + 1]  # i - window + 1: just inside


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bidirectional_window_boundary_is_exact(backend):
    t, window = 12, 3
    seen = _visibility(backend, t, t, causal=False, window=window)
    want = torch.tensor([[abs(i - j) < window for j in range(t)] for i in range(t)])
    assert torch.equal(seen, want)


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_causal_aligns_bottom_right(backend):
    seen = _visibility(backend, 3, 5, causal=True, window=None)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(seen, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_without_keys_are_zero_and_finite(backend):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    v = torch.randn(2, 2, 6, 8, requires_grad=True)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False  # batch row 1 has no real key at all
    kpm[0, :3] = False  # row 0: the first three causal queries see nothing
    out = attention(q, k, v, causal=True, window=4, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    assert out[0, :, 3:].abs().sum() > 0
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


@pytest.mark.parametrize("backend", ["math", "sdpa", "local", "flex"])
def test_queries_before_first_key_get_zeros(backend):
    # Tq > Tk with causal alignment bottom-right: the first Tq - Tk queries sit before key 0.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    out = attention(q, k, v, causal=True, window=2, backend=backend)
    ref = attention(q.double(), k.double(), v.double(), causal=True, window=2, backend="math")
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_scale_is_applied():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ref = brute_force(q, k, v, True, 3, None, scale=0.3)
    for backend in CPU_BACKENDS:
        out = attention(q, k, v, causal=True, window=3, scale=0.3, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
