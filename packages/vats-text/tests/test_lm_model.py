"""MoELanguageModel: the model contract, config validation, inputs, losses and presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vats_core.kv_cache import RollingKVCache, StaticKVCache
from vats_core.moe import MoE
from vats_core.testing import (
    check_autocast_training,
    check_backward,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_text.model import (
    IGNORE_INDEX,
    LMOutput,
    MoELanguageModel,
    MoELMConfig,
    shifted_cross_entropy,
)
from vats_text.presets import PRESETS, lm_preset


def _logits(out: LMOutput) -> torch.Tensor:
    return out.logits


def _model(seed: int = 0, **overrides) -> MoELanguageModel:
    torch.manual_seed(seed)
    return MoELanguageModel(lm_preset("tiny", **overrides))


def _ids(b: int = 2, t: int = 24, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tiny: dense + MoE layers, windows, shared gated expert, tied head
        {"tie_embeddings": False, "n_experts": 0, "qkv_bias": True, "qk_norm": True},
        {"tie_embeddings": False, "score_func": "sigmoid", "norm_topk_prob": False},
    ],
    ids=["tiny", "dense-untied-bias-qknorm", "sigmoid-router"],
)
def test_lm_contract(overrides, tmp_path):
    model = _model(**overrides)
    ids = _ids()
    check_forward(model, ids, (2, 24, 512), output_fn=_logits)
    check_backward(model, ids, output_fn=_logits)
    reloaded = check_save_load_roundtrip(model, ids, tmp_path, output_fn=_logits)
    if model.config.tie_embeddings:
        assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
    check_dtype_device_moves(model, ids, output_fn=_logits)


def test_lm_structure_follows_config():
    config = lm_preset("tiny", n_layers=5, layer_windows=[8, None, 8, None, 4], moe_every=2)
    model = MoELanguageModel(config)
    # first_dense_layers=1, moe_every=2 -> MoE on layers 1 and 3.
    assert [isinstance(layer.ffn, MoE) for layer in model.layers] == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert config.moe_layers == [1, 3]
    assert [layer.attn.config.window for layer in model.layers] == [8, None, 8, None, 4]
    assert all(layer.attn.config.causal for layer in model.layers)
    assert model.lm_head.weight is model.embed_tokens.weight
    caches = model.setup_caches(2, 32)
    kinds = [type(c) for c in caches]
    assert kinds == [RollingKVCache, StaticKVCache, RollingKVCache, StaticKVCache, RollingKVCache]


def test_lm_config_dict_round_trip_and_helpers():
    config = lm_preset("tiny")
    assert MoELMConfig.from_dict(config.to_dict()) == config
    assert config.window_of(0) == 16 and config.window_of(1) is None
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert MoELMConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2).windows == [None, None]
    check_raises(lambda: config.is_moe_layer(3), ValueError, "out of range")
    check_raises(lambda: config.window_of(-1), ValueError, "out of range")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 66}, "dim"),  # 66 / 4 heads is not an integer
        ({"head_dim": 7}, "head_dim"),  # odd: RoPE needs pairs
        ({"layer_windows": [8, None]}, "layer_windows"),  # 2 entries for 3 layers
        ({"layer_windows": [8, 0, None]}, "layer_windows"),
        ({"top_k": 5}, "top_k"),  # > n_experts=4
        ({"n_experts": -1}, "n_experts"),
        ({"moe_every": 0}, "moe_every"),
        ({"first_dense_layers": 4}, "first_dense_layers"),
        ({"n_shared_experts": 0}, "shared_expert_gate"),  # gate without a shared expert
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"z_loss_weight": float("nan")}, "z_loss_weight"),
        ({"init_std": 0.0}, "init_std"),
        ({"rope_scaling": "cubic"}, "rope_scaling"),
        ({"rope_scaling_factor": 0.5}, "rope_scaling_factor"),
        ({"score_func": "relu"}, "score_func"),
        ({"eos_token_id": 512}, "eos_token_id"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"expert_hidden_dim": 0}, "expert_hidden_dim"),
    ],
)
def test_lm_config_rejects(changes, field):
    check_raises(lambda: lm_preset("tiny", **changes), ValueError, rf"MoELMConfig\.{field}=")


def test_lm_presets_and_unknown_name():
    for name in PRESETS:
        assert isinstance(lm_preset(name), MoELMConfig)
    assert lm_preset("small", vocab_size=1000).vocab_size == 1000
    bench = lm_preset("bench")
    assert (bench.vocab_size, bench.dim, bench.n_layers, bench.n_heads, bench.kv_heads) == (
        8192,
        512,
        8,
        8,
        2,
    )
    assert (bench.n_experts, bench.top_k, bench.expert_hidden, bench.windows) == (
        8,
        2,
        1408,
        [1024] * 8,
    )
    check_raises(lambda: lm_preset("huge"), ValueError, "unknown LM preset")


# ------------------------------------------------------------------------- inputs


def test_lm_inputs_embeds_equals_input_ids():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        by_ids = model(ids, labels=ids)
        by_embeds = model(inputs_embeds=model.embed_tokens(ids), labels=ids)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss, rtol=0, atol=0)


def test_lm_attention_mask_int_bool_and_positions():
    model = _model().eval()
    ids = _ids()
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        as_int = model(ids, attention_mask=mask).logits
        as_bool = model(ids, attention_mask=mask.bool()).logits
        explicit = model(
            ids, attention_mask=mask.bool(), position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
        all_ones = model(ids, attention_mask=torch.ones(2, 24, dtype=torch.long)).logits
        no_mask = model(ids).logits
    torch.testing.assert_close(as_int, as_bool, rtol=0, atol=0)
    torch.testing.assert_close(explicit, as_bool, rtol=0, atol=0)
    torch.testing.assert_close(all_ones, no_mask, rtol=0, atol=0)


def test_lm_bad_inputs_raise_before_compute():
    model = _model()
    ids = _ids()
    check_raises(lambda: model(torch.tensor([[1, 512]])), ValueError, "outside")
    check_raises(lambda: model(torch.tensor([[-1, 3]])), ValueError, "outside")
    check_raises(lambda: model(ids, labels=torch.full_like(ids, 600)), ValueError, "labels")
    check_raises(lambda: model(ids, labels=ids[:, :3]), ValueError, "labels")
    check_raises(lambda: model(), ValueError, "exactly one")
    check_raises(
        lambda: model(ids, inputs_embeds=torch.zeros(2, 24, 64)), ValueError, "exactly one"
    )
    check_raises(lambda: model(ids.float()), ValueError, "integer")
    check_raises(lambda: model(ids[0]), ValueError, r"\(B, T\)")
    check_raises(lambda: model(inputs_embeds=torch.zeros(2, 3, 65)), ValueError, "inputs_embeds")
    check_raises(
        lambda: model(inputs_embeds=torch.zeros(2, 3, 64, dtype=torch.float64)),
        ValueError,
        "float64",
    )
    check_raises(lambda: model(torch.zeros(0, 4, dtype=torch.long)), ValueError, "empty")
    check_raises(lambda: model(ids, attention_mask=torch.ones(2, 5)), ValueError, "attention_mask")
    check_raises(lambda: model(ids, attention_mask=torch.full((2, 24), 2)), ValueError, "0/1")
    check_raises(lambda: model(ids, position_ids=torch.arange(5)), ValueError, "position_ids")
    check_raises(lambda: model(ids, labels=ids, logits_to_keep=1), ValueError, "logits_to_keep")
    # tiny has a global layer and max_seq_len=256
    check_raises(lambda: model(_ids(1, 257)), ValueError, "max_seq_len")


def test_lm_all_windowed_model_has_no_length_limit():
    model = _model(max_seq_len=8, layer_windows=[4, 4, 4]).eval()
    with torch.no_grad():
        out = model(_ids(1, 40))
    assert out.logits.shape == (1, 40, 512)


def test_lm_logits_to_keep():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- losses


def test_lm_labels_are_shifted_and_minus_100_ignored():
    model = _model().eval()
    ids = _ids()
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, 20:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.ce_loss, expected, rtol=1e-6, atol=1e-6)
    assert out.loss is not None and torch.equal(out.loss, out.ce_loss)  # eval mode: plain CE

    # Changing an ignored label changes nothing.
    other = labels.clone()
    other[0, :10] = 7
    other[0, 0] = -100  # position 0 is never a target (the shift drops it)
    other[0, 1:10] = -100
    with torch.no_grad():
        again = model(ids, labels=other)
    torch.testing.assert_close(again.ce_loss, out.ce_loss, rtol=0, atol=0)

    all_ignored = torch.full_like(ids, -100)
    assert float(shifted_cross_entropy(out.logits, all_ignored)) == 0.0


def test_lm_aux_losses_present_for_moe_absent_for_dense():
    ids = _ids()
    moe = _model().train()
    out = moe(ids, labels=ids)
    assert out.aux_loss is not None and out.z_loss is not None
    assert len(out.router_stats) == len(moe.config.moe_layers) == 2
    # Balancing loss is E·Σ f·P >= ... ~1 at init; z-loss >= 0.
    assert 0.5 < float(out.aux_loss.detach()) < 4.0 and float(out.z_loss.detach()) >= 0
    cfg = moe.config
    expected = out.ce_loss + cfg.aux_loss_weight * out.aux_loss + cfg.z_loss_weight * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    tokens = sum(int(s.tokens_per_expert.sum()) for s in out.router_stats)
    assert tokens == 2 * ids.numel() * cfg.top_k  # dropless: every assignment processed
    # The aux loss reaches the router: its gradient is not from the CE alone.
    out.aux_loss.backward()
    assert moe.layers[1].ffn.router.weight.grad.abs().sum() > 0

    dense = _model(n_experts=0).train()
    out = dense(ids, labels=ids)
    assert out.aux_loss is None and out.z_loss is None and out.router_stats == []
    assert torch.equal(out.loss, out.ce_loss)


def test_lm_padding_excluded_from_router_counts():
    model = _model().eval()
    ids = _ids()
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, :8] = False
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for stats in out.router_stats:
        assert int(stats.tokens_per_expert.sum()) == int(mask.sum()) * model.config.top_k


# ------------------------------------------------------------------------- init, counts


@torch.no_grad()
def test_lm_init_and_parameter_counts():
    model = _model(n_layers=8, layer_windows=[], init_std=0.02)
    n = model.config.n_layers
    o_proj = torch.cat([layer.attn.o_proj.weight.flatten() for layer in model.layers])
    qkv_proj = torch.cat([layer.attn.qkv_proj.weight.flatten() for layer in model.layers])
    assert abs(float(qkv_proj.std()) - 0.02) < 0.002
    assert abs(float(o_proj.std()) - 0.02 / math.sqrt(2 * n)) < 0.001
    experts_down = model.layers[1].ffn.experts.down_proj
    assert abs(float(experts_down.std()) - 0.02 / math.sqrt(2 * n)) < 0.001
    assert all(float(layer.attn_norm.weight.min()) == 1.0 for layer in model.layers)

    tied = _model()
    untied = _model(tie_embeddings=False)
    assert untied.num_parameters() - tied.num_parameters() == 512 * 64
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 512 * 64
    expert_params = sum(p.numel() for name, p in tied.named_parameters() if ".ffn.experts." in name)
    assert tied.num_parameters(active=True) == tied.num_parameters() - expert_params // 2


def test_loss_on_the_last_positions_only_equals_the_full_loss():
    """Answers at the end of every row (left padding): keeping their logits only gives the
    loss of the full head, and labels before them must be ignored."""
    model = MoELanguageModel(lm_preset("tiny")).eval()
    ids = _ids(2, 20)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -4:] = ids[:, -4:]  # the last 4 tokens are the answer
    full = model(ids, labels=labels)
    kept = model(ids, labels=labels, logits_to_keep=5)
    assert kept.logits.shape[1] == 5
    torch.testing.assert_close(kept.loss, full.loss)
    check_raises(lambda: model(ids, labels=labels, logits_to_keep=4), ValueError, "must be -100")
    check_raises(lambda: model(ids, labels=labels, logits_to_keep=21), ValueError, "exceeds")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lm_trains_under_bf16_autocast_on_cuda() -> None:
    """Mixed-precision training as the trainer runs it on a GPU (bf16 autocast)."""
    check_autocast_training(_model(), _ids(), "cuda", output_fn=_logits)
