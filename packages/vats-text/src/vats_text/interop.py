"""Import Hugging Face transformers Mixtral and Qwen2-MoE models into :class:`MoELanguageModel`.

A torchtitan-style state-dict adapter: :func:`config_from_transformers` maps the HF config
onto :class:`~vats_text.model.MoELMConfig` (and refuses, with a ``ValueError`` naming the HF
field and its value, whatever the vats model cannot compute exactly), :func:`vats_key` and
:func:`convert_state_dict` map the weight names, and :func:`from_transformers` does both and
copies the weights into a new model.

Weight names (``{i}`` layer, ``{e}`` expert; ``mlp`` is ``block_sparse_moe`` in transformers
v4 Mixtral checkpoints)::

    HF                                                  vats
    model.embed_tokens.weight                           embed_tokens.weight
    model.layers.{i}.input_layernorm.weight             layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.*           layers.{i}.attn.qkv_proj.* (stacked: q, k, v rows)
    model.layers.{i}.self_attn.o_proj.*                 layers.{i}.attn.o_proj.*
    model.layers.{i}.post_attention_layernorm.weight    layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.gate.weight                    layers.{i}.ffn.router.weight
    model.layers.{i}.mlp.experts.gate_up_proj (v5)      layers.{i}.ffn.experts.gate_up_proj
    model.layers.{i}.mlp.experts.down_proj    (v5)      layers.{i}.ffn.experts.down_proj
    model.layers.{i}.mlp.experts.{e}.w1|w3|w2 (v4 Mixtral: gate, up, down; stacked here)
    model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj (v4 Qwen2-MoE; stacked here)
    model.layers.{i}.mlp.shared_expert.*                layers.{i}.ffn.shared_expert.*
    model.layers.{i}.mlp.shared_expert_gate.weight      layers.{i}.ffn.shared_expert_gate.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     layers.{i}.ffn.{gate,up,down}_proj.weight
                                                        (Qwen2-MoE dense layers)
    model.norm.weight                                   norm.weight
    lm_head.weight                                      lm_head.weight (dropped when tied)

Semantics that were checked against transformers 5.x and map one to one: RMSNorm in fp32
with the weight applied after the cast back (``rms_norm_eps`` -> ``norm_eps``); RoPE in the
rotate-half layout, ``rope_theta`` and linear scaling; HF's sliding window ``j > i - window``
(the vats ``window``); Qwen2-MoE's ``layer_types`` (which ``use_sliding_window`` and
``max_window_layers`` derive); the router softmax in fp32 with top-k renormalization always
(Mixtral) or per ``norm_topk_prob`` (Qwen2-MoE); Qwen2-MoE's shared expert scaled by
``sigmoid(shared_expert_gate(x))``; its MoE layer pattern (``decoder_sparse_step``,
``mlp_only_layers``) when it is "the first k dense, then every m-th"; q/k/v biases.

transformers is not a dependency of vats-text: this module only reads attributes of the
objects it is handed and never imports it.

Shapes: E experts, D model dim, H expert hidden dim.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vats_core.rope import RopeScaling
from vats_text.model import MoELanguageModel, MoELMConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_transformers",
    "convert_state_dict",
    "from_transformers",
    "vats_key",
]

#: ``config.model_type`` values :func:`from_transformers` accepts.
SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _unsupported(model_type: str, field: str, value: object, why: str) -> ValueError:
    return ValueError(
        f"cannot import this {model_type} model: config.{field}={value!r} is not supported ({why})"
    )


def _rope(hf_config: Any, model_type: str) -> tuple[float, RopeScaling, float]:
    """``(theta, scaling, factor)`` from ``rope_parameters`` (v5) or ``rope_theta`` (v4)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers v4 layout
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise _unsupported(
            model_type,
            "partial_rotary_factor",
            partial,
            "vats RoPE rotates every channel of the head",
        )
    if rope_type == "default":
        return theta, RopeScaling.NONE, 1.0
    if rope_type == "linear":
        return theta, RopeScaling.LINEAR, float(params["factor"])
    raise _unsupported(
        model_type,
        "rope_parameters['rope_type']",
        rope_type,
        "only 'default' and 'linear' RoPE compute the same function in vats ('dynamic' "
        "changes the frequencies with the sequence length, the others reshape them)",
    )


def _token_id(model_type: str, field: str, value: object) -> int | None:
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise _unsupported(
                model_type, field, value, "vats models hold one id per special token"
            )
        value = value[0]
    return None if value is None else int(value)  # type: ignore[arg-type]


