"""VAE: the KL-regularised convolutional autoencoder of latent diffusion.

The first stage of Stable Diffusion (Rombach et al., 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", arXiv:2112.10752), a variational autoencoder (Kingma &
Welling, 2014, arXiv:1312.6114) whose encoder maps an image to a diagonal Gaussian over a
latent ``f`` times smaller per side, and whose decoder maps a latent back to pixels. It
computes the same function as diffusers' ``AutoencoderKL`` (``interop.vae`` imports one).

Architecture (``L = len(block_out_channels)`` levels, ``f = 2 ** (L - 1)``)::

    encoder: conv_in -> L levels of [layers_per_block ResnetBlocks, 2x Downsample (not the
             last)] -> mid block -> GroupNorm, SiLU, conv_out -> 2·Cz moments
    quant_conv (1x1, optional) -> DiagonalGaussian(mean, logvar)
    post_quant_conv (1x1, optional)
    decoder: conv_in -> mid block -> L levels of [layers_per_block + 1 ResnetBlocks,
             nearest-neighbour 2x Upsample + conv (not the last)] -> GroupNorm, SiLU, conv_out

A ResnetBlock is GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv plus a shortcut (a 1x1
conv when the channel count changes). The mid block is ResnetBlock, single-head
self-attention over the ``h·w`` positions (GroupNorm first, residual after; through
:class:`vats_core.attention.Attention`, as diffusers' VAE uses one head whose width is
every channel), ResnetBlock. Downsampling pads one zero row and column at the bottom
right and applies a stride-2 3x3 conv, as the LDM / diffusers checkpoints expect.

Latents for a diffusion model are ``(z - shift_factor) * scaling_factor``
(:meth:`VAE.encode_latents`), undone by :meth:`VAE.decode_latents`; ``scaling_factor`` is
chosen so those latents have about unit variance (0.18215 for SD 1.x/2.x).

Tiling: :meth:`VAE.encode` and :meth:`VAE.decode` take ``tile_size`` / ``tile_overlap``
(pixels; defaults from the config). A large input is cut into overlapping tiles laid out
evenly, each tile runs through the network alone, and the outputs are blended with linear
ramps across the overlaps (weights normalised to sum to one everywhere), so under
``torch.no_grad`` the activations held at once are those of one tile, whatever the image
size; only the output itself grows. Tiles are not exactly the untiled function: GroupNorm
statistics and the mid-block attention see one tile, not the whole image.

Video: :meth:`VAE.encode_frames` and :meth:`VAE.decode_frames` apply the image VAE to every
frame of ``(B, C, T, H, W)`` clips, ``chunk`` frames a call, so that memory beyond the
result stays flat in the clip length (the latents ``(B, Cz, T, h, w)`` a video diffusion
transformer reads).

Shapes: B batch, C image channels, H / W image height / width, f downsampling factor,
h / w latent height / width (H / f, W / f), Cz latent channels, T = h·w mid-block tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vats_core.attention import Attention, AttentionBackend, AttentionConfig
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check, check_positive, is_int

__all__ = [
    "VAE",
    "VAE_PRESETS",
    "DiagonalGaussian",
    "VAEConfig",
    "tile_map",
    "tile_spans",
    "vae_preset",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers / LDM clamp the log-variance here


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig(Config):
    """VAE settings. Defaults are the SD 1.x/2.x ``AutoencoderKL`` shape (f = 8)."""

    in_channels: int = 3  # C of the images encoded
    out_channels: int = 3  # C of the images decoded
    # Width of each level, finest first; L levels downsample by f = 2 ** (L - 1).
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    latent_channels: int = 4  # Cz
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    norm_eps: float = 1e-6
    mid_attention: bool = True  # self-attention in both mid blocks (diffusers' default)
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before the decoder
    scaling_factor: float = 0.18215  # latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # diffusers' None (SD 1.x/2.x, SDXL) is 0
    # Tiling defaults for encode / decode, in pixels (multiples of f). None: never tile.
    tile_size: int | None = None
    tile_overlap: int | None = None  # None = tile_size // 4 (diffusers' factor), rounded to f
    attention_backend: AttentionBackend = AttentionBackend.AUTO

    def __post_init__(self) -> None:
        check_positive(self, "in_channels", "out_channels", "layers_per_block", "latent_channels")
        check_positive(self, "norm_num_groups", "norm_eps", "scaling_factor")
        check(math.isfinite(self.shift_factor), self, "shift_factor", self.shift_factor, "finite")
        chans = self.block_out_channels
        groups = self.norm_num_groups
        ok = len(chans) >= 1 and all(c >= 1 and c % groups == 0 for c in chans)
        allowed = f"a non-empty list of positive multiples of norm_num_groups={groups}"
        check(ok, self, "block_out_channels", chans, allowed)
        f = self.downsample_factor
        if self.tile_size is not None:
            check(
                self.tile_size >= f and self.tile_size % f == 0,
                self,
                "tile_size",
                self.tile_size,
                f"None or a positive multiple of the downsampling factor f={f}",
            )
        if self.tile_overlap is not None:
            limit = "" if self.tile_size is None else f" and < tile_size={self.tile_size}"
            ok = self.tile_overlap >= 0 and self.tile_overlap % f == 0
            ok = ok and (self.tile_size is None or self.tile_overlap < self.tile_size)
            check(
                ok,
                self,
                "tile_overlap",
                self.tile_overlap,
                f"None or a multiple of f={f} that is >= 0{limit}",
            )

    @property
    def downsample_factor(self) -> int:
        """f: how many pixels per latent position along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The encoder's posterior: independent Gaussians per latent element.

    ``logvar`` is clamped to [-30, 20] as diffusers and LDM do, so ``std`` never under- or
    overflows in float32.

    Args:
        mean: ``(B, Cz, h, w)``.
        logvar: ``(B, Cz, h, w)``, before clamping.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(
                f"DiagonalGaussian: mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} "
                "must have the same shape"
            )
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split ``(B, 2·Cz, h, w)`` encoder moments into mean (first Cz) and logvar."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps``, ``eps ~ N(0, I)`` drawn from ``generator`` (global RNG if
        None), on the generator's device then moved, as diffusers does, so a CPU generator
        gives the same sample on any device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely latent: ``mean``."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other), summed over latent elements: ``(B,)``; ``other`` None is N(0, I)."""
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.flatten(1).sum(dim=1)

    def nll(self, sample: Tensor) -> Tensor:
        """Negative log-likelihood of ``sample`` ``(B, Cz, h, w)``, summed: ``(B,)``."""
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.flatten(1).sum(dim=1)


