"""Weight import from timm: a ``timm`` ``VisionTransformer`` becomes a :class:`ViT2D`.

``from_timm(model)`` reads the architecture off the timm module tree (not off a config
dict, so a model built any way, loaded from any checkpoint, converts), builds the
matching :class:`~vats_vision.vit2d.ViT2DConfig` and copies the weights. The result
computes the same function: ``forward_features``, ``forward_head``, ``forward`` and
``forward_intermediates`` equal timm's to float rounding, at the default size (square or
not) and, for ``dynamic_img_size`` models, at any size (both resample the learned table
with antialiased bicubic).

Mapping (timm -> vats)::

    patch_embed.proj            -> patch_embed.proj
    cls_token / reg_token       -> cls_token / reg_tokens
    pos_embed                   -> pos_embed   (pos_embed_prefix = not no_embed_class)
    norm_pre                    -> norm_pre    (pre_norm, CLIP's ln_pre)
    blocks.i.norm1 / norm2      -> blocks.i.attn_norm / ffn_norm
    blocks.i.attn.qkv           -> blocks.i.attn.qkv_proj  (the same fused q, k, v rows)
    blocks.i.attn.q_norm/k_norm -> blocks.i.attn.q_norm/k_norm (RmsNorm only)
    blocks.i.attn.proj (* ls1)  -> blocks.i.attn.o_proj
    blocks.i.mlp.fc1 / fc2 (* ls2) -> blocks.i.ffn.fc1 / fc2
    norm / fc_norm / head       -> norm / fc_norm / head

Layer scale (timm ``init_values``, DINOv2 / DeiT-III) multiplies a branch's output by a
per-channel ``gamma``; it is folded into the branch's last linear layer
(``W' = diag(gamma) W``, ``b' = gamma * b``), which is the same function. The imported
model then trains without the separate ``gamma`` parameter.

Dropout, attention dropout, drop-path and patch dropout are identities in eval mode and
are not carried over (ViT2D has none of them); parity holds in eval mode.

Anything else timm can build but ViT2D cannot compute raises a ValueError naming the
timm option: other block / attention / MLP classes (``block_fn``, ``attn_layer``,
``mlp_layer``), activations other than exact or tanh GELU (e.g. CLIP's QuickGELU),
LayerNorm QK-norm, ``scale_attn_norm`` / ``scale_mlp_norm``, gated attention,
``embed_norm_layer``, attention pooling (``global_pool='map'`` / ``'prr'``), ``'max'`` /
``'avgmax'`` pooling, ``pool_include_prefix``, ``final_norm=False``, norms that differ in
kind or eps between layers, non-square patches, an ``img_size`` whose sides are not
multiples of the patch size, and ``VisionTransformer`` subclasses (distilled DeiT, ...).

Rectangular models (``img_size=(h, w)``; timm keeps ``patch_embed.img_size`` and
``grid_size`` as pairs) become a ViT2D with ``image_size=(h, w)``: its learned table has the
same ``(h / p, w / p)`` grid, and ``forward_intermediates`` reshapes to that grid.

timm is not a dependency of vats-vision: it is imported here only to recognise its
classes, when a timm model is passed in.

Shapes: D model width, A = heads · head dim (attention width), F MLP hidden width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vats_core.mlp import Activation
from vats_core.norms import NormType
from vats_vision.layers import Pool, PosEmbed
from vats_vision.vit2d import ViT2D, ViT2DConfig

__all__ = ["from_timm"]

_POOLS = {"token": Pool.TOKEN, "avg": Pool.AVG, "": Pool.NONE}


def _timm() -> Any:
    """timm's ``vision_transformer`` module and the layer classes we recognise."""
    try:
        from timm import layers
        from timm.models import vision_transformer
    except ImportError as e:  # pragma: no cover - a timm model cannot exist without timm
        raise ImportError("from_timm needs timm installed (pip install timm)") from e
    return vision_transformer, layers


def _unsupported(option: str, why: str) -> ValueError:
    return ValueError(f"from_timm: timm option {option} cannot be represented by ViT2D: {why}")


