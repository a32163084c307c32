"""RMSNorm / LayerNorm and SwiGLU / GELU MLPs against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vats_core.mlp import Activation, GeluMLP, MLPConfig, SwiGLU, build_mlp
from vats_core.norms import LayerNorm, NormType, RMSNorm, build_norm

F64 = torch.float64


def test_rmsnorm_formula_float64() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5).double()
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16, dtype=F64) * 4
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = norm(x)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_rmsnorm_gradients_pass_gradcheck() -> None:
    # Gradients against finite differences, on a non-contiguous input (a transposed view),
    # with the weight passed functionally too.
    torch.manual_seed(2)
    norm = RMSNorm(6, eps=1e-3).double()
    nn.init.normal_(norm.weight)
    x = torch.randn(6, 4, 3, dtype=F64).transpose(0, 2).requires_grad_()  # (3, 4, 6)
    assert torch.autograd.gradcheck(norm, (x,))
    weight = norm.weight.detach().clone().requires_grad_()
    both = (x, weight)
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), both
    )


@pytest.mark.parametrize("grads", ["both", "input", "weight"])
def test_rmsnorm_float32_gradients_match_the_formula(grads: str) -> None:
    torch.manual_seed(3)
    norm = RMSNorm(24)
    nn.init.normal_(norm.weight)
    norm.weight.requires_grad_(grads != "input")
    x = (torch.randn(2, 36, 4, 24) * 3).requires_grad_(grads != "weight")
    g = torch.randn(2, 36, 4, 24)
    out = norm(x)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    expected = _rmsnorm_reference(x64, w64, norm.eps)
    expected.backward(g.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    if grads != "weight":
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    else:
        assert x.grad is None
    if grads != "input":
        torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    else:
        assert norm.weight.grad is None


def test_rmsnorm_without_grad_and_on_empty_input() -> None:
    torch.manual_seed(4)
    norm = RMSNorm(16)
    nn.init.normal_(norm.weight)
    x = torch.randn(5, 16) * 2
    expected = _rmsnorm_reference(x.double(), norm.weight.detach().double(), norm.eps)
    with torch.no_grad():
        torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-6)
    empty = norm(torch.zeros(0, 16, requires_grad=True))
    empty.sum().backward()
    assert empty.shape == (0, 16) and torch.equal(norm.weight.grad, torch.zeros(16))


def test_rmsnorm_half_precision_normalizes_in_fp32() -> None:
    # HF Llama order: normalize in fp32, cast to the input dtype, then multiply the weight.
    torch.manual_seed(1)
    norm = RMSNorm(32).to(torch.bfloat16)
    nn.init.normal_(norm.weight)
    x = (torch.randn(4, 32) * 100).to(torch.bfloat16)
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        torch.bfloat16
    )
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_layernorm_matches_torch_and_bias_is_optional() -> None:
    torch.manual_seed(2)
    ours, ref = LayerNorm(8, eps=1e-5), nn.LayerNorm(8, eps=1e-5)
    nn.init.normal_(ours.weight)
    nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())  # same parameter names as nn.LayerNorm / timm
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), ref(x))
    no_bias = LayerNorm(8, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight"]
    y = no_bias(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_build_norm_and_errors() -> None:
    assert isinstance(build_norm(NormType.RMSNORM, 4), RMSNorm)
    assert isinstance(build_norm("layernorm", 4, 1e-5), LayerNorm)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        build_norm("batchnorm", 4)
    with pytest.raises(ValueError, match=r"RMSNorm\.dim=0"):
        RMSNorm(0)
    with pytest.raises(ValueError, match=r"LayerNorm\.eps=0"):
        LayerNorm(4, eps=0)
    with pytest.raises(ValueError, match="last dim 4"):
        RMSNorm(4)(torch.zeros(2, 5))


def test_swiglu_formula_and_names() -> None:
    torch.manual_seed(3)
    mlp = build_mlp(MLPConfig(dim=6, hidden_dim=10)).double()
    assert isinstance(mlp, SwiGLU)
    assert sorted(n for n, _ in mlp.named_parameters()) == [
        "down_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
    ]
    x = torch.randn(2, 3, 6, dtype=F64)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = ((x @ g.T) * torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(("activation", "approximate"), [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_gelu_mlp_formula(activation: str, approximate: str) -> None:
    torch.manual_seed(4)
    cfg = MLPConfig(dim=6, hidden_dim=12, activation=Activation(activation), bias=True)
    mlp = build_mlp(cfg).double()
    assert isinstance(mlp, GeluMLP)
    assert sorted(n for n, _ in mlp.named_parameters()) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
    ]
    x = torch.randn(5, 6, dtype=F64) * 3
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    expected = F.gelu(h, approximate=approximate) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)
    other = "tanh" if approximate == "none" else "none"
    assert not torch.allclose(
        mlp(x), F.gelu(h, approximate=other) @ mlp.fc2.weight.T + mlp.fc2.bias
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 0, "hidden_dim": 4}, "dim"),
        ({"dim": 4, "hidden_dim": -1}, "hidden_dim"),
        ({"dim": 4, "hidden_dim": 4, "activation": "relu"}, "activation"),
        ({"dim": 4, "hidden_dim": 4, "out_dim": 0}, "out_dim"),
    ],
)
def test_mlp_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"MLPConfig\.{field}="):
        MLPConfig(**kwargs)


def test_mlp_config_round_trip() -> None:
    cfg = MLPConfig(dim=4, hidden_dim=8, activation=Activation.GELU_TANH, bias=True)
    assert MLPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["activation"] == "gelu_tanh"


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp_out_dim_maps_to_another_width(activation: str) -> None:
    cfg = MLPConfig(dim=6, hidden_dim=8, out_dim=3, activation=activation, bias=True)
    mlp = build_mlp(cfg)
    assert mlp(torch.randn(2, 5, 6)).shape == (2, 5, 3)
    assert cfg.output_dim == 3 and MLPConfig(dim=6, hidden_dim=8).output_dim == 6
