"""ViT-3D: a video Vision Transformer with factorized space / time self-attention.

Tubelet embedding as in ViViT (Arnab et al., 2021, arXiv:2103.15691): a Conv3d with kernel
= stride = ``(pT, p, p)`` turns a clip into a ``T' × gh × gw`` grid of tokens. Each block
factorizes self-attention as ViViT's model 3 / TimeSformer's divided attention (Bertasius
et al., 2021, arXiv:2102.05095): :class:`vats_core.block.FactorizedBlock`, which a video
diffusion transformer shares::

    x = x + spatial_attn(norm(x))    # over the P + gh·gw tokens of each frame
    x = x + temporal_attn(norm(x))   # over the T' tubelets at each token position
    x = x + ffn(norm(x))             # SwiGLU / GELU MLP

Joint attention over all ``T'·gh·gw`` tokens costs O((T'·S)²) per layer; factorized costs
O(T'·S² + S·T'²), linear in T' while T' is small against S. ``temporal_attention=False``
drops the temporal step: every frame is then encoded independently (the ablation showing
that motion needs the temporal path).

Prefix tokens (class, registers) are per frame: each frame's sequence is
``[cls, reg_1..reg_R, patches]`` with the same learned prefix vectors, and the prefix
tokens take part in temporal attention like any token position, so the class token of
frame t has seen every frame. ``forward_features`` returns ``(B, T', P + gh·gw, D)``;
``pool="token"`` averages the class token over the real frames, ``"avg"`` averages the
patch tokens of the real frames.

Positions, by ``pos_embed``:

* ``rope3d`` (default): 3D RoPE over (t, row, col) from vats-core. In spatial attention
  every token shares t and in temporal attention every token shares (row, col), and a
  shared coordinate's rotation cancels in ``q · k``, so the spatial step uses positions
  (0, row, col) and the temporal step (t, 0, 0): the same scores as full 3D positions at a
  fraction of the table size. Prefix tokens sit at row = col = 0 (spatially unrotated).
* ``learned``: separable tables (TimeSformer): ``pos_embed_spatial`` over the
  ``image_size`` patch grid (``H/p × W/p``, square or not; bicubic-resampled to other
  grids) is added to patches; ``pos_embed_temporal`` over ``num_frames / pT`` tubelets is
  added to every token of a frame; a shorter clip takes its first rows, a longer one a
  linear stretch (per clip, so clips in a padded batch get exactly what they would alone).
* ``none``.

Clips of different lengths: pass ``frame_mask`` ``(B, T)`` (True = real frame; the real
frames first, a multiple of pT of them) with a right-padded batch, or a list of
``(C, T_i, H, W)`` clips. Padded tubelets are masked out of temporal attention as keys, so
every clip's outputs equal running it alone; their feature rows are zeros. Eager calls
check the mask's values; under ``torch.compile`` they are not read on the host (no graph
break), so a compiled caller passes a well-formed mask.

Shapes: B batch, C channels, T frames, H / W frame size, pT tubelet length, p patch size,
T' = T / pT tubelets, gh / gw patch grid, S = P + gh·gw tokens per frame (P prefix tokens),
D model width, K classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import AttentionBackend
from vats_core.block import BlockConfig, FactorizedBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_positive
from vats_core.mlp import Activation
from vats_core.norms import NormType, build_norm
from vats_core.rope import RopeConfig, RotaryEmbedding, grid_positions_2d
from vats_vision.layers import (
    PatchEmbed,
    Pool,
    VideoPosEmbed,
    check_encoder_fields,
    check_images,
    encoder_block_config,
    image_hw,
    init_vit_weights,
    pad_to_multiple,
    resample_grid_embed,
    resample_sequence_embed,
)
from vats_vision.vit2d import take_indices

__all__ = ["Pool", "ViT3D", "ViT3DConfig", "VideoPosEmbed"]

_LAYOUT = "(B, C, T, H, W)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViT3DConfig(Config):
    """ViT-3D settings. Defaults: ViT-S width, 16-frame clips of 224², tubelets 2×16×16."""

    # Default frame size, S (square) or (H, W): the learned spatial table's grid is
    # (H / p, W / p). Other sizes still run (RoPE follows any grid; the table is resampled).
    image_size: int | tuple[int, int] = 224
    num_frames: int = 16  # default clip length: the learned temporal table covers / pT rows
    patch_size: int = 16  # p: spatial patch side
    tubelet_size: int = 2  # pT: frames per tubelet (Conv3d kernel = stride = (pT, p, p))
    in_channels: int = 3
    dim: int = 384  # D
    n_layers: int = 12
    n_heads: int = 6
    n_kv_heads: int | None = None  # GQA key/value heads (both attentions); None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU
    mlp_bias: bool = True
    norm: NormType = NormType.LAYERNORM
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False
    class_token: bool = True  # one class token per frame (see the module docstring)
    n_register_tokens: int = 0  # registers, per frame like the class token
    pos_embed: VideoPosEmbed = VideoPosEmbed.ROPE3D
    rope_theta: float = 100.0
    temporal_attention: bool = True  # False: no mixing across time at all (ablation)
    pool: Pool = Pool.TOKEN
    fc_norm: bool = False  # final norm after pooling instead of before (timm's fc_norm)
    num_classes: int = 0  # K; 0 = no head
    pad: bool = False  # zero-pad H, W up to multiples of p (frames are never padded)
    patch_bias: bool = True
    init_std: float = 0.02
    attention_backend: AttentionBackend = AttentionBackend.AUTO

    def __post_init__(self) -> None:
        check_encoder_fields(self)
        check_positive(self, "num_frames", "tubelet_size")
        check(
            self.num_frames % self.tubelet_size == 0,
            self,
            "num_frames",
            self.num_frames,
            f"a multiple of tubelet_size={self.tubelet_size}",
        )
        dh = self.block_config.attention.dh  # validates heads / head_dim first
        if self.pos_embed is VideoPosEmbed.ROPE3D:
            check(
                dh % 2 == 0 and dh >= 6,
                self,
                "head_dim",
                dh,
                "an even head dim >= 6 for 3D RoPE (each of t, row, col rotates channel pairs)",
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(H, W)`` of ``image_size``."""
        return image_hw(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)``: the patch grid at ``image_size``, the learned spatial table's grid."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def n_tubelets(self) -> int:
        """Tubelets per clip at ``num_frames``: the learned temporal table's length."""
        return self.num_frames // self.tubelet_size

    @property
    def n_prefix_tokens(self) -> int:
        """P per frame: class token (if any) plus registers."""
        return int(self.class_token) + self.n_register_tokens

    @property
    def block_config(self) -> BlockConfig:
        """Attention (used for both the spatial and the temporal step), MLP and norms."""
        return encoder_block_config(self, window=None)


