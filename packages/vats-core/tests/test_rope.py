"""RoPE: relative-position property in 1D/2D/3D, scaling formulas, caching, validation."""

from __future__ import annotations

import math

import pytest
import torch

from vats_core.rope import (
    RopeConfig,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary,
    grid_positions_2d,
    grid_positions_3d,
    rope_axes_dims,
    rotate_half,
)

F64 = torch.float64


def _scores(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, pq, pk) -> torch.Tensor:
    """(Tq, Tk) dot products of rotated q (at positions pq) and k (at positions pk)."""
    cq, sq = rope(pq, dtype=F64)
    ck, sk = rope(pk, dtype=F64)
    qr = apply_rotary(q, cq, sq)  # (1, 1, Tq, Dh)
    kr = apply_rotary(k, ck, sk)
    return (qr @ kr.transpose(-1, -2))[0, 0]


def test_apply_rotary_is_complex_rotation_of_half_pairs() -> None:
    # Independent reference: pair (i, i + Dh/2) is the complex number x_i + j·x_{i+Dh/2},
    # multiplied by exp(j · p · theta^(-2i/Dh)).
    torch.manual_seed(0)
    dh, theta = 8, 500.0
    rope = RotaryEmbedding(RopeConfig(head_dim=dh, theta=theta))
    x = torch.randn(2, 3, 5, dh, dtype=F64)
    pos = torch.tensor([0, 1, 7, 30, 1000])
    out = apply_rotary(x, *rope(pos, dtype=F64))
    inv = theta ** (-torch.arange(0, dh, 2, dtype=F64) / dh)
    z = torch.complex(x[..., : dh // 2], x[..., dh // 2 :])
    rot = z * torch.polar(torch.ones_like(inv), pos[:, None].to(F64) * inv)
    expected = torch.cat([rot.real, rot.imag], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_apply_rotary_matches_formula_and_gradcheck(layout: str) -> None:
    # apply_rotary against x·cos + rotate_half(x)·sin, with tables whose halves differ (any
    # (cos, sin) the public function accepts), on a transposed view like the attention
    # layer's queries, which it keeps in their layout; first and second derivatives through
    # gradcheck.
    torch.manual_seed(2)
    b, h, t, dh = 2, 3, 5, 8
    if layout == "transposed":
        x = torch.randn(b, t, h, dh, dtype=F64).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(b, h, t, dh, dtype=F64, requires_grad=True)
    cos, sin = torch.randn(1, 1, t, dh, dtype=F64), torch.randn(1, 1, t, dh, dtype=F64)
    expected = x * cos + rotate_half(x) * sin
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.stride() == x.stride()  # stays in the projection's layout
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: apply_rotary(v, cos, sin), (x,))
    assert torch.autograd.gradgradcheck(lambda v: apply_rotary(v, cos, sin), (x,))


def test_apply_rotary_differentiates_learned_tables() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 6, dtype=F64)
    cos = torch.randn(4, 6, dtype=F64, requires_grad=True)
    sin = torch.randn(4, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: apply_rotary(x, c, s), (cos, sin))


@pytest.mark.parametrize("shift", [1, 5, 123])
def test_1d_scores_depend_only_on_relative_position(shift: int) -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(RopeConfig(head_dim=16))
    q, k = torch.randn(1, 1, 6, 16, dtype=F64), torch.randn(1, 1, 9, 16, dtype=F64)
    pq, pk = torch.tensor([0, 3, 4, 10, 11, 40]), torch.arange(9) * 2
    base = _scores(rope, q, k, pq, pk)
    torch.testing.assert_close(_scores(rope, q, k, pq + shift, pk + shift), base)
    # Shifting only the queries changes the relative offsets, hence the scores.
    assert not torch.allclose(_scores(rope, q, k, pq + shift, pk), base)


def test_1d_per_row_positions_broadcast_over_heads() -> None:
    rope = RotaryEmbedding(RopeConfig(head_dim=8))
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = rope(pos)
    assert cos.shape == (2, 1, 3, 8)
    x = torch.randn(2, 4, 3, 8)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[1:], apply_rotary(x[1:], *rope(pos[1])))


