"""Parity of vats_text.interop.from_transformers with HF transformers Mixtral and Qwen2-MoE.

Every test builds a random tiny HF model locally (nothing is downloaded), with every weight,
bias and norm gain randomized so that a wrong mapping cannot hide behind HF's zero / one
init, converts it, and compares in fp32, eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from vats_text.interop import (
    config_from_transformers,
    convert_state_dict,
    from_transformers,
)
from vats_text.model import MoELanguageModel

VOCAB, T = 128, 24


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**fields, **overrides}))
    _randomize(model, seed)
    return model.eval()


def qwen2_moe(seed: int = 0, **overrides) -> Qwen2MoeForCausalLM:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        max_position_embeddings=256,
        norm_topk_prob=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**fields, **overrides}))
    _randomize(model, seed)
    return model.eval()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Within 1e-4 relative: elementwise rtol 1e-4 plus 1e-4 of the logits' scale."""
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


def check_parity(hf, *, batch: int = 2, seed: int = 1) -> MoELanguageModel:
    ours = from_transformers(hf)
    ids = torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_logits_match(ours(ids).logits, hf(ids).logits)
    return ours


# --------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kv_heads, window, tied",
    [(2, None, False), (1, None, True), (2, 8, False), (1, 8, True), (4, 8, False)],
    ids=["gqa", "mqa-tied", "gqa-window", "mqa-window-tied", "mha-window"],
)
def test_mixtral_logits_match(kv_heads, window, tied):
    hf = mixtral(num_key_value_heads=kv_heads, sliding_window=window, tie_word_embeddings=tied)
    ours = check_parity(hf)
    cfg = ours.config
    assert cfg.kv_heads == kv_heads and cfg.tie_embeddings == tied
    assert cfg.layer_windows == (() if window is None else (window, window))
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied


def test_sliding_window_is_active_in_hf_and_ours():
    """The window tests are not vacuous: with a window < T, HF's logits change, and ours too."""
    hf_window = mixtral(sliding_window=6)
    hf_global = copy.deepcopy(hf_window)
    hf_global.config.sliding_window = None
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = hf_window(ids).logits, hf_global(ids).logits
        ours_a, ours_b = (
            from_transformers(hf_window)(ids).logits,
            from_transformers(hf_global)(ids).logits,
        )
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the first window sees everything anyway
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-2
    assert_logits_match(ours_a, a)
    assert_logits_match(ours_b, b)


