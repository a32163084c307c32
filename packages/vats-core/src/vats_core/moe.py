"""Mixture-of-Experts feed-forward layer: top-k router, stacked SwiGLU experts, dropless dispatch.

Papers: Shazeer et al. 2017, "Outrageously Large Neural Networks" (sparsely-gated top-k MoE);
Fedus et al. 2021, "Switch Transformers" (load-balancing loss E·Σᵢ fᵢ·Pᵢ, capacity factor);
Zoph et al. 2022, "ST-MoE" (router z-loss); Gale et al. 2022, "MegaBlocks" (dropless dispatch
by sorting tokens into contiguous expert groups); Qwen2-MoE (sigmoid-gated shared expert);
DeepSeek-V3 (sigmoid router scores).

Dispatch, in one picture: flatten tokens to ``x_ND``; the router picks K experts per token
(``topk_idx_NK``); the N·K (token, expert) assignments are sorted by expert so each expert's
tokens are one contiguous slice of ``x_SD``; one matmul per slice (a Python loop over experts,
or a single ``grouped_mm`` call) runs the SwiGLU experts; the outputs are weighted by the router
and added back onto their tokens with ``index_add_``.

Weight layout (chosen so importing Hugging Face weights is a plain copy). transformers v5 stores
Mixtral and Qwen2-MoE experts stacked, exactly as here::

    HF (MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock)   vats MoE                    shape
    gate.weight                                            router.weight               (E, D)
    experts.gate_up_proj  (rows [0:H] gate, [H:2H] up)     experts.gate_up_proj        (E, 2H, D)
    experts.down_proj                                      experts.down_proj           (E, D, H)
    shared_expert.{gate,up,down}_proj.weight (Qwen2-MoE)   shared_expert.{same}.weight
    shared_expert_gate.weight (Qwen2-MoE)                  shared_expert_gate.weight   (1, D)

transformers v4 checkpoints keep one module per expert (Mixtral ``experts.{e}.w1/w3/w2``):
``gate_up_proj[e] = cat([w1, w3])`` and ``down_proj[e] = w2``. Mixtral is ``score_func=softmax,
norm_topk_prob=True``; Qwen2-MoE takes ``norm_topk_prob`` from its config.

Shape legend (suffixes on tensor names):
    N  tokens (all leading axes of the input, flattened)
    D  model dim
    E  routed experts
    K  experts per token (top_k)
    S  routed (token, expert) assignments: N·K, or those that are kept
    H  expert hidden dim (per expert)
    C  capacity per expert (only with a capacity factor)
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.config import Config, check, check_at_least, check_positive
from vats_core.lazy import computed_once
from vats_core.mlp import Activation, MLPConfig, SwiGLU

__all__ = [
    "COMPILE_SETTINGS",
    "GroupedExperts",
    "GroupedMM",
    "MoE",
    "MoEConfig",
    "Router",
    "RouterStats",
    "RouterSums",
    "Routing",
    "ScoreFunc",
    "SharedExpert",
    "load_balancing_loss",
    "router_losses_of_part",
    "router_sums",
    "router_z_loss",
]


class ScoreFunc(enum.StrEnum):
    """How router logits become per-expert scores."""

    SOFTMAX = "softmax"  # Mixtral, Qwen2-MoE, Switch: scores sum to 1 over experts
    SIGMOID = "sigmoid"  # DeepSeek-V3: independent per-expert scores in (0, 1)


class GroupedMM(enum.StrEnum):
    """Which of the two expert paths runs: one ``grouped_mm`` per projection, or a loop of
    one matmul per expert. Both compute the same function with plain autograd."""

    # grouped_mm on CUDA where it runs (bf16, sm80+: _grouped_mm_unsupported), else the loop.
    # On CPU the loop: torch 2.10's float32 grouped_mm kernel ran a MoE layer's forward +
    # backward ~20 % slower than the loop's matmuls (bench_moe: 4096 tokens, 8 experts) and
    # inference within 10 % of it, and torch.compile cannot trace it (the loop is what runs
    # compiled), so eager and compiled CPU runs take the same path.
    AUTO = "auto"
    ON = "on"  # grouped_mm (also the CPU float32 kernel in eager mode); a ValueError elsewhere
    OFF = "off"  # always the loop (the reference; it runs in any dtype and under compile)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(Config):
    """Configuration of :class:`MoE`."""

    dim: int  # model dim D (input and output)
    hidden_dim: int  # hidden dim H of each routed SwiGLU expert
    n_experts: int  # routed experts E
    top_k: int = 2  # experts per token K (<= n_experts)
    score_func: ScoreFunc = ScoreFunc.SOFTMAX  # softmax over experts, or a sigmoid per expert
    norm_topk_prob: bool = True  # rescale the K chosen scores to sum to 1 (Mixtral: yes)
    n_shared_experts: int = 0  # experts every token goes through (0 = none); fused into one MLP
    shared_hidden_dim: int | None = None  # hidden dim per shared expert; None = hidden_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(w·x)
    # None = dropless. Else each expert keeps at most ceil(capacity_factor·N·K/E) assignments
    # (N counts every token in the batch, padding included, so the limit needs no host sync).
    capacity_factor: float | None = None
    router_bias: bool = False  # a learned bias on the router logits
    grouped_mm: GroupedMM = GroupedMM.AUTO  # see GroupedMM
    init_std: float = 0.02  # std of the normal init of every weight

    def __post_init__(self) -> None:
        check_positive(self, "dim", "hidden_dim", "n_experts", "top_k", "shared_hidden_dim")
        ok = self.top_k <= self.n_experts
        check(ok, self, "top_k", self.top_k, f"at most n_experts={self.n_experts}")
        check_at_least(self, 0, "n_shared_experts")
        ok, gate = not self.shared_expert_gate or self.n_shared_experts > 0, self.shared_expert_gate
        check(
            ok, self, "shared_expert_gate", gate, "False when n_shared_experts=0 (nothing to gate)"
        )
        cf = self.capacity_factor
        ok = cf is None or (math.isfinite(cf) and cf > 0)
        check(ok, self, "capacity_factor", cf, "None (dropless) or a finite number > 0")
        check_positive(self, "init_std")

    @property
    def shared_total_hidden_dim(self) -> int:
        """Hidden dim of the fused shared-expert MLP (0 when there are no shared experts)."""
        per_expert = self.hidden_dim if self.shared_hidden_dim is None else self.shared_hidden_dim
        return per_expert * self.n_shared_experts

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert keeps for a batch of ``n_tokens`` tokens (None = all)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)


class Routing(NamedTuple):
    """The router's decision for N tokens."""

    logits_NE: Tensor  # raw router logits (at least float32)
    probs_NE: Tensor  # scores normalized to sum 1 over experts: the Pᵢ of the balancing loss
    topk_idx_NK: Tensor  # chosen experts, by decreasing score
    topk_weight_NK: Tensor  # their combine weights (renormalized if norm_topk_prob)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class RouterSums(NamedTuple):
    """What a MoE layer's two losses average, summed over a batch's real tokens: the sums of
    several parts of a batch (the ranks' rows) add up to those of the whole batch."""

    assignments_E: Tensor  # (E,) long: (token, slot) routings of real tokens to each expert
    scores_E: Tensor  # (E,) router scores summed over real tokens (carries the gradient)
    z: Tensor  # () logsumexp(router logits)² summed over real tokens (carries the gradient)
    tokens: Tensor  # () long: real tokens


