"""Import diffusers' ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` as a
:class:`~vats_diffusion.dit.DiT` that computes the same function.

Only the model's ``.config`` and ``.state_dict()`` are read; diffusers is never imported.

Mapping (diffusers -> vats)::

    pos_embed.proj                          -> patch_embed  (positions: sincos, base grid
                                               sample_size / p, interpolation_scale)
    *.emb.timestep_embedder.linear_1/2      -> time_embed.linear_1/2
    *.emb.class_embedder.embedding_table    -> class_embed  (K + 1 rows, K = null label)
    transformer_blocks.i.norm1.linear       -> blocks.i.adaln            (DiT, adaLN-Zero)
    adaln_single.linear                     -> adaln_single              (PixArt)
    transformer_blocks.i.scale_shift_table  -> blocks.i.scale_shift_table (PixArt)
    transformer_blocks.i.attn1.to_q/k/v     -> blocks.i.attn.qkv_proj    (stacked q, k, v rows)
    transformer_blocks.i.attn2.to_q         -> blocks.i.cross_attn.q_proj
    transformer_blocks.i.attn2.to_k/v       -> blocks.i.cross_attn.kv_proj (stacked k, v)
    transformer_blocks.i.attn{1,2}.to_out.0 -> blocks.i.{attn,cross_attn}.o_proj
    transformer_blocks.i.ff.net.0.proj      -> blocks.i.ffn.fc1  (swiglu: up_proj, gate_proj)
    transformer_blocks.i.ff.net.2           -> blocks.i.ffn.fc2  (swiglu: down_proj)
    caption_projection.linear_1/2           -> text_proj.fc1/fc2         (PixArt)
    proj_out_1 / proj_out_2                 -> final_adaln / proj_out    (DiT)
    scale_shift_table / proj_out            -> final_scale_shift_table / proj_out (PixArt)

diffusers' DiT keeps a copy of the timestep and class embedders in every block (the
original DiT has one; the conversion script copies it into each block and the final layer
reads block 0's). vats' DiT has one, so the copies must be equal: a model whose blocks'
embedders differ (a randomly initialised one, say) is refused with a ValueError.

Dropout is an identity in eval mode and is not carried over, nor is ``upcast_attention``
(it changes only half-precision rounding). What DiT cannot compute raises a ValueError
naming the diffusers config field: ``norm_elementwise_affine=True``, ``activation_fn``
other than ``gelu`` / ``gelu-approximate`` / ``swiglu``, ``out_channels`` other than
``in_channels`` or twice it, PixArt's ``use_additional_conditions`` (resolved as diffusers
does: None means ``sample_size == 128``), ``attention_type`` other than ``default``,
``caption_channels`` with a ``cross_attention_dim`` other than the model width (or
without cross-attention), and ``norm_type`` other than the class's own.

A padding mask maps as is: diffusers' ``encoder_attention_mask`` (1 = keep) is vats'
``text_mask`` (True = real token); only rows with no real token differ (diffusers then
averages every padded token, vats' null text condition adds nothing).

Shapes: D model width, A = heads · head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vats_core.mlp import Activation
from vats_diffusion.dit import DiT, DiTConfig, DiTPosEmbed
from vats_diffusion.dit_layers import AdaLNMode

__all__ = ["from_dit_transformer", "from_pixart_transformer"]

_ACTIVATIONS = {
    "gelu": Activation.GELU,
    "gelu-approximate": Activation.GELU_TANH,
    "swiglu": Activation.SWIGLU,
}


def _unsupported(
    cls: str, field: str, value: object, why: str, *, target: str = "DiT"
) -> ValueError:
    return ValueError(f"{cls}: config {field}={value!r} cannot be represented by {target}: {why}")


def _config(model: Any) -> dict[str, Any]:
    return dict(model.config)


def _common(
    cls: str, cfg: Mapping[str, Any], norm_type: str, *, target: str = "DiT"
) -> dict[str, Any]:
    """The config fields the diffusers DiT-style classes set alike (DiTConfig's names, which
    ``target``'s config shares)."""
    if cfg.get("norm_type") != norm_type:
        raise _unsupported(
            cls, "norm_type", cfg.get("norm_type"), f"expected {norm_type!r}", target=target
        )
    if cfg.get("norm_elementwise_affine", False):
        raise _unsupported(
            cls,
            "norm_elementwise_affine",
            True,
            f"{target}'s adaLN LayerNorms have no affine weights (the modulation is their affine)",
            target=target,
        )
    act = cfg.get("activation_fn", "gelu-approximate")
    if act not in _ACTIVATIONS:
        raise _unsupported(
            cls, "activation_fn", act, f"expected one of {sorted(_ACTIVATIONS)}", target=target
        )
    in_ch = cfg["in_channels"]
    out_ch = cfg.get("out_channels")
    if out_ch not in (None, in_ch, 2 * in_ch):
        raise _unsupported(
            cls,
            "out_channels",
            out_ch,
            f"expected None, in_channels={in_ch} or 2 * in_channels={2 * in_ch} (learned sigma)",
            target=target,
        )
    sample = cfg["sample_size"]
    if isinstance(sample, list | tuple):
        sample = tuple(sample)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return dict(
        sample_size=sample,
        patch_size=cfg["patch_size"],
        in_channels=in_ch,
        learned_sigma=out_ch == 2 * in_ch,
        dim=heads * head_dim,
        n_layers=cfg["num_layers"],
        n_heads=heads,
        head_dim=head_dim,
        mlp_hidden_dim=4 * heads * head_dim,  # diffusers' FeedForward, mult=4
        mlp_activation=_ACTIVATIONS[act],
        qkv_bias=bool(cfg.get("attention_bias", True)),
        out_bias=True,
        pos_embed=DiTPosEmbed.SINCOS,
        timestep_channels=256,
        timestep_flip_sin_to_cos=True,
    )


class _Mapper:
    """Collects the vats state dict from a diffusers one and tracks what was read."""

    def __init__(self, cls: str, source: Mapping[str, Tensor]) -> None:
        self.cls, self.source = cls, dict(source)
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor:
        if key not in self.source:
            raise ValueError(f"{self.cls}: state dict has no {key!r}, which its config implies")
        self.used.add(key)
        return self.source[key].detach()

    def linear(self, src: str, dst: str) -> None:
        self.out[f"{dst}.weight"] = self.get(f"{src}.weight")
        if f"{src}.bias" in self.source:
            self.out[f"{dst}.bias"] = self.get(f"{src}.bias")

    def stacked(self, srcs: list[str], dst: str, *, bias: bool) -> None:
        """Stack several linears' rows into one (q, k, v -> qkv_proj)."""
        self.out[f"{dst}.weight"] = torch.cat([self.get(f"{s}.weight") for s in srcs])
        if bias:
            self.out[f"{dst}.bias"] = torch.cat([self.get(f"{s}.bias") for s in srcs])

    def mlp(self, src: str, dst: str, activation: Activation) -> None:
        """diffusers' FeedForward ``net.0.proj`` / ``net.2`` onto vats' MLP."""
        if activation is Activation.SWIGLU:
            # diffusers' SwiGLU: proj -> (hidden, gate) halves, hidden * silu(gate).
            up_w, gate_w = self.get(f"{src}.net.0.proj.weight").chunk(2)
            up_b, gate_b = self.get(f"{src}.net.0.proj.bias").chunk(2)
            self.out.update(
                {
                    f"{dst}.up_proj.weight": up_w,
                    f"{dst}.up_proj.bias": up_b,
                    f"{dst}.gate_proj.weight": gate_w,
                    f"{dst}.gate_proj.bias": gate_b,
                }
            )
            self.linear(f"{src}.net.2", f"{dst}.down_proj")
        else:
            self.linear(f"{src}.net.0.proj", f"{dst}.fc1")
            self.linear(f"{src}.net.2", f"{dst}.fc2")

    def attention(self, src: str, dst: str, *, cross: bool, bias: bool) -> None:
        if cross:
            self.linear(f"{src}.to_q", f"{dst}.q_proj")
            self.stacked([f"{src}.to_k", f"{src}.to_v"], f"{dst}.kv_proj", bias=bias)
        else:
            self.stacked(
                [f"{src}.to_q", f"{src}.to_k", f"{src}.to_v"], f"{dst}.qkv_proj", bias=bias
            )
        self.linear(f"{src}.to_out.0", f"{dst}.o_proj")

    def build(self, config: Any, model_class: type[nn.Module] = DiT) -> Any:
        """The ``model_class(config)`` (a DiT unless given) with the collected weights, in
        eval mode; every source tensor must have been read."""
        name = model_class.__name__
        left = sorted(set(self.source) - self.used)
        if left:
            shown = ", ".join(left[:5]) + (
                f" ... and {len(left) - 5} more" if len(left) > 5 else ""
            )
            raise ValueError(f"{self.cls}: weights {name} cannot represent: {shown}")
        model = model_class(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.out))
        bad = [
            f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in self.out.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if missing or bad:
            raise ValueError(
                f"{self.cls}: weights do not fit the {name} built from its config: missing "
                f"{missing[:5]}, shape mismatches {bad[:5]}"
            )
        dtype = next(iter(self.out.values())).dtype
        model.to(dtype).load_state_dict(self.out, strict=True)
        return model.eval()


def from_dit_transformer(model: Any) -> DiT:
    """The :class:`DiT` equal to a diffusers ``DiTTransformer2DModel`` (class-conditional
    DiT, adaLN-Zero), with its weights, in eval mode.

    Args:
        model: a ``DiTTransformer2DModel`` (read through ``.config`` and ``.state_dict()``).

    Raises:
        ValueError: a config field DiT cannot represent (named), or blocks whose copies of
            the timestep / class embedders differ.
    """
    cls = "DiTTransformer2DModel"
    cfg = _config(model)
    fields = _common(cls, cfg, "ada_norm_zero")
    k = cfg.get("num_embeds_ada_norm")
    if k is None or k < 1:
        raise _unsupported(cls, "num_embeds_ada_norm", k, "expected the number of classes >= 1")
    config = DiTConfig(
        **fields,
        adaln=AdaLNMode.ZERO,
        num_classes=k,
        timestep_freq_shift=1.0,
        norm_eps=1e-6,  # AdaLayerNormZero's own LayerNorm
        mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)),  # norm3
    )
    m = _Mapper(cls, model.state_dict())
    m.linear("pos_embed.proj", "patch_embed")
    emb = "norm1.emb"
    _check_shared_embedders(m, cfg["num_layers"], emb)
    m.linear(f"transformer_blocks.0.{emb}.timestep_embedder.linear_1", "time_embed.linear_1")
    m.linear(f"transformer_blocks.0.{emb}.timestep_embedder.linear_2", "time_embed.linear_2")
    m.out["class_embed.weight"] = m.get(
        f"transformer_blocks.0.{emb}.class_embedder.embedding_table.weight"
    )
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        m.linear(f"{src}.norm1.linear", f"{dst}.adaln")
        m.attention(f"{src}.attn1", f"{dst}.attn", cross=False, bias=config.qkv_bias)
        m.mlp(f"{src}.ff", f"{dst}.ffn", config.mlp_activation)
    m.linear("proj_out_1", "final_adaln")
    m.linear("proj_out_2", "proj_out")
    return m.build(config)


