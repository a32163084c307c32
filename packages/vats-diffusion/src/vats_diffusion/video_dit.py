"""VideoDiT: a diffusion transformer over video latents with factorized space / time
attention: Latte (Ma et al., 2024, arXiv:2401.03048), the model variant that interleaves
spatial and temporal transformer blocks, on the image DiT's pieces (Peebles & Xie, 2023,
arXiv:2212.09748; PixArt-α's text conditioning, Chen et al., 2023, arXiv:2310.00426).

A clip of latents ``(B, C, T, h, w)`` (the image VAE applied frame by frame, see
:meth:`~vats_diffusion.vae.VAE.encode_frames`) is cut into ``pt × p × p`` tubelets by a
strided Conv3d (``pt = 1``: per-frame patches, as Latte), giving ``F = T / pt`` frames of
``N = (h / p)·(w / p)`` tokens. Each of the ``n_layers`` layers is a pair of adaLN blocks
(:class:`~vats_diffusion.dit_layers.DiTBlock`)::

    x = spatial_block(x, c, text)     # attention within each frame (1 × gh × gw), then
                                      # cross-attention to the text, then an MLP
    x = temporal_block(x, c)          # attention across frames at each patch position
                                      # (F × 1 × 1), then an MLP

and a final adaLN layer projects every token back to its ``pt × p × p`` tubelet of
``C_out`` channels (``2C`` with ``learned_sigma``: the prediction, then the variance).

Cost. Joint attention over a clip's ``F·N`` tokens costs ``O((F·N)²)`` scores per head. The
spatial attention here costs ``O(F·N²)``: linear in the number of frames. The temporal
attention costs ``O(N·F²)``: linear in the tokens per frame, ``N = h·w / p²``. Longer clips
and larger frames both stay affordable; cross-attention costs ``O(F·N·S)``.

Why DiTBlock and not :class:`vats_core.block.FactorizedBlock` (the ViT-3D's space / time
block): a diffusion block is modulated by the conditioning (adaLN shift, scale and gate
from the timestep and pooled text, per sample or per frame), which FactorizedBlock, a
pre-norm encoder block with learned norms and one shared MLP, has no place for. So the
layer is built from two DiTBlocks, each of vats-core's Attention and MLP with its own adaLN
modulation and MLP, as Latte pairs them; that is also what lets
:mod:`vats_diffusion.interop.latte` import diffusers' ``LatteTransformer3DModel`` exactly.
The grouping into frames (spatial) or position lines (temporal) is DiTBlock's
``attn_len``: cross-attention, MLP and modulation act per token, so they run over the whole
clip at once, without repeating the text or the conditioning per frame (a per-frame
conditioning is broadcast onto its frame's tokens).

Conditioning (as :class:`~vats_diffusion.dit.DiT`, without class labels)::

    c = time_embed(sinusoid(t)) + pooled_text_embed(masked_mean(text))

with one timestep per clip (``t (B,)``), or one per frame (``t (B, T)``, the frames of a
tubelet sharing theirs): Diffusion Forcing (Chen et al., 2024, arXiv:2407.01392) trains
each frame at its own noise level, so a noisy frame must be denoised from its cleaner
neighbours and temporal attention has to learn how frames relate. ``c`` is then ``(B, F,
D)``, and every block and the final layer modulate each token with its own frame's vectors:
each block computes its six vectors once per frame, ``(B, F, 6, D)``, and DiTBlock's
``cond_layout`` broadcasts them onto the tokens (frame-major "(f n)" in the spatial blocks,
position-major "(n f)" in the temporal ones), rather than running the adaLN linear per
token. A ``(B, T)`` timestep whose frames are equal gives the ``(B,)`` timestep's output.

adaLN ``zero`` (DiT: a modulation linear per block) or ``single`` (PixArt, Latte: one shared
projection plus a table per block). Masked text follows the image DiT's rules: padding
tokens change nothing (zeroed, left out of cross-attention and the pooled mean), a
``text_mask`` row with no True is the null condition for classifier-free guidance (its
cross-attention adds nothing, its pooled text is zero), and ``text_dropout`` makes rows null
at random in training.

Positions (``pos_embed``), for any clip of up to ``max_frames`` frames:

* ``sincos``: the image DiT's 2D sin-cos table (stretched onto the ``sample_size`` grid)
  added to every frame's tokens at the input, and a 1D sin-cos table over frame indices
  ``0 .. F - 1`` added to the tokens right before the first temporal block, where the
  frames first meet (Latte's placement). A one-frame clip gets no temporal position (as in
  Latte, it is an image). The table is computed for the clip at hand, so any ``F <=
  max_frames / pt`` works (Latte fixes it to ``video_length`` and fails on other lengths,
  Vchitect/Latte#133).
* ``rope3d``: vats-core's 3D RoPE over (frame, row, col): spatial attention rotates by
  (0, row, col), temporal attention by (frame, 0, 0), so each sees exactly the offsets
  along its own axes.
* ``sincos_rope``: the 2D sin-cos table per frame at the input, as ``sincos``, and a 1D
  RoPE over frame indices inside temporal attention, over its whole head dim; nothing is
  added to the tokens for time. The tokens the spatial blocks see are then exactly the
  image DiT's, which is what :func:`inflate_dit` needs: an image DiT's weights make a
  VideoDiT whose every frame is that DiT's prediction until its temporal blocks learn.

RoPE gives attention only the offsets between frames, never which frame is the first: in a
clip whose frames look alike (pure noise, where sampling starts) nothing tells frame 0 from
frame 7, so "moving left" cannot be drawn the right way round. ``frame_embed`` adds a
learned vector per frame (tubelet) to that frame's tokens at the input, zero at init (so an
inflated image DiT still starts exactly as the image DiT): the absolute index, as Latte's
1D sin-cos table gives, without moving the image DiT off its inputs at step 0.

From an image DiT (:func:`inflate_dit`, as Latte initialises from an image model): the
spatial blocks, embedders and final layer take the DiT's weights, the patch embedding is
inflated over the ``pt`` frames of a tubelet (each frame's share ``1 / pt``) and the output
projection repeated for each of them, and the temporal blocks keep their adaLN-Zero init,
the identity.

Shapes: B batch, C / C_out latent channels in / out, T frames, h / w latent height / width,
pt / p tubelet frames / side, F = T / pt, gh / gw = h / p, w / p, N = gh·gw tokens per
frame, D width, S text tokens, Dt text width.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, check_head_fields
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_positive
from vats_core.mlp import Activation
from vats_core.rope import RopeConfig, RotaryEmbedding, grid_positions_3d
from vats_diffusion.dit import DiT, DiTPosEmbed
from vats_diffusion.dit_layers import (
    AdaLNMode,
    ConditionMLP,
    CondLayout,
    DiTBlock,
    DiTBlockConfig,
    check_conditioning_fields,
    check_text_inputs,
    check_timestep,
    context_width,
    dit_block_config,
    embed_text,
    embed_timestep,
    final_layer,
    final_modulation,
    final_shift_scale,
    init_dit_weights,
    latent_size,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    text_embedders,
)

__all__ = [
    "VIDEO_DIT_PRESETS",
    "VideoDiT",
    "VideoDiTConfig",
    "VideoPosEmbed",
    "inflate_dit",
    "video_dit_preset",
]


class VideoPosEmbed(enum.StrEnum):
    SINCOS = "sincos"  # 2D sin-cos per frame at the input + 1D sin-cos over frames (Latte)
    ROPE3D = "rope3d"  # 3D RoPE: (row, col) in spatial attention, frame in temporal attention
    # 2D sin-cos per frame at the input (the image DiT's) + 1D RoPE over frames in temporal
    # attention only: the spatial path is the image DiT's exactly (see inflate_dit)
    SINCOS_ROPE = "sincos_rope"


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoDiTConfig(Config):
    """VideoDiT settings. Defaults: DiT-S/2's width and depth (each of the 12 layers a
    spatial and a temporal block), clips of up to 16 frames, unconditional."""

    # Default latent frame size, S (square) or (h, w): the grid whose sin-cos positions are
    # the integers; other sizes run too (positions stretched onto it, as the image DiT).
    sample_size: int | tuple[int, int] = 32
    max_frames: int = 16  # the longest clip (frames): a longer one is refused
    patch_size: int = 2  # p, the tubelet's height and width
    patch_frames: int = 1  # pt, the tubelet's frames; must divide T (and max_frames)
    in_channels: int = 4  # C
    learned_sigma: bool = False  # C_out = 2C: the prediction, then the variance
    dim: int = 384  # D
    n_layers: int = 12  # layers, each a spatial and a temporal block
    n_heads: int = 6
    n_kv_heads: int | None = None  # GQA key/value heads; None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU_TANH  # DiT's and Latte's approximate GELU
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    window: int | None = None  # self-attention over |i - j| < window (row-major in a frame; frames)
    attention_backend: AttentionBackend = AttentionBackend.AUTO  # local: self-attention only
    norm_eps: float = 1e-6  # the blocks' LayerNorms (the final one is always 1e-6)
    mlp_norm_eps: float | None = None  # the LayerNorm before each MLP; None = norm_eps
    pos_embed: VideoPosEmbed = VideoPosEmbed.SINCOS
    pos_interpolation_scale: float = 1.0  # 2D sin-cos positions are divided by it (PixArt)
    rope_theta: float = 100.0  # grids and clips are tens of positions, not 10k tokens
    # A learned position per frame (tubelet), zero at init, added to that frame's tokens at
    # the input: the absolute frame index, which relative (RoPE) offsets cannot give.
    frame_embed: bool = False
    adaln: AdaLNMode = AdaLNMode.ZERO
    timestep_channels: int = 256  # width of the sinusoid fed to time_embed
    timestep_flip_sin_to_cos: bool = True  # [cos, sin] (DiT, PixArt, Latte)
    timestep_freq_shift: float = 0.0  # diffusers' downscale_freq_shift (Latte 0)
    text_dim: int | None = None  # Dt; None = no text conditioning
    text_proj: bool = True  # project text to D first (Latte's caption_projection) or attend to Dt
    pooled_text: bool = True  # masked-mean text into the adaLN conditioning (not in Latte)
    cross_attn_norm: bool = True  # LayerNorm before cross-attention (Latte, PixArt: none)
    text_dropout: float = 0.0  # training: probability a row becomes the null text condition

    def __post_init__(self) -> None:
        check_positive(
            self,
            "max_frames",
            "patch_size",
            "patch_frames",
            "in_channels",
            "n_layers",
            "mlp_hidden_dim",
            "window",
            "norm_eps",
            "mlp_norm_eps",
            "pos_interpolation_scale",
            "rope_theta",
            "text_dim",
        )
        check(
            self.max_frames % self.patch_frames == 0,
            self,
            "max_frames",
            self.max_frames,
            f"a positive multiple of patch_frames={self.patch_frames}",
        )
        h, w = self.latent_hw
        p = self.patch_size
        check(
            h >= p and w >= p and h % p == 0 and w % p == 0,
            self,
            "sample_size",
            self.sample_size,
            f"a size (or (h, w)) whose sides are positive multiples of patch_size={p}",
        )
        check_conditioning_fields(self)
        rope = self.pos_embed is not VideoPosEmbed.SINCOS
        check_head_fields(self, rope=rope)
        if self.pos_embed is VideoPosEmbed.ROPE3D:
            dh = self.block_config.attention.dh
            check(dh >= 6, self, "head_dim", dh, "an even head dim >= 6 for 3D RoPE")
        if self.pos_embed is not VideoPosEmbed.ROPE3D:
            check(
                self.dim % 4 == 0,
                self,
                "dim",
                self.dim,
                "a multiple of 4 for sincos positions (sin and cos of rows and of columns)",
            )
        _ = self.block_config  # validates the blocks' sub-configs

    @property
    def latent_hw(self) -> tuple[int, int]:
        """``(h, w)`` of ``sample_size``."""
        return latent_size(self)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)`` at ``sample_size``: the 2D sin-cos base grid."""
        h, w = self.latent_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def out_channels(self) -> int:
        """C_out: ``2C`` with ``learned_sigma``, else ``C``."""
        return 2 * self.in_channels if self.learned_sigma else self.in_channels

    @property
    def context_dim(self) -> int | None:
        """Width of the states cross-attention reads: D if ``text_proj``, else Dt."""
        return context_width(self)

    @property
    def block_config(self) -> DiTBlockConfig:
        """The spatial blocks: self-attention within a frame, cross-attention to the text
        (``text_dim`` set), MLP."""
        return dit_block_config(self, self.adaln)

    @property
    def temporal_block_config(self) -> DiTBlockConfig:
        """The temporal blocks: self-attention across frames and an MLP (no text)."""
        return self.block_config.replace(cross_attention=None)