class _Norm:
    """One timm norm layer read as (kind, eps, weight, bias); bias None for RMS norms."""

    def __init__(self, module: nn.Module, where: str, dim: int) -> None:
        _, layers = _timm()
        if type(module) in (nn.LayerNorm, layers.LayerNorm):
            self.kind, bias = NormType.LAYERNORM, module.bias
        elif type(module) in (layers.RmsNorm, nn.RMSNorm):
            self.kind, bias = NormType.RMSNORM, None
        else:
            raise _unsupported(
                f"norm_layer ({where} is {type(module).__name__})",
                "only LayerNorm and RmsNorm are supported",
            )
        if tuple(module.normalized_shape) != (dim,) or module.eps is None:
            raise _unsupported(
                f"norm_layer ({where})",
                f"expected a norm over the last axis of width {dim} with an explicit eps, got "
                f"normalized_shape={tuple(module.normalized_shape)}, eps={module.eps}",
            )
        self.eps = float(module.eps)
        # Norms without affine parameters are the affine ones at weight 1, bias 0.
        w = module.weight
        self.weight = w.detach() if w is not None else torch.ones(dim)
        if self.kind is NormType.LAYERNORM:
            self.bias = bias.detach() if bias is not None else torch.zeros(dim)

    def state(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}.weight": self.weight}
        if self.kind is NormType.LAYERNORM:
            out[f"{prefix}.bias"] = self.bias
        return out


def _gelu(act: nn.Module) -> Activation:
    """The vats activation computing timm's ``act_layer``."""
    _, layers = _timm()
    if type(act) is nn.GELU:
        if act.approximate == "tanh":
            return Activation.GELU_TANH
        return Activation.GELU
    if type(act) is layers.activations.GELU:
        return Activation.GELU
    if type(act) is layers.activations.GELUTanh:
        return Activation.GELU_TANH
    raise _unsupported(
        f"act_layer={type(act).__name__}", "only the exact (erf) and tanh GELU are supported"
    )


