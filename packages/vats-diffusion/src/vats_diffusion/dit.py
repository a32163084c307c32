"""DiT: the diffusion transformer over image latents (Peebles & Xie, 2023, arXiv:2212.09748),
with PixArt-α's text conditioning (Chen et al., 2023, arXiv:2310.00426).

A latent ``(B, C, h, w)`` of any size whose sides are multiples of the patch size ``p`` is
cut into ``p × p`` patches by a strided Conv2d, mixed by adaLN transformer blocks
(:class:`~vats_diffusion.dit_layers.DiTBlock`) and projected back to ``(B, C_out, h, w)``:
the noise (or velocity) prediction, with the learned variance's ``C`` channels after it when
``learned_sigma`` (``C_out = 2C``, DiT's layout).

Conditioning. A vector ``c (B, D)`` drives every adaLN modulation::

    c = time_embed(sinusoid(t)) + class_embed(y) + pooled_text_embed(masked_mean(text))

* timestep: :func:`~vats_diffusion.dit_layers.timestep_embedding` (``timestep_channels``,
  ``timestep_flip_sin_to_cos``, ``timestep_freq_shift`` match diffusers' ``Timesteps``)
  then an MLP (``time_embed``);
* class labels (``num_classes = K > 0``): an embedding table of ``K + 1`` rows, the last
  (index ``K``) the null label for classifier-free guidance, as DiT; in training mode
  ``class_dropout`` replaces labels with it at random;
* text (``text_dim`` set): the text states ``(B, S, Dt)`` are projected to the width
  (``text_proj``, PixArt's caption projection) and read by a cross-attention in every block,
  with ``text_mask`` as its key padding mask; with ``pooled_text`` their masked mean over real
  tokens also goes through an MLP into ``c`` (PixArt has none; on by default here).

adaLN (``adaln``): ``zero`` (DiT) gives each block and the final layer its own modulation
linear of ``silu(c)``; ``single`` (PixArt) computes the six block vectors once and adds a
learned table per block, and the final layer adds its table to ``c`` itself.

Masked text. Padding text tokens change nothing: they are zeroed on input, left out of
cross-attention as keys and out of the pooled mean, so the same prompt padded to 8 or to 77
positions gives the same prediction (the gap of SD3, diffusers#8673, and Flux,
diffusers#10194). The null text condition for classifier-free guidance is a row of
``text_mask`` with no True (or ``text_states=None`` for the whole batch, which is the same
function): its cross-attention adds exactly nothing (not even the output bias) and its
pooled-text term is zero, so the row is conditioned on the timestep (and class) only. Such
rows give finite, deterministic outputs. In training mode ``text_dropout`` turns rows into
the null condition at random.

Positions (``pos_embed``): ``sincos`` adds fixed 2D sin-cos positions (diffusers'
numerics, rescaled onto the ``sample_size`` grid for other sizes, see
:func:`~vats_diffusion.dit_layers.sincos_pos_embed_2d`); ``rope2d`` rotates queries and keys
by each patch's integer (row, col) (vats-core RoPE). Attention is vats-core's: GQA
(``n_kv_heads``), a bidirectional sliding ``window`` over the row-major tokens, QK-norm and
every backend.

Shapes: B batch, C / C_out latent channels in / out, h / w latent height / width, p patch,
gh / gw = h / p, w / p, N = gh·gw tokens, D width, S text tokens, Dt text width, K classes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import AttentionBackend, AttentionConfig, check_head_fields
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import (
    Config,
    check,
    check_at_least,
    check_positive,
    check_probability,
)
from vats_core.mlp import Activation
from vats_core.rope import RopeConfig, RotaryEmbedding, grid_positions_2d
from vats_diffusion.dit_layers import (
    AdaLNMode,
    ConditionMLP,
    DiTBlock,
    DiTBlockConfig,
    check_conditioning_fields,
    check_text_inputs,
    check_timestep,
    context_width,
    dit_attention_config,
    dit_block_config,
    embed_text,
    embed_timestep,
    final_layer,
    final_modulation,
    final_shift_scale,
    init_dit_weights,
    latent_size,
    sincos_pos_embed_2d,
    text_embedders,
)

__all__ = ["DIT_PRESETS", "AdaLNMode", "DiT", "DiTConfig", "DiTPosEmbed", "dit_preset"]


class DiTPosEmbed(enum.StrEnum):
    SINCOS = "sincos"  # fixed 2D sin-cos table added to the patch tokens (DiT, PixArt)
    ROPE2D = "rope2d"  # axial 2D RoPE over each patch's (row, col) in every self-attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(Config):
    """DiT settings. Defaults are the DiT-S/2 shape, unconditional (timestep only)."""

    # Default latent size, S (square) or (h, w): the grid whose sin-cos positions are the
    # integers; other sizes run too (positions stretched onto it, as diffusers does).
    sample_size: int | tuple[int, int] = 32
    patch_size: int = 2  # p
    in_channels: int = 4  # C
    learned_sigma: bool = False  # C_out = 2C: the prediction, then the variance (DiT)
    dim: int = 384  # D
    n_layers: int = 12
    n_heads: int = 6
    n_kv_heads: int | None = None  # GQA key/value heads; None = n_heads
    head_dim: int | None = None  # None = dim // n_heads
    mlp_hidden_dim: int | None = None  # None = 4 * dim
    mlp_activation: Activation = Activation.GELU_TANH  # DiT's approximate GELU
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (SD3, Flux)
    window: int | None = None  # self-attention over |i - j| < window of the row-major tokens
    attention_backend: AttentionBackend = AttentionBackend.AUTO  # local: self-attention only
    norm_eps: float = 1e-6  # the blocks' LayerNorms (the final one is always 1e-6)
    mlp_norm_eps: float | None = None  # the LayerNorm before each MLP; None = norm_eps
    pos_embed: DiTPosEmbed = DiTPosEmbed.SINCOS
    pos_interpolation_scale: float = 1.0  # sin-cos positions are divided by it (PixArt)
    rope_theta: float = 100.0  # latent grids are tens of patches, not 10k tokens
    adaln: AdaLNMode = AdaLNMode.ZERO
    timestep_channels: int = 256  # width of the sinusoid fed to time_embed
    timestep_flip_sin_to_cos: bool = True  # [cos, sin] (DiT, PixArt)
    timestep_freq_shift: float = 0.0  # diffusers' downscale_freq_shift (DiT 1, PixArt 0)
    num_classes: int = 0  # K; 0 = no class conditioning; label K is the null label
    class_dropout: float = 0.0  # training: probability a label becomes the null label
    text_dim: int | None = None  # Dt; None = no text conditioning
    text_proj: bool = True  # project text to D first (PixArt caption_projection) or attend to Dt
    pooled_text: bool = True  # masked-mean text into the adaLN conditioning (not in PixArt)
    cross_attn_norm: bool = True  # LayerNorm before cross-attention (PixArt: none)
    text_dropout: float = 0.0  # training: probability a row becomes the null text condition

    def __post_init__(self) -> None:
        check_positive(
            self, "patch_size", "in_channels", "n_layers", "mlp_hidden_dim", "window", "norm_eps"
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
        check_positive(self, "mlp_norm_eps", "pos_interpolation_scale", "rope_theta", "text_dim")
        check_at_least(self, 0, "num_classes")
        check_probability(self, "class_dropout", "text_dropout")
        check(
            self.class_dropout == 0 or self.num_classes > 0,
            self,
            "class_dropout",
            self.class_dropout,
            "0 when num_classes=0 (no labels to drop)",
        )
        check_conditioning_fields(self)
        rope = self.pos_embed is DiTPosEmbed.ROPE2D
        check_head_fields(self, rope=rope)
        if rope:
            dh = self.attention_config.dh
            check(dh >= 4, self, "head_dim", dh, "an even head dim >= 4 for 2D RoPE")
        else:
            check(
                self.dim % 4 == 0,
                self,
                "dim",
                self.dim,
                "a multiple of 4 for sincos positions (sin and cos of rows and of columns)",
            )
        _ = self.block_config  # validates the block's sub-configs

    @property
    def latent_hw(self) -> tuple[int, int]:
        """``(h, w)`` of ``sample_size``."""
        return latent_size(self)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)`` at ``sample_size``: the sin-cos base grid."""
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
    def attention_config(self) -> AttentionConfig:
        return dit_attention_config(self)

    @property
    def block_config(self) -> DiTBlockConfig:
        """The block every layer is built from."""
        return dit_block_config(self, self.adaln)


