"""The benchmarks' kernel floor records the calls it is meant to, and only those."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
from common import _RecordCompute, kernel_floor


def _recorded(fn) -> dict[str, int]:
    recorder = _RecordCompute()
    with recorder:
        fn()
    counts: dict[str, int] = {}
    for (func, _, _), (count, _) in recorder.calls.items():
        counts[str(func)] = counts.get(str(func), 0) + count
    return counts


def test_counts_repeats_once_per_shape_and_forward_and_backward():
    a = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)

    def fn() -> None:
        y = sum(F.linear(a, w) for _ in range(3))  # one shape, three times
        F.linear(a[:2], w).sum().backward(retain_graph=False)  # another shape
        y.sum().backward()

    recorder = _RecordCompute()
    with recorder:
        fn()
    forward = [c for (f, *_), (c, _) in recorder.calls.items() if f is torch.ops.aten.mm.default]
    assert sum(forward) >= 4  # 4 forward products, plus the backward's
    assert 3 in forward  # the repeated shape is one entry counted three times
    # Elementwise work is not recorded.
    assert "aten.add.Tensor" not in _recorded(fn)


def test_records_whole_ops_under_inference_mode():
    x = torch.randn(4, 3, 8)
    w, b = torch.randn(6, 8), torch.randn(6)

    def fn() -> None:
        with torch.inference_mode():
            F.scaled_dot_product_attention(x[None], x[None], x[None])
            F.linear(x, w, b)

    counts = _recorded(fn)
    assert counts.get("aten.linear.default") == 1
    assert sum(v for k, v in counts.items() if "scaled_dot_product" in k) == 1


def test_records_convolutions_in_every_grad_mode():
    image, kernel = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    for mode in (torch.inference_mode, torch.no_grad):

        def fn(mode=mode) -> None:
            with mode():
                F.conv2d(image, kernel)

        counts = _recorded(fn)
        assert sum(v for k, v in counts.items() if "conv" in k) == 1, (mode, counts)


def test_elementwise_only_has_no_floor():
    x = torch.randn(64, 64)
    assert kernel_floor(lambda: (x * 2 + 1).relu()) == 0.0
    assert kernel_floor(lambda: x @ x) > 0.0
