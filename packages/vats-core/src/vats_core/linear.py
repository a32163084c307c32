"""Linear layers and matrix products on the faster of torch's two CPU GEMM libraries.

torch runs a float32 CPU ``F.linear`` or ``mm`` through MKL. It also ships oneDNN, whose
linear (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor fuses CPU linears into)
is the faster one in three places. Which of the last two applies depends on the processor:
on an AMD EPYC (Zen 4), MKL read few-row weights at 6-11 GB/s where oneDNN read them at
15-25 GB/s, and oneDNN ran many large products 10-20 % faster and others 5-30 % slower; on
an Intel Xeon MKL was the faster at few rows (oneDNN 0.54-0.97x) and about even on large
products. So vats times both on this machine and remembers the winner:

- **Bias and GELU inside the GEMM** (inference, from :data:`MIN_ROWS` rows). ``F.linear``
  with a bias runs ``addmm``: it first copies the bias into every row of a freshly allocated
  output, then accumulates the matmul onto it; an activation after it is one more pass over
  another fresh tensor. Those passes, and the first-touch page faults of the memory they
  walk, cost a ViT-S/16 forward about a sixth of its time at batch 16 (2 threads). oneDNN
  applies the bias and the activation to each tile as the GEMM writes it. Always oneDNN;
  from :data:`MIN_TIMED_MACS` multiply-adds on, the first call of each shape also times it
  on the weight reordered into oneDNN's blocked layout for the call (as the large products
  below do), and the shape keeps that where it wins by 5 %: a ViT-S/16 forward at batch 16
  on plain weights went from 1.19x to 1.23x timm's speed (EPYC, alternating in one process).
- **A few rows** (inference below 32 rows: decoding). A linear then only streams its
  weight. The first such call times both libraries, once per process, at 1, 2, 4, 8 and 16
  rows over 64 MiB of weights (about 0.4 s); each row count then takes the library that won
  its bucket (:func:`small_gemm_kernels`).
- **Large products** (:func:`mm`, and :func:`linear` with at least :data:`MIN_TIMED_MACS`
  multiply-adds, in training too: its backward runs through :func:`mm`). The first product
  of each layout and shape (row count bucketed to powers of two) times three kernels on its
  own operands, three calls each: MKL, oneDNN, and oneDNN on the right operand reordered
  into its blocked layout for that one call (see packed weights below; the reorder is paid
  inside its time, so it wins only where a small operand serves many rows: a ViT-S/16 fc2
  forward at batch 16 took 17.0 ms so, against 18.8 on MKL and 20.6 on plain oneDNN, EPYC).
  The shape keeps the fastest (oneDNN's two by 5 % or more, else MKL). A training step
  repeats its shapes, so this is paid in the first step.

**Packed weights** (:class:`packed_weights`). oneDNN runs faster still on a weight it has
reordered into its own blocked layout: on the EPYC, 0.67-0.90x MKL's time over 21 linear
shapes of 256-3152 rows, and at 1-8 rows it streamed weights at 31-43 GB/s where the plain
layout gave 20-34 (MKL: 6-11). The reordered copy has to be made once and kept while the
weights stay as they are, which a library cannot see in general: ``p.data.copy_(...)``
(how many EMA and checkpoint-loading helpers write weights) leaves no trace on the
parameter. So packing is scoped: inside ``with packed_weights():`` each float32
``nn.Parameter`` a :func:`linear` (or :func:`linear_stacked`) meets in inference is
reordered on first use, and the copy is reused while the weights keep their version
counter and storage. From 32 rows on it always runs packed; below, each row bucket takes
packed oneDNN where it won the few-row timing. The copies cost a second set of weights in
memory, up to a budget (a quarter of physical memory unless given); weights past it run
unpacked. Packing a weight costs about one pass over it (reordering ran at ~5.7 GB/s), which
pays back over many calls, not one (one call of thousands of rows can pay it, which the
large-product timing above finds out per shape): a region wraps a loop (the apps' evaluation and
generation loops; ``generate()`` itself does not enter one, its caller may). A MoE's expert
slices are packed one by one (:func:`linear_slice`).

``VATS_CPU_GEMM=mkl`` or ``=onednn`` fixes every timed choice instead (``auto``, the
default, times). The libraries sum in different orders, so results agree within float32
rounding, not bit for bit; a run that must repeat bit for bit sets the variable.

Only float32 CPU operands with oneDNN built in and enabled (``torch.backends.mkldnn``) are
considered (``VATS_CPU_GEMM=mkl`` also turns packing off). oneDNN's linear has no autograd
formula, so training goes through a small autograd function whose forward and backward
products are :func:`mm` calls. Under
torch.compile, inductor fuses and picks its own kernels: only the few-row choice is kept, as
the opaque op ``vats::onednn_linear`` (inductor cannot lower oneDNN's linear on weights it
has not packed itself), and only once made: timing inside a trace would be traced.
Everywhere else it is ``F.linear`` (then the activation).
"""