def router_sums(routing: Routing, token_mask_N: Tensor | None = None) -> RouterSums:
    """:class:`RouterSums` of N tokens' ``routing``; ``token_mask_N`` (N,) bool, True =
    real token, None = all real."""
    mask_N = _real(token_mask_N, routing.probs_NE)
    z_N = torch.logsumexp(routing.logits_NE, dim=-1).square()
    return RouterSums(
        assignments_E=_assignments(routing.topk_idx_NK, mask_N, routing.probs_NE.shape[1]),
        scores_E=_masked_sum(routing.probs_NE, mask_N),
        z=_masked_sum(z_N, mask_N),
        tokens=mask_N.sum(),
    )


def router_losses_of_part(
    part: RouterSums, assignments_E: Tensor, tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """A part's terms of the whole batch's load-balancing and z losses: summed over the
    parts, they are the whole batch's losses, value and gradient.

    Args:
        part: the part's own sums.
        assignments_E, tokens: the whole batch's (every part's summed; no gradient).

    Returns:
        ``(balancing, z)``: E·Σᵢ fᵢ·Pᵢ with fᵢ the whole batch's routing share of expert i
        and Pᵢ the part's scores over the whole batch's real tokens; the part's z over them.
        With ``part`` the whole batch: :func:`load_balancing_loss` and :func:`router_z_loss`.
    """
    balancing = _balancing(assignments_E, part.scores_E, tokens)
    return balancing, part.z / tokens.clamp(min=1)


def load_balancing_loss(
    probs_NE: Tensor, topk_idx_NK: Tensor, token_mask_N: Tensor | None = None
) -> Tensor:
    """Switch Transformer load-balancing loss E·Σᵢ fᵢ·Pᵢ, over real tokens only.

    fᵢ is the fraction of the routed (token, slot) assignments of real tokens that chose expert
    i (the routing decision, before any capacity dropping: the loss should see what the router
    wants, not what fit), and Pᵢ the mean over real tokens of the normalized router score of
    expert i. Both sum to 1 over experts, so perfect balance (all 1/E) gives exactly 1.0. Only
    Pᵢ carries a gradient (fᵢ comes from an argmax).

    Args:
        probs_NE: (N, E) per-token scores summing to 1 over experts.
        topk_idx_NK: (N, K) chosen experts.
        token_mask_N: (N,) bool, True = real token; None = all real.

    Returns:
        Scalar tensor; 0 when there is no real token.
    """
    mask_N = _real(token_mask_N, probs_NE)
    assignments_E = _assignments(topk_idx_NK, mask_N, probs_NE.shape[1])
    return _balancing(assignments_E, _masked_sum(probs_NE, mask_N), mask_N.sum())


def router_z_loss(logits_NE: Tensor, token_mask_N: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)². 0 with no real token."""
    z_N = torch.logsumexp(logits_NE, dim=-1).square()
    if token_mask_N is None:
        return z_N.mean() if z_N.numel() else z_N.sum()
    n_real = token_mask_N.sum().clamp(min=1)
    return _masked_sum(z_N, token_mask_N) / n_real


def _real(token_mask_N: Tensor | None, like_N: Tensor) -> Tensor:
    """(N,) bool: the real tokens (every one without a mask)."""
    if token_mask_N is not None:
        return token_mask_N
    return torch.ones(like_N.shape[0], dtype=torch.bool, device=like_N.device)


def _assignments(topk_idx_NK: Tensor, mask_N: Tensor, n_experts: int) -> Tensor:
    """(E,) long: real tokens' routings to each expert (padding goes to a null expert E, so
    one count covers real routings only)."""
    idx_S = topk_idx_NK.masked_fill(~mask_N[:, None], n_experts).reshape(-1)  # (N*K,)
    return _count(idx_S, n_experts + 1)[:n_experts]


def _masked_sum(x_N: Tensor, mask_N: Tensor) -> Tensor:
    """Sum over the real tokens of x's first axis. torch.where, not a multiply: a padding row
    holding inf/NaN must not leak into the sum."""
    mask = mask_N.reshape(mask_N.shape + (1,) * (x_N.ndim - 1))
    return torch.where(mask, x_N, 0.0).sum(0)


def _balancing(assignments_E: Tensor, scores_E: Tensor, tokens: Tensor) -> Tensor:
    """E·Σᵢ fᵢ·Pᵢ: fᵢ the share of the routings, Pᵢ the scores over ``tokens``."""
    n_routings = assignments_E.sum().clamp(min=1)  # every real token's K slots
    f_E = assignments_E.to(scores_E.dtype) / n_routings
    P_E = scores_E / tokens.clamp(min=1)
    return scores_E.shape[0] * (f_E * P_E).sum()


class RouterStats:
    """What a MoE layer reports besides its output. Losses are unweighted: the model weighs them.

    Each figure is computed the first time it is read, from the routing the layer kept, so
    a decode step that never looks at them does not pay for them. Reading a loss after the
    forward still gives it a gradient path to the router.

    Attributes:
        load_balancing_loss: scalar, Switch Transformer E·Σᵢ fᵢ·Pᵢ over real tokens; 1.0 when
            perfectly balanced.
        z_loss: scalar, mean over real tokens of logsumexp(router logits)².
        tokens_per_expert: (E,) long, assignments each expert processed (real tokens, after
            capacity dropping).
        dropped_tokens: scalar long, (token, expert) assignments of real tokens dropped because
            their expert was full (always 0 when dropless).
        sums: :class:`RouterSums`, what the two losses average, summed over real tokens: to
            take the losses of a batch split over ranks (:func:`router_losses_of_part`).
    """

    def __init__(
        self,
        routing: Routing,
        token_mask_N: Tensor | None,
        *,
        tokens_per_expert: Tensor | None = None,
        dropped_tokens: Tensor | None = None,
    ) -> None:
        self._routing = routing
        self._mask_N = token_mask_N
        if tokens_per_expert is not None:
            self.tokens_per_expert = tokens_per_expert
        if dropped_tokens is not None:
            self.dropped_tokens = dropped_tokens

    @computed_once
    def load_balancing_loss(self) -> Tensor:
        return load_balancing_loss(self._routing.probs_NE, self._routing.topk_idx_NK, self._mask_N)

    @computed_once
    def z_loss(self) -> Tensor:
        return router_z_loss(self._routing.logits_NE, self._mask_N)

    @computed_once
    def sums(self) -> RouterSums:
        """What the two losses average, summed over the real tokens, to combine with the
        sums of other parts of the batch (:func:`router_losses_of_part`)."""
        return router_sums(self._routing, self._mask_N)

    @computed_once
    def tokens_per_expert(self) -> Tensor:  # dropless: every real token's K assignments
        probs_NE = self._routing.probs_NE
        mask_N = _real(self._mask_N, probs_NE)
        return _assignments(self._routing.topk_idx_NK, mask_N, probs_NE.shape[1])

    @computed_once
    def dropped_tokens(self) -> Tensor:  # dropless
        return torch.zeros((), dtype=torch.long, device=self._routing.logits_NE.device)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Linear scores over experts -> top-k -> optional renormalization.

    ``weight`` is (E, D) like ``nn.Linear(D, E).weight`` and HF's ``gate.weight``. Scoring runs
    in at least float32 (bf16 softmax over many experts flips near-tied top-k choices).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.dim))
        self.bias = nn.Parameter(torch.empty(config.n_experts)) if config.router_bias else None

    def forward(self, x_ND: Tensor) -> Routing:
        """Route N tokens. x_ND (N, D) -> :class:`Routing`."""
        cfg = self.config
        logits_NE = _at_least_fp32(F.linear(x_ND, self.weight, self.bias))
        if cfg.score_func is ScoreFunc.SOFTMAX:
            scores_NE = logits_NE.softmax(dim=-1)
            probs_NE = scores_NE
        else:
            scores_NE = logits_NE.sigmoid()
            # The balancing loss wants a distribution over experts. For sigmoid scores we use
            # them normalized to sum 1 (DeepSeek-V3's sequence-wise balance loss does the same)
            # rather than a softmax of the logits: the loss then pushes on the very scores
            # that pick the experts.
            probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        topk_score_NK, topk_idx_NK = scores_NE.topk(cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            topk_score_NK = topk_score_NK / topk_score_NK.sum(dim=-1, keepdim=True)
        return Routing(logits_NE, probs_NE, topk_idx_NK, topk_score_NK)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, run on tokens already grouped by expert.

    ``gate_up_proj`` (E, 2H, D) holds each expert's gate rows then up rows, ``down_proj``
    (E, D, H): both ``(out, in)`` per expert like ``nn.Linear`` and transformers v5.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E, D, H = config.n_experts, config.dim, config.hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * H, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, H))

    def forward(
        self,
        x_ND: Tensor,
        token_S: Tensor,
        weight_S: Tensor,
        group_sizes_E: Tensor,
        *,
        grouped: bool,
    ) -> Tensor:
        """Run the experts on their tokens, weight the outputs and sum them per token.

        Assignment s sends token ``token_S[s]`` to expert e, where s lies in expert e's
        group: rows [start_e, start_e + group_sizes_E[e]) in expert order.

        Args:
            x_ND: (N, D) tokens, already in the compute dtype.
            token_S: (S,) long, the token of each assignment, grouped by expert.
            weight_S: (S,) combine weight of each assignment.
            group_sizes_E: (E,) long, assignments per expert; S = group_sizes_E.sum().
            grouped: one ``grouped_mm`` per projection (the caller checked it runs), or the
                loop over experts.

        Returns:
            (N, D): Σ over a token's assignments of weight · expert(x); zero for tokens
            with none.
        """
        # index_select, not x_ND[token_S]: its backward is an index_add, not an index_put.
        x_SD = x_ND.index_select(0, token_S)
        out_SD = self.expert_outputs(x_SD, group_sizes_E, grouped=grouped)
        out_SD = out_SD * weight_S.to(out_SD.dtype)[:, None]
        return torch.zeros_like(x_ND).index_add(0, token_S, out_SD)

    def expert_outputs(self, x_SD: Tensor, group_sizes_E: Tensor, *, grouped: bool) -> Tensor:
        """expert(x) for rows grouped by expert, unweighted: (S, D) -> (S, D).

        Here the experts are this module's own (:meth:`run_groups`); expert parallelism
        (:mod:`vats_core.parallel.expert`) overrides this step to send the rows to the rank
        holding their expert and bring the outputs back.
        """
        return self.run_groups(x_SD, group_sizes_E, grouped=grouped)

    def run_groups(self, x_SD: Tensor, group_sizes_E: Tensor, *, grouped: bool) -> Tensor:
        """This module's experts on rows already grouped by expert, unweighted.

        Args:
            x_SD: (S, D) rows in the compute dtype; expert e's are rows
                [start_e, start_e + group_sizes_E[e]).
            group_sizes_E: (E,) long, rows per expert of this module (S = its sum).
            grouped: one ``grouped_mm`` per projection, or the loop over experts.

        Returns:
            (S, D): expert(x) for each row, in ``x_SD``'s order.
        """
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if w_gate_up.dtype != x_SD.dtype:  # autocast: grouped_mm does not cast for itself
            w_gate_up, w_down = w_gate_up.to(x_SD.dtype), w_down.to(x_SD.dtype)
        if grouped and x_SD.shape[0] > 0:
            # int32 end offsets; the transposed weights are views, no copy.
            offsets_E = group_sizes_E.cumsum(0).to(torch.int32)
            gate_up_S2H = _grouped_mm(x_SD, w_gate_up.transpose(-2, -1), offsets_E)
            return _grouped_mm(_swiglu(gate_up_S2H), w_down.transpose(-2, -1), offsets_E)
        return _experts_loop(x_SD, group_sizes_E, w_gate_up, w_down)


def _swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for ``gate_up = cat([gate, up], -1)``: (..., 2H) -> (..., H)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _experts_loop(x_SD: Tensor, group_sizes_E: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """The experts one at a time: expert e's rows of ``x_SD`` (its group) through its two
    projections. One host read of the group sizes (under torch.compile, data-dependent
    sizes); an expert without tokens multiplies an empty block, which costs no weight read.

    Returns:
        (S, D), the unweighted expert outputs in ``x_SD``'s row order.
    """
    sizes = group_sizes_E.tolist()
    # unbind, not w[e]: its backward stacks the experts' weight gradients once, where each
    # w[e] would write its gradient into a zeroed copy of the whole stacked weight.
    groups = zip(x_SD.split(sizes), w_gate_up.unbind(0), w_down.unbind(0), strict=True)
    outs = [F.linear(_swiglu(F.linear(x_nD, w_gu)), w_d) for x_nD, w_gu, w_d in groups]
    return torch.cat(outs)


class SharedExpert(SwiGLU):
    """SwiGLU MLP every token goes through; n shared experts fused into one of n× the width.

    Named like Qwen2-MoE's ``shared_expert`` (gate_proj / up_proj / down_proj, no bias).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(MLPConfig(dim=dim, hidden_dim=hidden_dim, activation=Activation.SWIGLU))