class ViT3D(PretrainedMixin, nn.Module):
    """Video Vision Transformer with factorized attention; see the module docstring."""

    config_class = ViT3DConfig

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.config = config
        d, p, pt = config.dim, config.patch_size, config.tubelet_size
        self.n_prefix = config.n_prefix_tokens
        self.patch_embed = PatchEmbed((pt, p, p), config.in_channels, d, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.class_token else None
        self.reg_tokens = (
            nn.Parameter(torch.zeros(1, config.n_register_tokens, d))
            if config.n_register_tokens
            else None
        )
        self.pos_embed_spatial: nn.Parameter | None = None
        self.pos_embed_temporal: nn.Parameter | None = None
        if config.pos_embed is VideoPosEmbed.LEARNED:
            gh, gw = config.grid
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, gh * gw, d))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, config.n_tubelets, d))
        block = config.block_config
        self.rotary: RotaryEmbedding | None = None
        if config.pos_embed is VideoPosEmbed.ROPE3D:
            rope = RopeConfig(head_dim=block.attention.dh, theta=config.rope_theta, n_axes=3)
            self.rotary = RotaryEmbedding(rope)
        self.blocks = nn.ModuleList(
            FactorizedBlock(block, temporal=config.temporal_attention)
            for _ in range(config.n_layers)
        )
        final = build_norm(config.norm, d, config.norm_eps)
        self.norm: nn.Module = nn.Identity() if config.fc_norm else final
        self.fc_norm: nn.Module = final if config.fc_norm else nn.Identity()
        self.head: nn.Module = (
            nn.Linear(d, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default init (see :func:`~vats_vision.layers.init_vit_weights`)."""
        tables = [self.pos_embed_spatial, self.pos_embed_temporal]
        init_vit_weights(self, self.config.init_std, tables, [self.cls_token, self.reg_tokens])

    # ------------------------------------------------------------------ inputs

    def _check_clip(self, x: Tensor, *, single: bool = False) -> None:
        cfg = self.config
        layout = "(C, T, H, W)" if single else _LAYOUT
        check_images(
            "ViT3D",
            x,
            rank=4 if single else 5,
            layout=layout,
            channel_axis=-4,
            in_channels=cfg.in_channels,
            patch=cfg.patch_size,
            pad=cfg.pad,
        )
        t, pt = x.shape[-3], cfg.tubelet_size
        if t < pt or t % pt:
            raise ValueError(
                f"ViT3D expects a frame count T that is a positive multiple of "
                f"tubelet_size={pt}, got T={t} in shape {tuple(x.shape)}"
            )

    def _tubelet_mask(self, x: Tensor, frame_mask: Tensor | None) -> Tensor | None:
        """Check ``frame_mask`` ``(B, T)`` and turn it into ``(B, T')``; None if all real."""
        if frame_mask is None:
            return None
        b, t, pt = x.shape[0], x.shape[2], self.config.tubelet_size
        if frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (b, t):
            raise ValueError(
                f"ViT3D frame_mask must be a bool (B, T) = ({b}, {t}) tensor (True = real "
                f"frame), got {frame_mask.dtype} {tuple(frame_mask.shape)}"
            )
        # The mask's values are data: torch.compile traces without reading them (no checks,
        # and an all-real mask stays a mask: the same function, one graph for any mask).
        if not torch.compiler.is_compiling():
            lengths = frame_mask.sum(1)  # (B,)
            prefix = torch.arange(t, device=frame_mask.device) < lengths[:, None]
            if not torch.equal(prefix, frame_mask):
                raise ValueError(
                    "ViT3D frame_mask must mark each clip's real frames first, then padding "
                    "(right-padded clips)"
                )
            bad = [n for n in lengths.tolist() if n < pt or n % pt]
            if bad:
                raise ValueError(
                    f"ViT3D expects every clip's frame count to be a positive multiple of "
                    f"tubelet_size={pt}, got lengths {lengths.tolist()}"
                )
            if bool(frame_mask.all()):
                return None
        return frame_mask.view(b, t // pt, pt)[..., 0]  # (B, T')

    def _batch_clips(self, clips: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Right-pad a list of ``(C, T_i, H, W)`` clips: ``(B, C, T_max, H, W)``, ``(B, T_max)``."""
        if isinstance(clips, Tensor) or not isinstance(clips, Sequence) or len(clips) == 0:
            got = type(clips).__name__ if not isinstance(clips, Sequence) else "an empty list"
            raise ValueError(f"ViT3D expects a non-empty list of (C, T, H, W) clips, got {got}")
        for clip in clips:
            self._check_clip(clip, single=True)
        sizes = {tuple(c.shape[-2:]) for c in clips}
        if len(sizes) > 1:
            raise ValueError(
                f"ViT3D clips in one list must share their frame size (H, W), got {sorted(sizes)}"
            )
        lengths = [c.shape[1] for c in clips]
        # pad_sequence pads axis 0: put time first, pad, then move it back.
        x = torch.nn.utils.rnn.pad_sequence([c.transpose(0, 1) for c in clips], batch_first=True)
        x = x.transpose(1, 2)  # (B, C, T_max, H, W)
        mask = (
            torch.arange(x.shape[2], device=x.device)
            < torch.tensor(lengths, device=x.device)[:, None]
        )
        return x, mask

    # ------------------------------------------------------------------ encoder

    def _embed(self, x: Tensor, tubelet_mask: Tensor | None) -> Tensor:
        """``(B, C, T, H, W)`` -> tokens ``(B, T', S, D)`` with prefix tokens and positions."""
        cfg = self.config
        if cfg.pad:
            x = pad_to_multiple(x, cfg.patch_size)
        grid = self.patch_embed(x)  # (B, D, T', gh, gw)
        b, _, t, gh, gw = grid.shape
        tokens = rearrange(grid, "b d t h w -> b t (h w) d")
        if self.pos_embed_spatial is not None:
            tokens = tokens + resample_grid_embed(self.pos_embed_spatial, cfg.grid, (gh, gw))
        prefix = [p for p in (self.cls_token, self.reg_tokens) if p is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1).expand(b * t, -1, -1).reshape(b, t, self.n_prefix, -1)
            tokens = torch.cat([pre, tokens], dim=2)  # (B, T', S, D)
        if self.pos_embed_temporal is not None:
            tokens = tokens + self._temporal_table(t, tubelet_mask)[:, :, None]
        return tokens

    def _temporal_table(self, t: int, tubelet_mask: Tensor | None) -> Tensor:
        """Learned temporal positions ``(B or 1, T', D)``, chosen per clip length."""
        table = self.pos_embed_temporal
        assert table is not None
        if tubelet_mask is None or t <= table.shape[1]:
            # Slicing is per-clip exact: a shorter clip's rows are a prefix of these.
            return resample_sequence_embed(table, t)
        # Clips longer than the table get it stretched to their own length: every length
        # 1..T' once, then each clip picks its own (a gather, no host read of the lengths).
        d = table.shape[-1]
        by_length = torch.stack(
            [
                torch.cat([resample_sequence_embed(table, n)[0], table.new_zeros(t - n, d)])
                for n in range(1, t + 1)
            ]
        )  # (T', T', D): row n - 1 is a clip of n tubelets' table, zeros after
        return by_length[tubelet_mask.sum(1) - 1]  # (B, T', D)

    def _ropes(
        self, t: int, grid: tuple[int, int], like: Tensor
    ) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
        """Spatial ``(0, row, col)`` and temporal ``(t, 0, 0)`` RoPE tables."""
        if self.rotary is None:
            return None, None
        dev = like.device
        rc = torch.cat(
            [
                torch.zeros(self.n_prefix, 2, dtype=torch.long, device=dev),
                grid_positions_2d(*grid, device=dev),
            ]
        )  # (S, 2): prefix tokens at (0, 0)
        spatial = torch.cat([torch.zeros_like(rc[:, :1]), rc], dim=1)  # (S, 3)
        steps = torch.arange(t, device=dev)[:, None]
        temporal = torch.cat([steps, torch.zeros_like(steps), torch.zeros_like(steps)], dim=1)
        return self.rotary(spatial, like.dtype), self.rotary(temporal, like.dtype)

    def _run(
        self,
        x: Tensor,
        frame_mask: Tensor | None,
        keep: Sequence[int] = (),
        stop: int | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor | None, tuple[int, int]]:
        """Checked clip batch -> pre-final-norm tokens, kept block outputs, tubelet mask, grid."""
        self._check_clip(x)
        tubelet_mask = self._tubelet_mask(x, frame_mask)
        tokens = self._embed(x, tubelet_mask)  # (B, T', S, D)
        t = tokens.shape[1]
        p = self.config.patch_size
        grid = (-(-x.shape[-2] // p), -(-x.shape[-1] // p))  # ceil: pad rounds up
        rope_s, rope_t = self._ropes(t, grid, tokens)
        kept = []
        for i, block in enumerate(self.blocks):
            if stop is not None and i > stop:
                break
            tokens = block(
                tokens, rope_spatial=rope_s, rope_temporal=rope_t, frame_mask=tubelet_mask
            )
            if i in keep:
                kept.append(tokens)
        return tokens, kept, tubelet_mask, grid

    @staticmethod
    def _zero_padding(x: Tensor, tubelet_mask: Tensor | None) -> Tensor:
        if tubelet_mask is None:
            return x
        return x.masked_fill(~tubelet_mask[:, :, None, None], 0.0)

    # ------------------------------------------------------------------ timm-style contract

    def forward_features(
        self, x: Tensor | Sequence[Tensor], frame_mask: Tensor | None = None
    ) -> Tensor | list[Tensor]:
        """Every token of every tubelet after the final norm.

        Args:
            x: ``(B, C, T, H, W)`` clips (T a multiple of pT), or a list of
                ``(C, T_i, H, W)`` clips of different lengths.
            frame_mask: ``(B, T)`` bool, True = real frame (real frames first); tensor
                input only.

        Returns:
            ``(B, T', S, D)`` with ``S = P + gh·gw`` (prefix tokens first, then the patches
            row-major); rows of padded tubelets are zeros. For a list: a list of
            ``(T'_i, S, D)``, each equal to running that clip alone.
        """
        if not isinstance(x, Tensor):
            if frame_mask is not None:
                raise ValueError("ViT3D: pass frame_mask with a padded tensor, not with a list")
            clips = x
            x, frame_mask = self._batch_clips(clips)
            out, _, mask, _ = self._run(x, frame_mask)
            out = self._zero_padding(self.norm(out), mask)
            pt = self.config.tubelet_size
            return [o[: c.shape[1] // pt] for o, c in zip(out, clips, strict=True)]
        out, _, mask, _ = self._run(x, frame_mask)
        return self._zero_padding(self.norm(out), mask)

    def tubelet_mask(self, frame_mask: Tensor) -> Tensor:
        """``(B, T)`` frame mask -> ``(B, T')`` tubelet mask (True = real), for ``forward_head``."""
        b, t = frame_mask.shape
        pt = self.config.tubelet_size
        if t % pt:
            raise ValueError(f"ViT3D frame_mask length {t} is not a multiple of pT={pt}")
        return frame_mask.view(b, t // pt, pt).all(-1)

    def forward_head(
        self,
        features: Tensor,
        pre_logits: bool = False,
        *,
        tubelet_mask: Tensor | None = None,
    ) -> Tensor:
        """Pool over time and tokens, ``fc_norm``, then the head unless ``pre_logits``.

        Args:
            features: ``(B, T', S, D)`` from :meth:`forward_features`.
            pre_logits: return the pooled (and fc-normed) features.
            tubelet_mask: ``(B, T')`` bool, True = real tubelet (see :meth:`tubelet_mask`).

        Returns:
            ``(B, K)`` (``(B, D)`` with ``pre_logits`` or no head); ``pool="none"``:
            ``(B, T', S, K)``.
        """
        pool = self.config.pool
        if features.ndim != 4:
            raise ValueError(
                f"ViT3D.forward_head expects (B, T', S, D) features, got {tuple(features.shape)}"
            )
        if pool is Pool.NONE:
            x = features
        else:
            picked = features[:, :, :1] if pool is Pool.TOKEN else features[:, :, self.n_prefix :]
            if tubelet_mask is None:
                x = picked.mean(dim=(1, 2))
            else:
                w = tubelet_mask[:, :, None, None].to(picked.dtype)  # (B, T', 1, 1)
                x = (picked * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * picked.shape[2])
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor | Sequence[Tensor], frame_mask: Tensor | None = None) -> Tensor:
        """``forward_head(forward_features(x))``.

        Args:
            x: ``(B, C, T, H, W)`` or a list of ``(C, T_i, H, W)`` clips.
            frame_mask: ``(B, T)`` bool, True = real frame; tensor input only.

        Returns:
            ``(B, K)`` logits (``(B, D)`` without a head; ``pool="none"``: ``(B, T', S, K)``
            with padded tubelets included).
        """
        if not isinstance(x, Tensor):
            if frame_mask is not None:
                raise ValueError("ViT3D: pass frame_mask with a padded tensor, not with a list")
            x, frame_mask = self._batch_clips(x)
        out, _, mask, _ = self._run(x, frame_mask)
        return self.forward_head(self._zero_padding(self.norm(out), mask), tubelet_mask=mask)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        frame_mask: Tensor | None = None,
        norm: bool = False,
        output_fmt: str = "NCTHW",
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """Outputs of chosen blocks (patch tokens only), timm-style.

        Args:
            x: ``(B, C, T, H, W)``.
            indices: int ``n`` = last ``n`` blocks; list = those blocks; None = all.
            frame_mask: ``(B, T)`` bool, True = real frame.
            norm: apply the final norm to the intermediates.
            output_fmt: ``"NCTHW"`` -> ``(B, D, T', gh, gw)``; ``"NTLC"`` ->
                ``(B, T', gh·gw, D)``.
            intermediates_only: return only the list (later blocks are skipped).

        Returns:
            ``(features, intermediates)`` (features as :meth:`forward_features`) or just
            the intermediates, in ascending block order.
        """
        if output_fmt not in ("NCTHW", "NTLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is invalid: expected 'NCTHW' or 'NTLC'")
        keep = take_indices(len(self.blocks), indices)
        stop = keep[-1] if intermediates_only else None
        out, kept, mask, (gh, gw) = self._run(x, frame_mask, keep, stop)
        inter = []
        for h in kept:
            h = self._zero_padding(self.norm(h) if norm else h, mask)[:, :, self.n_prefix :]
            if output_fmt == "NCTHW":
                h = rearrange(h, "b t (h w) d -> b d t h w", h=gh, w=gw)
            inter.append(h)
        if intermediates_only:
            return inter
        return self._zero_padding(self.norm(out), mask), inter