from __future__ import annotations

import contextvars
import os
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core._autograd import in_func_transform, plain_ops_only

__all__ = [
    "MIN_ROWS",
    "MIN_TIMED_MACS",
    "SMALL_ROWS",
    "Linear",
    "linear",
    "linear_slice",
    "linear_stacked",
    "mm",
    "onednn_for_rows",
    "packed_weights",
    "small_gemm_kernels",
]

# From this many rows (tokens) on, a bias or an activation to fuse makes oneDNN the faster
# (ViT and prefill batches have thousands).
MIN_ROWS = 256

# Row buckets of the few-row choice: rows r use the bucket of the largest power of two <= r.
SMALL_ROWS = (1, 2, 4, 8, 16)

# Products of at least this many multiply-adds (about 0.1 ms here) get the per-shape choice.
MIN_TIMED_MACS = 1 << 24

_ENV = "VATS_CPU_GEMM"
_MODES = ("auto", "mkl", "onednn")

# linear()'s activations -> oneDNN's post-op (name, algorithm).
_POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}

# Buckets (from SMALL_ROWS) where oneDNN won; None until the first few-row call decides.
_onednn_buckets: frozenset[int] | None = None
# Buckets where oneDNN on packed weights beat both (decided with _onednn_buckets).
_packed_buckets: frozenset[int] = frozenset()