def test_2d_scores_depend_only_on_relative_grid_offset() -> None:
    torch.manual_seed(2)
    rope = RotaryEmbedding(RopeConfig(head_dim=16, n_axes=2))
    grid = grid_positions_2d(3, 4)  # (12, 2)
    assert grid.shape == (12, 2) and grid[5].tolist() == [1, 1]
    q, k = torch.randn(1, 1, 12, 16, dtype=F64), torch.randn(1, 1, 12, 16, dtype=F64)
    base = _scores(rope, q, k, grid, grid)
    shift = torch.tensor([7, 3])
    torch.testing.assert_close(_scores(rope, q, k, grid + shift, grid + shift), base)
    # Each axis matters: moving queries along h only, or w only, changes the scores.
    for axis_shift in (torch.tensor([1, 0]), torch.tensor([0, 1])):
        assert not torch.allclose(_scores(rope, q, k, grid + axis_shift, grid), base)


def test_3d_scores_depend_only_on_relative_tubelet_offset() -> None:
    torch.manual_seed(3)
    rope = RotaryEmbedding(RopeConfig(head_dim=24, n_axes=3))
    assert rope.axes_dims == [8, 8, 8]
    grid = grid_positions_3d(2, 3, 2)  # (12, 3)
    assert grid[-1].tolist() == [1, 2, 1]
    q, k = torch.randn(1, 1, 12, 24, dtype=F64), torch.randn(1, 1, 12, 24, dtype=F64)
    base = _scores(rope, q, k, grid, grid)
    shift = torch.tensor([4, 2, 9])
    torch.testing.assert_close(_scores(rope, q, k, grid + shift, grid + shift), base)
    for axis in range(3):
        one = torch.zeros(3, dtype=torch.long)
        one[axis] = 1
        assert not torch.allclose(_scores(rope, q, k, grid + one, grid), base)


def test_axes_split() -> None:
    assert rope_axes_dims(64, 1) == [64]
    assert rope_axes_dims(64, 2) == [32, 32]
    assert rope_axes_dims(64, 3) == [24, 20, 20]
    assert rope_axes_dims(72, 3) == [24, 24, 24]
    # Axis a's frequencies are those of a 1D RoPE with head_dim = axes_dims[a].
    rope = RotaryEmbedding(RopeConfig(head_dim=12, n_axes=2, axes_dims=[8, 4], theta=100.0))
    inv = rope.inv_freq(torch.device("cpu"), F64)
    expected = [100.0 ** (-i / 8) for i in (0, 2, 4, 6)] + [100.0 ** (-i / 4) for i in (0, 2)]
    torch.testing.assert_close(inv, torch.tensor(expected, dtype=F64))


def test_linear_scaling_divides_positions() -> None:
    cfg = RopeConfig(head_dim=4, theta=100.0, scaling=RopeScaling.LINEAR, scaling_factor=2.0)
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([3]), dtype=F64)
    angles = torch.tensor([1.5, 0.15, 1.5, 0.15], dtype=F64)  # 3 / 2 * [1, 100^-1/2]
    torch.testing.assert_close(cos[0, 0, 0], angles.cos())
    torch.testing.assert_close(sin[0, 0, 0], angles.sin())
    plain = RotaryEmbedding(RopeConfig(head_dim=4, theta=100.0))
    torch.testing.assert_close(
        RotaryEmbedding(cfg)(torch.tensor([8]), dtype=F64)[0],
        plain(torch.tensor([4]), dtype=F64)[0],
    )