class DiT(PretrainedMixin, nn.Module):
    """The diffusion transformer; see the module docstring and :class:`DiTConfig`.

    Modules: ``patch_embed`` (Conv2d), ``time_embed``, ``class_embed``, ``text_proj``,
    ``pooled_text_embed``, ``adaln_single`` (adaLN-single only), ``blocks``, ``final_adaln``
    (adaLN-Zero) or ``final_scale_shift_table`` (adaLN-single), ``proj_out``.
    """

    config_class = DiTConfig

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_size
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.time_embed = ConditionMLP(config.timestep_channels, d)
        self.class_embed = (
            nn.Embedding(config.num_classes + 1, d) if config.num_classes > 0 else None
        )
        self.text_proj, self.pooled_text_embed = text_embedders(config)
        self.adaln_single = nn.Linear(d, 6 * d) if config.adaln is AdaLNMode.SINGLE else None
        self.rotary: RotaryEmbedding | None = None
        block = config.block_config
        if config.pos_embed is DiTPosEmbed.ROPE2D:
            rope = RopeConfig(head_dim=block.attention.dh, theta=config.rope_theta, n_axes=2)
            self.rotary = RotaryEmbedding(rope)
        self.blocks = nn.ModuleList(DiTBlock(block) for _ in range(config.n_layers))
        self.final_adaln, self.final_scale_shift_table = final_modulation(d, config.adaln)
        self.proj_out = nn.Linear(d, p * p * config.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init (:func:`~vats_diffusion.dit_layers.init_dit_weights`): Xavier-uniform
        linears and patch conv, N(0, 0.02) embedders. adaLN-Zero zeroes every modulation
        linear, so each block starts as the identity; adaLN-single follows PixArt (N(0, 1/D)
        tables, zero cross-attention output projections). The final projection is zero in
        both: a fresh model predicts exactly zero."""
        init_dit_weights(
            self,
            patch_embed=self.patch_embed,
            embedders=[
                self.time_embed,
                self.text_proj,
                self.pooled_text_embed,
                self.adaln_single,
                self.class_embed,
            ],
            blocks=self.blocks,
            final_adaln=self.final_adaln,
            final_scale_shift_table=self.final_scale_shift_table,
            proj_out=self.proj_out,
        )

    # ------------------------------------------------------------------ inputs

    def _check_inputs(
        self,
        x: Tensor,
        timestep: Tensor,
        class_labels: Tensor | None,
        text_states: Tensor | None,
        text_mask: Tensor | None,
        text_keep: Tensor | None = None,
    ) -> None:
        """Every input error, before any work (ValueError naming the argument)."""
        cfg = self.config
        c, p = cfg.in_channels, cfg.patch_size
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DiT: x must be a floating (B, C={c}, h, w) latent, got {got}")
        b, ch, h, w = x.shape
        if ch != c:
            raise ValueError(
                f"DiT: x has {ch} channels, expected in_channels={c}: shape (B, {c}, h, w)"
            )
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"DiT: x's latent size (h, w)=({h}, {w}) is invalid: expected positive "
                f"multiples of patch_size={p}"
            )
        check_timestep("DiT", timestep, b)
        self._check_labels(class_labels, b)
        self._check_text(text_states, text_mask, b, text_keep)

    def _check_labels(self, labels: Tensor | None, b: int) -> None:
        k = self.config.num_classes
        if labels is None:
            return
        if k == 0:
            raise ValueError(
                "DiT: class_labels given, but the model has no classes (num_classes=0)"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.dtype == torch.bool
            or tuple(labels.shape) != (b,)
        ):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else labels
            raise ValueError(
                f"DiT: class_labels must be an integer (B,) = ({b},) tensor, got {got}"
            )
        if not torch.compiler.is_compiling() and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > k:
                raise ValueError(
                    f"DiT: class_labels out of range [{lo}, {hi}]: expected labels in [0, "
                    f"num_classes={k}] ({k} = the null label for classifier-free guidance)"
                )

    def _check_text(
        self, states: Tensor | None, mask: Tensor | None, b: int, keep: Tensor | None = None
    ) -> None:
        check_text_inputs("DiT", states, mask, b, self.config.text_dim, keep)

    # ------------------------------------------------------------------ conditioning

    def _labels(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor:
        """``(B,)`` labels with the null label for None and, in training, for dropped rows."""
        k = self.config.num_classes
        if labels is None:
            return torch.full((b,), k, dtype=torch.long, device=device)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(b, device=device) < self.config.class_dropout
            labels = torch.where(drop, k, labels)
        return labels

    def _text(
        self, states: Tensor, mask: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Project and pool the text.

        Returns:
            ``(context (B, S, Dc), context_mask (B, S) | None, gate (B, 1, 1) | None,
            pooled (B, D) | None)``: gate and pooled are 0 for rows with no real token.
        """
        return embed_text(
            states,
            mask,
            text_proj=self.text_proj,
            pooled_text_embed=self.pooled_text_embed,
            text_dropout=self.config.text_dropout,
            training=self.training,
            keep=keep,
        )

    def condition(
        self,
        timestep: Tensor,
        *,
        class_labels: Tensor | None = None,
        pooled_text: Tensor | None = None,
        batch: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """The adaLN conditioning ``c (B, D)`` (module docstring)."""
        c = embed_timestep(self.config, self.time_embed, timestep, batch, dtype)  # (B, D)
        if self.class_embed is not None:
            c = c + self.class_embed(self._labels(class_labels, batch, timestep.device))
        if pooled_text is not None:
            c = c + pooled_text
        return c

    # ------------------------------------------------------------------ forward

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens ``(B, N, D)`` with sin-cos positions added, and the grid."""
        cfg = self.config
        patches = self.patch_embed(x)  # (B, D, gh, gw)
        grid = (patches.shape[2], patches.shape[3])
        # contiguous: else the strided view's layout runs through every block, and each
        # LayerNorm copies its input (the eager forward was 8 % slower, measured)
        tokens = rearrange(patches, "b d h w -> b (h w) d").contiguous()
        if cfg.pos_embed is DiTPosEmbed.SINCOS:
            table = sincos_pos_embed_2d(
                cfg.dim,
                grid,
                base_grid=cfg.grid,
                interpolation_scale=cfg.pos_interpolation_scale,
                device=x.device,
            )  # (N, D)
            tokens = tokens + table.to(tokens.dtype)
        return tokens, grid

    def _final(self, x: Tensor, c: Tensor) -> Tensor:
        """Final adaLN LayerNorm and projection: ``(B, N, D) -> (B, N, p·p·C_out)``."""
        shift, scale = final_shift_scale(c, self.final_adaln, self.final_scale_shift_table)
        return final_layer(x, shift, scale, self.proj_out)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        *,
        class_labels: Tensor | None = None,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> Tensor:
        """Predict from noisy latents.

        Args:
            x: ``(B, C, h, w)`` latents; ``h`` and ``w`` multiples of ``patch_size``, any
                aspect ratio.
            timestep: ``(B,)`` (or a scalar for the whole batch), ints or floats.
            class_labels: ``(B,)`` ints in ``[0, K]``, ``K`` = the null label; None = the
                null label for every row. Models with ``num_classes > 0`` only.
            text_states: ``(B, S, Dt)`` text encoder states; None = the null text
                condition for every row. Models with ``text_dim`` only.
            text_mask: ``(B, S)`` bool, True = real token; None = all real. A row with no
                True is the null text condition.
            text_keep: ``(B,)`` bool, True = the row keeps its text (False: the null text
                condition), in place of ``text_dropout``'s draw; None = drawn in training.

        Returns:
            ``(B, C_out, h, w)``: with ``learned_sigma`` the ``C`` prediction channels,
            then the ``C`` variance channels.

        Raises:
            ValueError: bad shapes, dtypes, labels out of range, or conditioning the model
                does not have.
        """
        self._check_inputs(x, timestep, class_labels, text_states, text_mask, text_keep)
        cfg = self.config
        b = x.shape[0]
        # 1. Patches, positions.
        tokens, grid = self._embed(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(grid_positions_2d(*grid, device=x.device), tokens.dtype)
        # 2. Text: projected context, its mask, the gate of text-less rows, pooled text.
        context = context_mask = gate = pooled = None
        if text_states is not None:
            context, context_mask, gate, pooled = self._text(
                text_states.to(tokens.dtype), text_mask, text_keep
            )
        # 3. The adaLN conditioning and what each block reads from it.
        c = self.condition(
            timestep, class_labels=class_labels, pooled_text=pooled, batch=b, dtype=tokens.dtype
        )
        cond = F.silu(c)
        if self.adaln_single is not None:
            cond = self.adaln_single(cond)  # (B, 6D), shared by every block
        # 4. Blocks.
        for block in self.blocks:
            tokens = block(
                tokens,
                cond,
                rope=rope,
                context=context,
                context_mask=context_mask,
                context_gate=gate,
            )
        # 5. Final layer, unpatchify (channels last within a patch: DiT's layout).
        out = self._final(tokens, c)  # (B, N, p·p·C_out)
        p = cfg.patch_size
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)


# ---------------------------------------------------------------------- presets

DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: class labels and text together, GQA, learned sigma; a forward in milliseconds.
    "tiny": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        learned_sigma=True,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_dim=64,
        num_classes=10,
        text_dim=24,
    ),
    # PixArt's layout in miniature: text only, adaLN-single, no pooled text, no
    # cross-attention norm, learned sigma, timestep shift 0.
    "pixart-tiny": dict(
        sample_size=8,
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
    # The CPU demo: text-conditioned, on 4-channel 8×8 latents of 32×32 shape images (16×16
    # latents run too; pass sample_size=16 to make them the base grid).
    "shapes": dict(
        sample_size=8,
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


def _dit_imagenet(dim: int, depth: int, heads: int) -> dict[str, Any]:
    """DiT's class-conditional ImageNet models (Peebles & Xie, Table 1) at 256² (32×32
    latents): learned sigma, 1000 classes, the timestep shift and MLP-norm eps of the
    diffusers port."""
    return dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        learned_sigma=True,
        dim=dim,
        n_layers=depth,
        n_heads=heads,
        num_classes=1000,
        timestep_freq_shift=1.0,
        mlp_norm_eps=1e-5,
    )


DIT_PRESETS.update(
    {
        "DiT-S/2": _dit_imagenet(384, 12, 6),
        "DiT-B/2": _dit_imagenet(768, 12, 12),
        "DiT-L/2": _dit_imagenet(1024, 24, 16),
        "DiT-XL/2": _dit_imagenet(1152, 28, 16),
    }
)


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    """The named :class:`DiTConfig` (:data:`DIT_PRESETS`), with fields replaced by
    ``overrides``. Example: ``dit_preset("shapes", text_dim=128, sample_size=16)``."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}: expected one of {sorted(DIT_PRESETS)}")
    return DiTConfig(**{**DIT_PRESETS[name], **overrides})