def _linear(module: nn.Module, where: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise _unsupported(f"{where} ({type(module).__name__})", "expected an nn.Linear")
    return module


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or type(module) is nn.Identity


def _layer_scale(module: nn.Module, where: str, dim: int) -> Tensor | None:
    """``gamma`` of a timm LayerScale (None for Identity)."""
    _, layers = _timm()
    if _is_identity(module):
        return None
    if type(module) is not layers.LayerScale or tuple(module.gamma.shape) != (dim,):
        raise _unsupported(
            f"init_values ({where} is {type(module).__name__})",
            "only timm's per-channel LayerScale can be folded into the weights",
        )
    return module.gamma.detach()


def _scaled(linear: nn.Linear, gamma: Tensor | None) -> dict[str, Tensor]:
    """A linear layer's weight / bias with a following per-channel scale folded in."""
    w = linear.weight.detach()  # (out, in)
    b = linear.bias.detach() if linear.bias is not None else None
    if gamma is not None:
        w = w * gamma[:, None]
        b = b * gamma if b is not None else None
    out = {"weight": w}
    if b is not None:
        out["bias"] = b
    return out


def _check_model(model: nn.Module) -> None:
    """Refuse model-level options ViT2D cannot compute, naming each."""
    vt, _ = _timm()
    if type(model) is not vt.VisionTransformer:
        raise _unsupported(
            f"model class {type(model).__name__}",
            "from_timm converts timm.models.vision_transformer.VisionTransformer itself, not "
            "subclasses (extra tokens or heads) or other families",
        )
    if getattr(model, "attn_pool", None) is not None:
        raise _unsupported(
            f"global_pool={model.global_pool!r}", "attention pooling heads are not supported"
        )
    if model.global_pool not in _POOLS:
        raise _unsupported(
            f"global_pool={model.global_pool!r}", f"expected one of {sorted(_POOLS)}"
        )
    if model.pool_include_prefix and model.global_pool == "avg" and model.num_prefix_tokens:
        raise _unsupported(
            "pool_include_prefix=True", "ViT2D's avg pooling leaves the prefix tokens out"
        )
    if _is_identity(model.norm) and _is_identity(model.fc_norm):
        raise _unsupported("final_norm=False", "ViT2D always has a final norm")
    pe = model.patch_embed
    if type(pe) is not _timm()[1].PatchEmbed:
        raise _unsupported(
            f"embed_layer={type(pe).__name__}", "only timm's PatchEmbed (a strided conv)"
        )
    if not _is_identity(pe.norm):
        raise _unsupported("embed_norm_layer", "ViT2D has no norm inside the patch embedding")
    conv = pe.proj
    p = conv.kernel_size
    if (
        type(conv) is not nn.Conv2d
        or p[0] != p[1]
        or tuple(conv.stride) != tuple(p)
        or tuple(conv.padding) != (0, 0)
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
    ):
        raise _unsupported(
            f"patch_size={tuple(p)}",
            "expected a square, non-overlapping, unpadded patch conv (kernel = stride)",
        )
    if pe.img_size is None:
        raise _unsupported("img_size=None", "ViT2D needs a default input size")
    h, w = pe.img_size
    if h % p[0] or w % p[0]:
        raise _unsupported(
            f"img_size={(h, w)}",
            f"both sides must be multiples of patch_size={p[0]} (timm's conv drops the "
            "remainder rows and columns; ViT2D refuses or pads them)",
        )


def _blocks_config(model: nn.Module) -> dict[str, Any]:
    """Block-level ViT2DConfig fields, identical across blocks (else ValueError)."""
    vt, layers = _timm()
    d = model.embed_dim
    seen: dict[str, Any] | None = None
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if type(blk) is not vt.Block:
            raise _unsupported(
                f"block_fn={type(blk).__name__}", "only timm's pre-norm Block is supported"
            )
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not layers.Attention:
            raise _unsupported(f"attn_layer={type(attn).__name__}", "only timm's Attention")
        if not _is_identity(attn.norm):
            raise _unsupported("scale_attn_norm=True", "no norm before the output projection")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported("gated attention", "no sigmoid gate on the attention output")
        qk_norm = not _is_identity(attn.q_norm)
        if qk_norm:
            q_norm = _Norm(attn.q_norm, f"{where}.attn.q_norm", attn.head_dim)
            k_norm = _Norm(attn.k_norm, f"{where}.attn.k_norm", attn.head_dim)
            if q_norm.kind is not NormType.RMSNORM or {q_norm.eps, k_norm.eps} != {1e-6}:
                raise _unsupported(
                    f"qk_norm=True with {type(attn.q_norm).__name__}(eps={q_norm.eps})",
                    "ViT2D's QK-norm is RMSNorm with eps 1e-6",
                )
        if type(mlp) is not layers.Mlp:
            raise _unsupported(f"mlp_layer={type(mlp).__name__}", "only timm's GELU Mlp")
        if not _is_identity(mlp.norm):
            raise _unsupported("scale_mlp_norm=True", "no norm inside the MLP")
        fc1, fc2 = _linear(mlp.fc1, f"{where}.mlp.fc1"), _linear(mlp.fc2, f"{where}.mlp.fc2")
        if (fc1.bias is None) != (fc2.bias is None):
            raise _unsupported("Mlp bias=(a, b) with a != b", "MLP biases are all or none")
        qkv, proj = _linear(attn.qkv, f"{where}.attn.qkv"), _linear(attn.proj, f"{where}.attn.proj")
        norm1, norm2 = _Norm(blk.norm1, f"{where}.norm1", d), _Norm(blk.norm2, f"{where}.norm2", d)
        fields = {
            "n_heads": attn.num_heads,
            "head_dim": attn.head_dim,
            "qkv_bias": qkv.bias is not None,
            "out_bias": proj.bias is not None,
            "qk_norm": qk_norm,
            "mlp_hidden_dim": fc1.out_features,
            "mlp_activation": _gelu(mlp.act),
            "mlp_bias": fc1.bias is not None,
            "norm": (norm1.kind, norm2.kind),
            "norm_eps": (norm1.eps, norm2.eps),
        }
        if attn.scale != attn.head_dim**-0.5:
            raise _unsupported(f"attention scale {attn.scale}", "expected head_dim ** -0.5")
        if seen is not None and fields != seen:
            diff = sorted(k for k in fields if fields[k] != seen[k])
            raise _unsupported(
                f"per-block settings ({', '.join(diff)} differ at {where})",
                "every ViT2D block has the same settings",
            )
        seen = fields
    if seen is None:
        raise _unsupported("depth=0", "ViT2D needs at least one block")
    return seen


def _config(model: nn.Module) -> ViT2DConfig:
    """The ViT2DConfig computing ``model``'s function (after :func:`_check_model`)."""
    blocks = _blocks_config(model)
    d = model.embed_dim
    norms = list(blocks.pop("norm"))
    epss = list(blocks.pop("norm_eps"))
    final = model.fc_norm if _is_identity(model.norm) else model.norm
    extra = [("norm" if not _is_identity(model.norm) else "fc_norm", final)]
    if not _is_identity(model.norm_pre):
        extra.append(("norm_pre", model.norm_pre))
    for name, module in extra:
        n = _Norm(module, name, d)
        norms.append(n.kind)
        epss.append(n.eps)
    kinds = set(norms)
    if len(kinds) != 1 or len(set(epss)) != 1:
        raise _unsupported(
            "norm_layer (different norm kinds or eps between layers: "
            f"{sorted(str(k) for k in kinds)}, eps {sorted(set(epss))})",
            "ViT2D uses one norm kind and eps everywhere",
        )
    pe = model.patch_embed
    p = pe.proj.kernel_size[0]
    head = model.head
    num_classes = 0 if _is_identity(head) else _linear(head, "head").out_features
    return ViT2DConfig(
        image_size=tuple(pe.img_size),  # (H, W); stored as an int when square
        patch_size=p,
        in_channels=pe.proj.in_channels,
        dim=d,
        n_layers=len(model.blocks),
        n_kv_heads=None,
        norm=kinds.pop(),
        norm_eps=epss[0],
        class_token=model.cls_token is not None,
        n_register_tokens=model.num_reg_tokens,
        pos_embed=PosEmbed.NONE if model.pos_embed is None else PosEmbed.LEARNED,
        pos_embed_prefix=not model.no_embed_class,
        pool=_POOLS[model.global_pool],
        fc_norm=_is_identity(model.norm),
        num_classes=num_classes,
        pad=bool(pe.dynamic_img_pad),
        patch_bias=pe.proj.bias is not None,
        pre_norm=not _is_identity(model.norm_pre),
        **blocks,
    )


def _state_dict(model: nn.Module, config: ViT2DConfig) -> dict[str, Tensor]:
    """ViT2D's state dict holding ``model``'s weights (names in the module docstring)."""
    d = config.dim
    sd: dict[str, Tensor] = {}
    for name, t in model.patch_embed.proj.named_parameters():
        sd[f"patch_embed.proj.{name}"] = t.detach()
    if model.cls_token is not None:
        sd["cls_token"] = model.cls_token.detach()
    if model.reg_token is not None:
        sd["reg_tokens"] = model.reg_token.detach()
    if model.pos_embed is not None:
        sd["pos_embed"] = model.pos_embed.detach()
    if config.pre_norm:
        sd |= _Norm(model.norm_pre, "norm_pre", d).state("norm_pre")
    for i, blk in enumerate(model.blocks):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        attn, mlp = blk.attn, blk.mlp
        sd |= _Norm(blk.norm1, f"{src}.norm1", d).state(f"{dst}.attn_norm")
        sd |= _Norm(blk.norm2, f"{src}.norm2", d).state(f"{dst}.ffn_norm")
        # timm's fused qkv rows are [q heads | k heads | v heads], as vats stores them.
        for name, t in attn.qkv.named_parameters():
            sd[f"{dst}.attn.qkv_proj.{name}"] = t.detach()
        if config.qk_norm:
            sd[f"{dst}.attn.q_norm.weight"] = attn.q_norm.weight.detach()
            sd[f"{dst}.attn.k_norm.weight"] = attn.k_norm.weight.detach()
        ls1 = _layer_scale(blk.ls1, f"{src}.ls1", d)
        ls2 = _layer_scale(blk.ls2, f"{src}.ls2", d)
        for name, t in _scaled(attn.proj, ls1).items():
            sd[f"{dst}.attn.o_proj.{name}"] = t
        for name, t in mlp.fc1.named_parameters():
            sd[f"{dst}.ffn.fc1.{name}"] = t.detach()
        for name, t in _scaled(mlp.fc2, ls2).items():
            sd[f"{dst}.ffn.fc2.{name}"] = t
    final = "fc_norm" if config.fc_norm else "norm"
    sd |= _Norm(getattr(model, final), final, d).state(final)
    if config.num_classes:
        for name, t in model.head.named_parameters():
            sd[f"head.{name}"] = t.detach()
    return sd


def from_timm(model: nn.Module) -> ViT2D:
    """Convert a timm ``VisionTransformer`` into a :class:`ViT2D` computing the same function.

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (e.g. from
            ``timm.create_model("vit_small_patch16_224", pretrained=...)``), on any device
            and dtype. It is only read.

    Returns:
        A ViT2D with copies of the weights, on the timm model's device and dtype and in
        its train / eval mode. In eval mode ``forward_features``, ``forward_head`` and
        ``forward`` equal timm's to float rounding.

    Raises:
        ValueError: the timm model uses an option ViT2D cannot represent (named in the
            message; see the module docstring for the list).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    _check_model(model)
    config = _config(model)
    ref = next(model.parameters())
    vit = ViT2D(config)
    state = {
        k: v.to(dtype=torch.float32, device="cpu") for k, v in _state_dict(model, config).items()
    }
    vit.load_state_dict(state, strict=True)  # names and shapes must agree one to one
    return vit.to(device=ref.device, dtype=ref.dtype).train(model.training)