# --------------------------------------------------------------------------- layers


def _format(x: Tensor) -> torch.memory_format:
    """``x``'s memory format: channels-last where its strides are NHWC (and not also NCHW,
    as with one channel or a 1x1 image), else contiguous."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only where the width changes, as in diffusers (identity otherwise).
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # In place where the tensor is this block's own fresh output: on CPU a new
        # full-resolution activation (32 MiB at 256² x 128) is fresh pages from the kernel,
        # and touching them costs more than the arithmetic (measured: SiLU 72 -> 48 ms with
        # its GroupNorm, the add 32 -> 8 ms). Autograd allows both: GroupNorm saves its
        # input, not its output, and a conv's backward needs its input and weight only.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # = skip + h exactly (float addition commutes)


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row and column at the bottom right, 3x3 conv, stride 2.

    The asymmetric pad is what the LDM checkpoints were trained with (diffusers'
    ``downsample_padding=0``); a symmetric ``padding=1`` would shift the sampling grid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# A nearest 2x repeat then a 3x3 conv, phase by phase (see Upsample): output row 2r - 1 reads
# the repeated rows 2r - 2, 2r - 1, 2r, which repeat input rows r - 1, r - 1, r; output row 2r
# reads input rows r - 1, r, r. Row s of this table maps the 3 taps of the 3x3 kernel onto
# the 2 input rows (r - 1, r) for output row 2r + s - 1; the same holds for columns.
_PHASE_TAPS = torch.tensor(
    [
        [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # s = 0, output row 2r - 1: taps (0 + 1, 2)
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],  # s = 1, output row 2r: taps (0, 1 + 2)
    ]
)  # (s, 2 input rows, 3 taps)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv (``conv``, the weights
    diffusers' ``Upsample2D`` holds), computed without the repeated image.

    After a nearest 2x repeat, the 3x3 window of an output pixel covers only 2x2 distinct
    input pixels: output rows ``2r - 1`` and ``2r`` both read input rows ``r - 1`` and
    ``r`` (:data:`_PHASE_TAPS`), columns alike. So a 2x2 conv with padding 1 whose ``4·C``
    kernels are the 3x3 kernel's taps summed onto the pixels they repeat gives, at input
    position ``(r, q)``, the four output pixels ``(2r + s - 1, 2q + t - 1)``, ``s, t in {0,
    1}``; ``pixel_shuffle`` interleaves them and one pixel is cropped off each border. The
    same function as repeat-then-conv (zero padding of the repeated image is zero padding
    of the input), up to float rounding, in 16/36 of the multiply-adds and without the
    4x-sized repeated image: these convs are a quarter of the SD decoder's work.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight, bias = self.conv.weight, self.conv.bias  # (C, C, 3, 3), (C,)
        taps = _PHASE_TAPS.to(dtype=weight.dtype, device=weight.device)
        # (C_out, s, t, C_in, 2, 2): pixel_shuffle reads channel C_out·4 + 2s + t
        kernels = torch.einsum("syk,txl,oikl->ostiyx", taps, taps, weight)
        out = F.conv2d(x, kernels.reshape(4 * c, c, 2, 2), None, padding=1)
        # (B, 4·C, h + 1, w + 1) -> (B, C, 2h + 2, 2w + 2): output rows and columns -1 .. 2h
        out = F.pixel_shuffle(out, 2)[:, :, 1:-1, 1:-1]
        # The bias is added here, in the pass that copies the crop out, not in the conv as
        # bias.repeat_interleave(4): compiled, inductor cannot lower a convolution whose
        # bias is a view ("LoweringException: NotImplementedError: View").
        if bias is not None:
            out = out + bias.view(1, c, 1, 1)
        return out.contiguous(memory_format=_format(x))


class MidAttention(nn.Module):
    """GroupNorm, one-head self-attention over every position, residual."""

    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=config.norm_eps)
        attn = AttentionConfig(
            dim=channels,
            n_heads=1,  # diffusers' VAE: attention_head_dim = channels, so heads = 1
            qkv_bias=True,
            out_bias=True,
            backend=config.attention_backend,
        )
        self.attn = Attention(attn)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        return x + out


class MidBlock(nn.Module):
    """ResnetBlock, optional self-attention, ResnetBlock, at the coarsest resolution."""

    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, groups, eps) for _ in range(2)]
        )
        self.attention = MidAttention(channels, config) if config.mid_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class EncoderLevel(nn.Module):
    """ResnetBlocks at one resolution, then (except at the last level) a Downsample."""

    def __init__(
        self, in_channels: int, out_channels: int, config: VAEConfig, *, downsample: bool
    ) -> None:
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        widths = [in_channels] + [out_channels] * config.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock(a, b, groups, eps) for a, b in itertools.pairwise(widths)]
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """ResnetBlocks at one resolution, then (except at the last level) an Upsample."""

    def __init__(
        self, in_channels: int, out_channels: int, config: VAEConfig, *, upsample: bool
    ) -> None:
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        widths = [in_channels] + [out_channels] * (config.layers_per_block + 1)
        self.resnets = nn.ModuleList(
            [ResnetBlock(a, b, groups, eps) for a, b in itertools.pairwise(widths)]
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """``(B, C, H, W)`` pixels -> ``(B, 2·Cz, h, w)`` moments (mean, then logvar)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        chans, last = config.block_out_channels, len(config.block_out_channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(chans[max(i - 1, 0)], c, config, downsample=i < last)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], config)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, chans[-1], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, c0, H, W)
        for level in self.down_blocks:
            x = level(x)  # (B, c_last, h, w) after the last level
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # (B, 2·Cz, h, w)