class MoE(nn.Module):
    """Sparse MoE feed-forward: routed SwiGLU experts (+ optional shared experts).

    ``forward(x, token_mask)`` returns the output and :class:`RouterStats`. Padding tokens
    (``token_mask`` False) are not dispatched: they get zero from the routed experts, count
    for nothing in the losses and ``tokens_per_expert``, and take no capacity. The shared
    expert, being dense, still runs on them.

    Capacity (``capacity_factor`` set): each expert keeps its first C assignments in token
    order (flattened position of the token; a token's own K slots do not compete, they go to
    different experts), and drops the rest. A dropped assignment contributes nothing; a token
    whose every assignment is dropped passes through with the shared expert only (the residual
    connection around the layer is the caller's). Combine weights are not renormalized over
    the kept experts.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        hidden = config.shared_total_hidden_dim
        self.shared_expert = SharedExpert(config.dim, hidden) if hidden else None
        self.shared_expert_gate = (
            nn.Linear(config.dim, 1, bias=False) if config.shared_expert_gate else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero router bias."""
        for name, p in self.named_parameters():
            if name == "router.bias":
                p.zero_()
            else:
                p.normal_(0.0, self.config.init_std)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        """Route, dispatch, combine.

        Args:
            x: (..., D) tokens.
            token_mask: (...) bool, True = real token; None = all real.

        Returns:
            ``(y, stats)``: y (..., D) like x; stats a :class:`RouterStats`.
        """
        self._check_inputs(x, token_mask)
        cfg = self.config
        E, K = cfg.n_experts, cfg.top_k
        x_ND = x.reshape(-1, cfg.dim)  # (N, D)
        n_tokens = x_ND.shape[0]
        mask_N = None if token_mask is None else token_mask.reshape(-1)  # (N,)

        # 1. Route. (The losses are computed from the routing when RouterStats is read.)
        routing = self.router(x_ND)

        # 2. Order the N*K assignments by expert; padding and overflow go to a null expert E,
        #    which sorts last and is cut off.
        order_S, sizes_E, n_kept, dropped = _dispatch_plan(
            routing.topk_idx_NK, mask_N, E, cfg.capacity(n_tokens)
        )
        order_S = order_S[:n_kept]
        token_S = order_S // K  # assignment s of the flat (N*K,) list is token s // K's
        weight_S = routing.topk_weight_NK.reshape(-1)[order_S]

        # 3. Experts on contiguous groups, weighted and added back onto their tokens.
        x_compute = x_ND.to(self._compute_dtype(x))
        grouped = self._use_grouped_mm(x)
        y_ND = self.experts(x_compute, token_S, weight_S, sizes_E, grouped=grouped)
        stats = RouterStats(routing, mask_N, tokens_per_expert=sizes_E, dropped_tokens=dropped)

        # 4. Shared expert(s), dense.
        if self.shared_expert is not None:
            shared_ND = self.shared_expert(x_ND)
            if self.shared_expert_gate is not None:
                shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND

        return y_ND.to(x.dtype).reshape(x.shape), stats

    # -- helpers ---------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, token_mask: Tensor | None) -> None:
        D = self.config.dim
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != D:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"MoE expects x of shape (..., {D}) with >= 2 axes, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point x, got {x.dtype}")
        param_dtype = self.router.weight.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoE got x of dtype {x.dtype} but its weights are {param_dtype}: cast one of "
                "them, or run under torch.autocast"
            )
        if token_mask is None:
            return
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
            got = token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__
            raise ValueError(f"MoE token_mask must be a bool tensor (True = real token), got {got}")
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"MoE token_mask shape {tuple(token_mask.shape)} must equal x.shape[:-1] = "
                f"{tuple(x.shape[:-1])}"
            )
        if token_mask.device != x.device:
            raise ValueError(f"MoE token_mask is on {token_mask.device} but x on {x.device}")

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x.dtype

    def _use_grouped_mm(self, x: Tensor) -> bool:
        """Whether the experts run as grouped_mm for ``x`` (see :class:`GroupedMM`)."""
        mode = self.config.grouped_mm
        if mode is GroupedMM.OFF or (mode is GroupedMM.AUTO and x.device.type != "cuda"):
            return False
        why_not = _grouped_mm_unsupported(x.device, self._compute_dtype(x), self.config)
        if why_not is None and x.device.type == "cpu":
            # torch<=2.10's CPU kernel needs 16-byte aligned operands; memory-mapped
            # checkpoints can hand us weights that are not.
            why_not = _misaligned(self.experts.gate_up_proj, self.experts.down_proj)
        if why_not is not None and mode is GroupedMM.ON:
            raise ValueError(f"MoEConfig.grouped_mm='on' but grouped_mm cannot run: {why_not}")
        return why_not is None


