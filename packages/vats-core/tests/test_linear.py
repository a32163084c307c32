"""vats_core.linear: the oneDNN paths (fused bias/GELU, few rows) equal F.linear (+ GELU) and
are taken exactly where the module docstring says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vats_core import linear as L
from vats_core.linear import (
    MIN_ROWS,
    MIN_TIMED_MACS,
    SMALL_ROWS,
    Linear,
    linear,
    mm,
    packed_weights,
    small_gemm_kernels,
)

ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")


@pytest.fixture
def few_rows_on(monkeypatch):
    """Fix the few-row choice: ``few_rows_on("onednn")`` or ``few_rows_on("mkl")``."""

    def choose(kind: str) -> None:
        monkeypatch.setattr(L, "_onednn_buckets", frozenset(SMALL_ROWS if kind == "onednn" else ()))

    return choose


def _operands(rows: int, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen) / 7
    b = torch.randn(80, generator=gen) if bias else None
    return x, w, b


def _reference(x, w, b, activation):
    y = F.linear(x, w, b)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, MIN_ROWS])
def test_linear_equals_reference(activation, bias, rows):
    x, w, b = _operands(rows, bias)
    with torch.no_grad():
        got = linear(x, w, b, activation)
        # Strided inputs too: a slice of the tokens and a transposed batch.
        got_slice = linear(x[:, :1], w, b, activation)
        got_t = linear(x.transpose(0, 1), w, b, activation)
    torch.testing.assert_close(got, _reference(x, w, b, activation), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_slice, _reference(x[:, :1], w, b, activation))
    torch.testing.assert_close(got_t, _reference(x.transpose(0, 1), w, b, activation))


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_strided_weight_and_bias(activation):
    # Views as operands (a column slice of a wider weight, every other bias entry): the
    # fused kernel reads a bias as dense, so linear() must hand it a dense one.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MIN_ROWS, 96, generator=gen)[:, :48]
    w = torch.randn(80, 96, generator=gen)[:, ::2] / 7
    b = torch.randn(160, generator=gen)[::2]
    with torch.no_grad():
        got = linear(x, w, b, activation)
    torch.testing.assert_close(got, _reference(x, w, b, activation), rtol=1e-5, atol=1e-5)


def test_fused_path_taken_only_where_it_pays(few_rows_on):
    few_rows_on("mkl")
    x, w, b = _operands(MIN_ROWS)
    use = L._use_onednn
    with torch.no_grad():
        assert use(x, w, b, None) and use(x, w, None, "gelu")
        assert not use(x, w, None, None)  # nothing to fuse
        assert not use(x[:, :16], w, b, None)  # 32 rows: below MIN_ROWS, above the few
        assert not use(x[:, :1], w, b, None)  # decoding-sized (2 rows), MKL chosen for few
        assert not use(x.double(), w.double(), b.double(), None)
        assert not use(x, w, b.double(), None)  # F.linear then reports the mismatch
        with torch.backends.mkldnn.flags(enabled=False):
            assert not use(x, w, b, None)
    assert use(x, w, b, None)  # grad mode, but nothing requires a gradient
    assert not use(x, w.requires_grad_(), b, None)


@needs_onednn
@pytest.mark.parametrize("reorder", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_fused_linear_on_a_weight_reordered_for_the_call(
    monkeypatch, few_rows_on, reorder, activation
):
    # Outside a packed_weights() region, a large fused inference linear times oneDNN on the
    # plain weight against the weight reordered for the call, once per shape; either way
    # it equals the reference, strided weight and bias included.
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    few_rows_on("onednn")  # (decided: no few-row timing, which packs weights of its own)
    choices = DefaultChoice(reorder)
    monkeypatch.setattr(L, "_fused_choice", choices)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(MIN_ROWS, 256, generator=gen)
    w = torch.randn(256, 512, generator=gen)[:, ::2] / 16  # (256, 256), strided
    b = torch.randn(512, generator=gen)[::2]
    assert x.shape[0] * 256 * 256 >= MIN_TIMED_MACS
    reorders = []
    monkeypatch.setattr(L, "_reorder", lambda t, f=L._reorder: reorders.append(1) or f(t))
    with torch.no_grad():
        for _ in range(2):
            got = linear(x, w, b, activation)
            torch.testing.assert_close(got, _reference(x, w, b, activation), rtol=1e-5, atol=1e-5)
        small = linear(x[:8], w, b, activation)  # below the timed size: never reordered
    torch.testing.assert_close(small, _reference(x[:8], w, b, activation), rtol=1e-5, atol=1e-5)
    assert list(choices) == [(MIN_ROWS.bit_length(), 256, 256, True, activation)]
    assert len(reorders) == (2 if reorder else 0)  # one reorder a call, where it won


@needs_onednn
def test_the_fused_reorder_choice_is_timed_once(monkeypatch):
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    monkeypatch.setattr(L, "_fused_choice", {})
    timings = []
    monkeypatch.setattr(L, "_best_times", lambda *f: timings.append(1) or [1.0, 0.5])
    x, w = torch.randn(MIN_ROWS, 256), torch.randn(256, 256)
    with torch.no_grad():
        linear(x, w, torch.zeros(256))
        linear(x, w, torch.zeros(256))
    assert len(timings) == 1 and list(L._fused_choice.values()) == [True]
    monkeypatch.setenv("VATS_CPU_GEMM", "onednn")  # a fixed library: no reorder, no timing
    monkeypatch.setattr(L, "_fused_choice", {})
    with torch.no_grad():
        linear(x, w, torch.zeros(256))
    assert len(timings) == 1 and not L._fused_choice


@needs_onednn
def test_few_rows_follow_the_choice(few_rows_on):
    x, w, _ = _operands(MIN_ROWS)
    use = L._use_onednn
    with torch.no_grad():
        few_rows_on("onednn")
        for rows in (1, 2, 3, 15, 31):  # x is (2, rows, 48): 2*rows rows in all
            assert use(x[0, :rows], w, None, None) == (rows < 32), rows
        assert use(x[:, :15], w, None, None)  # 30 rows over two batch entries
        assert not use(x[:, :16], w, None, None)  # 32 rows: MKL on every machine measured
        assert not use(x[:, :1], w.double(), None, None)
        few_rows_on("mkl")
        assert not use(x[0, :1], w, None, None)


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 31])
def test_few_rows_on_onednn_equal_reference(few_rows_on, rows, bias, activation):
    few_rows_on("onednn")
    x, w, b = _operands(rows, bias, seed=rows)
    with torch.no_grad():
        assert L._use_onednn(x[0], w, b, activation)
        got = linear(x[0], w, b, activation)
        got_t = linear(x.transpose(0, 1)[:, :1], w.t().contiguous().t(), b, activation)
    torch.testing.assert_close(got, _reference(x[0], w, b, activation), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, _reference(x.transpose(0, 1)[:, :1], w, b, activation))


@needs_onednn
def test_the_choice_is_timed_once_and_the_env_var_fixes_it(monkeypatch):
    monkeypatch.setattr(L, "_onednn_buckets", None)
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    timed = small_gemm_kernels()  # times MKL against oneDNN on this machine
    assert set(timed) == set(SMALL_ROWS) and set(timed.values()) <= {"mkl", "onednn"}

    def fail() -> frozenset[int]:
        raise AssertionError("timed twice")

    monkeypatch.setattr(L, "_time_small_gemms", fail)
    assert small_gemm_kernels() == timed
    for kind in ("mkl", "onednn", " ONEDNN "):
        monkeypatch.setattr(L, "_onednn_buckets", None)
        monkeypatch.setenv("VATS_CPU_GEMM", kind)
        assert set(small_gemm_kernels().values()) == {kind.strip().lower()}
    monkeypatch.setattr(L, "_onednn_buckets", None)
    monkeypatch.setenv("VATS_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="VATS_CPU_GEMM must be auto, mkl or onednn"):
        small_gemm_kernels()


@needs_onednn
def test_compiled_few_rows_run_the_opaque_op_once_chosen(few_rows_on, monkeypatch):
    from torch._dynamo.testing import EagerAndRecordGraphs

    x, w, b = _operands(1)
    x = x[0]  # one row

    def f(x):
        return linear(x, w, b)

    def ops(backend) -> set[str]:
        return {str(n.target) for g in backend.graphs for n in g.graph.nodes}

    # Before the choice is made a trace does not time (it would be traced): F.linear.
    monkeypatch.setattr(L, "_onednn_buckets", None)
    monkeypatch.setattr(L, "_time_small_gemms", lambda: pytest.fail("timed inside a trace"))
    torch._dynamo.reset()
    before = EagerAndRecordGraphs()
    with torch.no_grad():
        torch.compile(f, backend=before, fullgraph=True)(x)
    assert not any("onednn" in op for op in ops(before))

    few_rows_on("onednn")
    torch._dynamo.reset()
    after = EagerAndRecordGraphs()
    with torch.no_grad():
        got = torch.compile(f, backend=after, fullgraph=True)(x)
    assert "vats.onednn_linear.default" in ops(after)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@needs_onednn
def test_opaque_op_passes_opcheck():
    x, w, b = _operands(3)
    torch.library.opcheck(L._onednn_linear_op, (x[0], w, b, "none", ""))
    torch.library.opcheck(L._onednn_linear_op, (x[0], w, None, "gelu", "tanh"))


def test_gradients_flow_through_the_plain_path():
    module = Linear(48, 80)
    x = torch.randn(2, MIN_ROWS, 48, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and module.weight.grad is not None and module.bias.grad is not None
    ref = torch.nn.Linear(48, 80)
    ref.load_state_dict(module.state_dict())  # same parameters, same state dict
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_activation_raises():
    x, w, b = _operands(2)
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, w, b, "relu")


# ---------------------------------------------------------------------------------------------
# Large products: mm and training linears on the library each shape timed faster on.
# ---------------------------------------------------------------------------------------------


def _big(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(256, 256, generator=gen)  # 256^3 = MIN_TIMED_MACS multiply-adds
    b = torch.randn(256, 256, generator=gen) / 16
    bias = torch.randn(256, generator=gen)
    return a, b, bias


@needs_onednn
@pytest.mark.parametrize("kind", ["mkl", "onednn", "auto"])
def test_mm_equals_torch_mm_in_every_layout(monkeypatch, kind):
    monkeypatch.setenv("VATS_CPU_GEMM", kind)
    monkeypatch.setattr(L, "_shape_choice", {})
    a, b, bias = _big()
    assert a.numel() * b.shape[1] == MIN_TIMED_MACS and L._timed(a, b)
    for x, y in ((a, b), (a, b.t()), (a.t(), b), (a.t(), b.t()), (a[:, :200], b[:200])):
        torch.testing.assert_close(mm(x, y), x @ y, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mm(x, y, bias), x @ y + bias, rtol=1e-5, atol=1e-4)
    # auto timed each of the four layouts once (the last product is below the floor)
    assert len(L._shape_choice) == (4 if kind == "auto" else 0)


@needs_onednn
@pytest.mark.parametrize("kernel", ["mkl", "onednn", "packed"])
def test_each_timed_kernel_equals_torch_mm_in_every_layout(monkeypatch, kernel):
    # Whichever kernel a shape's timing picks, the product is the same.
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    monkeypatch.setattr(L, "_shape_choice", DefaultChoice(kernel))
    a, b, bias = _big()
    rows = torch.cat([a, a])[:, :250]  # strided rows, still above the floor
    for x, y in ((a, b), (a, b.t()), (a.t(), b), (a.t(), b.t()), (rows, b[:250])):
        assert L._timed(x, y)
        torch.testing.assert_close(mm(x, y), x @ y, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mm(x, y, bias), x @ y + bias, rtol=1e-5, atol=1e-4)
        # a strided bias (oneDNN reads a dense one)
        strided = torch.stack([bias, bias], 1)[:, 0]
        torch.testing.assert_close(mm(x, y, strided), x @ y + bias, rtol=1e-5, atol=1e-4)
    assert set(L._shape_choice.values()) == {kernel}


class DefaultChoice(dict):
    """A shape-choice table where every shape has already chosen ``kernel`` (no timing)."""

    def __init__(self, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel

    def get(self, key, default=None):
        return self.setdefault(key, self.kernel)


@needs_onednn
def test_each_shape_is_timed_once_per_row_bucket(monkeypatch):
    class Choices(dict):
        def __setitem__(self, key, value):
            assert key not in self, "timed twice"
            self.timings = getattr(self, "timings", 0) + 1
            super().__setitem__(key, value)

    choices = Choices()
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    monkeypatch.setattr(L, "_shape_choice", choices)
    a, b, _ = _big()
    mm(a, b)
    assert list(choices) == [(True, True, 9, 256, 256)]  # 256 rows: bucket 2^8 <= M < 2^9
    mm(a, b)
    mm(torch.cat([a, a[:200]]), b)  # 456 rows: the same bucket
    small = torch.randn(8, 8)
    torch.testing.assert_close(mm(small, small), small @ small)  # below the floor: untimed
    assert choices.timings == 1
    mm(torch.cat([a, a]), b)  # 512 rows: the next bucket
    assert choices.timings == 2 and (True, True, 10, 256, 256) in choices


@needs_onednn
@pytest.mark.parametrize("kind", ["mkl", "onednn", "packed"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_linear_matches_f_linear(monkeypatch, kind, bias):
    # Forward, input, weight and bias gradients of the big-product path equal F.linear's.
    if kind == "packed":  # every product on oneDNN with its right operand packed per call
        monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
        monkeypatch.setattr(L, "_shape_choice", DefaultChoice("packed"))
    else:
        monkeypatch.setenv("VATS_CPU_GEMM", kind)
    torch.manual_seed(0)
    module = Linear(256, 256, bias=bias)
    ref = torch.nn.Linear(256, 256, bias=bias)
    ref.load_state_dict(module.state_dict())
    x = torch.randn(2, 128, 256)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert L._timed_linear(x_ours, module.weight, module.bias)
    y, y_ref = module(x_ours), ref(x_ref)
    # (the node runs on the 2-D rows; a view restores the batch shape)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LinearFunctionBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    cot = torch.randn_like(y)
    y.backward(cot)
    y_ref.backward(cot)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-3)
    if bias:
        torch.testing.assert_close(module.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)
    # A transposed (non-contiguous) input takes the same path and the same gradients.
    xt = x.transpose(0, 1).detach().requires_grad_()
    module(xt).sum().backward()
    xt_ref = x.transpose(0, 1).detach().requires_grad_()
    ref(xt_ref).sum().backward()
    torch.testing.assert_close(xt.grad, xt_ref.grad, rtol=1e-5, atol=1e-4)


def test_small_or_foreign_products_stay_on_f_linear():
    w = torch.randn(256, 256)
    assert not L._timed_linear(torch.randn(255, 256), w, None)  # one row short of the floor
    assert not L._timed_linear(torch.randn(256, 256).double(), w.double(), None)
    assert not L._timed_linear(torch.randn(256, 128), w, None)  # F.linear names the mismatch
    assert not L._timed_linear(torch.randn(256, 256), w, torch.randn(255))
    assert not L._timed(torch.randn(256, 256), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear applies the autocast dtype
        assert not L._timed_linear(torch.randn(256, 256), w, None)
        assert not L._use_onednn(torch.randn(MIN_ROWS, 256), w, torch.randn(256), None)


# ---------------------------------------------------------------------------------------------
# Packed weights: inside packed_weights(), parameters run on oneDNN copies packed once.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def packed_few_rows(monkeypatch):
    """Fix the few-row choice to packed oneDNN in every bucket (no timing)."""
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    monkeypatch.setattr(L, "_onednn_buckets", frozenset(SMALL_ROWS))
    monkeypatch.setattr(L, "_packed_buckets", frozenset(SMALL_ROWS))


@pytest.fixture
def pack_counter(monkeypatch):
    """Count the weights packed."""
    calls = []
    real = L._pack

    def counting(weight):
        calls.append(tuple(weight.shape))
        return real(weight)

    monkeypatch.setattr(L, "_pack", counting)
    return calls


def _param_operands(rows: int, bias: bool = True, seed: int = 0):
    x, w, b = _operands(rows, bias, seed)
    return x, torch.nn.Parameter(w), None if b is None else torch.nn.Parameter(b)


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 16, 31, 32, MIN_ROWS + 3])
def test_packed_linear_equals_reference(packed_few_rows, pack_counter, rows, bias, activation):
    x, w, b = _param_operands(rows, bias, seed=rows)
    with torch.no_grad(), packed_weights():
        assert L._inference_kernel(x[0], (w,), b, activation) == "packed"
        got = linear(x[0], w, b, activation)
        got_t = linear(x.transpose(0, 1)[:, : max(1, rows // 2)], w, b, activation)
    assert pack_counter == [(80, 48)]  # packed once, reused by the strided call
    ref = _reference(x[0], w.detach(), b, activation)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    xt = x.transpose(0, 1)[:, : max(1, rows // 2)]
    torch.testing.assert_close(got_t, _reference(xt, w.detach(), b, activation))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_linear_equals_concatenated(packed_few_rows, pack_counter, bias):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 48, generator=gen)
    ws = [torch.nn.Parameter(torch.randn(n, 48, generator=gen) / 7) for n in (64, 16, 16)]
    bs = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (64, 16, 16)] if bias else None
    ref = F.linear(x, torch.cat(ws), None if bs is None else torch.cat(bs)).detach()
    with torch.no_grad():
        plain = L.linear_stacked(x, ws, bs)  # outside a region: concatenated per call
        assert pack_counter == []
        with packed_weights():
            packed = L.linear_stacked(x, ws, bs)
            again = L.linear_stacked(x[:, :20], ws, bs)
    assert pack_counter == [(96, 48)]  # the stack, once
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref[:, :20], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packing_only_where_documented(packed_few_rows, monkeypatch):
    x, w, b = _param_operands(MIN_ROWS)
    kernel = L._inference_kernel
    with torch.no_grad():
        assert kernel(x, (w,), b, None) == "onednn"  # outside a region: fused bias
        assert kernel(x, (w,), None, None) is None  # ... and MKL with nothing to fuse
        with packed_weights():
            assert kernel(x, (w,), None, None) == "packed"
            assert kernel(x, (w.detach(),), None, None) is None  # not a parameter
            assert kernel(x, (w[:40],), None, None) is None  # a view is a new object per call
            assert kernel(x.double(), (w.double(),), None, None) is None
            with torch.enable_grad():
                w.requires_grad_(True)
                assert kernel(x, (w,), None, None) is None  # gradients wanted
            monkeypatch.setattr(L, "_packed_buckets", frozenset({1, 2}))
            assert kernel(x[0, :1], (w,), None, None) == "packed"  # bucket 1
            assert kernel(x[0, :4], (w,), None, None) == "onednn"  # bucket 4: plain oneDNN
            assert kernel(x[0, :32], (w,), None, None) == "packed"  # beyond the buckets
            assert kernel(x[0, :0], (w,), None, None) is None  # no rows: F.linear
            assert linear(x[0, :0], w).shape == (0, 80)
            monkeypatch.setenv("VATS_CPU_GEMM", "mkl")
            assert kernel(x, (w,), None, None) is None
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        packed_weights(-1)


@needs_onednn
def test_changed_weights_are_packed_again(packed_few_rows, pack_counter):
    x, w, b = _param_operands(40)
    packing = packed_weights()
    with torch.no_grad():
        with packing:
            linear(x, w, b)
            w.mul_(2)  # an in-place change autograd sees: version counter moves
            got = linear(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert len(pack_counter) == 2
        w.data = torch.randn(80, 48)  # a new storage under the same parameter
        with packing:
            got = linear(x, w, b)
            linear(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert len(pack_counter) == 3
        assert packing.bytes == 80 * 48 * 4  # only the current copy is held


@needs_onednn
def test_copies_are_freed_with_the_parameter_the_region_and_the_budget(
    packed_few_rows, pack_counter
):
    x, w, _ = _param_operands(40, bias=False)
    packing = packed_weights()
    with torch.no_grad():
        with packing:
            linear(x, w)
        with packing:  # entering again reuses the copy
            linear(x, w)
            with packed_weights(max_bytes=0):  # an inner region: the outer copies serve
                linear(x, w)
        assert len(pack_counter) == 1 and packing.bytes == 80 * 48 * 4
        linear(x, w)  # outside: plain weights
        assert len(pack_counter) == 1
        del w  # the parameter dies: its copy goes
        assert packing.bytes == 0 and not packing._cache._entries

        x, w, _ = _param_operands(40, bias=False)
        with packed_weights(max_bytes=80 * 48 * 4 - 1) as tight:
            got = linear(x, w)  # over budget: runs unpacked
        assert len(pack_counter) == 1 and tight.bytes == 0
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
        packing.clear()
        assert packing.bytes == 0


@needs_onednn
def test_the_few_row_timing_includes_packed(monkeypatch):
    monkeypatch.setattr(L, "_onednn_buckets", None)
    monkeypatch.delenv("VATS_CPU_GEMM", raising=False)
    kernels = small_gemm_kernels(packed=True)
    assert set(kernels) == set(SMALL_ROWS)
    assert set(kernels.values()) <= {"mkl", "onednn", "packed"}
    plain = small_gemm_kernels()
    assert all(kernels[r] in ("packed", plain[r]) for r in SMALL_ROWS)
    for kind, expected in (("mkl", {"mkl"}), ("onednn", {"packed"})):
        monkeypatch.setattr(L, "_onednn_buckets", None)
        monkeypatch.setenv("VATS_CPU_GEMM", kind)
        assert set(small_gemm_kernels(packed=True).values()) == expected


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_expert_slices_are_packed_once_each(packed_few_rows, pack_counter, rows):
    gen = torch.Generator().manual_seed(4)
    stacked = torch.nn.Parameter(torch.randn(4, 80, 48, generator=gen) / 7)
    x = torch.randn(rows, 48, generator=gen)
    packing = packed_weights()
    with torch.no_grad():
        plain = [L.linear_slice(x, stacked, e, "gelu") for e in range(4)]
        assert pack_counter == []  # outside a region: plain slices
        with packing:
            got = [L.linear_slice(x, stacked, e, "gelu") for e in (0, 2, 0, 2)]
            sliced_view = L.linear_slice(x, stacked[1:], 1, "gelu")  # a view: never packed
        assert pack_counter == [(80, 48), (80, 48)]  # experts 0 and 2, once each
        assert packing.bytes == 2 * 80 * 48 * 4
        with packing:
            stacked.mul_(0.5)  # the whole stack changed: every slice is packed again
            halved = L.linear_slice(x, stacked, 2, "gelu")
    assert len(pack_counter) == 3
    for e, y in zip((0, 2, 0, 2), got, strict=True):
        torch.testing.assert_close(y, plain[e], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            y, F.gelu(F.linear(x, 2 * stacked[e].detach())), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(sliced_view, plain[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        halved, F.gelu(F.linear(x, stacked[2].detach())), rtol=1e-5, atol=1e-5
    )


@needs_onednn
def test_a_dropped_region_frees_its_copies_at_once(packed_few_rows, monkeypatch):
    import gc
    import weakref

    made = []
    real = L._pack

    def pack(weight):
        packed = real(weight)
        made.append(weakref.ref(packed))
        return packed

    monkeypatch.setattr(L, "_pack", pack)
    x, w, _ = _param_operands(40, bias=False)
    gc.disable()  # no cycle collection: only reference counting frees them
    try:
        with torch.no_grad(), packed_weights():
            linear(x, w)
        assert made and all(r() is None for r in made)
    finally:
        gc.enable()
