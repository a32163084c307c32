"""MoE layer: dispatch against a per-token loop, losses against hand-computed numbers, capacity,
padding, the grouped_mm path, HF weight layout, config and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vats_core.moe import (
    GroupedMM,
    MoE,
    MoEConfig,
    ScoreFunc,
    load_balancing_loss,
    router_losses_of_part,
    router_z_loss,
)

# ---------------------------------------------------------------------------------------------
# A per-token reference: the plain definition, one token and one expert at a time.
# ---------------------------------------------------------------------------------------------


def reference_moe(moe: MoE, x: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Output and per-expert kept counts, token by token, straight from the definitions."""
    cfg = moe.config
    E, K, H = cfg.n_experts, cfg.top_k, cfg.hidden_dim
    x_ND = x.reshape(-1, cfg.dim)
    mask = [True] * x_ND.shape[0] if token_mask is None else token_mask.reshape(-1).tolist()
    capacity = cfg.capacity(x_ND.shape[0])
    kept = [0] * E
    rows = []
    for n, x_D in enumerate(x_ND):
        logits = moe.router.weight @ x_D
        if moe.router.bias is not None:
            logits = logits + moe.router.bias
        if cfg.score_func is ScoreFunc.SOFTMAX:
            scores = torch.exp(logits) / torch.exp(logits).sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        chosen = sorted(range(E), key=lambda e: -scores[e].item())[:K]
        weights = [scores[e] for e in chosen]
        if cfg.norm_topk_prob:
            total = sum(weights)
            weights = [w / total for w in weights]
        y_D = torch.zeros_like(x_D)
        for e, w in zip(chosen, weights, strict=True):
            if not mask[n]:
                continue
            if capacity is not None and kept[e] >= capacity:
                continue  # token order: earlier tokens claimed the slots
            kept[e] += 1
            gate = moe.experts.gate_up_proj[e, :H] @ x_D
            up = moe.experts.gate_up_proj[e, H:] @ x_D
            y_D = y_D + w * (moe.experts.down_proj[e] @ (gate * torch.sigmoid(gate) * up))
        if moe.shared_expert is not None:
            s = moe.shared_expert
            shared = s.down_proj.weight @ (
                F.silu(s.gate_proj.weight @ x_D) * (s.up_proj.weight @ x_D)
            )
            if moe.shared_expert_gate is not None:
                shared = torch.sigmoid(moe.shared_expert_gate.weight[0] @ x_D) * shared
            y_D = y_D + shared
        rows.append(y_D)
    return torch.stack(rows).reshape(x.shape), kept


def grads_of(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, cot: torch.Tensor):
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for n, p in module.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(out, [x, *params], cot, allow_unused=True)
    return dict(zip(["x", *names], gs, strict=True))