# --------------------------------------------------------------------------------------------
# Dispatch plumbing
# --------------------------------------------------------------------------------------------


def _dispatch_plan(
    topk_idx_NK: Tensor, mask_N: Tensor | None, n_experts: int, capacity: int | None
) -> tuple[Tensor, Tensor, int, Tensor]:
    """Sort assignments by expert; send padding and over-capacity ones to a null expert E.

    Returns:
        order_S: (N*K,) flat assignment indices, expert-major, token order within an expert
            (stable sort), null-expert entries last.
        sizes_E: (E,) long, kept assignments per expert.
        n_kept: number of kept assignments = sizes_E.sum() (a host sync only when padding or a
            capacity can make it differ from N*K).
        dropped: scalar long, real assignments dropped for capacity.
    """
    E = n_experts
    N, K = topk_idx_NK.shape
    expert_S = topk_idx_NK.reshape(-1)  # (N*K,), token-major: s = n*K + k
    if mask_N is not None:
        expert_S = expert_S.masked_fill(~mask_N.repeat_interleave(K), E)
    dropped = torch.zeros((), dtype=torch.long, device=expert_S.device)
    if capacity is not None:
        # Rank of each assignment within its expert, in token order: position in the stably
        # sorted list minus where its expert's group starts.
        order_S = torch.sort(expert_S, stable=True).indices
        counts_E1 = _count(expert_S, E + 1)
        starts_E1 = counts_E1.cumsum(0) - counts_E1
        rank_sorted_S = torch.arange(N * K, device=expert_S.device) - starts_E1[expert_S[order_S]]
        rank_S = torch.empty_like(rank_sorted_S).scatter_(0, order_S, rank_sorted_S)
        over_S = (rank_S >= capacity) & (expert_S < E)
        dropped = over_S.sum()
        expert_S = expert_S.masked_fill(over_S, E)
    order_S = torch.sort(expert_S, stable=True).indices
    sizes_E = _count(expert_S, E + 1)[:E]
    n_kept = N * K if mask_N is None and capacity is None else int(sizes_E.sum())
    return order_S, sizes_E, n_kept, dropped