def test_mixtral_linear_rope_scaling():
    hf = mixtral(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    ours = check_parity(hf)
    assert ours.config.rope_scaling == "linear" and ours.config.rope_scaling_factor == 4.0


@pytest.mark.parametrize(
    "overrides, moe_layers",
    [
        (dict(norm_topk_prob=False), [0, 1, 2, 3]),
        (dict(norm_topk_prob=True), [0, 1, 2, 3]),
        (dict(decoder_sparse_step=2), [1, 3]),
        (dict(mlp_only_layers=[0]), [1, 2, 3]),
        (dict(mlp_only_layers=[0, 1], norm_topk_prob=True), [2, 3]),
        (dict(use_sliding_window=True, sliding_window=6, max_window_layers=3), [0, 1, 2, 3]),
        (dict(layer_types=["full_attention", "sliding_attention"] * 2, use_sliding_window=True,
              sliding_window=5, decoder_sparse_step=2), [1, 3]),
        (dict(qkv_bias=False, tie_word_embeddings=True, num_key_value_heads=1), [0, 1, 2, 3]),
    ],
    ids=["topk-raw", "topk-norm", "sparse-step-2", "mlp-only-0", "first-2-dense", "window",
         "layer-types", "no-bias-tied-mqa"],
)  # fmt: skip
def test_qwen2_moe_logits_match(overrides, moe_layers):
    hf = qwen2_moe(**overrides)
    ours = check_parity(hf)
    cfg = ours.config
    assert cfg.moe_layers == moe_layers
    assert cfg.n_shared_experts == 1 and cfg.shared_expert_gate
    assert cfg.norm_topk_prob == hf.config.norm_topk_prob
    hf_windows = [
        hf.config.sliding_window if t == "sliding_attention" else None
        for t in hf.config.layer_types
    ]
    assert cfg.windows == hf_windows


def test_qwen2_moe_sliding_layers_really_slide():
    """Qwen2-MoE's default layer_types make the even layers below max_window_layers local."""
    hf = qwen2_moe(use_sliding_window=True, sliding_window=4, max_window_layers=3)
    assert from_transformers(hf).config.windows == [4, None, 4, None]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_left_padded_batch_matches(family):
    """attention_mask with left padding: real positions equal HF's (given HF's generate-style
    position ids), and ours derives those positions from the mask by itself."""
    hf = (
        mixtral(sliding_window=8)
        if family == "mixtral"
        else qwen2_moe(use_sliding_window=True, sliding_window=8, max_window_layers=4)
    )
    ours = from_transformers(hf)
    ids = torch.randint(3, VOCAB, (3, T), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_logits_match(mine[real], theirs[real])


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_weights_are_copies_and_dtype_device_follow_hf():
    hf = mixtral(tie_word_embeddings=True)
    ours = from_transformers(hf)
    assert not ours.training  # follows hf.eval()
    with torch.no_grad():
        ours.embed_tokens.weight.zero_()
    assert hf.model.embed_tokens.weight.abs().sum() > 0
    assert ours.lm_head.weight is ours.embed_tokens.weight

    hf64 = mixtral().double()
    ours64 = from_transformers(hf64)
    assert all(p.dtype == torch.float64 for p in ours64.parameters())


def test_v4_per_expert_state_dict_converts_to_the_same_weights():
    """transformers v4 checkpoints store one module per expert: stacking them gives v5's."""
    for hf, leaves in (
        (mixtral(), ("w1", "w3", "w2")),
        (qwen2_moe(decoder_sparse_step=2), ("gate_proj", "up_proj", "down_proj")),
    ):
        config = config_from_transformers(hf.config)
        v5 = hf.state_dict()
        v4 = {}
        for key, value in v5.items():
            if key.endswith("experts.gate_up_proj"):
                prefix = key.removesuffix("gate_up_proj")
                if leaves[0] == "w1":  # Mixtral v4 called the MoE block block_sparse_moe
                    prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
                gate, up = value.chunk(2, dim=1)
                for e in range(value.shape[0]):
                    v4[f"{prefix}{e}.{leaves[0]}.weight"] = gate[e]
                    v4[f"{prefix}{e}.{leaves[1]}.weight"] = up[e]
            elif key.endswith("experts.down_proj"):
                prefix = key.removesuffix("down_proj")
                if leaves[0] == "w1":
                    prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
                for e in range(value.shape[0]):
                    v4[f"{prefix}{e}.{leaves[2]}.weight"] = value[e]
            elif leaves[0] == "w1" and ".mlp.gate." in key:
                v4[key.replace(".mlp.", ".block_sparse_moe.")] = value
            else:
                v4[key] = value
        a, b = convert_state_dict(v5, config), convert_state_dict(v4, config)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# What cannot be imported
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: MixtralConfig(hidden_act="gelu"), "hidden_act"),
        (lambda: MixtralConfig(attention_dropout=0.1), "attention_dropout"),
        (lambda: MixtralConfig(router_jitter_noise=0.1), "router_jitter_noise"),
        (lambda: MixtralConfig(sliding_window=0), "sliding_window"),
        (
            lambda: MixtralConfig(
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
            ),
            "rope_type",
        ),
        (
            lambda: MixtralConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            "rope_type",
        ),
        (lambda: MixtralConfig(eos_token_id=[2, 3]), "eos_token_id"),
        (lambda: Qwen2MoeConfig(num_hidden_layers=4, mlp_only_layers=[1]), "mlp_only_layers"),
        (
            lambda: Qwen2MoeConfig(
                num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"],
                use_sliding_window=False,
            ),
            "sliding_window",
        ),
        (lambda: Qwen2MoeConfig(decoder_sparse_step=0), "decoder_sparse_step"),
        (lambda: transformers.LlamaConfig(), "model_type"),
    ],
    ids=["act", "attn-dropout", "jitter", "window-0", "dynamic-rope", "yarn", "eos-list",
         "mlp-only-pattern", "window-0-qwen", "sparse-step-0", "llama"],
)  # fmt: skip
def test_unrepresentable_configs_raise_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        config_from_transformers(build())


def test_base_model_without_head_is_refused():
    hf = mixtral()
    with pytest.raises(ValueError, match="ForCausalLM"):
        from_transformers(hf.model)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_greedy_generation_matches_hf_generate(family):
    from transformers import GenerationConfig

    from vats_text import generation

    # No EOS (eos_token_id=None in the config, so neither side stops): all 20 tokens compared.
    if family == "mixtral":
        hf = mixtral(sliding_window=8, eos_token_id=None)  # 8 < 30: the rolling cache is used
    else:
        hf = qwen2_moe(
            use_sliding_window=True, sliding_window=8, max_window_layers=2, eos_token_id=None
        )
    ours = from_transformers(hf)
    assert ours.config.eos_token_id is None
    prompt = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=20, min_new_tokens=20, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=mask, generation_config=gen_config)
        mine = generation.generate(ours, prompt, max_new_tokens=20, attention_mask=mask)
        single = generation.generate(ours, prompt[:1], max_new_tokens=20)
    assert theirs.shape == (3, 30)
    assert theirs[:, 10:].unique().numel() > 5  # a real continuation, not one repeated token
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(single, theirs[:1], rtol=0, atol=0)
