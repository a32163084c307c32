"""ViT-2D: the Vision Transformer image encoder (Dosovitskiy et al., 2021, arXiv:2010.11929).

An image is cut into ``p × p`` patches by a strided Conv2d, optional class and register
tokens (Darcet et al., 2024, arXiv:2309.16588) are put in front, and pre-norm transformer
blocks from :mod:`vats_core.block` (non-causal self-attention with GQA, an optional
bidirectional sliding window, RMS or Layer norm, SwiGLU or GELU MLP) mix them.

Positions, by ``pos_embed``:

* ``rope2d`` (default): axial 2D RoPE over each patch's integer (row, col), as in RoPE-ViT
  (Heo et al., 2024, arXiv:2403.13298, whose theta of 100 is the default here). Any grid
  works with no parameters to resample. Prefix tokens sit at (0, 0), i.e. they are not
  rotated (as in DINOv3 / EVA).
* ``learned``: an absolute table ``pos_embed`` for the ``image_size`` grid (``gh × gw`` =
  ``H/p × W/p``, square or not), resampled with bicubic interpolation (timm's default) when
  the input grid differs. With ``pos_embed_prefix=True`` the table also holds one row per
  prefix token, first (timm's default ``no_embed_class=False``); with False the prefix
  tokens get none.
* ``none``.

The encoder contract is timm's: ``forward_features`` -> every token (prefix tokens first,
then the patches row-major) after the final norm, ``forward_head`` pools and classifies,
``forward_intermediates`` returns chosen blocks' outputs, ``forward = head(features)``.

Ragged batches: ``forward`` / ``forward_features`` also take a list of ``(C, H, W)``
images of different sizes. Each image's tokens are laid out exactly as it would be alone
(its own grid, its own RoPE positions or resampled table), the sequences are right-padded to
the longest and the padding is masked out of attention as keys, so every image's outputs
equal running it alone (to float rounding). Padding at the end of the flattened sequence
also keeps a sliding window's neighbourhoods the same as in a lone run.

Module names follow timm's ``VisionTransformer`` where a counterpart exists
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``norm_pre``, ``blocks``, ``norm``,
``fc_norm``, ``head``); the blocks are vats-core ``TransformerBlock``s (``attn_norm``,
``attn.{q,k,v,o}_proj``, ``ffn_norm``, ``ffn``). timm's ``reg_token`` is ``reg_tokens`` here.

Shapes: B batch, C channels, H / W image height / width, p patch size, gh / gw patch grid
(H' = H / p, W' = W / p), P prefix tokens (class + registers), N = P + gh·gw tokens,
D model width, K classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import AttentionBackend
from vats_core.block import BlockConfig, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check
from vats_core.mlp import Activation
from vats_core.norms import NormType, build_norm
from vats_core.rope import RopeConfig, RotaryEmbedding, grid_positions_2d
from vats_vision.layers import (
    PatchEmbed,
    Pool,
    PosEmbed,
    check_encoder_fields,
    check_images,
    encoder_block_config,
    image_hw,
    init_vit_weights,
    pad_to_multiple,
    pool_tokens,
    resample_grid_embed,
)

__all__ = ["Pool", "PosEmbed", "ViT2D", "ViT2DConfig", "take_indices"]

_LAYOUT = "(B, C, H, W)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViT2DConfig(Config):
    """ViT-2D settings. Defaults are the ViT-S/16 shape with 2D RoPE."""

    # Default input size, S (square) or (H, W): the learned table's grid is (H / p, W / p).
    # Other sizes still run (RoPE positions follow any grid; the table is resampled).
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16  # p: square patches, Conv2d kernel = stride = p
    in_channels: int = 3
    dim: int = 384  # D
    n_layers: int = 12
    n_heads: int = 6
    n_kv_heads: int | None = None  # GQA key/value heads; None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU
    mlp_bias: bool = True  # biases in the MLP (timm ViTs have them)
    norm: NormType = NormType.LAYERNORM
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    out_bias: bool = True  # bias on the attention output projection (timm's attn.proj)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (ViT-22B)
    class_token: bool = True
    n_register_tokens: int = 0  # registers (Darcet et al. 2024): extra learned prefix tokens
    pos_embed: PosEmbed = PosEmbed.ROPE2D
    pos_embed_prefix: bool = True  # learned table also covers prefix tokens (timm default)
    rope_theta: float = 100.0  # RoPE-ViT's base: grids are tens of patches, not 10k tokens
    window: int | None = None  # bidirectional window |i - j| < window over all N tokens
    pool: Pool = Pool.TOKEN
    fc_norm: bool = False  # timm's fc_norm: final norm after pooling instead of before
    num_classes: int = 0  # K; 0 = no head (forward returns pooled features)
    pad: bool = False  # zero-pad H, W up to multiples of p instead of refusing them
    patch_bias: bool = True  # bias in the patch-embedding conv
    pre_norm: bool = False  # norm right after the embedding (CLIP's ln_pre; timm norm_pre)
    init_std: float = 0.02  # truncated-normal std of linear weights and learned tables
    attention_backend: AttentionBackend = AttentionBackend.AUTO

    def __post_init__(self) -> None:
        check_encoder_fields(self)
        if self.pos_embed is PosEmbed.ROPE2D:
            dh = self.block_config.attention.dh  # validates heads / head_dim first
            check(
                dh % 2 == 0 and dh >= 4,
                self,
                "head_dim",
                dh,
                "an even head dim >= 4 for 2D RoPE (each axis rotates channel pairs)",
            )
        else:
            _ = self.block_config  # validate the block settings

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(H, W)`` of ``image_size``."""
        return image_hw(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)``: the patch grid at ``image_size``, the learned table's grid."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def n_prefix_tokens(self) -> int:
        """P: class token (if any) plus registers."""
        return int(self.class_token) + self.n_register_tokens

    @property
    def block_config(self) -> BlockConfig:
        """The vats-core block every layer is built from."""
        return encoder_block_config(self, window=self.window)