def _mixtral_windows(hf_config: Any) -> tuple[int | None, ...]:
    window = hf_config.sliding_window
    if window is None:
        return ()
    if not isinstance(window, int) or window < 1:
        raise _unsupported("mixtral", "sliding_window", window, "expected None or an int >= 1")
    return (window,) * hf_config.num_hidden_layers


def _qwen2_moe_windows(hf_config: Any) -> tuple[int | None, ...]:
    n = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * n
    if len(layer_types) != n or any(
        t not in ("full_attention", "sliding_attention") for t in layer_types
    ):
        raise _unsupported(
            "qwen2_moe",
            "layer_types",
            layer_types,
            f"expected {n} entries, each 'full_attention' or 'sliding_attention'",
        )
    if "sliding_attention" not in layer_types:
        return ()
    window = hf_config.sliding_window
    if not isinstance(window, int) or window < 1:
        # Qwen2MoeConfig sets sliding_window=0 when use_sliding_window is False; HF then masks
        # every key of a "sliding_attention" layer, which no vats model computes.
        raise _unsupported(
            "qwen2_moe",
            "sliding_window",
            window,
            f"layer_types has sliding_attention layers, so an int >= 1 is needed "
            f"(use_sliding_window={getattr(hf_config, 'use_sliding_window', None)!r})",
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _moe_pattern(moe_layers: list[int], n_layers: int, hf_config: Any) -> tuple[int, int]:
    """``(first_dense_layers, moe_every)`` giving exactly ``moe_layers`` (non-empty)."""
    first = min(moe_layers)
    for every in range(1, n_layers + 1):
        if list(range(first, n_layers, every)) == moe_layers:
            return first, every
    raise _unsupported(
        "qwen2_moe",
        "mlp_only_layers",
        list(hf_config.mlp_only_layers),
        f"with decoder_sparse_step={hf_config.decoder_sparse_step} the MoE layers are "
        f"{moe_layers}; vats expresses only 'the first k layers dense, then a MoE layer "
        "every m layers'",
    )


def _check_common(hf_config: Any, model_type: str) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported(model_type, "hidden_act", act, "vats experts are SwiGLU (silu)")
    dropout = getattr(hf_config, "attention_dropout", 0.0)
    if dropout:
        raise _unsupported(
            model_type,
            "attention_dropout",
            dropout,
            "vats has no dropout on attention probabilities; set it to 0.0 to import",
        )
    jitter = getattr(hf_config, "router_jitter_noise", 0.0)
    if jitter:
        raise _unsupported(
            model_type, "router_jitter_noise", jitter, "vats routers add no noise; set it to 0.0"
        )


def config_from_transformers(hf_config: Any) -> MoELMConfig:
    """The :class:`MoELMConfig` computing what an HF Mixtral / Qwen2-MoE config computes.

    Training-only settings map where vats has them: ``router_aux_loss_coef`` becomes
    ``aux_loss_weight`` when ``output_router_logits`` is set (HF adds the loss only then), else
    0; HF has no z-loss (``z_loss_weight=0``). ``max_position_embeddings`` becomes
    ``max_seq_len`` (which vats enforces on models with a global layer; HF does not).

    Args:
        hf_config: a ``MixtralConfig`` or ``Qwen2MoeConfig`` (any object with their fields).

    Raises:
        ValueError: another ``model_type``, or a field vats cannot represent exactly
            (the message names it and its value).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"from_transformers supports config.model_type in {SUPPORTED_MODEL_TYPES}, "
            f"got {model_type!r}"
        )
    _check_common(hf_config, model_type)
    c = hf_config
    n_layers = c.num_hidden_layers
    theta, scaling, factor = _rope(c, model_type)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    common: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        n_layers=n_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        max_seq_len=c.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        top_k=c.num_experts_per_tok,
        aux_loss_weight=c.router_aux_loss_coef
        if getattr(c, "output_router_logits", False)
        else 0.0,
        z_loss_weight=0.0,
        init_std=c.initializer_range,
        pad_token_id=_token_id(model_type, "pad_token_id", c.pad_token_id),
        bos_token_id=_token_id(model_type, "bos_token_id", c.bos_token_id),
        eos_token_id=_token_id(model_type, "eos_token_id", c.eos_token_id),
    )
    if model_type == "mixtral":
        return MoELMConfig(
            **common,
            layer_windows=_mixtral_windows(c),
            n_experts=c.num_local_experts,
            expert_hidden_dim=c.intermediate_size,
            norm_topk_prob=True,  # MixtralTopKRouter always renormalizes
        )

    # Qwen2-MoE: layer i is sparse iff not in mlp_only_layers and (i + 1) % step == 0.
    step = c.decoder_sparse_step
    if not isinstance(step, int) or step < 1:
        raise _unsupported(model_type, "decoder_sparse_step", step, "expected an int >= 1")
    mlp_only = set(c.mlp_only_layers or [])
    moe_layers = [
        i
        for i in range(n_layers)
        if c.num_experts > 0 and i not in mlp_only and (i + 1) % step == 0
    ]
    n_experts, first_dense, every = c.num_experts, 0, 1
    if moe_layers:
        first_dense, every = _moe_pattern(moe_layers, n_layers, c)
    else:
        n_experts = 0  # every layer dense
    shared = c.shared_expert_intermediate_size
    return MoELMConfig(
        **common,
        layer_windows=_qwen2_moe_windows(c),
        qkv_bias=bool(getattr(c, "qkv_bias", True)),
        n_experts=n_experts,
        expert_hidden_dim=c.moe_intermediate_size,
        moe_every=every,
        first_dense_layers=first_dense,
        dense_hidden_dim=c.intermediate_size,
        # A zero-width shared expert adds sigmoid(g)·0 = 0: the same as none.
        n_shared_experts=1 if shared else 0,
        shared_hidden_dim=shared or None,
        shared_expert_gate=bool(shared),
        norm_topk_prob=bool(c.norm_topk_prob),
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_RENAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "gate.weight": "ffn.router.weight",
    "experts.gate_up_proj": "ffn.experts.gate_up_proj",
    "experts.down_proj": "ffn.experts.down_proj",
    "shared_expert_gate.weight": "ffn.shared_expert_gate.weight",
}
# v4 per-expert weights: (HF leaf) -> (slot in the stacked tensors).
_V4_EXPERT = re.compile(r"experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_V4_SLOT = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down"}
_V4_SLOT["down_proj"] = "down"


def vats_key(hf_key: str, config: MoELMConfig) -> str | None:
    """The vats parameter name of an HF Mixtral / Qwen2-MoE state-dict key.

    Returns None for keys that carry nothing for vats: a tied ``lm_head.weight`` and the
    weights of a zero-width Qwen2-MoE shared expert. Some HF weights are rows of one vats
    parameter, which :func:`convert_state_dict` stacks: ``self_attn.{q,k,v}_proj`` map to
    ``attn.qkv_proj`` (their key is returned), v4 per-expert keys (``experts.{e}.w1`` ...)
    to the stacked experts.

    Raises:
        ValueError: a key this mapping does not know (a feature vats does not have).
    """
    if hf_key == "model.embed_tokens.weight":
        return "embed_tokens.weight"
    if hf_key == "model.norm.weight":
        return "norm.weight"
    if hf_key == "lm_head.weight":
        return None if config.tie_embeddings else "lm_head.weight"
    match = _LAYER.fullmatch(hf_key)
    if match is not None:
        i, rest = match.groups()
        rest = rest.replace("block_sparse_moe.", "mlp.", 1)  # v4 Mixtral
        if rest.startswith("self_attn."):
            rest = rest.removeprefix("self_attn.")
            proj, _, leaf = rest.partition(".")
            if proj in ("q_proj", "k_proj", "v_proj") and leaf in ("weight", "bias"):
                return f"layers.{i}.attn.qkv_proj.{leaf}"
            return f"layers.{i}.attn.{rest}"
        if rest.startswith("mlp."):
            rest = rest.removeprefix("mlp.")
            if rest.startswith("shared_expert") and config.n_shared_experts == 0:
                return None
            if rest in _RENAMES:
                return f"layers.{i}.{_RENAMES[rest]}"
            if rest.startswith("shared_expert."):
                return f"layers.{i}.ffn.{rest}"
            if rest in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
                return f"layers.{i}.ffn.{rest}"  # dense SwiGLU layer
        elif rest in _RENAMES:
            return f"layers.{i}.{_RENAMES[rest]}"
    raise ValueError(f"from_transformers: no vats parameter for the HF weight {hf_key!r}")


def convert_state_dict(hf_state: Mapping[str, Tensor], config: MoELMConfig) -> dict[str, Tensor]:
    """Rename an HF state dict to vats names (tensors shared, not copied).

    v5 stacked experts pass through as they are; v4 per-expert weights are stacked into
    ``gate_up_proj[e] = cat([gate, up])`` ``(E, 2H, D)`` and ``down_proj`` ``(E, D, H)``;
    each layer's q, k and v projections into ``qkv_proj = cat([q, k, v])`` (the only
    copies made).

    Raises:
        ValueError: an unknown key, or v4 experts or q/k/v projections with some weights
            missing.
    """
    out: dict[str, Tensor] = {}
    v4: dict[str, dict[str, dict[int, Tensor]]] = {}  # layer prefix -> slot -> expert -> w
    qkv: dict[str, dict[str, Tensor]] = {}  # qkv_proj key -> "q_proj" / ... -> tensor
    for hf_key, tensor in hf_state.items():
        match = _LAYER.fullmatch(hf_key)
        if match is not None:
            rest = match.group(2).replace("block_sparse_moe.", "mlp.", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                key = vats_key(hf_key, config)
                assert key is not None
                qkv.setdefault(key, {})[rest.split(".")[1]] = tensor
                continue
            expert = _V4_EXPERT.fullmatch(rest.removeprefix("mlp."))
            if rest.startswith("mlp.") and expert is not None:
                e, leaf = expert.groups()
                slots = v4.setdefault(f"layers.{match.group(1)}.ffn.experts", {})
                slots.setdefault(_V4_SLOT[leaf], {})[int(e)] = tensor
                continue
        key = vats_key(hf_key, config)
        if key is not None:
            out[key] = tensor
    for prefix, slots in v4.items():
        n = config.n_experts
        for slot in ("gate", "up", "down"):
            if sorted(slots.get(slot, {})) != list(range(n)):
                raise ValueError(
                    f"from_transformers: {prefix} needs the {slot} weight of experts 0..{n - 1}, "
                    f"got experts {sorted(slots.get(slot, {}))}"
                )
        gate, up, down = (slots[s] for s in ("gate", "up", "down"))
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([gate[e], up[e]]) for e in range(n)]
        )  # (E, 2H, D)
        out[f"{prefix}.down_proj"] = torch.stack([down[e] for e in range(n)])  # (E, D, H)
    for key, parts in qkv.items():
        if sorted(parts) != ["k_proj", "q_proj", "v_proj"]:
            raise ValueError(
                f"from_transformers: {key} needs the q_proj, k_proj and v_proj weights, got "
                f"{sorted(parts)}"
            )
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def _check_hf_model(hf_model: Any) -> None:
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "state_dict"):
        raise ValueError(
            f"from_transformers expects a transformers model, got {type(hf_model).__name__}"
        )
    if getattr(hf_model, "lm_head", None) is None:
        raise ValueError(
            f"from_transformers needs the causal-LM class with its head (MixtralForCausalLM, "
            f"Qwen2MoeForCausalLM), got {type(hf_model).__name__}"
        )
    for name, module in hf_model.named_modules():
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
            raise ValueError(
                f"from_transformers: {name} stores its experts transposed or with biases, which "
                "vats experts do not"
            )


def from_transformers(hf_model: Any) -> MoELanguageModel:
    """A :class:`MoELanguageModel` with the weights of an HF Mixtral / Qwen2-MoE causal LM.

    The result computes the same logits (to float rounding) on the HF model's device and in
    its dtype, and is in the HF model's train / eval mode. The vats model is built on the meta
    device and then allocated once, so converting holds the HF weights plus one copy.

    Args:
        hf_model: a ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` (transformers v5;
            v4-style per-expert state dicts are handled by :func:`convert_state_dict`).

    Returns:
        The vats model; its weights are copies (changing one model leaves the other alone).

    Raises:
        ValueError: not one of those models, or a config field vats cannot represent (see
            :func:`config_from_transformers`).
    """
    _check_hf_model(hf_model)
    config = config_from_transformers(hf_model.config)
    hf_state = hf_model.state_dict()
    embed, head = hf_state["model.embed_tokens.weight"], hf_state.get("lm_head.weight")
    # The weights decide tying, not the config flag: a tied checkpoint shares one tensor.
    tied = head is None or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape)
    if tied != config.tie_embeddings:
        config = config.replace(tie_embeddings=tied)
    weights = convert_state_dict(hf_state, config)

    with torch.device("meta"):
        model = MoELanguageModel(config)
    model = model.to(dtype=embed.dtype).to_empty(device=embed.device)
    if config.tie_embeddings:  # to_empty allocated the tied weight twice
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())  # a tied weight appears once
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params)
    if missing or unexpected:
        raise ValueError(
            f"from_transformers: weights do not cover the vats model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    with torch.no_grad():
        for name, param in params.items():
            source = weights[name]
            if source.shape != param.shape:
                raise ValueError(
                    f"from_transformers: {name} has shape {tuple(param.shape)} in vats but "
                    f"{tuple(source.shape)} in the HF model"
                )
            param.copy_(source)
    return model.train(hf_model.training)
