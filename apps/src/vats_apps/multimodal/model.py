"""The multimodal language model: image, video and audio encoders feeding the MoE LM.

LLaVA (Liu et al. 2023, "Visual Instruction Tuning", arXiv:2304.08485): an encoder's
patch features are mapped by a small MLP (the *projector*) into the LM's embedding space
and take the place of placeholder tokens in the prompt. For audio, Ultravox's recipe:
``k`` consecutive encoder frames are stacked into one vector before the MLP, so a clip
costs ``k`` times fewer LM positions::

    ids      <s> <image> x N  "What colour is the shape?\\n"          (N = the image's tokens)
    image    (C, H, W) -> ViT2D.forward_features -> (n, D_img) -> Projector -> (N, D_lm)
    embeds   = embed_tokens(ids); embeds[ids == <image>] = the projected features, in order
    logits   = MoELanguageModel(inputs_embeds=embeds, attention_mask=..., ...)

Every medium has one placeholder id (``<image>``, ``<video>``, ``<audio>``: the vats
tokenizer's ids 4, 5, 6). A prompt holds each medium's placeholder repeated exactly as
many times as that medium yields tokens (:func:`vats_apps.multimodal.inputs.build_inputs`
expands one written placeholder into that run); :meth:`MultimodalLM.embed` checks the
counts before any encoder runs and raises a ``ValueError`` naming the medium, the
placeholders found and the features given (the silent misalignment of LLaVA-style models
when they differ). Media are taken in order: the first image fills the first run of
``<image>`` positions, row by row.

Token counts per medium (patch tokens only; class and register tokens are dropped):

* image ``(C, H, W)``: ``ceil(gh·gw / k)`` with ``gh = H / p``, ``gw = W / p``;
* video ``(C, T, H, W)``: ``ceil(T/pT · gh·gw / k)``, frame-major (each tubelet's
  patches row-major, then the next tubelet); then, with ``video_image_frames = f``, the
  image tokens of ``f`` evenly spaced frames (:func:`frame_indices`), each as an image;
* audio ``(S,)`` samples: ``F = S // hop`` log-mel frames, ``ceil(F / 2)`` encoder frames
  (the stride-2 conv), then ``ceil(· / k)`` tokens.

Generation goes through :func:`vats_text.generation.generate` with the embeddings as the
prefill's input (``inputs_embeds``): the encoders run once per request, the decode steps
read the KV caches (rolling caches for sliding-window layers), as for text.

A frozen encoder (no parameter requiring grad) runs under ``torch.no_grad``: no autograd
graph is kept for it during training.

Shapes: B batch rows, T tokens, N media items, n encoder tokens of one item, D_enc encoder
width, D_lm the LM width, k the projector's stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import torch
from safetensors import safe_open
from torch import Tensor, nn

from vats_audio import AudioEncoder, AudioEncoderConfig, LogMel, LogMelConfig
from vats_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, load_config_json
from vats_core.config import Config, check, check_positive
from vats_core.mlp import Activation, MLPConfig, build_mlp
from vats_core.norms import RMSNorm
from vats_text.generation import TextTokenizer, generate, stream
from vats_text.model import IGNORE_INDEX, LMOutput, MoELanguageModel, MoELMConfig
from vats_text.tokenizer import AUDIO_ID, IMAGE_ID, VIDEO_ID
from vats_vision.vit2d import ViT2D, ViT2DConfig
from vats_vision.vit3d import ViT3D, ViT3DConfig

__all__ = [
    "KINDS",
    "Media",
    "MultimodalConfig",
    "MultimodalLM",
    "Projector",
    "ProjectorConfig",
]

KINDS = ("image", "video", "audio")
_PLURAL = {"image": "images", "video": "videos", "audio": "audios"}
# Images (C, H, W), video clips (C, T, H, W), audio clips (S,) waveforms: a list of items,
# or one stacked tensor with a leading N axis.
Media = Tensor | Sequence[Tensor]


# ----------------------------------------------------------------------------- projector


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectorConfig(Config):
    """An encoder-to-LM projector: stack ``k`` features, optional RMSNorm, a two-layer MLP."""

    in_dim: int  # D_enc: the encoder's feature width
    out_dim: int  # D_lm: the LM's embedding width
    hidden_dim: int | None = None  # MLP hidden width; None = out_dim (LLaVA)
    stack: int = 1  # k consecutive features -> one token (Ultravox stacks 8 audio frames)
    norm: bool = False  # RMSNorm over the stacked vector first (Ultravox)
    activation: Activation = Activation.GELU  # LLaVA: GELU; Ultravox: SwiGLU
    # Prepend one token made from the mean of the item's (stacked) features: the pooled
    # vector an encoder's classifier reads, handed to the LM whole.
    mean_token: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "in_dim", "out_dim", "hidden_dim", "stack")

    @property
    def mlp(self) -> MLPConfig:
        """The vats-core MLP: ``in_dim · stack -> hidden -> out_dim``, with biases."""
        return MLPConfig(
            dim=self.in_dim * self.stack,
            hidden_dim=self.out_dim if self.hidden_dim is None else self.hidden_dim,
            out_dim=self.out_dim,
            activation=self.activation,
            bias=True,
        )

    def output_length(self, n: int) -> int:
        """Tokens out for ``n`` features in: ``ceil(n / stack)`` (+ 1 with ``mean_token``)."""
        return -(-n // self.stack) + int(self.mean_token)


class Projector(nn.Module):
    """``(B, n, D_enc)`` features and their lengths -> ``(B, ceil(n / k), D_lm)`` and lengths
    (one more token first with ``mean_token``: the mean of the row's stacked features).

    Features past a row's length are zeroed before stacking, so a padded row's last token
    equals that of the row run alone (its missing frames are zeros there too), and the mean
    covers the row's own tokens only.
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        if not isinstance(config, ProjectorConfig):
            raise ValueError(f"config must be a ProjectorConfig, got {type(config).__name__}")
        self.config = config
        self.norm = RMSNorm(config.mlp.dim) if config.norm else None
        self.mlp = build_mlp(config.mlp)

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Project ``features`` ``(B, n, D_enc)`` with ``lengths`` ``(B,)`` real features per row
        (None = all n) -> ``((B, n', D_lm), (B,) lengths)``."""
        cfg = self.config
        if features.ndim != 3 or features.shape[-1] != cfg.in_dim:
            raise ValueError(
                f"Projector expects (B, n, {cfg.in_dim}) features, got {tuple(features.shape)}"
            )
        b, n, d = features.shape
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=features.device)
        else:
            real = torch.arange(n, device=features.device) < lengths[:, None]  # (B, n)
            features = features.masked_fill(~real[..., None], 0.0)
        k = cfg.stack
        pad = (-n) % k
        if pad:
            features = nn.functional.pad(features, (0, 0, 0, pad))
        x = features.reshape(b, (n + pad) // k, k * d)  # (B, n', k·D_enc)
        lengths = (lengths + k - 1).div(k, rounding_mode="floor")
        if cfg.mean_token:  # the real tokens' mean, first
            mean = x.sum(1, keepdim=True) / lengths[:, None, None].to(x.dtype)  # padding is 0
            x, lengths = torch.cat([mean, x], dim=1), lengths + 1
        if self.norm is not None:
            x = self.norm(x)
        return self.mlp(x), lengths


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultimodalConfig(Config):
    """The LM, and for each medium it takes an encoder with its projector (None = that
    medium is not supported). Audio also needs its log-mel front end."""

    lm: MoELMConfig
    image_encoder: ViT2DConfig | None = None
    image_projector: ProjectorConfig | None = None
    video_encoder: ViT3DConfig | None = None
    video_projector: ProjectorConfig | None = None
    audio_features: LogMelConfig | None = None
    audio_encoder: AudioEncoderConfig | None = None
    audio_projector: ProjectorConfig | None = None
    # Frames of each clip the image encoder also reads (evenly spaced, through the image
    # projector; 0 = none): their tokens follow the clip's. The video encoder carries the
    # motion, the image encoder what is moving (its shape, colour, size, background), as
    # video LMs that encode frames with their image tower do.
    video_image_frames: int = 0
    image_token_id: int = IMAGE_ID  # the vats tokenizer's <image>
    video_token_id: int = VIDEO_ID
    audio_token_id: int = AUDIO_ID

    def __post_init__(self) -> None:
        for kind in KINDS:
            encoder, projector = self.encoder(kind), self.projector(kind)
            check(
                (encoder is None) == (projector is None),
                self,
                f"{kind}_projector",
                projector,
                f"set exactly when {kind}_encoder is set",
            )
            if encoder is None or projector is None:
                continue
            check(
                projector.in_dim == encoder.dim,
                self,
                f"{kind}_projector",
                f"in_dim={projector.in_dim}",
                f"in_dim={encoder.dim} ({kind}_encoder.dim)",
            )
            check(
                projector.out_dim == self.lm.dim,
                self,
                f"{kind}_projector",
                f"out_dim={projector.out_dim}",
                f"out_dim={self.lm.dim} (lm.dim)",
            )
        self._check_audio()
        check(
            self.video_image_frames >= 0
            and (
                self.video_image_frames == 0 or None not in (self.video_encoder, self.image_encoder)
            ),
            self,
            "video_image_frames",
            self.video_image_frames,
            "an int >= 0, and 0 unless both video_encoder and image_encoder are set",
        )
        ids = [self.token_id(kind) for kind in KINDS]
        for kind, token in zip(KINDS, ids, strict=True):
            ok = 0 <= token < self.lm.vocab_size and ids.count(token) == 1
            check(
                ok,
                self,
                f"{kind}_token_id",
                token,
                f"an id in [0, lm.vocab_size={self.lm.vocab_size}) that no other medium uses",
            )

    def _check_audio(self) -> None:
        features, encoder = self.audio_features, self.audio_encoder
        check(
            (features is None) == (encoder is None),
            self,
            "audio_features",
            features,
            "set exactly when audio_encoder is set",
        )
        if features is None or encoder is None:
            return
        pairs = [
            ("n_mels", features.n_mels, encoder.n_mels),
            ("sample_rate", features.sample_rate, encoder.sample_rate),
            ("hop_length", features.hop_length, encoder.hop_length),
        ]
        for name, have, want in pairs:
            check(
                want is None or have == want,
                self,
                "audio_features",
                f"{name}={have}",
                f"{name}={want} (audio_encoder.{name})",
            )

    def encoder(self, kind: str) -> ViT2DConfig | ViT3DConfig | AudioEncoderConfig | None:
        """The encoder config of ``kind`` (``"image"``, ``"video"`` or ``"audio"``)."""
        return getattr(self, f"{_kind(kind)}_encoder")

    def projector(self, kind: str) -> ProjectorConfig | None:
        """The projector config of ``kind``."""
        return getattr(self, f"{_kind(kind)}_projector")

    def token_id(self, kind: str) -> int:
        """The placeholder id of ``kind``."""
        return getattr(self, f"{_kind(kind)}_token_id")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The media this model takes."""
        return tuple(k for k in KINDS if self.encoder(k) is not None)


def frame_indices(frames: int, k: int) -> list[int]:
    """``k`` evenly spaced frames of ``frames``: the middle of each of ``k`` equal spans
    (``k = 1``: the middle frame)."""
    return [(2 * j + 1) * frames // (2 * k) for j in range(k)]


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"media kind {kind!r} is invalid: expected one of {KINDS}")
    return kind


# ----------------------------------------------------------------------------- model


class MultimodalLM(PretrainedMixin, nn.Module):
    """The MoE LM with encoders and projectors; see the module docstring.

    Example:
        >>> model = MultimodalLM(config).eval()
        >>> batch = build_inputs(model, tokenizer, ["<image>\\nWhat shape is it?\\n"],
        ...                      images=[image])                  # vats_apps.multimodal.inputs
        >>> out = model.generate(batch.input_ids, batch.attention_mask, images=batch.images,
        ...                      max_new_tokens=8)
    """

    config_class = MultimodalConfig
    config: MultimodalConfig

    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        if not isinstance(config, MultimodalConfig):
            raise ValueError(f"config must be a MultimodalConfig, got {type(config).__name__}")
        self.config = config
        self.lm = MoELanguageModel(config.lm)
        c = config
        self.image_encoder = ViT2D(c.image_encoder) if c.image_encoder else None
        self.image_projector = Projector(c.image_projector) if c.image_projector else None
        self.video_encoder = ViT3D(c.video_encoder) if c.video_encoder else None
        self.video_projector = Projector(c.video_projector) if c.video_projector else None
        self.audio_features = LogMel(c.audio_features) if c.audio_features else None
        self.audio_encoder = AudioEncoder(c.audio_encoder) if c.audio_encoder else None
        self.audio_projector = Projector(c.audio_projector) if c.audio_projector else None

    # ------------------------------------------------------------------ media

    def media_token_counts(
        self,
        *,
        images: Media | None = None,
        videos: Media | None = None,
        audios: Media | None = None,
    ) -> dict[str, list[int]]:
        """The LM positions each medium item takes, read off the shapes (nothing runs).

        Validates every item for its encoder first (rank, channels, dtype, size).

        Returns:
            ``{kind: [tokens of item 0, item 1, ...]}`` for the kinds given.

        Raises:
            ValueError: a kind this model has no encoder for, or an item that does not fit
                its encoder.
        """
        given = {"image": images, "video": videos, "audio": audios}
        counts: dict[str, list[int]] = {}
        for kind, media in given.items():
            if media is None:
                continue
            items = self.media_items(kind, media)
            check_item = getattr(self, f"_{kind}_tokens")
            counts[kind] = [check_item(i, item) for i, item in enumerate(items)]
        return counts

    def media_items(self, kind: str, media: Media) -> list[Tensor]:
        """``media`` of ``kind`` as a list of items (a stacked tensor is split on its first
        axis); ValueError for a kind without an encoder or a value that is not tensors."""
        if self.config.encoder(kind) is None:
            raise ValueError(
                f"{_PLURAL[kind]}= given, but this model has no {kind} encoder "
                f"(it takes {list(self.config.kinds) or 'text only'})"
            )
        rank = {"image": 3, "video": 4, "audio": 1}[kind]
        if isinstance(media, Tensor):
            if media.ndim != rank + 1:
                raise ValueError(
                    f"{_PLURAL[kind]} must be a list of {_ITEM_SHAPES[kind]} tensors or one "
                    f"{_STACKED_SHAPES[kind]} tensor, got shape {tuple(media.shape)}"
                )
            return list(media.unbind(0))
        if not isinstance(media, Sequence) or not all(isinstance(m, Tensor) for m in media):
            raise ValueError(
                f"{_PLURAL[kind]} must be a tensor or a list of tensors, got {type(media).__name__}"
            )
        return list(media)

    def _check_float(self, kind: str, i: int, item: Tensor, rank: int, want: torch.dtype) -> None:
        if item.ndim != rank:
            raise ValueError(
                f"{kind} {i} must be a {_ITEM_SHAPES[kind]} tensor, got shape {tuple(item.shape)}"
            )
        if item.dtype != want:
            raise ValueError(f"{kind} {i} is {item.dtype} but the {kind} encoder takes {want}")

    def _grid(
        self,
        kind: str,
        i: int,
        cfg: ViT2DConfig | ViT3DConfig,
        h: int,
        w: int,
        encoder: str | None = None,
    ) -> int:
        p = cfg.patch_size
        if h < p or w < p or (not cfg.pad and (h % p or w % p)):
            need = "at least" if cfg.pad else "multiples of and at least"
            raise ValueError(
                f"{kind} {i} is {h}x{w} pixels; the {encoder or kind} encoder needs sides "
                f"{need} its patch size {p}"
            )
        return math.ceil(h / p) * math.ceil(w / p)

    def _image_tokens(self, i: int, item: Tensor) -> int:
        cfg = self.config.image_encoder
        assert cfg is not None and self.image_encoder is not None and self.image_projector
        self._check_float("image", i, item, 3, self.image_encoder.patch_embed.proj.weight.dtype)
        if item.shape[0] != cfg.in_channels:
            raise ValueError(
                f"image {i} has {item.shape[0]} channels; the image encoder takes {cfg.in_channels}"
            )
        n = self._grid("image", i, cfg, item.shape[1], item.shape[2])
        return self.image_projector.config.output_length(n)

    def _video_tokens(self, i: int, item: Tensor) -> int:
        cfg = self.config.video_encoder
        assert cfg is not None and self.video_encoder is not None and self.video_projector
        self._check_float("video", i, item, 4, self.video_encoder.patch_embed.proj.weight.dtype)
        c, t, h, w = item.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"video {i} has {c} channels; the video encoder takes {cfg.in_channels}"
            )
        pt = cfg.tubelet_size
        if t < pt or t % pt:
            raise ValueError(
                f"video {i} has {t} frames; the video encoder needs a multiple of its "
                f"tubelet size {pt}"
            )
        n = (t // pt) * self._grid("video", i, cfg, h, w)
        tokens = self.video_projector.config.output_length(n)
        k = self.config.video_image_frames
        if k:
            if k > t:
                raise ValueError(
                    f"video {i} has {t} frames; the image encoder reads "
                    f"video_image_frames={k} of each clip"
                )
            tokens += k * self._frame_tokens(i, item)
        return tokens

    def _frame_tokens(self, i: int, item: Tensor) -> int:
        """Image tokens of one frame of clip ``i`` (``video_image_frames``): its frames are
        encoded as images, so they must fit the image encoder too."""
        cfg = self.config.image_encoder
        assert cfg is not None and self.image_projector is not None
        n = self._grid("video", i, cfg, item.shape[2], item.shape[3], encoder="image")
        return self.image_projector.config.output_length(n)

    def _audio_tokens(self, i: int, item: Tensor) -> int:
        features, cfg = self.config.audio_features, self.config.audio_encoder
        assert features is not None and cfg is not None and self.audio_projector is not None
        if item.ndim != 1 or not item.is_floating_point():
            raise ValueError(
                f"audio {i} must be a (S,) float waveform at {features.sample_rate} Hz, got a "
                f"{item.dtype} tensor of shape {tuple(item.shape)}"
            )
        frames = item.shape[0] // features.hop_length
        if frames < 1:
            raise ValueError(
                f"audio {i} has {item.shape[0]} samples, fewer than one feature frame "
                f"({features.hop_length} samples at {features.sample_rate} Hz)"
            )
        limit = cfg.max_frames
        if limit is not None and frames > limit:
            raise ValueError(
                f"audio {i} is {frames} frames ({item.shape[0] / features.sample_rate:.2f} s); "
                f"the audio encoder takes at most {limit}"
            )
        return self.audio_projector.config.output_length((frames - 1) // 2 + 1)

    def encode(self, kind: str, media: Media) -> Tensor:
        """Every item's projected tokens, concatenated in order: ``(sum of counts, D_lm)``.

        Call :meth:`media_token_counts` first to validate (``embed`` does).
        """
        items = self.media_items(kind, media)
        encoder = getattr(self, f"{kind}_encoder")
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features, lengths = getattr(self, f"_encode_{kind}")(items)  # (N, n, D), (N,)
        projected, lengths = getattr(self, f"{kind}_projector")(features, lengths)
        rows = [projected[i, :n] for i, n in enumerate(lengths.tolist())]
        k = self.config.video_image_frames
        if kind == "video" and k:  # each clip's frames through the image encoder, after it
            frames = [item[:, t] for item in items for t in frame_indices(item.shape[1], k)]
            sizes = [k * self._frame_tokens(i, item) for i, item in enumerate(items)]
            per_clip = self.encode("image", frames).split(sizes)  # clips may differ in size
            rows = [torch.cat([row, own]) for row, own in zip(rows, per_clip, strict=True)]
        return torch.cat(rows)  # (sum n', D_lm)

    def _encode_image(self, items: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        encoder = self.image_encoder
        assert encoder is not None
        p = encoder.n_prefix
        if len({tuple(x.shape) for x in items}) == 1:
            return encoder.forward_features(torch.stack(items))[:, p:], None  # (N, n, D)
        features, mask = encoder.forward_features_padded(items)  # (N, P + n_max, D)
        return features[:, p:], mask.sum(1) - p

    def _encode_video(self, items: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        encoder = self.video_encoder
        assert encoder is not None
        p = encoder.n_prefix
        if len({tuple(x.shape) for x in items}) == 1:
            features = encoder.forward_features(torch.stack(items))[:, :, p:]  # (N, T', n, D)
            return features.flatten(1, 2), None  # (N, T'·n, D) frame-major
        clips = encoder.forward_features(items)  # list of (T'_i, P + n, D)
        flat = [c[:, p:].flatten(0, 1) for c in clips]
        lengths = torch.tensor([f.shape[0] for f in flat], device=flat[0].device)
        return nn.utils.rnn.pad_sequence(flat, batch_first=True), lengths

    def _encode_audio(self, items: list[Tensor]) -> tuple[Tensor, Tensor]:
        logmel, encoder = self.audio_features, self.audio_encoder
        assert logmel is not None and encoder is not None
        dtype = next(encoder.parameters()).dtype
        samples = torch.tensor([x.shape[0] for x in items])
        waveform = nn.utils.rnn.pad_sequence(list(items), batch_first=True)  # (N, S_max)
        device = logmel.filters.device
        mel = logmel(waveform.to(device), samples.to(device)).to(dtype)  # (N, M, F)
        frames = logmel.frame_lengths(samples).to(device)
        features = encoder.forward_features(mel, frames)  # (N, ceil(F / 2), D)
        return features, encoder.output_lengths(frames).to(features.device)

    # ------------------------------------------------------------------ text + media

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        images: Media | None = None,
        videos: Media | None = None,
        audios: Media | None = None,
    ) -> Tensor:
        """Token embeddings with every medium's projected features at its placeholders.

        Args:
            input_ids: ``(B, T)`` ids, each medium's placeholder repeated as many times as
                it yields tokens (see :func:`~vats_apps.multimodal.inputs.build_inputs`).
            attention_mask: ``(B, T)``, True = real token; placeholders in padding are not
                counted.
            images, videos, audios: the media, in the order of their placeholders.

        Returns:
            ``(B, T, D_lm)`` in the LM's dtype.

        Raises:
            ValueError: before any encoder runs, for ids that are not ``(B, T)`` integers in
                the vocabulary, media that do not fit their encoders, or a placeholder count
                that differs from the media's token count (naming both).
        """
        vocab = self.config.lm.vocab_size
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a (B, T) tensor, got {_describe(input_ids)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            bad = int(input_ids[(input_ids < 0) | (input_ids >= vocab)][0])
            raise ValueError(f"input_ids holds {bad}, outside [0, vocab_size={vocab})")
        device = self.lm.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        real = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a (B, T) = {tuple(input_ids.shape)} tensor, got "
                    f"{_describe(attention_mask)}"
                )
            real = attention_mask.to(device) != 0
        counts = self.media_token_counts(images=images, videos=videos, audios=audios)
        given = {"image": images, "video": videos, "audio": audios}
        slots = {}
        for kind in KINDS:  # every check before any encoder runs
            where = input_ids == self.config.token_id(kind)  # (B, T)
            if real is not None:
                where = where & real
            found, features = int(where.sum()), sum(counts.get(kind, []))
            if found != features:
                n = len(counts.get(kind, []))
                token = f"<{kind}>"
                raise ValueError(
                    f"{kind}: the prompt holds {found} {token} placeholder token(s) but the "
                    f"{n} {kind} item(s) given yield {features} feature(s) "
                    f"({counts.get(kind, [])} per item); expand each {token} with "
                    "build_inputs, and give one item per placeholder"
                )
            if found:
                slots[kind] = where
        embeds = self.lm.embed_tokens(input_ids)  # (B, T, D)
        for kind, where in slots.items():
            media = given[kind]
            assert media is not None
            features = self.encode(kind, media).to(embeds.dtype)  # (sum n', D)
            embeds = embeds.masked_scatter(where[..., None], features)
        return embeds

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        images: Media | None = None,
        videos: Media | None = None,
        audios: Media | None = None,
        labels: Tensor | None = None,
    ) -> LMOutput:
        """The LM's output on the prompt with its media; the loss when ``labels`` are given.

        Args:
            input_ids, attention_mask, images, videos, audios: as in :meth:`embed`.
            labels: ``(B, T)`` aligned with ``input_ids`` (the LM shifts them), ``-100``
                everywhere but the answer tokens (``build_inputs(..., answers=)`` makes them).

        Returns:
            :class:`~vats_text.model.LMOutput`; with labels, ``logits`` covers the positions
            from the one before the first label to the end (all the loss reads).
        """
        embeds = self.embed(input_ids, attention_mask, images=images, videos=videos, audios=audios)
        keep = 0
        if labels is not None and isinstance(labels, Tensor) and labels.shape == input_ids.shape:
            # The head only where the loss reads it: from the position before the first label
            # on (left-padded answers end together, so the prompts' logits are skipped).
            cols = (labels != IGNORE_INDEX).any(0).nonzero()
            if len(cols):
                keep = input_ids.shape[1] - int(cols[0]) + 1
        return self.lm(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, logits_to_keep=keep
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        images: Media | None = None,
        videos: Media | None = None,
        audios: Media | None = None,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
    ) -> Tensor:
        """Continue each left-padded prompt (:func:`vats_text.generation.generate`; the media
        enter at the prefill only). Returns ``(B, T + N)`` ids: the prompts, then the new
        tokens (EOS ends a row; padding follows)."""
        embeds = self.embed(input_ids, attention_mask, images=images, videos=videos, audios=audios)
        return generate(
            self.lm,
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=embeds,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            compile=compile,
        )

    @torch.no_grad()
    def stream(
        self,
        tokenizer: TextTokenizer,
        input_ids: Tensor,
        *,
        images: Media | None = None,
        videos: Media | None = None,
        audios: Media | None = None,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """Answer one ``(1, T)`` prompt and yield the text as it is generated
        (:func:`vats_text.generation.stream`)."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"stream takes one prompt, (1, T) ids; got {_describe(input_ids)}")
        embeds = self.embed(input_ids, images=images, videos=videos, audios=audios)
        return stream(
            self.lm,
            tokenizer,
            input_ids[0].tolist(),
            inputs_embeds=embeds,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )

    # ------------------------------------------------------------------ parts

    def load_part(self, name: str, source: nn.Module) -> None:
        """Copy a trained part's weights in: ``name`` is ``"lm"`` or ``"<kind>_encoder"``.

        A classifier's head (an encoder trained with ``num_classes > 0``) is left out: the
        model reads the encoder's features, not its logits. So are the blocks past this
        model's encoder depth when its config keeps fewer (``n_layers``) than the source has:
        the features then come from an earlier layer (through the final norm), which keeps
        more of what the classifier's last layers discard (LLaVA reads its CLIP encoder's
        penultimate layer for the same reason).
        """
        target = getattr(self, name, None)
        if name not in ("lm", *(f"{k}_encoder" for k in KINDS)) or target is None:
            raise ValueError(f"no part {name!r} in this model (parts: lm, {self.config.kinds})")
        depth = getattr(target.config, "n_layers", None)

        def kept(key: str) -> bool:
            if key.startswith("head."):
                return False
            if name != "lm" and key.startswith("blocks.") and depth is not None:
                return int(key.split(".")[1]) < depth
            return True

        state = {k: v for k, v in source.state_dict().items() if kept(k)}
        target.load_state_dict(state, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """:meth:`PretrainedMixin.from_pretrained`, with weights that do not fit their config
        section reported by section first (``lm``, ``image_encoder``, ...)."""
        _check_sections(cls, Path(directory))
        return super().from_pretrained(directory, device=device, dtype=dtype)


_ITEM_SHAPES = {"image": "(C, H, W)", "video": "(C, T, H, W)", "audio": "(S,)"}
_STACKED_SHAPES = {"image": "(N, C, H, W)", "video": "(N, C, T, H, W)", "audio": "(N, S)"}


def _check_sections(cls: type[MultimodalLM], directory: Path) -> None:
    """ValueError naming the config section (``lm``, ``video_encoder``, ...) whose
    parameters' shapes or names disagree with the weights file, before anything loads."""
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        return  # from_pretrained raises the FileNotFoundError
    try:
        config = MultimodalConfig.from_dict(load_config_json(config_path, cls.__name__))
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception:  # a corrupt file: from_pretrained reports it
        return
    with torch.device("meta"):
        skeleton = cls(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for section in ("lm", *(f"{k}_{p}" for k in KINDS for p in ("encoder", "projector"))):
        prefix = section + "."
        want = {k: s for k, s in expected.items() if k.startswith(prefix)}
        have = {k: s for k, s in stored.items() if k.startswith(prefix)}
        if not want and not have:
            continue
        if not want or not have:
            state = "holds no weights for it" if not have else "holds weights for it"
            raise ValueError(
                f"{config_path}: `{section}` is {'set' if want else 'unset'} but {weights.name} "
                f"{state}; the config does not match the checkpoint"
            )
        for key in sorted(set(want) | set(have)):
            tied_head = key == "lm.lm_head.weight" and config.lm.tie_embeddings
            if want.get(key) != have.get(key) and not tied_head:
                raise ValueError(
                    f"{config_path}: `{section}` disagrees with {weights.name}: {key} is "
                    f"{have.get(key, 'absent')} in the weights but {want.get(key, 'absent')} by "
                    f"the config's {section} section"
                )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