def _check_shared_embedders(m: _Mapper, n_layers: int, emb: str) -> None:
    """Every block's embedder copy equals block 0's (and is marked as read)."""
    first = f"transformer_blocks.0.{emb}."
    for key in [k for k in m.source if k.startswith(first)]:
        reference = m.get(key)
        for i in range(1, n_layers):
            other = key.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)
            if not torch.equal(m.get(other), reference):
                raise ValueError(
                    f"DiTTransformer2DModel: {other} differs from {key}: DiT has one timestep "
                    "and class embedder, as the original DiT (whose diffusers conversion "
                    "copies it into every block); per-block embedders cannot be represented"
                )


def from_pixart_transformer(model: Any) -> DiT:
    """The :class:`DiT` equal to a diffusers ``PixArtTransformer2DModel`` (text-conditioned,
    adaLN-single), with its weights, in eval mode.

    Its call maps as ``model(x, timestep, encoder_hidden_states=text,
    encoder_attention_mask=mask)`` -> ``dit(x, timestep, text_states=text,
    text_mask=mask.bool())``.

    Args:
        model: a ``PixArtTransformer2DModel`` (read through ``.config`` and ``.state_dict()``).

    Raises:
        ValueError: a config field DiT cannot represent (named).
    """
    cls = "PixArtTransformer2DModel"
    cfg = _config(model)
    fields = _common(cls, cfg, "ada_norm_single")
    sample = cfg["sample_size"]
    additional = cfg.get("use_additional_conditions")
    if additional is None:  # diffusers' default: on for the 1024² PixArt-α
        additional = sample == 128
    if additional:
        raise _unsupported(
            cls,
            "use_additional_conditions",
            cfg.get("use_additional_conditions"),
            "resolution / aspect-ratio conditioning is not supported; set it to False "
            "(None means True when sample_size == 128)",
        )
    attention_type = cfg.get("attention_type", "default")
    if attention_type not in (None, "default"):
        raise _unsupported(cls, "attention_type", attention_type, "expected 'default'")
    dim = fields["dim"]
    cross_dim, caption = cfg.get("cross_attention_dim"), cfg.get("caption_channels")
    if caption is not None and cross_dim != dim:
        raise _unsupported(
            cls,
            "cross_attention_dim",
            cross_dim,
            f"with caption_channels set, cross-attention reads the projected captions of "
            f"width num_attention_heads * attention_head_dim = {dim}",
        )
    scale = cfg.get("interpolation_scale")
    if scale is None:
        scale = max((sample if isinstance(sample, int) else sample[0]) // 64, 1)
    config = DiTConfig(
        **fields,
        adaln=AdaLNMode.SINGLE,
        timestep_freq_shift=0.0,
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        pos_interpolation_scale=float(scale),
        text_dim=caption if caption is not None else cross_dim,
        text_proj=caption is not None,
        pooled_text=False,
        cross_attn_norm=False,
    )
    m = _Mapper(cls, model.state_dict())
    m.linear("pos_embed.proj", "patch_embed")
    m.linear("adaln_single.emb.timestep_embedder.linear_1", "time_embed.linear_1")
    m.linear("adaln_single.emb.timestep_embedder.linear_2", "time_embed.linear_2")
    m.linear("adaln_single.linear", "adaln_single")
    if caption is not None:
        m.linear("caption_projection.linear_1", "text_proj.fc1")
        m.linear("caption_projection.linear_2", "text_proj.fc2")
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        m.out[f"{dst}.scale_shift_table"] = m.get(f"{src}.scale_shift_table")
        m.attention(f"{src}.attn1", f"{dst}.attn", cross=False, bias=config.qkv_bias)
        if cross_dim is not None:
            m.attention(f"{src}.attn2", f"{dst}.cross_attn", cross=True, bias=config.qkv_bias)
        m.mlp(f"{src}.ff", f"{dst}.ffn", config.mlp_activation)
    m.out["final_scale_shift_table"] = m.get("scale_shift_table")
    m.linear("proj_out", "proj_out")
    return m.build(config)
