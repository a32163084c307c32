"""The vats Mixture-of-Experts decoder language model.

A decoder-only transformer in the Mixtral / Qwen2-MoE family, built entirely from
vats-core blocks::

    h = embed_tokens(input_ids)                       # or inputs_embeds (multimodal splicing)
    for i, layer in enumerate(layers):                # pre-norm TransformerBlock
        h = layer(h)                                  #   causal GQA + RoPE, window_of(i)
                                                      #   FFN: MoE (is_moe_layer(i)) or SwiGLU
    logits = lm_head(norm(h))                         # lm_head tied to embed_tokens or not

Papers: Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088; sparse top-2 SwiGLU
experts, GQA, sliding windows); Qwen2-MoE (shared expert with a sigmoid gate, fine-grained
experts); Beltagy et al. 2020, "Longformer" and Gemma 2 (interleaved local sliding-window
and global layers); Su et al. 2021, RoFormer (RoPE); Fedus et al. 2021, Switch Transformers
(load-balancing loss); Zoph et al. 2022, ST-MoE (router z-loss).

The model knows nothing of generation (gpt-fast style): :meth:`MoELanguageModel.setup_caches`
builds one KV cache per layer (a ring buffer of O(window) for sliding-window layers, a
static buffer for global ones) and ``forward(..., caches=caches)`` processes one new chunk
at a time; sampling loops live in ``vats_text.generate``.

Module names (``embed_tokens``, ``layers.{i}.attn.qkv_proj``, ``layers.{i}.ffn.experts``,
``norm``, ``lm_head``) are what the HF importer maps Mixtral / Qwen2-MoE weights onto.

Shapes: B batch, T tokens of this call, L tokens held by the caches (past + this call),
D model dim, V vocabulary, E experts, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, AttentionConfig, check_head_fields
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_at_least, check_positive, is_int
from vats_core.kv_cache import KVCaches
from vats_core.lazy import computed_once
from vats_core.mlp import MLPConfig
from vats_core.moe import GroupedMM, MoEConfig, RouterStats, ScoreFunc
from vats_core.norms import RMSNorm
from vats_core.rope import RopeConfig, RopeScaling, RotaryEmbedding

__all__ = ["IGNORE_INDEX", "LMOutput", "MoELMConfig", "MoELanguageModel"]

#: Label value that the cross-entropy skips (HF / PyTorch convention).
IGNORE_INDEX = -100


def check_layer_windows(config: Any) -> None:
    """``layer_windows`` of a config with ``n_layers``: empty (every layer global) or one
    entry per layer, each None (global) or a window >= 1; shared by the LM and the text
    encoder configs."""
    windows, n_layers = config.layer_windows, config.n_layers
    ok = len(windows) in (0, n_layers)
    check(ok, config, "layer_windows", windows, f"empty or n_layers={n_layers} entries")
    ok = all(w is None or w >= 1 for w in windows)
    check(ok, config, "layer_windows", windows, "entries that are None or an int >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoELMConfig(Config):
    """Configuration of :class:`MoELanguageModel` (see :mod:`vats_text.presets` for presets).

    Layer ``i`` is a MoE layer when :meth:`is_moe_layer` says so (``n_experts > 0``,
    ``i >= first_dense_layers`` and ``(i - first_dense_layers) % moe_every == 0``), else a
    dense SwiGLU layer; its attention window is :meth:`window_of`.
    """

    vocab_size: int  # V; token ids are in [0, V)
    dim: int  # model width D
    n_layers: int  # transformer blocks
    n_heads: int  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None = n_heads, 1 = MQA
    head_dim: int | None = None  # Dh; None = dim // n_heads. Even (RoPE rotates pairs)
    # Longest sequence (prompt + generated) the model accepts when any layer is global.
    # A model whose every layer is windowed has no limit (its caches are O(window)).
    max_seq_len: int = 2048
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling = RopeScaling.NONE  # context stretching of RoPE
    rope_scaling_factor: float = 1.0  # stretch factor for LINEAR / NTK (>= 1)
    # Per-layer causal sliding window: () = every layer global; else n_layers entries,
    # None = global layer, int w = layer i sees keys i - w < j <= i (Mixtral's sliding_window).
    layer_windows: tuple[int | None, ...] = ()
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2-MoE: True)
    qk_norm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3, OLMoE)
    norm_eps: float = 1e-6  # eps of every RMSNorm (Mixtral 1e-5, Qwen2-MoE 1e-6)
    tie_embeddings: bool = False  # lm_head.weight is embed_tokens.weight (small models)
    # -- feed-forward ------------------------------------------------------------------
    n_experts: int = 0  # routed experts E per MoE layer; 0 = dense model
    top_k: int = 2  # experts per token (<= n_experts)
    expert_hidden_dim: int | None = None  # hidden dim of each expert; None = dense hidden
    moe_every: int = 1  # a MoE layer every k layers (after the first dense ones)
    first_dense_layers: int = 0  # the first k layers are dense (DeepSeek-MoE style)
    dense_hidden_dim: int | None = None  # hidden of dense SwiGLU layers; None = 8/3·D -> 64
    n_shared_experts: int = 0  # experts every token goes through (Qwen2-MoE: 1)
    shared_hidden_dim: int | None = None  # hidden per shared expert; None = expert hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(w·x)
    norm_topk_prob: bool = True  # renormalize the top-k scores to sum 1 (Mixtral: True)
    score_func: ScoreFunc = ScoreFunc.SOFTMAX  # router scores: softmax or sigmoid
    capacity_factor: float | None = None  # None = dropless; else per-expert capacity
    # -- losses ------------------------------------------------------------------------
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss (Mixtral: 0.02)
    z_loss_weight: float = 0.001  # weight of the router z-loss (ST-MoE: 0.001)
    # -- init and special tokens -------------------------------------------------------
    init_std: float = 0.02  # std of the normal init of every weight matrix
    pad_token_id: int | None = 0  # vats Tokenizer PAD_ID
    bos_token_id: int | None = 2  # vats Tokenizer BOS_ID
    eos_token_id: int | None = 3  # vats Tokenizer EOS_ID
    # -- kernels (do not change the function computed) ---------------------------------
    attention_backend: AttentionBackend = AttentionBackend.AUTO  # pin a backend for all layers
    grouped_mm: GroupedMM = GroupedMM.AUTO  # MoE experts as one grouped_mm or a loop

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "n_layers", "max_seq_len")
        self._check_attention()
        self._check_ffn()
        check_positive(self, "norm_eps", "init_std")
        check_at_least(self, 0, "aux_loss_weight", "z_loss_weight")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ok = value is None or 0 <= value < self.vocab_size
            check(ok, self, name, value, f"None or an id in [0, vocab_size={self.vocab_size})")

    def _check_attention(self) -> None:
        check_head_fields(self, rope=True)
        check_positive(self, "rope_theta")
        check_at_least(self, 1, "rope_scaling_factor")
        check_layer_windows(self)

    def _check_ffn(self) -> None:
        n = self.n_experts
        check(n >= 0, self, "n_experts", n, "an int >= 0 (0 = dense model)")
        ok = self.top_k >= 1 and (n == 0 or self.top_k <= n)
        check(ok, self, "top_k", self.top_k, f"an int in [1, n_experts={n}]")
        check_positive(self, "expert_hidden_dim", "dense_hidden_dim", "shared_hidden_dim")
        check_positive(self, "moe_every")
        first = self.first_dense_layers
        ok = 0 <= first <= self.n_layers
        check(ok, self, "first_dense_layers", first, f"an int in [0, n_layers={self.n_layers}]")
        check_at_least(self, 0, "n_shared_experts")
        check(
            not self.shared_expert_gate or self.n_shared_experts > 0,
            self,
            "shared_expert_gate",
            self.shared_expert_gate,
            "False when n_shared_experts=0 (nothing to gate)",
        )
        cf = self.capacity_factor
        ok = cf is None or (math.isfinite(cf) and cf > 0)
        check(ok, self, "capacity_factor", cf, "None (dropless) or a finite number > 0")

    # -- derived values ------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Key/value heads with the default applied."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dh(self) -> int:
        """Head dim with the default applied."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def dense_hidden(self) -> int:
        """Hidden dim of the dense SwiGLU layers: ``dense_hidden_dim`` or the Llama default
        (8/3·D rounded up to a multiple of 64, so SwiGLU has ~ the params of a 4·D MLP)."""
        if self.dense_hidden_dim is not None:
            return self.dense_hidden_dim
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    @property
    def expert_hidden(self) -> int:
        """Hidden dim of each routed expert (``expert_hidden_dim`` or :attr:`dense_hidden`)."""
        return self.dense_hidden if self.expert_hidden_dim is None else self.expert_hidden_dim

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has a MoE feed-forward (else a dense SwiGLU)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} out of range [0, n_layers={self.n_layers})")
        if self.n_experts == 0 or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == 0

    def window_of(self, i: int) -> int | None:
        """Causal sliding window of layer ``i`` (None = global attention)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} out of range [0, n_layers={self.n_layers})")
        return self.layer_windows[i] if self.layer_windows else None

    @property
    def windows(self) -> list[int | None]:
        """:meth:`window_of` for every layer."""
        return [self.window_of(i) for i in range(self.n_layers)]

    @property
    def has_global_layer(self) -> bool:
        """Whether some layer attends to the whole past (then ``max_seq_len`` applies)."""
        return any(w is None for w in self.windows)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def block_config(self, i: int) -> BlockConfig:
        """The vats-core :class:`BlockConfig` of layer ``i``."""
        attention = AttentionConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            n_kv_heads=self.kv_heads,
            head_dim=self.dh,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            qk_norm_eps=self.norm_eps,
            causal=True,
            window=self.window_of(i),
            backend=self.attention_backend,
        )
        if not self.is_moe_layer(i):
            mlp = MLPConfig(dim=self.dim, hidden_dim=self.dense_hidden)
            return BlockConfig(attention=attention, mlp=mlp, norm_eps=self.norm_eps)
        moe = MoEConfig(
            dim=self.dim,
            hidden_dim=self.expert_hidden,
            n_experts=self.n_experts,
            top_k=self.top_k,
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            n_shared_experts=self.n_shared_experts,
            shared_hidden_dim=self.shared_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
            capacity_factor=self.capacity_factor,
            grouped_mm=self.grouped_mm,
            init_std=self.init_std,
        )
        return BlockConfig(attention=attention, moe=moe, norm_eps=self.norm_eps)

    def rope_config(self) -> RopeConfig:
        """The 1D RoPE of every layer."""
        return RopeConfig(
            head_dim=self.dh,
            theta=float(self.rope_theta),
            scaling=self.rope_scaling,
            scaling_factor=float(self.rope_scaling_factor),
        )


@dataclasses.dataclass
class LMOutput:
    """What :meth:`MoELanguageModel.forward` returns.

    Attributes:
        logits: ``(B, T', V)`` next-token logits (``T' = T``, or ``logits_to_keep``).
        last_hidden_state: ``(B, T, D)`` final-norm hidden states (the LM head's input).
        loss: scalar, None without labels. ``ce_loss`` plus, in training mode on a MoE
            model, ``aux_loss_weight * aux_loss + z_loss_weight * z_loss``; in eval mode
            ``loss == ce_loss`` so validation numbers are plain cross-entropy.
        ce_loss: scalar, the shifted next-token cross-entropy (mean over labels that are not
            ``-100``; 0 when every label is ignored). None without labels.
        aux_loss: scalar mean load-balancing loss over the MoE layers (1.0 = balanced),
            unweighted; None for a dense model. Computed with or without labels.
        z_loss: scalar mean router z-loss over the MoE layers, unweighted; None when dense.
        router_stats: one :class:`~vats_core.moe.RouterStats` per MoE layer, in layer order.
    """

    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    router_stats: list[RouterStats] = dataclasses.field(default_factory=list)

    # Computed on first read (decoding never reads them, so it does not pay for them).
    @computed_once
    def aux_loss(self) -> Tensor | None:
        if not self.router_stats:
            return None
        return torch.stack([s.load_balancing_loss for s in self.router_stats]).mean()

    @computed_once
    def z_loss(self) -> Tensor | None:
        if not self.router_stats:
            return None
        return torch.stack([s.z_loss for s in self.router_stats]).mean()


class MoELanguageModel(PretrainedMixin, nn.Module):
    """Decoder-only MoE transformer LM; see the module docstring and :class:`MoELMConfig`.

    Example:
        >>> from vats_text.presets import lm_preset
        >>> model = MoELanguageModel(lm_preset("tiny"))
        >>> ids = torch.randint(7, 512, (2, 16))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 16, 512]), torch.Size([]))
    """

    config_class = MoELMConfig
    config: MoELMConfig

    def __init__(self, config: MoELMConfig) -> None:
        super().__init__()
        if not isinstance(config, MoELMConfig):
            raise ValueError(f"config must be a MoELMConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.rotary = RotaryEmbedding(config.rope_config())
        self.layers = nn.ModuleList(
            TransformerBlock(config.block_config(i)) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ construction

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 / nanoGPT init.

        Every weight matrix (embedding, projections, router, experts) ~ Normal(0, init_std);
        biases zero; norm gains one. The projections that write into the residual stream
        (attention ``o_proj``, SwiGLU / expert / shared-expert ``down_proj``) get
        ``init_std / sqrt(2 * n_layers)``: each layer adds two such outputs to the residual,
        so this keeps the residual's variance at init independent of depth (GPT-2, Radford
        et al. 2019). A tied head shares the embedding's init.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):  # attn_norm, ffn_norm, norm, q_norm, k_norm
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)

    def num_parameters(self, *, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Parameter count (a tied head counted once).

        Args:
            exclude_embeddings: leave out the token embedding and an untied LM head.
            active: count only what one token uses: ``top_k`` of the ``n_experts`` routed
                experts of each MoE layer (the usual "active parameters" of a MoE).
        """
        total = 0
        for name, p in self.named_parameters():  # named_parameters yields a tied weight once
            if exclude_embeddings and name in ("embed_tokens.weight", "lm_head.weight"):
                continue
            n = p.numel()
            if active and ".ffn.experts." in name:
                n = n * self.config.top_k // self.config.n_experts
            total += n
        return total

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fixed_shape: bool = False,
    ) -> KVCaches:
        """KV caches for incremental decoding, one per layer (gpt-fast style).

        Windowed layers get a :class:`~vats_core.kv_cache.RollingKVCache` of O(window)
        memory, global layers a :class:`~vats_core.kv_cache.StaticKVCache` of ``max_len``.

        Args:
            batch_size: rows decoded together.
            max_len: most tokens (prompt, padding included, + generated) a row will hold.
            device: default: the model's device.
            dtype: default: the model's parameter dtype (use the activation dtype under
                autocast).
            fixed_shape: one-token steps see the same shapes every step (whole buffers,
                unwritten slots masked), so a compiled decode step traces once; see
                :mod:`vats_core.kv_cache`.

        Raises:
            ValueError: ``batch_size`` or ``max_len`` < 1, or ``max_len > max_seq_len`` on a
                model with a global layer.
        """
        cfg = self.config
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"setup_caches: batch_size={batch_size!r} must be an int >= 1")
        if not is_int(max_len) or max_len < 1:
            raise ValueError(f"setup_caches: max_len={max_len!r} must be an int >= 1")
        if cfg.has_global_layer and max_len > cfg.max_seq_len:
            raise ValueError(
                f"setup_caches: max_len={max_len} exceeds the model's max_seq_len="
                f"{cfg.max_seq_len} (it has global-attention layers)"
            )
        weight = self.embed_tokens.weight
        return KVCaches.for_layers(
            cfg.windows,
            batch_size=batch_size,
            max_len=max_len,
            n_kv_heads=cfg.kv_heads,
            head_dim=cfg.dh,
            dtype=dtype if dtype is not None else weight.dtype,
            device=device if device is not None else weight.device,
            fixed_shape=fixed_shape,
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        caches: KVCaches | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Next-token logits, and the loss when ``labels`` are given.

        Args:
            input_ids: ``(B, T)`` integer token ids in ``[0, V)``. Exactly one of
                ``input_ids`` / ``inputs_embeds``.
            inputs_embeds: ``(B, T, D)`` input embeddings in the model's dtype (text
                embeddings with image / audio embeddings spliced in).
            attention_mask: ``(B, T)`` bool or 0/1, True = real token, False = padding
                (left padding for batched prompts). With ``caches`` it covers this chunk
                only: the caches remember earlier chunks' masks.
            position_ids: ``(B, T)`` or ``(T,)`` RoPE positions. Default: ``0..T-1``; with
                a mask, ``cumsum(mask) - 1`` clipped at 0 (so a left-padded row's first real
                token is at 0, as in HF); with caches, offset by the real tokens each row
                already holds (``caches[0].seq_lens()``).
            labels: ``(B, T)`` ids aligned with ``input_ids`` (HF convention: the model
                shifts, position t's logits are scored against ``labels[:, t + 1]``);
                ``-100`` = ignored.
            caches: from :meth:`setup_caches`; this call appends its keys / values and
                attends over everything held.
            logits_to_keep: 0 = logits for all T positions; n > 0 = only the last n (a
                prefill needs the last position's only). With labels, the loss scores those
                n positions, so every label before the last n - 1 must be -100 (answers
                ending together in left-padded rows: the head skips the prompts).

        Returns:
            :class:`LMOutput`.

        Raises:
            ValueError: bad shapes or dtypes, token ids or labels out of range, both or
                neither of input_ids / inputs_embeds, a sequence longer than max_seq_len on a
                model with a global layer, or caches that do not fit.
        """
        cfg = self.config
        # 1. Validate everything before any compute.
        batch, t = self._check_inputs(input_ids, inputs_embeds, labels, caches, logits_to_keep)
        mask = self._prepare_mask(attention_mask, batch, t)
        positions = self._positions(position_ids, mask, caches, batch, t)

        # 2. Embed, then the blocks. RoPE tables are computed once and shared by all layers.
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        rope = self.rotary(positions, dtype=h.dtype)
        router_stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            h, stats = layer(h, rope=rope, key_padding_mask=mask, cache=cache)
            if stats is not None:
                router_stats.append(stats)
        h = self.norm(h)  # (B, T, D)

        # 3. Head and losses.
        logits = self.lm_head(h if logits_to_keep == 0 else h[:, -logits_to_keep:])  # (B, T', V)
        out = LMOutput(logits=logits, last_hidden_state=h, router_stats=router_stats)
        if labels is not None:
            scored = labels if logits_to_keep == 0 else labels[:, -logits_to_keep:]
            out.ce_loss = shifted_cross_entropy(logits, scored)
            out.loss = out.ce_loss
            if self.training and out.aux_loss is not None and out.z_loss is not None:
                out.loss = (
                    out.ce_loss
                    + cfg.aux_loss_weight * out.aux_loss
                    + cfg.z_loss_weight * out.z_loss
                )
        return out

    # ------------------------------------------------------------------ helpers

    def _check_inputs(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        labels: Tensor | None,
        caches: KVCaches | None,
        logits_to_keep: int,
    ) -> tuple[int, int]:
        """Validate the inputs; returns ``(B, T)``."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MoELanguageModel: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
                raise ValueError(f"input_ids must be a (B, T) tensor, got {_describe(input_ids)}")
            if (
                input_ids.is_floating_point()
                or input_ids.is_complex()
                or input_ids.dtype == torch.bool
            ):
                raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
            batch, t = input_ids.shape
            _check_ids_in_range(input_ids, cfg.vocab_size, "input_ids")
        else:
            assert inputs_embeds is not None
            if (
                not isinstance(inputs_embeds, Tensor)
                or inputs_embeds.ndim != 3
                or inputs_embeds.shape[-1] != cfg.dim
            ):
                raise ValueError(
                    f"inputs_embeds must be a (B, T, {cfg.dim}) tensor, got "
                    f"{_describe(inputs_embeds)}"
                )
            weight_dtype = self.embed_tokens.weight.dtype
            if inputs_embeds.dtype != weight_dtype and not torch.is_autocast_enabled(
                inputs_embeds.device.type
            ):
                raise ValueError(
                    f"inputs_embeds is {inputs_embeds.dtype} but the model is {weight_dtype}"
                )
            batch, t = inputs_embeds.shape[:2]
        if batch < 1 or t < 1:
            raise ValueError(f"empty input: batch size {batch}, sequence length {t}")

        past = 0
        if caches is not None:
            if not isinstance(caches, KVCaches) or len(caches) != cfg.n_layers:
                raise ValueError(
                    f"caches must be the KVCaches of setup_caches ({cfg.n_layers} layers), got "
                    f"{_describe(caches)}"
                )
            if caches[0].batch_size != batch:
                raise ValueError(
                    f"caches were set up for batch size {caches[0].batch_size}, got {batch}"
                )
            # (Compiled decoding skips the check: the length is a device count there, and
            # generate() sized the caches within max_seq_len.)
            past = 0 if torch.compiler.is_compiling() else caches.length
        if cfg.has_global_layer and past + t > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + t} tokens ({past} cached + {t} new) exceeds max_seq_len="
                f"{cfg.max_seq_len} of a model with global-attention layers"
            )

        if not is_int(logits_to_keep) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be an int >= 0")
        if labels is not None:
            if not isinstance(labels, Tensor) or tuple(labels.shape) != (batch, t):
                raise ValueError(
                    f"labels must be a (B, T) = ({batch}, {t}) tensor, got {_describe(labels)}"
                )
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
            _check_ids_in_range(labels, cfg.vocab_size, "labels", ignore=IGNORE_INDEX)
            if logits_to_keep > t:
                raise ValueError(f"logits_to_keep={logits_to_keep} exceeds the {t} positions")
            seen = t - logits_to_keep + 1  # labels the kept logits score start here
            early = labels[:, :seen] != IGNORE_INDEX
            if logits_to_keep and not torch.compiler.is_compiling() and bool(early.any()):
                raise ValueError(
                    f"labels before the last {logits_to_keep - 1} positions must be "
                    f"{IGNORE_INDEX} with logits_to_keep={logits_to_keep}: their logits are not "
                    "computed (keep more, or 0 for all)"
                )
        return batch, t

    def _prepare_mask(self, attention_mask: Tensor | None, batch: int, t: int) -> Tensor | None:
        """``(B, T)`` bool key padding mask, or None when nothing is padded."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, t):
            raise ValueError(
                f"attention_mask must be a (B, T) = ({batch}, {t}) tensor, got "
                f"{_describe(attention_mask)}"
            )
        device = self.embed_tokens.weight.device
        if attention_mask.dtype != torch.bool:
            if not torch.compiler.is_compiling() and not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()
            ):
                raise ValueError("attention_mask must hold only 0/1 (or be bool)")
            attention_mask = attention_mask != 0
        attention_mask = attention_mask.to(device)
        # An all-real mask is dropped: attention then takes its unmasked fast paths and the
        # MoE dispatch skips its padding bookkeeping. (Under compile the branch is skipped:
        # a data-dependent branch would break the graph.)
        if not torch.compiler.is_compiling() and bool(attention_mask.all()):
            return None
        return attention_mask

    def _positions(
        self,
        position_ids: Tensor | None,
        mask: Tensor | None,
        caches: KVCaches | None,
        batch: int,
        t: int,
    ) -> Tensor:
        """RoPE positions: ``(T,)`` shared by the batch or ``(B, T)``."""
        device = self.embed_tokens.weight.device
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or tuple(position_ids.shape) not in (
                (t,),
                (batch, t),
            ):
                raise ValueError(
                    f"position_ids must be a (T,) or (B, T) = ({batch}, {t}) tensor, got "
                    f"{_describe(position_ids)}"
                )
            if position_ids.is_floating_point() or position_ids.dtype == torch.bool:
                raise ValueError(f"position_ids must be integers, got {position_ids.dtype}")
            return position_ids.to(device)
        if mask is None:
            positions = torch.arange(t, device=device)  # (T,)
            if caches is None:
                return positions
            return caches[0].seq_lens()[:, None] + positions  # (B, T)
        positions = mask.long().cumsum(-1) - 1  # (B, T): a real token's index among real ones
        if caches is not None:
            positions = positions + caches[0].seq_lens()[:, None]
        return positions.clamp(min=0)


def shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: ``logits[:, t]`` scored against ``labels[:, t + 1]``.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` aligned with the inputs; ``-100`` entries are skipped.

    Returns:
        Scalar float32 (or float64) mean over the scored positions; 0 when none is scored
        (a fully ignored batch must not turn a gradient-accumulation sum into NaN).
    """
    logits = logits[:, :-1].flatten(0, 1)  # (B·(T-1), V)
    targets = labels[:, 1:].flatten()  # (B·(T-1),)
    # Accumulate in at least fp32: bf16 logits lose ~1e-2 nats in a bf16 log-softmax.
    wide = logits if logits.dtype == torch.float64 else logits.float()
    total = F.cross_entropy(wide, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def _check_ids_in_range(
    ids: Tensor, vocab_size: int, name: str, *, ignore: int | None = None
) -> None:
    """ValueError unless every entry of ``ids`` is in ``[0, vocab_size)`` (or ``ignore``)."""
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return  # a data-dependent check would break the compiled graph; eager calls check
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore is not None:
        bad = bad & (ids != ignore)
    if bool(bad.any()):
        value = int(ids[bad][0])
        allowed = f"[0, {vocab_size})" + (f" or {ignore}" if ignore is not None else "")
        raise ValueError(f"{name} holds {value}, outside {allowed} (vocab_size={vocab_size})")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