def make(seed: int = 0, dtype=torch.float64, **overrides) -> MoE:
    fields = dict(dim=8, hidden_dim=6, n_experts=4, top_k=2, grouped_mm="off")
    fields.update(overrides)
    torch.manual_seed(seed)
    # A larger init than the default 0.02 so routing and gates are far from uniform.
    return MoE(MoEConfig(**fields, init_std=0.5)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch equals the per-token loop: outputs and gradients, float64.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize(
    "shared", ["none", "shared", "shared_gated"], ids=["no_shared", "shared", "shared_gated"]
)
def test_dropless_matches_per_token_loop(score_func, norm_topk_prob, shared):
    moe = make(
        score_func=score_func,
        norm_topk_prob=norm_topk_prob,
        n_shared_experts=0 if shared == "none" else 2,
        shared_hidden_dim=3,
        shared_expert_gate=shared == "shared_gated",
        router_bias=shared == "shared",  # exercise the bias in one branch
    )
    if moe.router.bias is not None:
        torch.nn.init.normal_(moe.router.bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    cot = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen)

    y, stats = moe(x)
    y_ref, kept = reference_moe(moe, x)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert stats.tokens_per_expert.tolist() == kept
    assert sum(kept) == 15 * 2 and stats.dropped_tokens.item() == 0
    got, want = grads_of(moe, x, y, cot), grads_of(moe, x, y_ref, cot)
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_padding_tokens_are_not_dispatched():
    moe = make(n_shared_experts=1, shared_expert_gate=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y, stats = moe(x, mask)
    y_ref, kept = reference_moe(moe, x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert stats.tokens_per_expert.tolist() == kept and sum(kept) == 10 * 2

    cot = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    got, want = grads_of(moe, x, y, cot), grads_of(moe, x, y_ref, cot)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_padding_values_change_neither_losses_nor_counts_nor_real_outputs():
    moe = make(capacity_factor=0.75)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    y1, s1 = moe(x, mask)
    x2 = x.clone()
    x2[~mask] = 1e3 * torch.randn(int((~mask).sum()), 8, dtype=torch.float64, generator=gen)
    y2, s2 = moe(x2, mask)
    assert s1.load_balancing_loss.item() == s2.load_balancing_loss.item()
    assert s1.z_loss.item() == s2.z_loss.item()
    assert torch.equal(s1.tokens_per_expert, s2.tokens_per_expert)
    assert s1.dropped_tokens.item() == s2.dropped_tokens.item()
    torch.testing.assert_close(y1[mask], y2[mask], rtol=0, atol=0)
    # And padding is really excluded: without the mask the stats differ.
    _, s3 = moe(x2)
    assert s3.tokens_per_expert.sum() > s1.tokens_per_expert.sum()


# ---------------------------------------------------------------------------------------------
# Losses on hand-checked numbers.
# ---------------------------------------------------------------------------------------------

LN3 = math.log(3.0)


def routed_by_logits(logits: list[list[float]], top_k: int = 1, **overrides):
    """A MoE with dim = E and an identity router, so the router logits are x itself."""
    E = len(logits[0])
    moe = make(dim=E, n_experts=E, top_k=top_k, **overrides)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, dtype=torch.float64))
    return moe, torch.tensor(logits, dtype=torch.float64)


def test_losses_softmax_hand_checked():
    # 4 tokens, 2 experts, top-1. probs are (3/4, 1/4) or (1/4, 3/4):
    #   choices 0, 0, 1, 0 -> f = (3/4, 1/4)
    #   P = ((3·.75 + .25)/4, (3·.25 + .75)/4) = (.625, .375)
    #   balance loss = 2·(.75·.625 + .25·.375) = 1.125
    #   logsumexp = ln(3 + 1) = ln 4 for every token -> z = (ln 4)² = 1.9218...
    moe, x = routed_by_logits([[LN3, 0], [LN3, 0], [0, LN3], [LN3, 0]])
    _, stats = moe(x)
    assert stats.load_balancing_loss.item() == pytest.approx(1.125, abs=1e-12)
    assert stats.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-12)
    assert stats.tokens_per_expert.tolist() == [3, 1]

    # A fifth, padding token with wild logits changes nothing.
    x_pad = torch.cat([x, torch.tensor([[50.0, -50.0]], dtype=torch.float64)])
    _, stats_pad = moe(x_pad, torch.tensor([True] * 4 + [False]))
    assert stats_pad.load_balancing_loss.item() == pytest.approx(1.125, abs=1e-12)
    assert stats_pad.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-12)
    assert stats_pad.tokens_per_expert.tolist() == [3, 1]


def test_balance_loss_is_one_when_balanced():
    # Alternating choices: f = P = (1/2, 1/2) -> 2·(1/4 + 1/4) = 1.
    moe, x = routed_by_logits([[LN3, 0], [0, LN3], [LN3, 0], [0, LN3]])
    assert moe(x)[1].load_balancing_loss.item() == pytest.approx(1.0, abs=1e-12)
    # top-2 of 2 experts: f = (1/2, 1/2) whatever P is, and P sums to 1 -> 1.
    moe, x = routed_by_logits([[LN3, 0], [LN3, 0], [2.0, -1.0]], top_k=2)
    assert moe(x)[1].load_balancing_loss.item() == pytest.approx(1.0, abs=1e-12)