def _best_times(*fns: Callable[[], object]) -> list[float]:
    """Each function's best time of 3 calls, taken in turn after one warm-up call of each."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn()
        for _ in range(3):
            for fn, seen in zip(fns, times, strict=True):
                t0 = time.perf_counter()
                fn()
                seen.append(time.perf_counter() - t0)
    return [min(seen) for seen in times]


def _time_small_gemms() -> tuple[frozenset[int], frozenset[int]]:
    """The SMALL_ROWS buckets where oneDNN beats MKL by 10 %, and those where oneDNN on
    packed weights beats the faster of the two by 10 %."""
    gen = torch.Generator().manual_seed(0)
    # 16 weights of 2048 x 512: 64 MiB, past the last-level cache, as decoding reads them.
    weights = [torch.empty(2048, 512).uniform_(-0.05, 0.05, generator=gen) for _ in range(16)]
    packed = [_pack(w) for w in weights]

    def one_pass(product: Callable[[Tensor, Tensor], Tensor], x: Tensor) -> Callable[[], object]:
        return lambda: [product(x, w.t()) for w in weights]

    def packed_pass(x: Tensor) -> Callable[[], object]:
        return lambda: [_onednn_linear(x, w, None, None) for w in packed]

    onednn_wins, packed_wins = set(), set()
    for rows in SMALL_ROWS:
        x = torch.randn(rows, 512, generator=gen)
        t_mkl, t_onednn, t_packed = _best_times(
            one_pass(_mkl_mm, x), one_pass(_onednn_mm, x), packed_pass(x)
        )
        if t_onednn < 0.9 * t_mkl:
            onednn_wins.add(rows)
        if t_packed < 0.9 * min(t_mkl, t_onednn):
            packed_wins.add(rows)
    return frozenset(onednn_wins), frozenset(packed_wins)


_parsed_modes: dict[str, str] = {}


def _mode() -> str:
    raw = os.environ.get(_ENV, "auto")
    mode = _parsed_modes.get(raw)
    if mode is None:
        mode = raw.strip().lower()
        if mode not in _MODES:
            raise ValueError(f"{_ENV} must be auto, mkl or onednn, got {mode!r}")
        _parsed_modes[raw] = mode
    return mode


def _onednn_on() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _cpu_float32(*tensors: Tensor | None) -> bool:
    """Every given tensor float32 on CPU, and no CPU autocast (F.linear would cast)."""
    given = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in given):
        return False
    return not torch.is_autocast_enabled("cpu")


def small_gemm_kernels(packed: bool = False) -> dict[int, str]:
    """The kernel each few-row bucket uses, deciding if needed: ``{rows: "mkl" | "onednn"}``
    for plain weights, or with ``packed`` for parameters inside :func:`packed_weights`, where
    a bucket may also say ``"packed"``.

    Raises:
        ValueError: ``VATS_CPU_GEMM`` is set to something other than auto, mkl or onednn.
    """
    global _onednn_buckets, _packed_buckets
    if _onednn_buckets is None:
        mode = _mode()
        if not _onednn_on():
            return dict.fromkeys(SMALL_ROWS, "mkl")  # not cached: it may be enabled later
        if mode == "auto":
            _onednn_buckets, _packed_buckets = _time_small_gemms()
        else:
            _onednn_buckets = _packed_buckets = frozenset(SMALL_ROWS if mode == "onednn" else ())
    kernels = {rows: "onednn" if rows in _onednn_buckets else "mkl" for rows in SMALL_ROWS}
    if packed:
        kernels.update(dict.fromkeys(_packed_buckets, "packed"))
    return kernels


def onednn_for_rows(rows: int) -> bool:
    """Whether a no-bias float32 CPU linear of ``rows`` rows runs on oneDNN (decides if needed).

    Under torch.compile it only reads a choice already made (and is False before one is).
    """
    if rows < 1 or rows >= 2 * SMALL_ROWS[-1]:
        return False
    buckets = _onednn_buckets
    if buckets is None and not torch.compiler.is_compiling():
        small_gemm_kernels()
        buckets = _onednn_buckets
    return buckets is not None and 1 << (rows.bit_length() - 1) in buckets


def _inference_kernel(
    x: Tensor,
    weights: tuple[Tensor, ...],
    bias: Tensor | None,
    activation: str | None,
    sources: tuple[Tensor, ...] | None = None,
    packing: bool = True,
) -> str | None:
    """The kernel of an inference linear: ``"packed"``, ``"onednn"``, or None for F.linear
    (or, when gradients are wanted, :class:`_LinearFunction`). ``sources`` are the tensors
    a packed copy would be made from (default: ``weights``; for an expert slice, the stacked
    parameter); ``packing=False`` asks for the kernel of the plain weights. Runs on every
    call of a decoding step, so the cheap checks come first."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2 or x.shape[-1] == 0:
        return None
    operands = (x, *weights) if bias is None else (x, *weights, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return None
    if not _cpu_float32(*weights, bias):
        return None  # (F.linear names a mismatch)
    if any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        return None
    if bias is not None and bias.shape != (sum(w.shape[0] for w in weights),):
        return None
    rows = x.numel() // x.shape[-1]
    if rows == 0:
        return None  # (F.linear returns the empty result)
    if in_func_transform():
        return None  # (oneDNN's linear has no batching rule: vats_core._autograd)
    if torch.compiler.is_compiling():
        # Inductor fuses bias and activation itself; the oneDNN availability checks would
        # break the graph (the few-row choice was made where they passed).
        return "onednn" if len(weights) == 1 and onednn_for_rows(rows) else None
    if not _onednn_on():
        return None
    region = packing and _packing.get() is not None
    if region and _packable(weights if sources is None else sources) and _mode() != "mkl":
        if rows >= 2 * SMALL_ROWS[-1]:
            return "packed"
        if _onednn_buckets is None:
            small_gemm_kernels()
        if 1 << (rows.bit_length() - 1) in _packed_buckets:
            return "packed"
    if len(weights) > 1:
        return None  # stacked, unpacked: concatenated, then a plain linear
    if rows >= MIN_ROWS:  # nothing to fuse: MKL's plain GEMM is as fast or faster
        return "onednn" if bias is not None or activation is not None else None
    return "onednn" if onednn_for_rows(rows) else None


# (bucket of rows, in, out, bias, activation) -> whether reordering the weight for the call
# won, for fused inference linears on plain weights
_fused_choice: dict[tuple[int, int, int, bool, str | None], bool] = {}


def _reorder_pays(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> bool:
    """Whether a fused inference linear of many rows (outside a :class:`packed_weights`
    region) runs faster on its weight reordered for this one call, reorder included; timed
    once per shape, as the large products are (module docstring)."""
    rows = x.numel() // x.shape[-1]
    if rows < MIN_ROWS or rows * x.shape[-1] * weight.shape[0] < MIN_TIMED_MACS:
        return False
    if _mode() != "auto":
        return False
    key = (rows.bit_length(), weight.shape[1], weight.shape[0], bias is not None, activation)
    choice = _fused_choice.get(key)
    if choice is None:
        t_plain, t_reordered = _best_times(
            lambda: _onednn_linear(x, weight, bias, activation),
            lambda: _onednn_linear(x, _reorder(weight), bias, activation),
        )
        choice = _fused_choice[key] = t_reordered < 0.95 * t_plain
    return choice


def _packable(weights: tuple[Tensor, ...]) -> bool:
    # Parameters only: a view or a temporary is a new object on every call. An inference
    # tensor has no version counter to watch.
    return all(isinstance(w, nn.Parameter) and not w.is_inference() for w in weights)


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> bool:
    """Whether an inference linear on a plain (unpacked) weight runs on oneDNN."""
    return _inference_kernel(x, (weight,), bias, activation, packing=False) == "onednn"


def _packed_linear(
    x: Tensor,
    weights: tuple[Tensor, ...],
    bias: Tensor | None,
    activation: str | None,
    index: int | None = None,
) -> Tensor | None:
    """The linear on the region's packed copy of ``weights`` stacked (of ``weights[0][index]``
    with an index), or None where that is not the kernel (no region, not parameters, a row
    bucket that runs plain) or the copy would not fit the budget."""
    if torch.compiler.is_compiling():
        return None  # (dynamo cannot trace the ContextVar; inductor picks its own kernels)
    cache = _packing.get()
    if cache is None:
        return None
    used = weights if index is None else (weights[0][index],)
    if _inference_kernel(x, used, bias, activation, sources=weights) != "packed":
        return None
    packed = cache.get(weights, index)
    return None if packed is None else _onednn_linear(x, packed, bias, activation)


# (a row-major, b row-major, bucket of a's rows, a's columns, b's columns) -> the kernel that
# won: "mkl", "onednn" or "packed"
_shape_choice: dict[tuple[bool, bool, int, int, int], str] = {}


def _onednn_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    # oneDNN's linear computes a @ w.T (+ bias) for w = b.T, any strides; a dense bias.
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


def _packed_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    # The same on b reordered into oneDNN's blocked layout first, for this call only.
    return torch.ops.mkldnn._linear_pointwise(a, _reorder(b.t()), bias, "none", [], "")


def _mkl_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


_MM_KERNELS = {"mkl": _mkl_mm, "onednn": _onednn_mm, "packed": _packed_mm}


def _timed(a: Tensor, b: Tensor) -> bool:
    """Whether ``a @ b`` (2-D) gets the per-shape library choice (module docstring)."""
    if not _cpu_float32(a, b) or plain_ops_only():
        return False
    m, k = a.shape
    return m * k * b.shape[1] >= MIN_TIMED_MACS and _onednn_on()


def _mm_kernel(a: Tensor, b: Tensor, bias: Tensor | None) -> str:
    """The kernel ``a @ b`` runs on; times this layout and shape first if it is new."""
    mode = _mode()
    if mode != "auto":
        return mode
    m, k = a.shape
    key = (a.stride(1) == 1, b.stride(1) == 1, m.bit_length(), k, b.shape[1])
    choice = _shape_choice.get(key)
    if choice is None:
        t_mkl, t_onednn, t_packed = _best_times(
            *(lambda f=f: f(a, b, bias) for f in _MM_KERNELS.values())
        )
        # oneDNN's kernels must win by 5 %; packing is paid inside its time
        best = min(t_onednn, t_packed)
        choice = "mkl" if best >= 0.95 * t_mkl else "onednn" if t_onednn == best else "packed"
        _shape_choice[key] = choice
    return choice


def mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b`` (+ ``bias``) for 2-D operands, on the kernel this shape runs fastest on.

    Float32 CPU products of at least :data:`MIN_TIMED_MACS` multiply-adds take MKL, oneDNN,
    or oneDNN on ``b`` packed for the call, as timed for their layout and shape (module
    docstring); everything else is ``torch.mm`` / ``torch.addmm``. No autograd: callers
    write their own backward (it is three more :func:`mm` calls).

    Args:
        a: ``(M, K)``.
        b: ``(K, N)``, any strides (``w.t()`` of a ``(N, K)`` weight is free).
        bias: ``(N,)`` or None.

    Returns:
        ``(M, N)``, a new tensor.
    """
    if not _timed(a, b):
        return _mkl_mm(a, b, bias)
    bias = _dense(bias)  # (timed with it too)
    return _MM_KERNELS[_mm_kernel(a, b, bias)](a, b, bias)


def _timed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear` runs as :class:`_LinearFunction` (large float32 CPU products)."""
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return False  # (F.linear names what is wrong)
    if not _cpu_float32(x, weight, bias) or plain_ops_only():
        return False
    if bias is not None and bias.shape != (weight.shape[0],):
        return False
    macs = x.numel() * weight.shape[0]
    return macs >= MIN_TIMED_MACS and _onednn_on()


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` of 2-D ``x`` whose three products (forward, input and weight gradients)
    are :func:`mm`. Under ``create_graph=True`` the backward is the same formulas in
    differentiable ``torch.mm``, so a second backward runs through it."""

    @staticmethod
    def forward(ctx, x_MK: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_MK, weight)
        ctx.has_bias = bias is not None
        return mm(x_MK, weight.t(), bias)

    @staticmethod
    def backward(ctx, grad_MN: Tensor):  # type: ignore[override]
        x_MK, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        product = torch.mm if torch.is_grad_enabled() else mm  # (grad mode: create_graph)
        grad_x = product(grad_MN, weight) if need_x else None
        grad_w = product(grad_MN.t(), x_MK) if need_w else None
        grad_b = grad_MN.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _linear_function(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # (the reshapes outside the node: its saved input is then x's own view, with history)
    y = _LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """``act(F.linear(x, weight, bias))``, on oneDNN where that is faster (module docstring).

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)``.
        bias: ``(out,)`` or None.
        activation: None, ``"gelu"`` (exact, erf) or ``"gelu_tanh"``.

    Returns:
        ``(..., out)``.
    """
    if activation not in _POST_OPS:
        raise ValueError(f"linear: activation must be one of {list(_POST_OPS)}, got {activation!r}")
    y = _packed_linear(x, (weight,), bias, activation)
    if y is not None:
        return y
    if _use_onednn(x, weight, bias, activation):
        if torch.compiler.is_compiling():
            name, algorithm = _POST_OPS[activation]
            return _onednn_linear_op(x, weight, _dense(bias), name, algorithm)
        if _reorder_pays(x, weight, bias, activation):
            weight = _reorder(weight)
        return _onednn_linear(x, weight, bias, activation)
    if _timed_linear(x, weight, bias):
        y = _linear_function(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def linear_stacked(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor] | None = None
) -> Tensor:
    """``linear(x, cat(weights), cat(biases))``: several projections of one input (q, k and v)
    as one product, the outputs side by side. Inside :func:`packed_weights` the stack of
    parameters is packed once, not concatenated on every call.

    Args:
        x: ``(..., in)``.
        weights: ``(out_i, in)`` each.
        biases: ``(out_i,)`` each, or None.

    Returns:
        ``(..., sum(out_i))``.
    """
    weights = tuple(weights)
    bias = None if biases is None else torch.cat(tuple(biases))
    y = _packed_linear(x, weights, bias, None)
    return linear(x, torch.cat(weights), bias) if y is None else y


def linear_slice(x: Tensor, weight: Tensor, index: int, activation: str | None = None) -> Tensor:
    """``linear(x, weight[index], None, activation)`` for stacked ``(E, out, in)`` weights (a
    MoE's experts). Inside :func:`packed_weights` each slice of a parameter is packed once.

    Args:
        x: ``(..., in)``.
        weight: ``(E, out, in)``.
        index: which ``(out, in)`` slice.
        activation: as in :func:`linear`.

    Returns:
        ``(..., out)``.
    """
    y = _packed_linear(x, (weight,), None, activation, index)
    return linear(x, weight[index], None, activation) if y is None else y


def _dense(bias: Tensor | None) -> Tensor | None:
    # oneDNN takes any strides for x and weight but reads the bias as dense (a strided bias
    # gave wrong sums): a no-op for a parameter.
    return None if bias is None else bias.contiguous()


def _onednn_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None
) -> Tensor:
    name, algorithm = _POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, weight, _dense(bias), name, [], algorithm)


def _reorder(weight: Tensor) -> Tensor:
    """oneDNN's blocked copy of a float32 ``(out, in)`` weight (an opaque mkldnn tensor that
    only its linear reads). The batch-size hint hardly mattered for 1-3152 rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 256)


def _pack(weight: Tensor) -> Tensor:
    """A copy to keep: what :func:`packed_weights` regions (and the few-row timing) make."""
    return _reorder(weight)


class _PackedWeights:
    """The packed copies one :func:`packed_weights` region has made, by the parameters they
    stack. An entry is used while every parameter is alive and keeps its version counter,
    storage and shape; else it is packed again."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # key (the parameters' ids, then the slice index or None) -> (weak references to
        # them, their stamp, packed, bytes)
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple, Tensor, int]] = {}

    @staticmethod
    def _stamp(weights: tuple[Tensor, ...]) -> tuple:
        return tuple((w._version, w.data_ptr(), w.shape) for w in weights)

    def get(self, weights: tuple[Tensor, ...], index: int | None = None) -> Tensor | None:
        """The packed stack of ``weights`` (or, with ``index``, of ``weights[0][index]``),
        packing it if needed; None past the budget."""
        key = (*(id(w) for w in weights), index)
        stamp = self._stamp(weights)
        entry = self._entries.get(key)
        if entry is not None:
            # (an entry whose parameter died was dropped then, so an id reused since then
            # cannot find one)
            if entry[1] == stamp:
                return entry[2]
            self._drop(key)
        used = weights if index is None else (weights[0][index],)
        size = 4 * sum(w.numel() for w in used)
        if self.bytes + size > self.max_bytes:
            return None
        with torch.no_grad():
            packed = _pack(used[0] if len(used) == 1 else torch.cat(used))
        # A parameter's death drops its entries (an id can then be reused). The callback
        # holds the cache weakly: a strong reference would make a cycle (cache -> entry ->
        # weakref -> callback -> cache) that keeps the copies until the garbage collector runs.
        cache = weakref.ref(self)

        def drop(_: object, key: tuple = key) -> None:
            alive = cache()
            if alive is not None:
                alive._drop(key)

        refs = tuple(weakref.ref(w, drop) for w in weights)
        self._entries[key] = (refs, stamp, packed, size)
        self.bytes += size
        return packed

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[3]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


_packing: contextvars.ContextVar[_PackedWeights | None] = contextvars.ContextVar(
    "vats_packed_weights", default=None
)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        return 16 << 30


class packed_weights:  # a context manager, named like torch.no_grad
    """Run inference linears on packed copies of their weights, made once (module docstring).

    Inside ``with packed_weights():`` each float32 CPU ``nn.Parameter`` that :func:`linear`
    or :func:`linear_stacked` meets without autograd is reordered into oneDNN's blocked layout
    on first use (where that kernel is the faster for the call's row count) and the copy is
    reused. The copies belong to the object: entering it again reuses them (a serving loop
    may enter it around each request), and they are freed with it or by :meth:`clear`.
    Change weights only through ops autograd sees (``with torch.no_grad(): p.copy_(new)``,
    optimizer steps): they are packed again. Writes through ``p.data`` are not seen. Inside
    another region, the outer one's copies serve.

    Args:
        max_bytes: the most memory the copies may take; weights past it run unpacked.
            Default: a quarter of physical memory.

    Raises:
        ValueError: ``max_bytes`` is negative.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"packed_weights: max_bytes must be >= 0, got {max_bytes}")
        self._cache = _PackedWeights(_physical_memory() // 4 if max_bytes is None else max_bytes)
        self._tokens: list[contextvars.Token | None] = []

    @property
    def bytes(self) -> int:
        """Memory the packed copies take now."""
        return self._cache.bytes

    def clear(self) -> None:
        """Free the packed copies (the next use packs again)."""
        self._cache.clear()

    def __enter__(self) -> packed_weights:
        outer = _packing.get()
        self._tokens.append(None if outer is not None else _packing.set(self._cache))
        return self

    def __exit__(self, *exc: object) -> None:
        token = self._tokens.pop()
        if token is not None:
            _packing.reset(token)


@torch.library.custom_op("vats::onednn_linear", mutates_args=())
def _onednn_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, name: str, algorithm: str
) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, [], algorithm)


@_onednn_linear_op.register_fake
def _(x, weight, bias, name, algorithm):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) calling :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