def _count(idx: Tensor, n: int) -> Tensor:
    """``(n,)`` long: how often each of ``0..n-1`` occurs in ``idx`` (values < n). Like
    ``bincount(minlength=n)``, but with a shape known before the data, which torch.compile
    traces without a graph break."""
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(
        0, idx, torch.ones_like(idx)
    )


# Dynamo settings under which the expert loop's group sizes, read from the device, trace as
# data-dependent sizes inside one graph instead of breaking it (and under which nothing
# recompiles for a new routing). The trainer, compile_frozen and compiled generation run
# their compiled calls under them.
COMPILE_SETTINGS: dict[str, bool] = {
    "capture_scalar_outputs": True,
    "capture_dynamic_output_shape_ops": True,
}


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm(a_SI: Tensor, b_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """(S, I) x per-group (E, I, O) -> (S, O); rows [offsets[e-1], offsets[e]) use b[e]."""
    return _grouped_mm_fn()(a_SI, b_EIO, offs=offsets_E)


# Read once: the version object is a str subclass, which torch.compile cannot build in a graph.
_TORCH_2_9 = torch.torch_version.TorchVersion(torch.__version__) >= "2.9"


def _grouped_mm_unsupported(device: torch.device, dtype: torch.dtype, cfg: MoEConfig) -> str | None:
    """None if grouped_mm runs here, else why not (shown by ``grouped_mm='on'``)."""
    if _grouped_mm_fn() is None:
        return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
    if device.type == "cpu":
        if torch.compiler.is_compiling():
            # (torch 2.10's fake-tensor rule for grouped_mm admits bfloat16 only.)
            return "torch.compile cannot trace the CPU kernel; the loop runs compiled"
        if not _TORCH_2_9:
            return f"torch {torch.__version__} has no CPU grouped_mm kernel (needs torch>=2.9)"
        if dtype != torch.float32:
            return f"on CPU it is used for float32 only, got {dtype}"
        if cfg.dim % 4 or cfg.hidden_dim % 4:
            return (
                f"dim={cfg.dim} and hidden_dim={cfg.hidden_dim} must be multiples of 4 (16 B rows)"
            )
        return None
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"on CUDA it needs bfloat16, got {dtype}"
        major_minor = torch.cuda.get_device_capability(device)
        if major_minor < (8, 0) or (not _TORCH_2_9 and major_minor[0] != 9):
            return f"compute capability {major_minor} is not supported by torch {torch.__version__}"
        if cfg.dim % 8 or cfg.hidden_dim % 8:
            return (
                f"dim={cfg.dim} and hidden_dim={cfg.hidden_dim} must be multiples of 8 (16 B rows)"
            )
        return None
    return f"not available on {device.type}"


def _misaligned(*weights: Tensor) -> str | None:
    """Why the CPU grouped_mm kernel cannot read ``weights``, or None."""
    try:
        if any(w.data_ptr() % 16 for w in weights):
            return "the expert weights are not 16-byte aligned (memory-mapped?)"
    except RuntimeError:  # a torch.func transform's wrapper has no storage to point at
        return "the expert weights have no storage here (inside a torch.func transform?)"
    return None


def _at_least_fp32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