def test_ntk_scaling_raises_theta() -> None:
    # theta' = 100 * 4 ** (4 / 2) = 1600, so inv_freq = [1, 1600 ** -0.5 = 0.025].
    cfg = RopeConfig(head_dim=4, theta=100.0, scaling=RopeScaling.NTK, scaling_factor=4.0)
    rope = RotaryEmbedding(cfg)
    torch.testing.assert_close(
        rope.inv_freq(torch.device("cpu"), F64), torch.tensor([1.0, 0.025], dtype=F64)
    )
    cos, _ = rope(torch.tensor([10]), dtype=F64)
    torch.testing.assert_close(cos[0, 0, 0, 1], torch.tensor(math.cos(0.25), dtype=F64))
    # head_dim 8: exponent 8/6 applies to theta.
    rope8 = RotaryEmbedding(cfg.replace(head_dim=8))
    theta = 100.0 * 4.0 ** (8 / 6)
    expected = torch.tensor([theta ** (-i / 8) for i in (0, 2, 4, 6)], dtype=F64)
    torch.testing.assert_close(rope8.inv_freq(torch.device("cpu"), F64), expected)


def test_inv_freq_cache_keyed_by_device_and_dtype() -> None:
    rope = RotaryEmbedding(RopeConfig(head_dim=8))
    pos = torch.arange(4)
    c64, _ = rope(pos, dtype=F64)
    c32, _ = rope(pos, dtype=torch.float32)
    rope(pos, dtype=torch.float32)
    assert c64.dtype == F64 and c32.dtype == torch.float32
    assert set(rope._inv_freq_cache) == {
        (torch.device("cpu"), F64),
        (torch.device("cpu"), torch.float32),
    }
    assert rope.inv_freq(torch.device("cpu"), F64) is rope.inv_freq(torch.device("cpu"), F64)
    # bf16 tables are computed from the float32 frequencies, then cast.
    cb, _ = rope(pos, dtype=torch.bfloat16)
    assert cb.dtype == torch.bfloat16 and len(rope._inv_freq_cache) == 2
    torch.testing.assert_close(cb, c32.to(torch.bfloat16))
    assert not list(rope.state_dict())  # nothing persisted: frequencies derive from config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inv_freq_cache_per_device_cuda() -> None:
    rope = RotaryEmbedding(RopeConfig(head_dim=8))
    c_cpu, _ = rope(torch.arange(4))
    c_gpu, _ = rope(torch.arange(4, device="cuda"))
    assert c_gpu.device.type == "cuda" and len(rope._inv_freq_cache) == 2
    torch.testing.assert_close(c_gpu.cpu(), c_cpu)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"head_dim": 7}, "head_dim"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 8, "theta": 0.0}, "theta"),
        ({"head_dim": 8, "n_axes": 4}, "n_axes"),
        ({"head_dim": 8, "n_axes": 2, "axes_dims": [6, 4]}, "axes_dims"),
        ({"head_dim": 8, "n_axes": 2, "axes_dims": [5, 3]}, "axes_dims"),
        ({"head_dim": 8, "scaling_factor": 0.5}, "scaling_factor"),
        (
            {"head_dim": 6, "n_axes": 3, "scaling": RopeScaling.NTK, "scaling_factor": 2.0},
            "axes_dims",
        ),
    ],
)
def test_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"RopeConfig\.{field}="):
        RopeConfig(**kwargs)


def test_bad_positions_and_tables_rejected() -> None:
    rope = RotaryEmbedding(RopeConfig(head_dim=8))
    with pytest.raises(ValueError, match="integer"):
        rope(torch.arange(4.0))
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        rope(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        RotaryEmbedding(RopeConfig(head_dim=8, n_axes=2))(torch.zeros(4, 3, dtype=torch.long))
    cos, sin = rope(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    x = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="do not fit"):
        apply_rotary(x, cos[:, 0], sin[:, 0])  # (B, T, Dh) would broadcast B against H
    with pytest.raises(ValueError, match="do not fit"):
        apply_rotary(x[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="grid_positions_2d"):
        grid_positions_2d(0, 3)