def test_losses_sigmoid_hand_checked():
    # sigmoid(ln 3) = 3/4 and sigmoid(0) = 1/2, normalized: (.6, .4) or (.4, .6).
    #   choices 0, 0, 1 -> f = (2/3, 1/3); P = ((.6·2 + .4)/3, (.4·2 + .6)/3) = (1.6/3, 1.4/3)
    #   balance loss = 2·(2/3·1.6/3 + 1/3·1.4/3) = 9.2/9
    #   z = (ln 4)² again (logsumexp does not depend on the score function)
    moe, x = routed_by_logits([[LN3, 0], [LN3, 0], [0, LN3]], score_func="sigmoid")
    _, stats = moe(x)
    assert stats.load_balancing_loss.item() == pytest.approx(9.2 / 9, abs=1e-12)
    assert stats.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-12)


def test_loss_functions_direct():
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.25]])
    idx = torch.tensor([[0], [0], [1], [0]])
    assert load_balancing_loss(probs, idx).item() == pytest.approx(1.125)
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    # logsumexp: ln 2 and 2 + ln(1 + e^-1)
    want = (math.log(2) ** 2 + (2 + math.log1p(math.exp(-1))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)
    only_first = torch.tensor([True, False])
    assert router_z_loss(logits, only_first).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)
    # No real token: zeros, not NaN.
    none = torch.zeros(4, dtype=torch.bool)
    assert load_balancing_loss(probs, idx, none).item() == 0.0
    assert router_z_loss(probs, none).item() == 0.0


def test_losses_have_router_gradients():
    moe = make()
    x = torch.randn(10, 8, dtype=torch.float64)
    _, stats = moe(x)
    (g_lb,) = torch.autograd.grad(stats.load_balancing_loss, moe.router.weight, retain_graph=True)
    (g_z,) = torch.autograd.grad(stats.z_loss, moe.router.weight)
    assert g_lb.abs().sum() > 0 and g_z.abs().sum() > 0