def take_indices(n_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices for ``forward_intermediates``, as timm's ``feature_take_indices``.

    An int ``n`` takes the last ``n`` blocks; a sequence takes those blocks (negative
    counts from the end); None takes all. Returned sorted ascending, non-negative.
    """
    if indices is None:
        return list(range(n_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= n_blocks:
            raise ValueError(
                f"forward_intermediates: indices={indices} asks for the last {indices} blocks; "
                f"expected 1..{n_blocks}"
            )
        return list(range(n_blocks - indices, n_blocks))
    taken = []
    for i in indices:
        if not -n_blocks <= i < n_blocks:
            raise ValueError(
                f"forward_intermediates: block index {i} is out of range for {n_blocks} "
                f"blocks: expected {-n_blocks}..{n_blocks - 1}"
            )
        taken.append(i % n_blocks)
    return sorted(set(taken))


class ViT2D(PretrainedMixin, nn.Module):
    """Vision Transformer image encoder; see the module docstring and :class:`ViT2DConfig`."""

    config_class = ViT2DConfig

    def __init__(self, config: ViT2DConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_size
        self.n_prefix = config.n_prefix_tokens
        self.patch_embed = PatchEmbed((p, p), config.in_channels, d, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.class_token else None
        self.reg_tokens = (
            nn.Parameter(torch.zeros(1, config.n_register_tokens, d))
            if config.n_register_tokens
            else None
        )
        self.pos_embed: nn.Parameter | None = None
        if config.pos_embed is PosEmbed.LEARNED:
            gh, gw = config.grid
            rows = gh * gw + (self.n_prefix if config.pos_embed_prefix else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, rows, d))
        self.rotary: RotaryEmbedding | None = None
        block = config.block_config
        if config.pos_embed is PosEmbed.ROPE2D:
            rope = RopeConfig(head_dim=block.attention.dh, theta=config.rope_theta, n_axes=2)
            self.rotary = RotaryEmbedding(rope)
        self.norm_pre = build_norm(config.norm, d, config.norm_eps) if config.pre_norm else None
        self.blocks = nn.ModuleList(TransformerBlock(block) for _ in range(config.n_layers))
        final = build_norm(config.norm, d, config.norm_eps)
        self.norm: nn.Module = nn.Identity() if config.fc_norm else final
        self.fc_norm: nn.Module = final if config.fc_norm else nn.Identity()
        self.head: nn.Module = (
            nn.Linear(d, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default init (see :func:`~vats_vision.layers.init_vit_weights`)."""
        tokens = (self.cls_token, self.reg_tokens)
        init_vit_weights(self, self.config.init_std, [self.pos_embed], tokens)

    # ------------------------------------------------------------------ embedding

    def _check(self, x: Tensor, *, single: bool = False) -> None:
        cfg = self.config
        check_images(
            "ViT2D",
            x,
            rank=3 if single else 4,
            layout="(C, H, W)" if single else _LAYOUT,
            channel_axis=-3,
            in_channels=cfg.in_channels,
            patch=cfg.patch_size,
            pad=cfg.pad,
        )

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patchify, add prefix tokens and learned positions.

        Args:
            x: ``(B, C, H, W)``, already checked.

        Returns:
            ``(tokens, (gh, gw))`` with tokens ``(B, N, D)``.
        """
        cfg = self.config
        if cfg.pad:
            x = pad_to_multiple(x, cfg.patch_size)
        patches = self.patch_embed(x)  # (B, D, gh, gw)
        b, _, gh, gw = patches.shape
        tokens = rearrange(patches, "b d h w -> b (h w) d")
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_tokens) if t is not None]
        if self.pos_embed is not None:
            (th, tw), rows = cfg.grid, self.pos_embed.shape[1]
            n_pos_prefix = rows - th * tw  # prefix rows, first (pos_embed_prefix)
            table = resample_grid_embed(self.pos_embed[:, n_pos_prefix:], (th, tw), (gh, gw))
            tokens = tokens + table
            if prefix and n_pos_prefix:
                prefix = [torch.cat(prefix, dim=1) + self.pos_embed[:, :n_pos_prefix]]
        if prefix:
            tokens = torch.cat([*prefix, tokens], dim=1)  # (B, N, D)
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        return tokens, (gh, gw)

    def _positions(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """RoPE (row, col) of every token: ``(N, 2)``; prefix tokens at (0, 0) (unrotated)."""
        patches = grid_positions_2d(*grid, device=device)  # (gh·gw, 2)
        prefix = torch.zeros(self.n_prefix, 2, dtype=patches.dtype, device=device)
        return torch.cat([prefix, patches])

    def _rope(self, grid: tuple[int, int], tokens: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.rotary is None:
            return None
        return self.rotary(self._positions(grid, tokens.device), tokens.dtype)

    def _blocks(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        out_tokens: int | None = None,
    ) -> Tensor:
        """Run the blocks; ``out_tokens``: the last block computes only the first tokens."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            n = out_tokens if i == last else None
            x, _ = block(x, rope=rope, key_padding_mask=mask, out_tokens=n)
        return x

    def _head_reads_class_token_only(self) -> bool:
        # Its last block can then skip every other token's queries and MLP: about 7 % of a
        # ViT-S/16 forward at 224² (10 of the 12 D² weights each token meets in that block).
        cfg = self.config
        return (
            cfg.pool is Pool.TOKEN
            and cfg.class_token
            and cfg.window is None
            and len(self.blocks) > 0
        )

    # ------------------------------------------------------------------ timm contract

    def forward_features(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Every token after the final norm.

        Args:
            x: ``(B, C, H, W)`` images, or a list of ``(C, H_i, W_i)`` images of any sizes.

        Returns:
            ``(B, N, D)``: ``N = P + gh·gw``, prefix tokens (class, then registers) first,
            then the patches row-major. For a list: a list of ``(N_i, D)``, each equal to
            running that image alone (see :meth:`forward_features_padded` for the padded
            batch and its mask).
        """
        if not isinstance(x, Tensor):
            feats, _, lengths = self._encode_padded(x)
            return [f[:n] for f, n in zip(feats, lengths, strict=True)]
        self._check(x)
        tokens, grid = self._embed(x)
        return self.norm(self._blocks(tokens, self._rope(grid, tokens), None))

    def forward_features_padded(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Encode images of different sizes in one batch.

        Each image's tokens are laid out as in a lone run, right-padded to the longest
        sequence; padding is masked out of attention as keys, so real tokens equal a lone
        run's.

        Args:
            images: non-empty list of ``(C, H_i, W_i)`` images.

        Returns:
            ``(features, mask)``: ``(B, N_max, D)`` with zeros at padding, and ``(B, N_max)``
            bool, True = real token.
        """
        feats, mask, _ = self._encode_padded(images)
        return feats, mask

    def _encode_padded(
        self, images: Sequence[Tensor], out_tokens: int | None = None
    ) -> tuple[Tensor, Tensor, list[int]]:
        """:meth:`forward_features_padded`, plus each image's token count; ``out_tokens`` as
        in :meth:`_blocks` (the features then hold only those first tokens, the mask still
        every token)."""
        if isinstance(images, Tensor) or not isinstance(images, Sequence) or len(images) == 0:
            got = type(images).__name__ if not isinstance(images, Sequence) else "an empty list"
            raise ValueError(f"ViT2D expects a non-empty list of (C, H, W) images, got {got}")
        for image in images:
            self._check(image, single=True)
        # Images of one size share one patch-embedding call.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        embedded: list[Tensor] = [images[0]] * len(images)  # placeholders
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        for idx in groups.values():
            tokens, grid = self._embed(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                embedded[i], grids[i] = tokens[j], grid
        lengths = [e.shape[0] for e in embedded]
        n_max = max(lengths)
        x = torch.nn.utils.rnn.pad_sequence(embedded, batch_first=True)  # (B, N_max, D)
        mask = (
            torch.arange(n_max, device=x.device) < torch.tensor(lengths, device=x.device)[:, None]
        )
        rope = None
        if self.rotary is not None:
            pos = [self._positions(g, x.device) for g in grids]
            positions = torch.nn.utils.rnn.pad_sequence(pos, batch_first=True)  # (B, N_max, 2)
            rope = self.rotary(positions, x.dtype)
        # Same-length batches need no mask: padding-free, identical to the tensor path.
        out = self._blocks(x, rope, None if min(lengths) == n_max else mask, out_tokens)
        out = self.norm(out).masked_fill(~mask[:, : out.shape[1], None], 0.0)
        return out, mask, lengths

    def forward_head(
        self,
        features: Tensor | Sequence[Tensor],
        pre_logits: bool = False,
        *,
        mask: Tensor | None = None,
    ) -> Tensor | list[Tensor]:
        """Pool (``config.pool``), ``fc_norm``, then the head unless ``pre_logits``.

        Args:
            features: ``(B, N, D)`` from :meth:`forward_features`, or its list form.
            pre_logits: return the pooled (and fc-normed) features, skip the head.
            mask: ``(B, N)`` bool, True = real token, for padded features.

        Returns:
            ``(B, K)`` logits (``(B, D)`` with ``pre_logits`` or without a head). With
            ``pool="none"`` the head runs on every token: ``(B, N, K)``, or a list of
            ``(N_i, K)`` for list features.
        """
        as_list = not isinstance(features, Tensor)
        if as_list:
            lengths = [f.shape[0] for f in features]
            features = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)
            mask = (
                torch.arange(features.shape[1], device=features.device)
                < torch.tensor(lengths, device=features.device)[:, None]
            )
        x = pool_tokens(features, self.config.pool, self.n_prefix, mask)
        x = self.fc_norm(x)
        if not pre_logits:
            x = self.head(x)
        if as_list and self.config.pool is Pool.NONE:
            return [row[:n] for row, n in zip(x, lengths, strict=True)]
        return x

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """``forward_head(forward_features(x))``.

        With a class-token head (``pool="token"``, no window) the last block runs only the
        class token (its query over every token's key and value, then its MLP): the same
        logits for about 7 % less work at ViT-S/16 sizes.

        Args:
            x: ``(B, C, H, W)`` or a list of ``(C, H_i, W_i)`` images.

        Returns:
            ``(B, K)`` logits (``(B, D)`` when ``num_classes=0``); see :meth:`forward_head`
            for ``pool="none"``.
        """
        if isinstance(x, Tensor):
            if self._head_reads_class_token_only():
                # forward_features' class token row, computed alone in the last block.
                self._check(x)
                tokens, grid = self._embed(x)
                cls = self._blocks(tokens, self._rope(grid, tokens), None, out_tokens=1)
                return self.forward_head(self.norm(cls))
            return self.forward_head(self.forward_features(x))
        if self._head_reads_class_token_only():
            cls, _, _ = self._encode_padded(x, out_tokens=1)
            return self.forward_head(cls)
        feats, mask, lengths = self._encode_padded(x)
        out = self.forward_head(feats, mask=mask)
        if self.config.pool is Pool.NONE:
            return [row[:n] for row, n in zip(out, lengths, strict=True)]
        return out

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """Outputs of chosen blocks, as timm's ``forward_intermediates``.

        Args:
            x: ``(B, C, H, W)``.
            indices: an int ``n`` = the last ``n`` blocks; a list of block indices
                (negative from the end); None = every block.
            norm: apply the final norm to the intermediates too.
            output_fmt: ``"NCHW"`` -> patch tokens as ``(B, D, gh, gw)``; ``"NLC"`` ->
                ``(B, gh·gw, D)``. Prefix tokens are dropped from intermediates.
            intermediates_only: return only the list (the blocks after the last index
                are skipped).

        Returns:
            ``(features, intermediates)`` with features as :meth:`forward_features`, or
            just ``intermediates``, in ascending block order.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is invalid: expected 'NCHW' or 'NLC'")
        self._check(x)
        keep = take_indices(len(self.blocks), indices)
        tokens, grid = self._embed(x)
        rope = self._rope(grid, tokens)
        kept: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if intermediates_only and i > keep[-1]:
                break
            tokens, _ = block(tokens, rope=rope)
            if i in keep:
                kept.append(tokens)
        out = []
        for h in kept:
            h = self.norm(h) if norm else h
            h = h[:, self.n_prefix :]  # (B, gh·gw, D)
            if output_fmt == "NCHW":
                h = rearrange(h, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
            out.append(h)
        if intermediates_only:
            return out
        return self.norm(tokens), out
