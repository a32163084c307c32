"""Weight import from transformers: a Whisper encoder becomes an :class:`AudioEncoder`.

``from_transformers(model)`` takes an HF ``WhisperEncoder``, ``WhisperModel`` or
``WhisperForConditionalGeneration`` (their encoder), reads its config and module tree,
builds the matching :class:`~vats_audio.encoder.AudioEncoderConfig` and copies the
weights. The result computes the same function: ``forward_features`` equals HF's
``last_hidden_state`` to float rounding on the 2·``max_source_positions`` frames HF takes,
and also runs any shorter input (or a padded batch of them) that HF refuses.

Mapping (HF ``WhisperEncoder`` -> vats)::

    conv1 / conv2                          -> conv1 / conv2
    embed_positions.weight                 -> embed_positions   (a buffer, copied as is)
    layers.i.self_attn_layer_norm          -> blocks.i.attn_norm
    layers.i.self_attn.q_proj/k_proj/v_proj -> blocks.i.attn.qkv_proj  (rows q | k | v; the
                                              bias is q_proj.bias | zeros | v_proj.bias,
                                              since Whisper's k_proj has none)
    layers.i.self_attn.out_proj            -> blocks.i.attn.o_proj
    layers.i.final_layer_norm              -> blocks.i.ffn_norm
    layers.i.fc1 / fc2                     -> blocks.i.ffn.fc1 / fc2
    layer_norm                             -> norm

WhisperConfig fields, and what happens to them:

* ``num_mel_bins``, ``d_model``, ``encoder_layers``, ``encoder_attention_heads``,
  ``encoder_ffn_dim``, ``max_source_positions`` -> the config's sizes.
* ``activation_function``: ``"gelu"`` (exact) and the tanh approximations
  ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` are carried; any other is refused.
* ``dropout``, ``attention_dropout``, ``activation_dropout``, ``encoder_layerdrop``:
  training-time regularizers the AudioEncoder does not have. They are identities in eval
  mode, so an eval-mode model converts whatever they are; a model in training mode with
  any of them above 0 is refused (its training forward could not be reproduced): call
  ``.eval()`` first or set them to 0.
* ``scale_embedding``: HF's Whisper encoder never applies it (only the decoder's token
  embedding does), so it is ignored. ``apply_spec_augment`` and the ``mask_*`` fields are
  SpecAugment applied by ``WhisperModel.forward`` to the input features while training,
  before the encoder: not part of the encoder's function, not carried over.
* The decoder's fields, ``vocab_size``, generation and classification fields: not the
  encoder's.

The encoder's LayerNorm eps is read off the modules (torch's 1e-5 in every Whisper).

transformers is not a dependency of vats-audio: models are recognised by class name and
only their attributes are read.

Shapes: D model width, F MLP hidden width, M mel bins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vats_audio.encoder import AudioEncoder, AudioEncoderConfig, AudioPosEmbed
from vats_core.mlp import Activation
from vats_core.norms import NormType

__all__ = ["from_transformers"]

_ENCODER_OWNERS = {
    "WhisperEncoder": (),
    "WhisperModel": ("encoder",),
    "WhisperForConditionalGeneration": ("model", "encoder"),
}
_ACTIVATIONS = {
    "gelu": Activation.GELU,
    "gelu_new": Activation.GELU_TANH,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
}
_REGULARIZERS = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop")


def _unsupported(field: str, why: str) -> ValueError:
    return ValueError(
        f"from_transformers: WhisperConfig.{field} cannot be represented by AudioEncoder: {why}"
    )


def _encoder_of(model: nn.Module) -> nn.Module:
    """The ``WhisperEncoder`` inside ``model`` (recognised by class name and module)."""
    cls = type(model)
    path = _ENCODER_OWNERS.get(cls.__name__)
    if path is None or not cls.__module__.startswith("transformers."):
        raise ValueError(
            f"from_transformers expects a transformers WhisperEncoder, WhisperModel or "
            f"WhisperForConditionalGeneration, got {cls.__module__}.{cls.__name__}"
        )
    encoder = model
    for name in path:
        encoder = getattr(encoder, name)
    if type(encoder).__name__ != "WhisperEncoder":
        raise ValueError(
            f"from_transformers: {cls.__name__}.{'.'.join(path)} is a "
            f"{type(encoder).__name__}, expected a WhisperEncoder"
        )
    return encoder


def _check_conv(conv: nn.Module, name: str, stride: int) -> None:
    ok = (
        type(conv) is nn.Conv1d
        and tuple(conv.kernel_size) == (3,)
        and tuple(conv.stride) == (stride,)
        and tuple(conv.padding) == (1,)
        and tuple(conv.dilation) == (1,)
        and conv.groups == 1
        and conv.bias is not None
    )
    if not ok:
        raise ValueError(
            f"from_transformers: encoder.{name} is not Whisper's Conv1d(kernel 3, stride "
            f"{stride}, padding 1, with bias): got {conv}"
        )


def _norm_eps(norms: list[tuple[str, nn.Module]], dim: int) -> float:
    """The one eps every encoder LayerNorm shares (else ValueError naming the odd one)."""
    eps = None
    for where, norm in norms:
        if (
            type(norm) is not nn.LayerNorm
            or tuple(norm.normalized_shape) != (dim,)
            or norm.weight is None
            or norm.bias is None
        ):
            raise ValueError(
                f"from_transformers: encoder.{where} is not an affine LayerNorm over D={dim}: "
                f"got {norm}"
            )
        if eps is None:
            eps = float(norm.eps)
        elif float(norm.eps) != eps:
            raise ValueError(
                f"from_transformers: encoder.{where} has eps={norm.eps}, the other LayerNorms "
                f"{eps}; AudioEncoder has one norm eps"
            )
    assert eps is not None
    return eps


def _config(encoder: nn.Module) -> AudioEncoderConfig:
    """The AudioEncoderConfig of ``encoder``; refuses what it cannot represent."""
    hf: Any = encoder.config
    act = hf.activation_function
    if act not in _ACTIVATIONS:
        raise _unsupported(
            f"activation_function={act!r}",
            f"the MLP activation must be one of {sorted(_ACTIVATIONS)}",
        )
    if encoder.training:
        for field in _REGULARIZERS:
            if getattr(hf, field) > 0:
                raise _unsupported(
                    f"{field}={getattr(hf, field)}",
                    "AudioEncoder has no such regularizer, so the model's training forward "
                    "cannot be reproduced; convert the model in eval mode (model.eval()) or set "
                    f"{field}=0",
                )
    d = hf.d_model
    _check_conv(encoder.conv1, "conv1", stride=1)
    _check_conv(encoder.conv2, "conv2", stride=2)
    table = encoder.embed_positions.weight
    if tuple(table.shape) != (hf.max_source_positions, d):
        raise _unsupported(
            f"max_source_positions={hf.max_source_positions}",
            f"encoder.embed_positions holds {tuple(table.shape)} rows, expected "
            f"({hf.max_source_positions}, {d})",
        )
    norms = [("layer_norm", encoder.layer_norm)]
    for i, layer in enumerate(encoder.layers):
        norms += [
            (f"layers.{i}.self_attn_layer_norm", layer.self_attn_layer_norm),
            (f"layers.{i}.final_layer_norm", layer.final_layer_norm),
        ]
        attn = layer.self_attn
        if attn.k_proj.bias is not None or any(
            p.bias is None for p in (attn.q_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2)
        ):
            raise ValueError(
                f"from_transformers: encoder.layers.{i} does not have Whisper's biases (q, v, "
                "out, fc1, fc2 with bias; k without)"
            )
    return AudioEncoderConfig(
        n_mels=hf.num_mel_bins,
        dim=d,
        n_layers=hf.encoder_layers,
        n_heads=hf.encoder_attention_heads,
        mlp_hidden_dim=hf.encoder_ffn_dim,
        mlp_activation=_ACTIVATIONS[act],
        mlp_bias=True,
        norm=NormType.LAYERNORM,
        norm_eps=_norm_eps(norms, d),
        qkv_bias=True,
        out_bias=True,
        pos_embed=AudioPosEmbed.SINUSOIDAL,
        max_positions=hf.max_source_positions,
        num_classes=0,
        init_std=hf.init_std,
    )


def _state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """The AudioEncoder state dict holding ``encoder``'s weights, as fresh copies."""

    def take(t: Tensor) -> Tensor:
        return t.detach().clone()

    sd = {
        f"{conv}.{name}": take(getattr(encoder, conv).get_parameter(name))
        for conv in ("conv1", "conv2")
        for name in ("weight", "bias")
    }
    sd["embed_positions"] = take(encoder.embed_positions.weight)
    for i, layer in enumerate(encoder.layers):
        dst, attn = f"blocks.{i}", layer.self_attn
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        # Rows [q heads | k heads | v heads], as vats' fused projection stores them.
        sd[f"{dst}.attn.qkv_proj.weight"] = torch.cat([q.weight, k.weight, v.weight]).detach()
        k_bias = torch.zeros_like(q.bias)  # Whisper's k_proj has no bias: zeros are exact
        sd[f"{dst}.attn.qkv_proj.bias"] = torch.cat([q.bias, k_bias, v.bias]).detach()
        pairs = (
            ("attn.o_proj", attn.out_proj),
            ("attn_norm", layer.self_attn_layer_norm),
            ("ffn_norm", layer.final_layer_norm),
            ("ffn.fc1", layer.fc1),
            ("ffn.fc2", layer.fc2),
        )
        for name, module in pairs:
            sd[f"{dst}.{name}.weight"] = take(module.weight)
            sd[f"{dst}.{name}.bias"] = take(module.bias)
    sd["norm.weight"] = take(encoder.layer_norm.weight)
    sd["norm.bias"] = take(encoder.layer_norm.bias)
    return sd


def from_transformers(model: nn.Module) -> AudioEncoder:
    """Convert a transformers Whisper encoder into an :class:`AudioEncoder` computing the
    same function.

    Args:
        model: a ``WhisperEncoder``, or a ``WhisperModel`` / ``WhisperForConditionalGeneration``
            whose encoder is taken (e.g. from ``WhisperModel.from_pretrained(...)``), on any
            device and dtype. It is only read.

    Returns:
        An AudioEncoder (no head) with copies of the weights, on the model's device and
        dtype and in the encoder's train / eval mode. ``forward_features`` equals HF's
        ``last_hidden_state`` to float rounding.

    Raises:
        ValueError: not one of those classes, or a config field the AudioEncoder cannot
            represent (named in the message; see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"from_transformers expects a Whisper model, got {type(model).__name__}")
    encoder = _encoder_of(model)
    config = _config(encoder)
    state = _state_dict(encoder)
    with torch.device("meta"):
        ours = AudioEncoder(config)  # shapes only: the copies become its tensors
    ours.load_state_dict(state, strict=True, assign=True)  # names and shapes agree one to one
    return ours.train(encoder.training)
