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
  applies the bias and the activation to each tile as the GEMM writes it. Always oneDNN.
- **A few rows** (inference below 32 rows: decoding). A linear then only streams its
  weight. The first such call times both libraries, once per process, at 1, 2, 4, 8 and 16
  rows over 64 MiB of weights (about 0.4 s); each row count then takes the library that won
  its bucket (:func:`small_gemm_kernels`).
- **Large products** (:func:`mm`, and :func:`linear` with at least :data:`MIN_TIMED_MACS`
  multiply-adds, in training too: its backward runs through :func:`mm`). The first product
  of each layout and shape (row count bucketed to powers of two) times both libraries on
  its own operands, three calls each, and the shape keeps the winner (by 5 % or more, else
  MKL). A training step repeats its shapes, so this is paid in the first step.

``VATS_CPU_GEMM=mkl`` or ``=onednn`` fixes every timed choice instead (``auto``, the
default, times). The libraries sum in different orders, so results agree within float32
rounding, not bit for bit; a run that must repeat bit for bit sets the variable.

Only float32 CPU operands with oneDNN built in and enabled (``torch.backends.mkldnn``) are
considered. oneDNN's linear has no autograd formula, so training goes through a small
autograd function whose forward and backward products are :func:`mm` calls. Under
torch.compile, inductor fuses and picks its own kernels: only the few-row choice is kept, as
the opaque op ``vats::onednn_linear`` (inductor cannot lower oneDNN's linear on weights it
has not packed itself), and only once made: timing inside a trace would be traced.
Everywhere else it is ``F.linear`` (then the activation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MIN_ROWS",
    "MIN_TIMED_MACS",
    "SMALL_ROWS",
    "Linear",
    "linear",
    "mm",
    "onednn_for_rows",
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


def _onednn_faster(mkl: Callable[[], object], onednn: Callable[[], object], margin: float) -> bool:
    """Whether ``onednn()`` takes under ``margin`` times ``mkl()``'s time (best of 3 each,
    alternating, after one warm-up call of each)."""
    times: dict[Callable[[], object], list[float]] = {mkl: [], onednn: []}
    with torch.no_grad():
        for fn in times:
            fn()
        for _ in range(3):
            for fn, seen in times.items():
                t0 = time.perf_counter()
                fn()
                seen.append(time.perf_counter() - t0)
    return min(times[onednn]) < margin * min(times[mkl])


def _time_small_gemms() -> frozenset[int]:
    """The SMALL_ROWS buckets where oneDNN beats MKL by 10 %."""
    gen = torch.Generator().manual_seed(0)
    # 16 weights of 2048 x 512: 64 MiB, past the last-level cache, as decoding reads them.
    weights = [torch.empty(2048, 512).uniform_(-0.05, 0.05, generator=gen) for _ in range(16)]

    def one_pass(product: Callable[[Tensor, Tensor], Tensor], x: Tensor) -> Callable[[], object]:
        return lambda: [product(x, w.t()) for w in weights]

    wins = set()
    for rows in SMALL_ROWS:
        x = torch.randn(rows, 512, generator=gen)
        if _onednn_faster(one_pass(_mkl_mm, x), one_pass(_onednn_mm, x), margin=0.9):
            wins.add(rows)
    return frozenset(wins)


def _mode() -> str:
    mode = os.environ.get(_ENV, "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"{_ENV} must be auto, mkl or onednn, got {mode!r}")
    return mode


def _onednn_on() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _cpu_float32(*tensors: Tensor | None) -> bool:
    """Every given tensor float32 on CPU, and no CPU autocast (F.linear would cast)."""
    given = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in given):
        return False
    return not torch.is_autocast_enabled("cpu")


def small_gemm_kernels() -> dict[int, str]:
    """The library each few-row bucket uses: ``{rows: "mkl" | "onednn"}`` (decides if needed).

    Raises:
        ValueError: ``VATS_CPU_GEMM`` is set to something other than auto, mkl or onednn.
    """
    global _onednn_buckets
    if _onednn_buckets is None:
        mode = _mode()
        if not _onednn_on():
            return dict.fromkeys(SMALL_ROWS, "mkl")  # not cached: it may be enabled later
        if mode == "auto":
            _onednn_buckets = _time_small_gemms()
        else:
            _onednn_buckets = frozenset(SMALL_ROWS if mode == "onednn" else ())
    return {rows: "onednn" if rows in _onednn_buckets else "mkl" for rows in SMALL_ROWS}


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


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> bool:
    if not _cpu_float32(x, weight, bias) or x.dim() < 2 or x.shape[-1] == 0:
        return False  # (mismatches fall to F.linear, which names them)
    operands = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return False
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling():
        # Inductor fuses bias and activation itself; the oneDNN availability checks would
        # break the graph (the few-row choice was made where they passed).
        return onednn_for_rows(rows)
    if not _onednn_on():
        return False
    if rows >= MIN_ROWS:  # nothing to fuse: MKL's plain GEMM is as fast or faster
        return bias is not None or activation is not None
    return onednn_for_rows(rows)


# (a row-major, b row-major, bucket of a's rows, a's columns, b's columns) -> oneDNN won
_shape_choice: dict[tuple[bool, bool, int, int, int], bool] = {}


def _onednn_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    # oneDNN's linear computes a @ w.T (+ bias) for w = b.T, any strides; a dense bias.
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


def _mkl_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _timed(a: Tensor, b: Tensor) -> bool:
    """Whether ``a @ b`` (2-D) gets the per-shape library choice (module docstring)."""
    if not _cpu_float32(a, b) or torch.compiler.is_compiling():
        return False
    m, k = a.shape
    return m * k * b.shape[1] >= MIN_TIMED_MACS and _onednn_on()


def _mm_on_onednn(a: Tensor, b: Tensor, bias: Tensor | None) -> bool:
    """Whether ``a @ b`` runs on oneDNN; times this layout and shape first if it is new."""
    mode = _mode()
    if mode != "auto":
        return mode == "onednn"
    m, k = a.shape
    key = (a.stride(1) == 1, b.stride(1) == 1, m.bit_length(), k, b.shape[1])
    choice = _shape_choice.get(key)
    if choice is None:
        choice = _onednn_faster(
            lambda: _mkl_mm(a, b, bias), lambda: _onednn_mm(a, b, bias), margin=0.95
        )
        _shape_choice[key] = choice
    return choice


def mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b`` (+ ``bias``) for 2-D operands, on the library this shape runs faster on.

    Float32 CPU products of at least :data:`MIN_TIMED_MACS` multiply-adds take MKL or
    oneDNN as timed for their layout and shape (module docstring); everything else is
    ``torch.mm`` / ``torch.addmm``. No autograd: callers write their own backward (it is
    three more :func:`mm` calls).

    Args:
        a: ``(M, K)``.
        b: ``(K, N)``, any strides (``w.t()`` of a ``(N, K)`` weight is free).
        bias: ``(N,)`` or None.

    Returns:
        ``(M, N)``, a new tensor.
    """
    if _timed(a, b) and _mm_on_onednn(a, b, bias):
        return _onednn_mm(a, b, None if bias is None else bias.contiguous())
    return _mkl_mm(a, b, bias)


def _timed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear` runs as :class:`_LinearFunction` (large float32 CPU products)."""
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return False  # (F.linear names what is wrong)
    if not _cpu_float32(x, weight, bias) or torch.compiler.is_compiling():
        return False
    if bias is not None and bias.shape != (weight.shape[0],):
        return False
    macs = x.numel() * weight.shape[0]
    return macs >= MIN_TIMED_MACS and _onednn_on()


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` whose three products (forward, input and weight gradients) are :func:`mm`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        x_MK = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_MK, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return mm(x_MK, weight.t(), bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x_MK, weight = ctx.saved_tensors
        grad_MN = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = mm(grad_MN, weight).view(ctx.x_shape) if need_x else None
        grad_w = mm(grad_MN.t(), x_MK) if need_w else None
        grad_b = grad_MN.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


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
    if _use_onednn(x, weight, bias, activation):
        name, algorithm = _POST_OPS[activation]
        # oneDNN takes any strides for x and weight but reads the bias as dense (a strided
        # bias gave wrong sums): a no-op for a parameter.
        bias = None if bias is None else bias.contiguous()
        if torch.compiler.is_compiling():
            return _onednn_linear_op(x, weight, bias, name, algorithm)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, [], algorithm)
    if _timed_linear(x, weight, bias):
        y = _LinearFunction.apply(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


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