class VideoDiT(PretrainedMixin, nn.Module):
    """The video diffusion transformer; see the module docstring and :class:`VideoDiTConfig`.

    Modules: ``patch_embed`` (Conv3d), ``time_embed``, ``text_proj``, ``pooled_text_embed``,
    ``adaln_single`` (adaLN-single only), ``spatial_blocks``, ``temporal_blocks``,
    ``final_adaln`` (adaLN-Zero) or ``final_scale_shift_table`` (adaLN-single), ``proj_out``.

    Example::

        model = VideoDiT(video_dit_preset("shapes", text_dim=64))
        eps = model(latents, t, text_states=text, text_mask=mask)  # (B, 4, T, 12, 12)
    """

    config_class = VideoDiTConfig

    def __init__(self, config: VideoDiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p, pt = config.dim, config.patch_size, config.patch_frames
        self.patch_embed = nn.Conv3d(config.in_channels, d, (pt, p, p), stride=(pt, p, p))
        self.time_embed = ConditionMLP(config.timestep_channels, d)
        self.text_proj, self.pooled_text_embed = text_embedders(config)
        self.adaln_single = nn.Linear(d, 6 * d) if config.adaln is AdaLNMode.SINGLE else None
        self.frame_embed: nn.Parameter | None = None
        if config.frame_embed:
            self.frame_embed = nn.Parameter(torch.zeros(config.max_frames // pt, d))
        self.rotary: RotaryEmbedding | None = None
        if config.pos_embed is not VideoPosEmbed.SINCOS:
            dh = config.block_config.attention.dh
            axes = 3 if config.pos_embed is VideoPosEmbed.ROPE3D else 1
            self.rotary = RotaryEmbedding(
                RopeConfig(head_dim=dh, theta=config.rope_theta, n_axes=axes)
            )
        spatial, temporal = config.block_config, config.temporal_block_config
        self.spatial_blocks = nn.ModuleList(DiTBlock(spatial) for _ in range(config.n_layers))
        self.temporal_blocks = nn.ModuleList(DiTBlock(temporal) for _ in range(config.n_layers))
        self.final_adaln, self.final_scale_shift_table = final_modulation(d, config.adaln)
        self.proj_out = nn.Linear(d, pt * p * p * config.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The image DiT's init (:func:`~vats_diffusion.dit_layers.init_dit_weights`): a
        fresh model predicts exactly zero, adaLN-Zero blocks start as the identity."""
        init_dit_weights(
            self,
            patch_embed=self.patch_embed,
            embedders=[self.time_embed, self.text_proj, self.pooled_text_embed, self.adaln_single],
            blocks=[*self.spatial_blocks, *self.temporal_blocks],
            final_adaln=self.final_adaln,
            final_scale_shift_table=self.final_scale_shift_table,
            proj_out=self.proj_out,
        )
        if self.frame_embed is not None:
            nn.init.zeros_(self.frame_embed)

    # ------------------------------------------------------------------ inputs

    def _check_inputs(
        self,
        x: Tensor,
        timestep: Tensor,
        text_states: Tensor | None,
        text_mask: Tensor | None,
        text_keep: Tensor | None = None,
    ) -> None:
        """Every input error, before any work (ValueError naming the argument or field)."""
        cfg = self.config
        c, p, pt = cfg.in_channels, cfg.patch_size, cfg.patch_frames
        layout = f"(B, C={c}, T, h, w)"
        if not isinstance(x, Tensor) or x.ndim != 5:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"VideoDiT: x must be a {layout} clip of latents, got {got}")
        weight = self.patch_embed.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if not x.is_floating_point() or (x.dtype != weight.dtype and not autocast):
            raise ValueError(
                f"VideoDiT: x must have the model's dtype {weight.dtype} (or run under "
                f"autocast), got {x.dtype}"
            )
        b, ch, t, h, w = x.shape
        if ch != c:
            raise ValueError(
                f"VideoDiT: x has {ch} channels, expected in_channels={c}: shape {layout}"
            )
        if t < 1 or t > cfg.max_frames or t % pt:
            raise ValueError(
                f"VideoDiT: x has T={t} frames, expected 1 <= T <= VideoDiTConfig.max_frames="
                f"{cfg.max_frames}" + (f", a multiple of patch_frames={pt}" if pt > 1 else "")
            )
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"VideoDiT: x's latent frame size (h, w)=({h}, {w}) is invalid: expected "
                f"positive multiples of patch_size={p}"
            )
        check_timestep("VideoDiT", timestep, b, frames=t, tubelet=pt)
        check_text_inputs("VideoDiT", text_states, text_mask, b, cfg.text_dim, text_keep)

    # ------------------------------------------------------------------ forward

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Tubelet tokens ``(B, F·N, D)`` (frame-major) with 2D sin-cos positions added to
        every frame (and each frame's ``frame_embed``), and ``(F, gh, gw)``."""
        cfg = self.config
        patches = self.patch_embed(x)  # (B, D, F, gh, gw)
        f, gh, gw = patches.shape[2:]
        tokens = rearrange(patches, "b d f h w -> b (f h w) d").contiguous()
        if cfg.pos_embed is not VideoPosEmbed.ROPE3D:
            table = sincos_pos_embed_2d(
                cfg.dim,
                (gh, gw),
                base_grid=cfg.grid,
                interpolation_scale=cfg.pos_interpolation_scale,
                device=x.device,
            ).to(tokens.dtype)  # (N, D)
            tokens = tokens + table.repeat(f, 1)
        if self.frame_embed is not None:  # (F, D) onto each frame's N tokens
            n = gh * gw
            frames = self.frame_embed[:f].to(tokens.dtype)
            tokens = (tokens.view(-1, f, n, cfg.dim) + frames[:, None]).view_as(tokens)
        return tokens, (f, gh, gw)

    def _rope(
        self, f: int, gh: int, gw: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
        """3D RoPE tables: spatial over (0, row, col) ``(1, 1, N, Dh)`` and temporal over
        (frame, 0, 0) ``(1, 1, F, Dh)``; ``sincos_rope``: temporal only, 1D over the frames;
        None for sin-cos positions."""
        if self.rotary is None:
            return None, None
        if self.config.pos_embed is VideoPosEmbed.SINCOS_ROPE:
            return None, self.rotary(torch.arange(f, device=device), dtype)
        spatial = self.rotary(grid_positions_3d(1, gh, gw, device=device), dtype)
        temporal = self.rotary(grid_positions_3d(f, 1, 1, device=device), dtype)
        return spatial, temporal

    def _condition(
        self, timestep: Tensor, pooled: Tensor | None, b: int, f: int, dtype: torch.dtype
    ) -> Tensor:
        """The adaLN conditioning ``c``: ``(B, D)`` from a ``(B,)`` or scalar timestep,
        ``(B, F, D)`` from a ``(B, T)`` one (a tubelet's frames share theirs)."""
        cfg = self.config
        if timestep.ndim < 2:
            c = embed_timestep(cfg, self.time_embed, timestep, b, dtype)  # (B, D)
            return c if pooled is None else c + pooled
        per_tubelet = timestep[:, :: cfg.patch_frames].reshape(b * f)  # (B·F,)
        c = embed_timestep(cfg, self.time_embed, per_tubelet, b * f, dtype).view(b, f, cfg.dim)
        return c if pooled is None else c + pooled[:, None]

    def _final(self, x: Tensor, c: Tensor, layout: CondLayout | None) -> Tensor:
        """Final adaLN LayerNorm and projection: ``(B, F·N, D) -> (B, F·N, pt·p·p·C_out)``."""
        shift, scale = final_shift_scale(c, self.final_adaln, self.final_scale_shift_table)
        return final_layer(x, shift, scale, self.proj_out, layout)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        *,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> Tensor:
        """Predict from a clip of noisy latents.

        Spatial attention costs ``O(F·N²)`` per head, linear in the frames T; temporal
        attention ``O(N·F²)``, linear in the ``N = h·w / p²`` tokens per frame (module
        docstring).

        Args:
            x: ``(B, C, T, h, w)`` latents, the model's dtype; ``1 <= T <= max_frames`` (a
                multiple of ``patch_frames``), ``h`` and ``w`` multiples of ``patch_size``.
            timestep: ``(B,)`` (or a scalar for the whole batch), ints or floats; or
                ``(B, T)``, one per frame (Diffusion Forcing: each frame at its own noise
                level), equal within each tubelet of ``patch_frames`` frames.
            text_states: ``(B, S, Dt)`` text encoder states; None = the null text
                condition for every row. Models with ``text_dim`` only.
            text_mask: ``(B, S)`` bool, True = real token; None = all real. A row with no
                True is the null text condition.
            text_keep: ``(B,)`` bool, True = the row keeps its text (False: the null text
                condition), in place of ``text_dropout``'s draw; None = drawn in training.

        Returns:
            ``(B, C_out, T, h, w)``: with ``learned_sigma`` the ``C`` prediction channels,
            then the ``C`` variance channels.

        Raises:
            ValueError: bad shapes or dtypes, more than ``max_frames`` frames, a per-frame
                timestep that is not ``(B, T)`` or differs within a tubelet, text states of
                the wrong width, a mask that does not fit them, or text given to a model
                without text conditioning.
        """
        self._check_inputs(x, timestep, text_states, text_mask, text_keep)
        cfg = self.config
        b = x.shape[0]
        # 1. Tubelets, spatial positions.
        tokens, (f, gh, gw) = self._embed(x)  # (B, F·N, D), frame-major
        n, d = gh * gw, cfg.dim
        rope_s, rope_t = self._rope(f, gh, gw, tokens.dtype, x.device)
        time_table = None
        if cfg.pos_embed is VideoPosEmbed.SINCOS and f > 1:
            time_table = sincos_pos_embed_1d(d, f, device=x.device).to(tokens.dtype)  # (F, D)
        # 2. Text: projected context, its mask, the gate of text-less rows, pooled text.
        context = context_mask = gate = pooled = None
        if text_states is not None:
            context, context_mask, gate, pooled = embed_text(
                text_states.to(tokens.dtype),
                text_mask,
                text_proj=self.text_proj,
                pooled_text_embed=self.pooled_text_embed,
                text_dropout=cfg.text_dropout,
                training=self.training,
                keep=text_keep,
            )
        # 3. The adaLN conditioning and what each block reads from it: per clip, or per
        # frame (a (B, T) timestep), each frame's vectors then laid onto its tokens.
        c = self._condition(timestep, pooled, b, f, tokens.dtype)  # (B, D) or (B, F, D)
        frame_major = position_major = None
        if c.ndim == 3:
            frame_major, position_major = CondLayout.OUTER, CondLayout.INNER
        cond = F.silu(c)
        if self.adaln_single is not None:
            cond = self.adaln_single(cond)  # (B, 6D) or (B, F, 6D), shared by every block
        # 4. Layers: within each frame (with the text), then across frames.
        pairs = zip(self.spatial_blocks, self.temporal_blocks, strict=True)
        for i, (spatial, temporal) in enumerate(pairs):
            tokens = spatial(
                tokens,
                cond,
                rope=rope_s,
                context=context,
                context_mask=context_mask,
                context_gate=gate,
                attn_len=n,
                cond_layout=frame_major,
            )
            tokens = rearrange(tokens, "b (f n) d -> b (n f) d", f=f)  # position-major
            if i == 0 and time_table is not None:
                tokens = (tokens.view(b, n, f, d) + time_table).view(b, n * f, d)
            tokens = temporal(tokens, cond, rope=rope_t, attn_len=f, cond_layout=position_major)
            tokens = rearrange(tokens, "b (n f) d -> b (f n) d", f=f)  # frame-major
        # 5. Final layer, unpatchify (channels last within a tubelet, as DiT).
        out = self._final(tokens, c, frame_major)  # (B, F·N, pt·p·p·C_out)
        p, pt = cfg.patch_size, cfg.patch_frames
        return rearrange(
            out,
            "b (f h w) (r p q c) -> b c (f r) (h p) (w q)",
            f=f,
            h=gh,
            w=gw,
            r=pt,
            p=p,
            q=p,
        )


# ---------------------------------------------------------------------- from an image DiT

# The VideoDiTConfig fields that shape the spatial path, which must equal the image DiT's.
INFLATED_FIELDS = (
    "sample_size", "patch_size", "in_channels", "learned_sigma", "dim", "n_layers", "n_heads",
    "n_kv_heads", "head_dim", "mlp_hidden_dim", "mlp_activation", "qkv_bias", "out_bias",
    "qk_norm", "window", "norm_eps", "mlp_norm_eps", "pos_interpolation_scale", "adaln",
    "timestep_channels", "timestep_flip_sin_to_cos", "timestep_freq_shift", "text_dim",
    "text_proj", "pooled_text", "cross_attn_norm",
)  # fmt: skip


def inflate_dit(image: DiT, config: VideoDiTConfig) -> VideoDiT:
    """A VideoDiT initialised from an image DiT (Latte's initialisation from an image model).

    The spatial blocks take the DiT's blocks, the timestep, text and adaLN embedders and the
    final layer take the DiT's; the Conv2d patch embedding becomes the Conv3d one with each
    of a tubelet's ``pt`` frames weighted ``1 / pt``, and the output projection is repeated
    for each of them. The temporal blocks and ``frame_embed`` keep their fresh init. With
    ``adaln="zero"`` the blocks are the identity and ``frame_embed`` is zero, so with
    ``pos_embed="sincos_rope"`` (no time table in the tokens) and ``patch_frames=1`` the new
    model predicts, for every frame of any clip, exactly what the image DiT predicts for
    that frame alone; with ``pt > 1``, for a clip whose tubelets hold one repeated frame. Training then teaches the temporal blocks the motion.

    Args:
        image: a text- or un-conditioned DiT with 2D sin-cos positions and no class labels.
        config: the VideoDiT's config: the fields of :data:`INFLATED_FIELDS` equal to the
            DiT's, ``pos_embed`` ``sincos_rope`` or ``sincos``; frames, tubelets and
            ``text_dropout`` are its own.

    Raises:
        ValueError: a DiT the VideoDiT cannot take (class labels, RoPE positions) or a
            config whose field differs from the DiT's, naming the field and both values.
    """
    src = image.config
    if src.num_classes:
        raise ValueError(
            f"inflate_dit: the image DiT has num_classes={src.num_classes}: a VideoDiT has "
            "no class labels (expected a DiT with num_classes=0)"
        )
    if src.pos_embed is not DiTPosEmbed.SINCOS:
        raise ValueError(
            f"inflate_dit: the image DiT has pos_embed={src.pos_embed.value!r}: expected "
            "'sincos' (2D RoPE does not split its head dims as the VideoDiT's 3D RoPE does)"
        )
    if config.pos_embed is VideoPosEmbed.ROPE3D:
        raise ValueError(
            "inflate_dit: VideoDiTConfig.pos_embed='rope3d' is invalid: expected "
            "'sincos_rope' (or 'sincos'), whose per-frame positions are the image DiT's"
        )
    for field in INFLATED_FIELDS:
        a, b = getattr(config, field), getattr(src, field)
        if a != b:
            raise ValueError(
                f"inflate_dit: VideoDiTConfig.{field}={a!r} is invalid: expected the image "
                f"DiT's {field}={b!r}"
            )
    video = VideoDiT(config)
    pt = config.patch_frames
    state = {}
    for name, tensor in image.state_dict().items():
        if name.startswith("blocks."):
            state["spatial_" + name] = tensor
        elif name == "patch_embed.weight":  # (D, C, p, p) -> (D, C, pt, p, p)
            state[name] = tensor.unsqueeze(2).expand(-1, -1, pt, -1, -1) / pt
        elif name.startswith("proj_out."):  # rows (p q c) -> (r p q c)
            state[name] = tensor.repeat(pt, *([1] * (tensor.ndim - 1)))
        else:
            state[name] = tensor
    own = video.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:  # every DiT field the VideoDiT lacks is refused above; a guard for new ones
        raise ValueError(f"inflate_dit: the image DiT has weights a VideoDiT lacks: {unknown}")
    fresh = ("temporal_blocks.", "frame_embed")  # the VideoDiT's own, kept at their init
    missing = [k for k in own if k not in state and not k.startswith(fresh)]
    if missing:
        raise ValueError(f"inflate_dit: the image DiT lacks the VideoDiT's weights {missing}")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    video.load_state_dict(own)
    return video


# ---------------------------------------------------------------------- presets

VIDEO_DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: text, GQA, learned sigma, pooled text; a forward in milliseconds.
    "tiny": dict(
        sample_size=8,
        max_frames=8,
        patch_size=2,
        in_channels=4,
        learned_sigma=True,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        text_dim=24,
    ),
    # Latte's layout in miniature: text only, adaLN-single, no pooled text, no
    # cross-attention norm, learned sigma, timestep shift 0, sin-cos positions.
    "latte-tiny": dict(
        sample_size=8,
        max_frames=8,
        patch_size=2,
        in_channels=4,
        learned_sigma=True,
        dim=32,
        n_layers=2,
        n_heads=4,
        mlp_hidden_dim=128,
        adaln=AdaLNMode.SINGLE,
        text_dim=24,
        pooled_text=False,
        cross_attn_norm=False,
    ),
    # The CPU demo: text-conditioned, on clips of 4 or 8 frames of 4-channel 12×12 latents
    # (24×24-pixel frames through the "shapes" VAE, f = 2); the image DiT's "shapes" width
    # and depth, so 36 tokens per frame. Pass the text encoder's width as text_dim.
    "shapes": dict(
        sample_size=12,
        max_frames=8,
        patch_size=2,
        in_channels=4,
        dim=128,
        n_layers=4,
        n_heads=4,
        mlp_hidden_dim=512,
        text_dim=64,
        text_dropout=0.1,
    ),
}


def video_dit_preset(name: str, **overrides: Any) -> VideoDiTConfig:
    """The named :class:`VideoDiTConfig` (:data:`VIDEO_DIT_PRESETS`), with fields replaced by
    ``overrides``. Example: ``video_dit_preset("shapes", text_dim=128, max_frames=16)``."""
    if name not in VIDEO_DIT_PRESETS:
        raise ValueError(
            f"unknown VideoDiT preset {name!r}: expected one of {sorted(VIDEO_DIT_PRESETS)}"
        )
    return VideoDiTConfig(**{**VIDEO_DIT_PRESETS[name], **overrides})