@pytest.mark.parametrize("score_func", list(ScoreFunc))
def test_parts_terms_add_up_to_the_whole_batch_losses(score_func):
    # Rows split in two parts with unequal real tokens (padding): each part's terms over the
    # whole batch's counts sum to the whole batch's losses, value and router gradient,
    # which the mean of the parts' own losses is not (the test can tell).
    moe = make(score_func=score_func)
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, :3] = mask[4, :1] = mask[5, :4] = False
    _, whole = moe(x, mask)
    losses = (whole.load_balancing_loss, whole.z_loss)
    parts = [moe(x[rows], mask[rows])[1].sums for rows in (slice(0, 2), slice(2, 6))]
    assignments = sum(p.assignments_E for p in parts)
    tokens = sum(p.tokens for p in parts)
    assert torch.equal(whole.sums.assignments_E, assignments) and int(tokens) == int(mask.sum())
    terms = [router_losses_of_part(p, assignments, tokens) for p in parts]
    for i, want in enumerate(losses):
        got = terms[0][i] + terms[1][i]
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        (g_want,) = torch.autograd.grad(want, moe.router.weight, retain_graph=True)
        (g_got,) = torch.autograd.grad(got, moe.router.weight, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    own = [router_losses_of_part(p, p.assignments_E, p.tokens) for p in parts]
    assert (own[0][0] + own[1][0]).item() / 2 != pytest.approx(losses[0].item(), rel=1e-6)
    # and a part that is the whole batch gives the layer's own losses
    whole_terms = router_losses_of_part(whole.sums, assignments, tokens)
    assert whole_terms[0].item() == pytest.approx(losses[0].item(), rel=1e-12)
    assert whole_terms[1].item() == pytest.approx(losses[1].item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Capacity factor.
# ---------------------------------------------------------------------------------------------


def test_capacity_drops_overflow_in_token_order():
    # Router bias makes every token pick expert 0 first; top-1, 16 tokens, 4 experts,
    # capacity_factor 1 -> C = ceil(1·16·1/4) = 4: tokens 0..3 keep expert 0, 4..15 get nothing.
    moe = make(top_k=1, router_bias=True, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    y, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [4, 0, 0, 0]
    assert stats.dropped_tokens.item() == 12
    assert torch.all(y[4:] == 0)  # exactly zero, not just small
    assert torch.all(y[:4].abs().sum(-1) > 0)
    # Dropped tokens get no gradient through the experts.
    y.sum().backward()
    assert torch.all(x.grad[4:] == 0)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_matches_reference_and_respects_limit(capacity_factor):
    moe = make(n_experts=4, top_k=2, capacity_factor=capacity_factor, n_shared_experts=1)
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # skew routing so some expert overflows
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    y, stats = moe(x, mask)
    y_ref, kept = reference_moe(moe, x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    capacity = math.ceil(capacity_factor * 24 * 2 / 4)
    assert stats.tokens_per_expert.tolist() == kept
    assert max(kept) <= capacity
    assert stats.dropped_tokens.item() == 21 * 2 - sum(kept)
    cot = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    got, want = grads_of(moe, x, y, cot), grads_of(moe, x, y_ref, cot)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@settings(max_examples=25, deadline=None)
@given(
    n_tokens=st.integers(1, 12),
    n_experts=st.integers(1, 6),
    data=st.data(),
)
def test_dispatch_matches_reference_random_configs(n_tokens, n_experts, data):
    top_k = data.draw(st.integers(1, n_experts))
    capacity_factor = data.draw(st.sampled_from([None, 0.3, 1.0, 2.0]))
    score_func = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    seed = data.draw(st.integers(0, 2**16))
    moe = make(
        seed=seed,
        n_experts=n_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        score_func=score_func,
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, 8, dtype=torch.float64, generator=gen)
    mask = torch.rand(n_tokens, generator=gen) < 0.8
    y, stats = moe(x, mask)
    y_ref, kept = reference_moe(moe, x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert stats.tokens_per_expert.tolist() == kept
    assert stats.dropped_tokens.item() == int(mask.sum()) * top_k - sum(kept)


# ---------------------------------------------------------------------------------------------
# grouped_mm path equals the loop path.
# ---------------------------------------------------------------------------------------------


def _grouped_runs_on_cpu() -> bool:
    moe = make(dtype=torch.float32, grouped_mm="on", hidden_dim=8)  # 16-byte rows
    try:
        return moe._use_grouped_mm(torch.zeros(1, 8))
    except ValueError:
        return False


@pytest.mark.skipif(not _grouped_runs_on_cpu(), reason="no CPU grouped_mm in this torch")
@pytest.mark.parametrize("case", ["dropless", "padding_capacity", "sum_backward"])
def test_grouped_mm_matches_loop_cpu(case):
    overrides = dict(dim=16, hidden_dim=24, n_experts=6, top_k=2, n_shared_experts=1)
    if case == "padding_capacity":
        overrides["capacity_factor"] = 0.8
    loop = make(dtype=torch.float32, grouped_mm="off", **overrides)
    grouped = make(dtype=torch.float32, grouped_mm="on", **overrides)
    grouped.load_state_dict(loop.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    mask = None
    if case == "padding_capacity":
        mask = torch.ones(3, 11, dtype=torch.bool)
        mask[1, 7:] = False
    # y.sum() hands back an expanded (stride-0) gradient: the grouped backward must cope.
    cot = torch.ones(3, 11, 16) if case == "sum_backward" else torch.randn(3, 11, 16)
    if case == "sum_backward":
        cot = cot.expand(3, 11, 16)

    y_loop, s_loop = loop(x, mask)
    y_grp, s_grp = grouped(x, mask)
    torch.testing.assert_close(y_grp, y_loop, rtol=1e-5, atol=1e-6)
    assert torch.equal(s_grp.tokens_per_expert, s_loop.tokens_per_expert)
    assert s_grp.dropped_tokens.item() == s_loop.dropped_tokens.item()
    if case == "sum_backward":
        g_grp = grads_of(grouped, x, y_grp.sum(), torch.tensor(1.0))
        g_loop = grads_of(loop, x, y_loop.sum(), torch.tensor(1.0))
    else:
        g_grp, g_loop = grads_of(grouped, x, y_grp, cot), grads_of(loop, x, y_loop, cot)
    for name in g_loop:
        torch.testing.assert_close(g_grp[name], g_loop[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not _grouped_runs_on_cpu(), reason="no CPU grouped_mm in this torch")
def test_cpu_runs_the_loop_on_auto_and_grouped_mm_on_request():
    # auto on CPU: the loop (GroupedMM.AUTO says why). "on": the CPU grouped_mm kernel in
    # eager mode, with or without gradient, any row count; under torch.compile (whose
    # fake-tensor rule for the kernel admits bf16 only) "on" is refused, naming why. Every
    # path gives the loop's outputs.
    overrides = dict(dim=16, hidden_dim=24, n_experts=6, top_k=2)
    auto = make(dtype=torch.float32, grouped_mm="auto", **overrides)
    on = make(dtype=torch.float32, grouped_mm="on", **overrides)
    loop = make(dtype=torch.float32, grouped_mm="off", **overrides)
    on.load_state_dict(auto.state_dict())
    loop.load_state_dict(auto.state_dict())
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[False, True, True, True, True, True, True, True]])  # left padding
    assert not auto._use_grouped_mm(x) and on._use_grouped_mm(x)
    with torch.no_grad():
        assert on._use_grouped_mm(x[:, :1])
        for rows in (x, x[:, :1], x.repeat(1, 5, 1)):
            torch.testing.assert_close(on(rows)[0], loop(rows)[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(auto(rows)[0], loop(rows)[0])
        y_on, s_on = on(x, mask)
        y_loop, s_loop = loop(x, mask)
        torch.testing.assert_close(y_on, y_loop, rtol=1e-5, atol=1e-6)
        assert torch.equal(y_on[0, 0], torch.zeros(16))  # padding gets nothing
        assert torch.equal(s_on.tokens_per_expert, s_loop.tokens_per_expert)

    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match=r"torch\.compile cannot trace"):
        torch.compile(lambda x: on(x)[0], backend="eager")(x)


def _cuda_pair(**overrides) -> tuple[MoE, MoE]:
    fields = dict(dim=64, hidden_dim=96, n_experts=8, top_k=2, n_shared_experts=1, init_std=0.1)
    fields.update(overrides)
    torch.manual_seed(0)
    loop = MoE(MoEConfig(**fields, grouped_mm="off")).cuda()
    grouped = MoE(MoEConfig(**fields, grouped_mm="on")).cuda()
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _assert_same_run(loop: MoE, grouped: MoE, x: torch.Tensor, mask: torch.Tensor | None):
    """Same routing (same router code), expert outputs and gradients equal to bf16 precision."""
    x_loop, x_grp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_loop, s_loop = loop(x_loop, mask)
    y_grp, s_grp = grouped(x_grp, mask)
    assert torch.equal(s_grp.tokens_per_expert, s_loop.tokens_per_expert)
    torch.testing.assert_close(y_grp.float(), y_loop.float(), rtol=2e-2, atol=2e-3)
    cot = torch.randn_like(y_loop)
    y_loop.backward(cot)
    y_grp.backward(cot)
    torch.testing.assert_close(x_grp.grad.float(), x_loop.grad.float(), rtol=2e-2, atol=2e-3)
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        g_grp = grouped.get_parameter(name).grad.float()
        g_loop = loop.get_parameter(name).grad.float()
        torch.testing.assert_close(g_grp, g_loop, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_cuda_bf16_matches_loop():
    loop, grouped = _cuda_pair(capacity_factor=1.0)
    loop.bfloat16()
    grouped.bfloat16()
    assert grouped._use_grouped_mm(torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    _assert_same_run(loop, grouped, x, None)
    _assert_same_run(loop, grouped, x, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_cuda_under_autocast():
    loop, grouped = _cuda_pair()  # float32 weights, bf16 compute
    x = torch.randn(4, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert grouped._use_grouped_mm(x)
        _assert_same_run(loop, grouped, x, None)
    assert grouped.experts.gate_up_proj.grad.dtype == torch.float32


def test_grouped_mm_on_where_it_cannot_run_raises():
    moe = make(dtype=torch.float64, grouped_mm="on")
    with pytest.raises(ValueError, match="grouped_mm"):
        moe(torch.randn(4, 8, dtype=torch.float64))
    # The CPU kernel wants 16-byte rows: hidden_dim 6 in fp32 is refused up front ("on") and
    # left to the loop ("auto"), not a crash inside the kernel.
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        make(dtype=torch.float32, grouped_mm="on")(x)
    auto, loop = make(dtype=torch.float32, grouped_mm="auto"), make(dtype=torch.float32)
    with torch.no_grad():
        assert not auto._use_grouped_mm(x)
        torch.testing.assert_close(auto(x)[0], loop(x)[0])


# ---------------------------------------------------------------------------------------------
# HF weight layout: a copy of the stacked tensors reproduces the peer's block.
# ---------------------------------------------------------------------------------------------


def test_hf_mixtral_and_qwen2_moe_weights_copy_over():
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)

    mix_cfg = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    )
    mix_cfg._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(mix_cfg)
    ours = MoE(MoEConfig(dim=16, hidden_dim=24, n_experts=4, top_k=2, init_std=0.3))
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        torch.testing.assert_close(ours(x)[0], hf(x), rtol=1e-5, atol=1e-6)

    qwen_cfg = transformers.Qwen2MoeConfig(
        hidden_size=16,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=20,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )
    qwen_cfg._experts_implementation = "eager"
    hf = Qwen2MoeSparseMoeBlock(qwen_cfg)
    ours = MoE(
        MoEConfig(
            dim=16,
            hidden_dim=24,
            n_experts=4,
            top_k=2,
            norm_topk_prob=False,
            n_shared_experts=1,
            shared_hidden_dim=20,
            shared_expert_gate=True,
            init_std=0.3,
        )
    )
    # Same parameter names as Qwen2-MoE except the router (gate -> router).
    state = {k.replace("router.", "gate."): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config and input validation.
# ---------------------------------------------------------------------------------------------

BASE = dict(dim=8, hidden_dim=6, n_experts=4, top_k=2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dim", 0),
        ("hidden_dim", -1),
        ("n_experts", 0),
        ("top_k", 0),
        ("top_k", 5),
        ("top_k", 1.5),
        ("score_func", "relu"),
        ("grouped_mm", "maybe"),
        ("norm_topk_prob", "yes"),
        ("n_shared_experts", -1),
        ("shared_hidden_dim", 0),
        ("shared_expert_gate", True),  # with n_shared_experts=0
        ("capacity_factor", 0.0),
        ("capacity_factor", -1.0),
        ("capacity_factor", float("inf")),
        ("router_bias", 1),
        ("init_std", 0.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*expected"):
        MoEConfig(**{**BASE, field: value})


def test_config_enums_and_round_trip():
    cfg = MoEConfig(**BASE, score_func="sigmoid", grouped_mm="off", capacity_factor=1.25)
    assert cfg.score_func is ScoreFunc.SIGMOID and cfg.grouped_mm is GroupedMM.OFF
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.capacity(10) == math.ceil(1.25 * 10 * 2 / 4)
    assert MoEConfig(**BASE).capacity(10) is None


def test_bad_inputs_raise_value_error():
    moe = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        moe(torch.randn(4, 7))
    with pytest.raises(ValueError, match="shape"):
        moe(torch.randn(8))
    with pytest.raises(ValueError, match="floating"):
        moe(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        moe(torch.randn(4, 8, dtype=torch.float64))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="bool"):
        moe(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="token_mask shape"):
        moe(x, torch.ones(2, 4, dtype=torch.bool))


def test_empty_batch():
    moe = make(dtype=torch.float32)
    y, stats = moe(torch.randn(0, 3, 8))
    assert y.shape == (0, 3, 8)
    assert stats.load_balancing_loss.item() == 0 and stats.z_loss.item() == 0
    assert stats.tokens_per_expert.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("grouped_mm", ["off", "on"])
@pytest.mark.parametrize("n_tokens", [1, 3, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_inference_on_few_tokens_matches_reference(grouped_mm, n_tokens, padded):
    # Decoding's shapes: a few tokens, no gradient, some of them padding.
    if grouped_mm == "on" and not _grouped_runs_on_cpu():
        pytest.skip("no CPU grouped_mm in this torch")
    dtype = torch.float64 if grouped_mm == "off" else torch.float32
    moe = make(
        dtype=dtype, grouped_mm=grouped_mm, hidden_dim=8, n_shared_experts=1, shared_hidden_dim=4
    )
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n_tokens, 1, 8, dtype=dtype, generator=gen)
    mask = None
    if padded:
        mask = torch.ones(n_tokens, 1, dtype=torch.bool)
        mask[0] = False
    with torch.no_grad():
        y, stats = moe(x, token_mask=mask)
    y_ref, kept = reference_moe(moe.double(), x.double(), mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    assert stats.tokens_per_expert.tolist() == kept


def test_expert_loop_gradcheck():
    # The loop path's gradients (plain autograd), against finite differences.
    moe = make(n_experts=3, top_k=2, hidden_dim=4)
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: moe(x)[0], (x,), atol=1e-8)


@pytest.mark.parametrize("grouped_mm", ["off", "on"])
def test_no_forward_activation_outlives_backward(grouped_mm):
    # Every tensor the forward creates is freed by backward() (plain autograd saves what it
    # needs with save_for_backward semantics and releases it), while the graph's output and
    # the module's parameters live on: nothing is kept on the side (a ctx attribute would
    # keep it as long as the graph lives, and hide it from saved-tensor hooks).
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    if grouped_mm == "on" and not _grouped_runs_on_cpu():
        pytest.skip("no CPU grouped_mm in this torch")
    moe = make(
        dtype=torch.float32, grouped_mm=grouped_mm, dim=16, hidden_dim=24, n_shared_experts=1
    )
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.refs.append((str(func), StorageWeakRef(t.untyped_storage())))
            return out

    record = Record()
    with record:
        y, stats = moe(x, mask)
        loss = y.square().mean() + stats.load_balancing_loss + stats.z_loss
    kept = {
        StorageWeakRef(t.untyped_storage()).cdata for t in (y, loss, x, mask, *moe.parameters())
    }
    kept |= {StorageWeakRef(t.untyped_storage()).cdata for t in (stats.tokens_per_expert,)}
    del stats
    loss.backward()
    alive = [name for name, ref in record.refs if not ref.expired() and ref.cdata not in kept]
    assert not alive, f"forward tensors still alive after backward: {alive}"
    assert len(record.refs) > 20  # the recording saw the forward


@pytest.mark.parametrize("n_tokens, padded", [(1, False), (1, True), (4, True), (40, False)])
def test_loop_compiles_to_one_graph(n_tokens, padded):
    # Under torch.compile the loop's group sizes are data-dependent sizes (no graph break,
    # no recompile per routing pattern) when dynamo captures scalar outputs, as
    # vats_text.generate's compiled decode step does; outputs match eager.
    overrides = dict(dim=16, hidden_dim=24, n_experts=6, top_k=2, n_shared_experts=1)
    moe = make(dtype=torch.float32, grouped_mm="auto", **overrides)
    gen = torch.Generator().manual_seed(8)
    mask = torch.ones(n_tokens, 1, dtype=torch.bool)
    mask[0] = not padded
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, m: moe(x, m)[0], backend="eager", fullgraph=True)
    settings = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True, **settings):
        for _ in range(3):  # new routings, same graph
            x = torch.randn(n_tokens, 1, 16, generator=gen)
            torch.testing.assert_close(compiled(x, mask), moe(x, mask)[0], rtol=1e-6, atol=1e-7)
