"""The dispatch point: argument checks, backend choice, unavailable backends, context manager."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from vats_core.attention import (
    AttentionBackend,
    attention,
    attention_backend,
    backend_unavailable_reason,
    resolve_backend,
)


def qkv(b=2, hq=4, hkv=2, tq=6, tk=6, dh=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, tq, dh, generator=g, dtype=dtype),
        torch.randn(b, hkv, tk, dh, generator=g, dtype=dtype),
        torch.randn(b, hkv, tk, dh, generator=g, dtype=dtype),
    )


Q, K, V = qkv()


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((Q[0], K, V), {}, r"q must be 4-D .* got shape \(4, 6, 8\)"),
        ((Q, K[:1], V[:1]), {}, r"batch sizes differ: q has 2, k/v have 1"),
        ((Q, K, V[..., :4]), {}, r"k and v must have the same shape"),
        ((Q[..., :4], K, V), {}, r"head dims differ: q has Dh=4, k/v have Dh=8"),
        ((Q[:, :3], K, V), {}, r"multiple of key/value heads .* Hq=3, Hkv=2"),
        ((Q, K.double(), V), {}, r"one dtype, got torch.float32, torch.float64"),
        ((Q.long(), K.long(), V.long()), {}, r"floating point, got torch.int64"),
        ((Q, K, V), {"window": 0}, r"window must be None or an int >= 1, got 0"),
        ((Q, K, V), {"window": 2.5}, r"window must be None or an int >= 1, got 2.5"),
        ((Q, K, V), {"window": True}, r"window must be None or an int >= 1, got True"),
        ((Q, K, V), {"causal": "yes"}, r"causal must be a bool, got 'yes'"),
        (
            (Q, K, V),
            {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)},
            r"shape \(B, Tk\) = \(2, 6\), got \(2, 5\)",
        ),
        (
            (Q, K, V),
            {"key_padding_mask": torch.ones(2, 6)},
            r"must be torch.bool .* got torch.float32",
        ),
        ((Q, K, V), {"scale": 0.0}, r"scale must be a finite number > 0 or None, got 0.0"),
        ((Q, K, V), {"scale": float("nan")}, r"scale must be a finite number > 0"),
        ((Q, K, V), {"backend": "fast"}, r"unknown attention backend 'fast': expected one of"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="one device"):
        attention(Q, K.cuda(), V)


@pytest.mark.parametrize("backend,extra", [("flash", "flash-attn"), ("xformers", "xformers")])
def test_optional_kernels_on_cpu_say_why_and_how_to_install(backend, extra):
    with pytest.raises(ValueError, match=f"attention backend '{backend}' cannot serve") as err:
        attention(Q, K, V, backend=backend)
    msg = str(err.value)
    installed = "not installed" not in msg
    if installed:
        assert "CUDA" in msg  # installed (e.g. on a GPU machine), but these are CPU tensors
    else:
        assert f'pip install "vats-core[{extra}]"' in msg


def test_local_without_window_is_refused():
    with pytest.raises(ValueError, match=r"'local' cannot serve .*window=None"):
        attention(Q, K, V, backend="local")
    assert backend_unavailable_reason("local", Q, K, V, window=3) is None


def test_backend_accepts_enum_and_string():
    a = attention(Q, K, V, causal=True, backend=AttentionBackend.MATH)
    b = attention(Q, K, V, causal=True, backend="math")
    assert torch.equal(a, b)
    assert AttentionBackend("sdpa") is AttentionBackend.SDPA
    assert AttentionBackend.SDPA == "sdpa"  # a str Enum: configs can store the plain name


def test_auto_on_cpu_picks_local_for_short_windows_and_sdpa_otherwise():
    q, k, v = qkv(b=1, hq=2, hkv=1, tq=2048, tk=2048, dh=8)
    assert resolve_backend(q, k, v, causal=True, window=64) is AttentionBackend.LOCAL
    assert resolve_backend(q, k, v, causal=True) is AttentionBackend.SDPA
    assert resolve_backend(q, k, v, causal=True, window=4096) is AttentionBackend.SDPA
    assert resolve_backend(*qkv(), causal=True, window=2) is AttentionBackend.SDPA  # tiny T


def test_context_manager_sets_backend_for_auto_calls_only():
    assert resolve_backend(Q, K, V) is AttentionBackend.SDPA
    with attention_backend("math") as chosen:
        assert chosen is AttentionBackend.MATH
        assert resolve_backend(Q, K, V) is AttentionBackend.MATH
        with attention_backend(AttentionBackend.LOCAL):
            assert resolve_backend(Q, K, V, window=2) is AttentionBackend.LOCAL
            # An explicit backend argument wins over the context.
            assert resolve_backend(Q, K, V, backend="sdpa") is AttentionBackend.SDPA
        assert resolve_backend(Q, K, V) is AttentionBackend.MATH
        with attention_backend("auto"):  # "auto" restores automatic choice inside a region
            assert resolve_backend(Q, K, V) is AttentionBackend.SDPA
    assert resolve_backend(Q, K, V) is AttentionBackend.SDPA


def test_context_manager_backend_that_cannot_serve_raises():
    with attention_backend("local"), pytest.raises(ValueError, match="window=None"):
        attention(Q, K, V)


def test_context_manager_is_reset_after_an_exception():
    with pytest.raises(RuntimeError), attention_backend("math"):
        raise RuntimeError("boom")
    assert resolve_backend(Q, K, V) is AttentionBackend.SDPA


def test_context_backend_is_per_thread():
    seen = {}

    def other_thread() -> None:
        seen["other"] = resolve_backend(Q, K, V)

    with attention_backend("math"):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert resolve_backend(Q, K, V) is AttentionBackend.MATH
    assert seen["other"] is AttentionBackend.SDPA  # the region is this thread's only


def test_context_backend_traces_into_one_graph_and_is_guarded():
    # torch.compile reads the region's backend without a graph break, and a region with a
    # different backend does not reuse the graph traced under the first one.
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v), backend="eager", fullgraph=True)
    with attention_backend("math"):
        torch.testing.assert_close(compiled(Q, K, V), attention(Q, K, V))
    with attention_backend("math"), torch.compiler.set_stance("fail_on_recompile"):
        compiled(Q, K, V)  # same region, same graph
    with (
        attention_backend("sdpa"),
        torch.compiler.set_stance("fail_on_recompile"),
        pytest.raises(RuntimeError, match="recompil"),
    ):
        compiled(Q, K, V)


def test_context_manager_rejects_unknown_names():
    with (
        pytest.raises(ValueError, match=re.escape("unknown attention backend 'nope'")),
        attention_backend("nope"),
    ):
        pass


def test_float64_runs_on_every_cpu_backend():
    q, k, v = qkv(dtype=torch.float64)
    ref = attention(q, k, v, causal=True, window=3, backend="math")
    for backend in ("sdpa", "local", "flex", "auto"):
        out = attention(q, k, v, causal=True, window=3, backend=backend)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref)


def test_xformers_refusal_is_said_on_one_line_per_kernel():
    """An xformers that cannot serve a call (built for another torch, say) is refused with
    each kernel's reasons, as its dispatcher gave them (the H200 run's message)."""
    from vats_core.attention._xformers import _short_reasons

    message = (
        "No operator found for `memory_efficient_attention_forward` with inputs:\n"
        "     query       : shape=(2, 19, 2, 2, 8) (torch.float32)\n"
        "     p           : 0.0\n"
        "`fa3F@0.0.0` is not supported because:\n"
        "    min(query.shape[-1], value.shape[-1]) < 32\n"
        "    xFormers wasn't build with CUDA support\n"
        "`cutlassF-pt` is not supported because:\n"
        "    xFormers wasn't build with CUDA support"
    )
    assert _short_reasons(message) == (
        "fa3F@0.0.0: min(query.shape[-1], value.shape[-1]) < 32, xFormers wasn't build with "
        "CUDA support; cutlassF-pt: xFormers wasn't build with CUDA support"
    )
    assert _short_reasons("something else\nmore") == "something else"