class Decoder(nn.Module):
    """``(B, Cz, h, w)`` latent -> ``(B, C, H, W)`` pixels."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        chans = tuple(reversed(config.block_out_channels))  # coarsest first
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], config)
        self.up_blocks = nn.ModuleList(
            DecoderLevel(chans[max(i - 1, 0)], c, config, upsample=i < last)
            for i, c in enumerate(chans)
        )
        self.norm_out = nn.GroupNorm(config.norm_num_groups, chans[-1], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chans[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, c_last, h, w)
        for level in self.up_blocks:
            x = level(x)  # (B, c0, H, W) after the last level
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # (B, C, H, W)


# --------------------------------------------------------------------------- tiling


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of equal tiles of at most ``tile`` covering ``[0, length)``, laid
    out evenly with neighbours overlapping by at least ``overlap``.

    One span ``(0, length)`` when ``length <= tile``. Otherwise ``n = ceil((length -
    overlap) / (tile - overlap))`` tiles, the fewest of size ``tile`` that cover the length
    with that overlap, each of size ``size = ceil((length + (n - 1) · overlap) / n)``: the
    smallest size at which ``n`` tiles still cover it with that overlap (``n · size >= length
    + (n - 1) · overlap``), so ``size <= tile``. Full-size tiles would overlap by more than
    asked wherever ``n`` tiles are more than enough, and every extra row is decoded twice:
    128 latent rows in tiles of 64 overlapping by 16 take 3 tiles either way, 3 x 64 = 192
    rows decoded at full size but 3 x 54 = 162 here (2.25x then 1.6x the image's area).
    Starts are ``round(i (length - size) / (n - 1))``: the first at 0, the last ending at
    ``length``, and every gap between starts at most ``size - overlap``.
    """
    if not (is_int(tile) and is_int(overlap) and 0 <= overlap < tile):
        raise ValueError(f"tile_spans: need ints 0 <= overlap < tile, got {overlap=}, {tile=}")
    if length <= tile:
        return [(0, length)]
    n = -(-(length - overlap) // (tile - overlap))  # ceil
    size = min(tile, -(-(length + (n - 1) * overlap) // n))  # ceil; <= tile (docstring)
    span = length - size
    # round half up in integers: floor((2 i span + (n - 1)) / (2 (n - 1)))
    starts = [(2 * i * span + n - 1) // (2 * (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def _blend_weights(
    spans: list[tuple[int, int]], scale: int, *, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """Per-span 1D weights at output resolution (``scale`` outputs per input unit): a linear
    ramp up across the overlap with the previous span, down across the next's, 1 between.
    Two overlapping ramps sum to 1; the caller still divides by the summed weights, which
    also covers three spans overlapping (an overlap above half a tile)."""
    weights = []
    for k, (start, end) in enumerate(spans):
        size = (end - start) * scale
        pos = torch.arange(size, dtype=torch.float64, device=device) + 0.5
        w = torch.ones(size, dtype=torch.float64, device=device)
        if k > 0 and spans[k - 1][1] > start:
            w = torch.minimum(w, pos / ((spans[k - 1][1] - start) * scale))
        if k + 1 < len(spans) and spans[k + 1][0] < end:
            w = torch.minimum(w, (size - pos) / ((end - spans[k + 1][0]) * scale))
        weights.append(w.to(dtype))
    return weights


def tile_map(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    unit_in: int = 1,
    unit_out: int = 1,
) -> Tensor:
    """Apply ``fn`` to overlapping tiles of ``x``'s last two axes and blend the outputs.

    Tiles are laid out by :func:`tile_spans` on a grid whose unit is ``unit_in`` input
    samples and ``unit_out`` output samples (the VAE encoder: ``unit_in = f``, ``unit_out =
    1``; the decoder the reverse), so tiles start on the grid and ``fn`` maps a tile of
    ``n · unit_in`` samples to ``n · unit_out``. Each output is weighted by separable linear
    ramps across the overlaps (:func:`_blend_weights`) and the sum divided by the summed
    weights, so a pointwise ``fn`` gives exactly its untiled result, and a ``fn`` with a
    finite receptive field gives it wherever only one tile covers a sample and that sample is
    beyond the receptive field from the tile's cut edges.

    Only one tile's intermediates exist at a time (under ``torch.no_grad``); the output and
    two 1D weight sums are the only full-size buffers.

    Args:
        fn: ``(B, ..., n_h · unit_in, n_w · unit_in) -> (B, ..., n_h · unit_out, n_w ·
            unit_out)``.
        x: ``(B, ..., H, W)`` with H and W multiples of ``unit_in``.
        tile, overlap: tile size and minimum overlap, in grid units.
        unit_in, unit_out: samples per grid unit in ``x`` and in the output.

    Returns:
        ``(B, ..., H / unit_in · unit_out, W / unit_in · unit_out)``.
    """
    grid_h, grid_w = x.shape[-2] // unit_in, x.shape[-1] // unit_in
    rows, cols = tile_spans(grid_h, tile, overlap), tile_spans(grid_w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    out: Tensor | None = None
    row_w: list[Tensor] = []
    col_w: list[Tensor] = []
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            y = fn(x[..., r0 * unit_in : r1 * unit_in, c0 * unit_in : c1 * unit_in])
            if out is None:  # the output's dtype, device and leading axes come from fn
                out = y.new_zeros(*y.shape[:-2], grid_h * unit_out, grid_w * unit_out)
                kw: dict[str, Any] = dict(dtype=y.dtype, device=y.device)
                row_w = _blend_weights(rows, unit_out, **kw)
                col_w = _blend_weights(cols, unit_out, **kw)
            ys = slice(r0 * unit_out, r1 * unit_out)
            xs = slice(c0 * unit_out, c1 * unit_out)
            out[..., ys, xs] += y * (row_w[i][:, None] * col_w[j][None, :])
    assert out is not None
    # The summed weights are separable: sum_ij r_i(y) c_j(x) = (sum_i r_i(y)) (sum_j c_j(x)).
    row_sum = out.new_zeros(grid_h * unit_out)
    col_sum = out.new_zeros(grid_w * unit_out)
    for (r0, r1), w in zip(rows, row_w, strict=True):
        row_sum[r0 * unit_out : r1 * unit_out] += w
    for (c0, c1), w in zip(cols, col_w, strict=True):
        col_sum[c0 * unit_out : c1 * unit_out] += w
    return out / (row_sum[:, None] * col_sum[None, :])


# --------------------------------------------------------------------------- model


class VAE(PretrainedMixin, nn.Module):
    """KL autoencoder; see the module docstring and :class:`VAEConfig`.

    Example::

        vae = VAE(vae_preset("tiny")).eval()
        posterior = vae.encode(images)  # images: (B, 3, H, W) in [-1, 1]
        latents = vae.encode_latents(images, generator=torch.Generator().manual_seed(0))
        recon = vae.decode_latents(latents)  # (B, 3, H, W)
        big = vae.decode(z, tile_size=256, tile_overlap=64)  # tiled, flat memory
        clip_latents = vae.encode_frames(clips, chunk=8)  # (B, 3, T, H, W) -> (B, Cz, T, h, w)
    """

    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        cz = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * cz, 2 * cz, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cz, cz, 1) if config.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        """f: pixels per latent position along each side."""
        return self.config.downsample_factor

    # ---- encode / decode

    def encode(
        self, x: Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> DiagonalGaussian:
        """The posterior over latents of images ``x``.

        Args:
            x: ``(B, C, H, W)`` pixels (in [-1, 1] for the SD checkpoints); H and W
                multiples of f.
            tile_size, tile_overlap: tile the image (pixels, multiples of f); default the
                config's. An image no larger than one tile runs untiled.

        Returns:
            A :class:`DiagonalGaussian` over ``(B, Cz, H / f, W / f)``.
        """
        f = self.downsample_factor
        self._check_input(x, "x", self.config.in_channels, "(B, C, H, W)", multiple=f)
        tiling = self._tiling(tile_size, tile_overlap)
        if tiling is None:
            moments = self._moments(x)
        else:
            tile, overlap = tiling
            moments = tile_map(
                self._moments, x, tile=tile // f, overlap=overlap // f, unit_in=f, unit_out=1
            )
        return DiagonalGaussian.from_moments(moments)

    def decode(
        self, z: Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> Tensor:
        """Pixels for latents ``z`` (unscaled: what :meth:`encode`'s posterior gives).

        Args:
            z: ``(B, Cz, h, w)``.
            tile_size, tile_overlap: tile the output (pixels, multiples of f); default the
                config's. A latent no larger than one tile runs untiled.

        Returns:
            ``(B, C_out, h·f, w·f)``.
        """
        self._check_input(z, "z", self.config.latent_channels, "(B, Cz, h, w)", multiple=1)
        tiling = self._tiling(tile_size, tile_overlap)
        if tiling is None:
            return self._pixels(z)
        f = self.downsample_factor
        tile, overlap = tiling
        return tile_map(self._pixels, z, tile=tile // f, overlap=overlap // f, unit_out=f)

    def forward(
        self,
        x: Tensor,
        *,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reconstruct ``x`` ``(B, C, H, W)``: decode the posterior's mode (or a sample)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ---- what a latent diffusion trainer / sampler needs

    def encode_latents(
        self,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        sample: bool = True,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> Tensor:
        """Diffusion-ready latents ``(z - shift_factor) * scaling_factor``, ``(B, Cz, h, w)``.

        Args:
            x: ``(B, C, H, W)`` pixels.
            generator: RNG for the posterior sample.
            sample: draw ``z`` from the posterior (what diffusers' training scripts do);
                False takes its mode.
            tile_size, tile_overlap: see :meth:`encode`.
        """
        posterior = self.encode(x, tile_size=tile_size, tile_overlap=tile_overlap)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(
        self, latents: Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> Tensor:
        """Pixels for diffusion latents: ``decode(latents / scaling_factor + shift_factor)``."""
        self._check_input(
            latents, "latents", self.config.latent_channels, "(B, Cz, h, w)", multiple=1
        )
        z = latents / self.config.scaling_factor + self.config.shift_factor
        return self.decode(z, tile_size=tile_size, tile_overlap=tile_overlap)

    # ---- video: the image VAE frame by frame

    def encode_frames(
        self,
        x: Tensor,
        *,
        chunk: int = 8,
        generator: torch.Generator | None = None,
        sample: bool = True,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> Tensor:
        """Diffusion latents of clips, frame by frame: :meth:`encode_latents` of each frame.

        The frames go through the encoder ``chunk`` at a time (``B·chunk`` images a call),
        so under ``torch.no_grad`` the activations held at once are one chunk's, whatever
        the clip length; only the result grows with T. The posterior's noise is drawn once
        for the whole ``(B, Cz, T, h, w)`` result after the last chunk, so ``chunk`` changes
        the memory, never the latents.

        Args:
            x: ``(B, C, T, H, W)`` frames (pixels); H and W multiples of f.
            chunk: frames per encoder call (of each clip).
            generator, sample: as :meth:`encode_latents`; ``sample=False`` gives exactly
                the per-frame ``encode_latents(..., sample=False)``.
            tile_size, tile_overlap: tile each frame, see :meth:`encode`.

        Returns:
            ``(B, Cz, T, H / f, W / f)``.
        """
        f = self.downsample_factor
        self._check_input(x, "x", self.config.in_channels, "(B, C, T, H, W)", multiple=f, rank=5)
        self._check_chunk(chunk)
        b, t = x.shape[0], x.shape[2]
        mean: Tensor | None = None
        logvar: Tensor | None = None
        for start in range(0, t, chunk):
            frames = rearrange(x[:, :, start : start + chunk], "b c t h w -> (b t) c h w")
            posterior = self.encode(frames, tile_size=tile_size, tile_overlap=tile_overlap)
            part = [
                rearrange(m, "(b t) c h w -> b c t h w", b=b)
                for m in (posterior.mean, posterior.logvar)
            ]  # each (B, Cz, chunk, h, w)
            if mean is None or logvar is None:
                mean = part[0].new_empty(*part[0].shape[:2], t, *part[0].shape[3:])
                logvar = torch.empty_like(mean)
            mean[:, :, start : start + chunk] = part[0]
            logvar[:, :, start : start + chunk] = part[1]
        assert mean is not None and logvar is not None
        clip = DiagonalGaussian(mean, logvar)
        z = clip.sample(generator) if sample else clip.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_frames(
        self,
        latents: Tensor,
        *,
        chunk: int = 8,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> Tensor:
        """Frames for clips of diffusion latents: :meth:`decode_latents` of each frame,
        ``chunk`` frames of each clip a decoder call, written into the preallocated result,
        so under ``torch.no_grad`` memory beyond the result stays flat in the clip length.

        Args:
            latents: ``(B, Cz, T, h, w)``.
            chunk: frames per decoder call (of each clip).
            tile_size, tile_overlap: tile each frame, see :meth:`decode`.

        Returns:
            ``(B, C_out, T, h·f, w·f)``.
        """
        self._check_input(
            latents, "latents", self.config.latent_channels, "(B, Cz, T, h, w)", multiple=1, rank=5
        )
        self._check_chunk(chunk)
        b, t = latents.shape[0], latents.shape[2]
        out: Tensor | None = None
        for start in range(0, t, chunk):
            z = rearrange(latents[:, :, start : start + chunk], "b c t h w -> (b t) c h w")
            pixels = self.decode_latents(z, tile_size=tile_size, tile_overlap=tile_overlap)
            part = rearrange(pixels, "(b t) c h w -> b c t h w", b=b)
            if out is None:
                out = part.new_empty(*part.shape[:2], t, *part.shape[3:])
            out[:, :, start : start + chunk] = part
        assert out is not None
        return out

    def loss(
        self,
        x: Tensor,
        *,
        kl_weight: float = 1e-6,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss on images ``x``: ``(sum sq. error + kl_weight · KL) / (B·C·H·W)``.

        The LDM objective with MSE as the reconstruction term (no perceptual or adversarial
        loss), per pixel element: the reconstruction is the mean squared error of a decoded
        posterior sample and KL(q(z|x) || N(0, I)) summed over latent elements, averaged over
        the batch, is divided by the pixel elements per image. ``kl_weight`` 1e-6 is LDM's.

        Returns:
            ``(loss, {"recon": mse, "kl": kl per image})``, the shape the vats_core
            :class:`~vats_core.training.Trainer` takes from a ``loss_fn``.
        """
        posterior = self.encode(x)
        recon = self.decode(posterior.sample(generator))
        mse = F.mse_loss(recon.float(), x.float())
        kl = posterior.kl().float().mean()
        total = mse + kl_weight * kl / x[0].numel()
        return total, {"recon": mse.detach(), "kl": kl.detach()}

    # ---- internals

    def _moments(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _pixels(self, z: Tensor) -> Tensor:
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(z)

    def _tiling(self, tile_size: int | None, tile_overlap: int | None) -> tuple[int, int] | None:
        """Validated ``(tile, overlap)`` in pixels, or None for no tiling."""
        cfg, f = self.config, self.downsample_factor
        tile = cfg.tile_size if tile_size is None else tile_size
        overlap = cfg.tile_overlap if tile_overlap is None else tile_overlap
        if tile is None:
            if tile_overlap is not None:
                raise ValueError(
                    f"VAE tile_overlap={tile_overlap} was given without a tile_size (and "
                    "VAEConfig.tile_size is None): pass tile_size too"
                )
            return None
        if not (is_int(tile) and tile >= f and tile % f == 0):
            raise ValueError(
                f"VAE tile_size={tile!r} is invalid: expected a positive multiple of the "
                f"downsampling factor f={f}"
            )
        if overlap is None:
            overlap = tile // 4 // f * f
        if not (is_int(overlap) and 0 <= overlap < tile and overlap % f == 0):
            raise ValueError(
                f"VAE tile_overlap={overlap!r} is invalid: expected a multiple of the "
                f"downsampling factor f={f} with 0 <= tile_overlap < tile_size={tile}"
            )
        return tile, overlap

    def _check_input(
        self, t: Any, name: str, channels: int, layout: str, *, multiple: int, rank: int = 4
    ) -> None:
        if not isinstance(t, Tensor):
            raise ValueError(f"VAE expects {name} as a tensor {layout}, got {type(t).__name__}")
        if t.ndim != rank:
            raise ValueError(
                f"VAE expects {name} of rank {rank} {layout}, got rank {t.ndim} with shape "
                f"{tuple(t.shape)}"
            )
        weight = self.encoder.conv_in.weight
        autocast = torch.is_autocast_enabled(t.device.type)
        if not t.is_floating_point() or (t.dtype != weight.dtype and not autocast):
            raise ValueError(
                f"VAE expects {name} with dtype {weight.dtype} (the model's; or run under "
                f"autocast), got {t.dtype}"
            )
        if t.shape[1] != channels:
            raise ValueError(
                f"VAE expects {name} with {channels} channels (the 2nd axis of {layout}), got "
                f"{t.shape[1]} in shape {tuple(t.shape)}"
            )
        h, w = t.shape[-2:]
        if h < 1 or w < 1 or h % multiple or w % multiple:
            raise ValueError(
                f"VAE expects {name} height and width that are positive multiples of the "
                f"downsampling factor f={multiple}, got {h}x{w}"
            )
        if rank == 5 and t.shape[2] < 1:
            raise ValueError(
                f"VAE expects {name} with at least one frame (T, the 3rd axis of {layout})"
            )

    @staticmethod
    def _check_chunk(chunk: Any) -> None:
        if not (is_int(chunk) and chunk >= 1):
            raise ValueError(
                f"VAE chunk={chunk!r} is invalid: expected an int >= 1 (frames per call)"
            )


# --------------------------------------------------------------------------- presets


VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: two levels (f = 2), a forward pass in milliseconds on CPU.
    "tiny": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ),
    # The CPU demo on 32x32 RGB images of simple shapes. f = 2 (16x16x4 latents, 3x fewer
    # numbers than pixels): flat-coloured shapes survive it almost losslessly, and a DiT with
    # patch 2 sees 64 tokens. f = 4 (a third level, 8x8 latents) costs more per step and
    # needs longer to reconstruct edges. Widths (16, 32) rather than (32, 64): measured on
    # one busy CPU thread at batch 32, a training step takes 0.39 s instead of 1.7 s, and
    # after 300 AdamW steps (lr 2e-3) the reconstruction MSE is 0.059 vs 0.070 (pixels in
    # [-1, 1]): for a minutes-long budget the narrower model is better. 8 groups keep 2-4
    # channels per GroupNorm group. LDM's KL weight (1e-6) leaves the latents far from unit
    # variance: set scaling_factor to 1 / std of the trained VAE's latents before training
    # a diffusion model on them, as SD did.
    "shapes": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=1.0,
    ),
    # The SD 1.x/2.x AutoencoderKL (f = 8, 4 latent channels, 83.7M parameters).
    "sd": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        shift_factor=0.0,
    ),
}


def vae_preset(name: str, **overrides: Any) -> VAEConfig:
    """The named :class:`VAEConfig` (``tiny``, ``shapes``, ``sd``), with ``overrides``."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}: expected one of {sorted(VAE_PRESETS)}")
    return VAEConfig(**{**VAE_PRESETS[name], **overrides})
