"""VAE: the model contract, the upsampling against repeat-then-conv, the posterior against its
closed forms, latent scaling, tiling
(the blend is exact where it should be, the network only ever sees tile-sized inputs, and
the largest activation does not grow with the image), presets and input errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from vats_core.testing import (
    check_backward,
    check_config,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_diffusion.vae import (
    VAE,
    VAE_PRESETS,
    DiagonalGaussian,
    Upsample,
    VAEConfig,
    tile_map,
    tile_spans,
    vae_preset,
)


def _vae(seed: int = 0, **overrides) -> VAE:
    torch.manual_seed(seed)
    return VAE(vae_preset("tiny", **overrides)).eval()


def _images(b: int = 2, h: int = 16, w: int = 24, c: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def _texture(h: int, w: int) -> torch.Tensor:
    """A smooth, stationary RGB test image in [-0.8, 0.8]: sinusoids of period 16 px."""
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    rgb = [
        torch.sin(2 * math.pi * xx / 16),
        torch.cos(2 * math.pi * yy / 16),
        torch.sin(2 * math.pi * (xx + yy) / 16),
    ]
    return 0.8 * torch.stack(rgb)[None]


# --------------------------------------------------------------------------- config, presets


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_presets_are_valid_configs(name: str) -> None:
    config = vae_preset(name)
    check_config(config)
    assert vae_preset(name, latent_channels=8).latent_channels == 8


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(block_out_channels=(8, 10)), r"VAEConfig\.block_out_channels=.*norm_num_groups=4"),
        (dict(block_out_channels=()), r"VAEConfig\.block_out_channels=\(\)"),
        (dict(latent_channels=0), r"VAEConfig\.latent_channels=0"),
        (dict(scaling_factor=0.0), r"VAEConfig\.scaling_factor=0\.0"),
        (dict(shift_factor=math.inf), r"VAEConfig\.shift_factor=inf"),
        (dict(tile_size=15), r"VAEConfig\.tile_size=15 .*f=2"),
        (dict(tile_size=16, tile_overlap=16), r"VAEConfig\.tile_overlap=16 .*< tile_size=16"),
        (dict(tile_size=16, tile_overlap=3), r"VAEConfig\.tile_overlap=3 .*multiple of f=2"),
        (dict(attention_backend="fast"), r"VAEConfig\.attention_backend='fast'"),
    ],
)
def test_config_errors_name_the_field(changes: dict, match: str) -> None:
    check_raises(lambda: vae_preset("tiny", **changes), ValueError, match)


def test_defaults_are_the_sd_shape() -> None:
    assert VAEConfig() == vae_preset("sd")
    assert VAEConfig().downsample_factor == 8


def test_unknown_preset() -> None:
    check_raises(lambda: vae_preset("xl"), ValueError, r"unknown VAE preset 'xl'.*'tiny'")


# --------------------------------------------------------------------------- model contract


def test_contract(tmp_path) -> None:
    vae = _vae()
    x = _images()
    check_forward(vae, x, (2, 3, 16, 24))
    assert tuple(vae.encode(x).mean.shape) == (2, 4, 8, 12)
    check_backward(vae.train(), x)
    check_dtype_device_moves(vae.eval(), x)
    check_save_load_roundtrip(vae, x, tmp_path / "vae")
    # The posterior and the latent helpers also survive the round trip.
    reloaded = VAE.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x).logvar, vae.encode(x).logvar, rtol=0, atol=0)


def test_variants_without_attention_and_quant_convs() -> None:
    vae = _vae(mid_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.encoder.mid_block.attention is None
    check_forward(vae, _images(1, 8, 8), (1, 3, 8, 8))
    three = VAE(vae_preset("tiny", block_out_channels=(4, 8, 8), out_channels=1)).eval()
    check_forward(three, _images(1, 16, 8), (1, 1, 16, 8))
    assert three.encode(_images(1, 16, 8)).mean.shape[-2:] == (4, 2)


# --------------------------------------------------------------------------- posterior


def test_posterior_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    post = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(ref, std_normal).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), kl, rtol=1e-5, atol=1e-5)
    other = DiagonalGaussian(mean.flip(0), logvar.flip(1))
    ref_other = torch.distributions.Normal(mean.flip(0), (0.5 * logvar.flip(1)).exp())
    kl_other = torch.distributions.kl_divergence(ref, ref_other).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(other), kl_other, rtol=1e-5, atol=1e-4)
    z = torch.randn(3, 4, 5, 6, generator=g)
    nll = -ref.log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(post.nll(z), nll, rtol=1e-5, atol=1e-4)
    assert post.mode() is mean
    # A seeded sample is mean + std * that generator's standard normal draw.
    sample = post.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + (0.5 * logvar).exp() * eps, rtol=0, atol=0)


def test_posterior_clamps_logvar_and_checks_shapes() -> None:
    post = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert post.logvar.tolist() == [[-30.0, 20.0]]
    assert torch.isfinite(post.var).all() and (post.std > 0).all()
    check_raises(lambda: DiagonalGaussian(torch.zeros(2), torch.zeros(3)), ValueError, "same shape")
    moments = torch.arange(8.0).view(1, 8, 1, 1)
    split = DiagonalGaussian.from_moments(moments)
    assert split.mean.flatten().tolist() == [0, 1, 2, 3]
    assert split.logvar.flatten().tolist() == [4, 5, 6, 7]


# --------------------------------------------------------------------------- latents, loss


def test_latent_scaling_round_trip() -> None:
    vae = _vae(scaling_factor=0.5, shift_factor=0.25)
    x = _images(1)
    with torch.no_grad():
        post = vae.encode(x)
        latents = vae.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, (post.mean - 0.25) * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(post.mean))
        sampled = vae.encode_latents(x, generator=torch.Generator().manual_seed(3))
        z = post.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, (z - 0.25) * 0.5, rtol=0, atol=0)


def test_loss_is_the_stated_objective_and_trains() -> None:
    vae = _vae().train()
    x = _images(4, 8, 8)
    loss, metrics = vae.loss(x, kl_weight=0.1, generator=torch.Generator().manual_seed(0))
    post = vae.encode(x)
    recon = vae.decode(post.sample(torch.Generator().manual_seed(0)))
    expected = ((recon - x) ** 2).mean() + 0.1 * post.kl().mean() / (3 * 8 * 8)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["kl"], post.kl().mean().detach())
    first = float(metrics["recon"])
    for step in range(15):  # plain SGD (torch.optim would import torch._dynamo: seconds)
        loss, metrics = vae.loss(x, generator=torch.Generator().manual_seed(step))
        vae.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in vae.parameters():
                p -= 0.2 * p.grad
    assert float(metrics["recon"]) < 0.85 * first


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda v: v.encode(torch.zeros(1, 4, 8, 8)), r"x with 3 channels .* got 4"),
        (lambda v: v.encode(torch.zeros(3, 8, 8)), r"x of rank 4 .* got rank 3"),
        (lambda v: v.encode(torch.zeros(1, 3, 8, 8, dtype=torch.int64)), r"dtype torch.float32"),
        (lambda v: v.encode(torch.zeros(1, 3, 8, 8).double()), r"got torch.float64"),
        (lambda v: v.encode(torch.zeros(1, 3, 8, 7)), r"multiples of .* f=2, got 8x7"),
        (lambda v: v.encode([[0.0]]), r"x as a tensor"),
        (lambda v: v.decode(torch.zeros(1, 3, 4, 4)), r"z with 4 channels .* got 3"),
        (lambda v: v.decode_latents(torch.zeros(1, 4, 4)), r"latents of rank 4"),
        (lambda v: v.encode(torch.zeros(1, 3, 8, 8), tile_size=5), r"tile_size=5 .*f=2"),
        (
            lambda v: v.decode(torch.zeros(1, 4, 4, 4), tile_size=8, tile_overlap=8),
            r"tile_overlap=8 .*tile_overlap < tile_size=8",
        ),
        (
            lambda v: v.decode(torch.zeros(1, 4, 4, 4), tile_size=8, tile_overlap=3),
            r"tile_overlap=3 .*f=2",
        ),
        (lambda v: v.decode(torch.zeros(1, 4, 4, 4), tile_overlap=2), r"without a tile_size"),
    ],
)
def test_bad_inputs_raise_before_any_work(call, match: str) -> None:
    check_raises(lambda: call(_vae()), ValueError, match)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_upsample_equals_nearest_repeat_then_conv(memory_format) -> None:
    """The phase-decomposed Upsample is the 3x3 conv of the nearest 2x repeat (what the
    checkpoints were trained with), forward and backward, on rectangular and 1-pixel inputs,
    and keeps the input's memory format."""
    torch.manual_seed(0)
    up = Upsample(6)
    for h, w in ((5, 7), (1, 1), (4, 1)):
        x = torch.randn(2, 6, h, w).contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        want = up.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        got = up(x)
        assert got.shape == (2, 6, 2 * h, 2 * w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if h > 1 and w > 1:
            assert got.is_contiguous(memory_format=memory_format)
        grad = torch.randn_like(want)
        grads = torch.autograd.grad(got, [x, up.conv.weight, up.conv.bias], grad)
        wants = torch.autograd.grad(want, [x, up.conv.weight, up.conv.bias], grad)
        for g, r in zip(grads, wants, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def test_upsample_compiles_with_inductor() -> None:
    """The Upsample lowers in inductor (per-block compile, train.parallel.compile, runs it
    so) and equals eager, forward and backward. Its conv used to take the bias as
    ``bias.repeat_interleave(4)``, a view, which inductor's convolution cannot lower."""
    pytest.importorskip("setuptools")  # inductor's CPU code generation
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    compiled = torch.compile(up, backend="inductor", fullgraph=True)
    got, want = compiled(x), up(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), [x, up.conv.weight, up.conv.bias])
    wants = torch.autograd.grad(want.square().sum(), [x, up.conv.weight, up.conv.bias])
    for g, r in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(10, 4, 1), (37, 8, 3), (64, 16, 8), (128, 64, 16), (16, 8, 2), (9, 8, 0), (100, 33, 7)],
)
def test_tile_spans_cover_evenly_with_the_overlap(length: int, tile: int, overlap: int) -> None:
    spans = tile_spans(length, tile, overlap)
    n = len(spans)
    assert spans[0][0] == 0 and spans[-1][1] == length
    sizes = {end - start for start, end in spans}
    assert len(sizes) == 1 and sizes.pop() <= tile  # equal tiles, none above `tile`
    size = spans[0][1] - spans[0][0]
    assert n == -(-(length - overlap) // (tile - overlap))  # as few tiles as full ones need
    # ... each as small as n tiles with that overlap allow: one row less would not cover
    assert n * size >= length + (n - 1) * overlap > n * (size - 1)
    overlaps = [a[1] - b[0] for a, b in itertools.pairwise(spans)]
    assert all(overlap <= o < size for o in overlaps)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(spans)]
    assert max(gaps) - min(gaps) <= 1  # laid out evenly


def test_tile_spans_shrink_tiles_to_the_overlap_asked() -> None:
    # The tiled decode (128 latent rows, tiles 64, overlap 16): 3 tiles of 54 rows
    # (162 rows decoded, 1.27x) rather than of 64 (192 rows, 1.5x), overlapping by 17 and 16.
    assert tile_spans(128, 64, 16) == [(0, 54), (37, 91), (74, 128)]
    assert tile_spans(40, 16, 4) == [(0, 16), (12, 28), (24, 40)]  # full tiles needed
    assert tile_spans(4, 8, 2) == [(0, 4)]
    check_raises(lambda: tile_spans(10, 4, 4), ValueError, "overlap < tile")


def test_tile_map_blend_is_a_partition_of_unity() -> None:
    """A pointwise fn tiled equals it untiled (to rounding), whatever the grid units."""
    x = torch.randn(2, 3, 24, 40)
    pointwise = nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        tiled = tile_map(pointwise, x, tile=8, overlap=3)
        torch.testing.assert_close(tiled, pointwise(x), rtol=1e-5, atol=1e-6)
        # encoder-like: 4 input samples per unit -> 1 output sample (2x2 pixel-unshuffle)
        down = nn.Sequential(nn.PixelUnshuffle(4), nn.Conv2d(48, 2, 1))
        tiled = tile_map(down, x, tile=3, overlap=1, unit_in=4, unit_out=1)
        torch.testing.assert_close(tiled, down(x), rtol=1e-5, atol=1e-6)


def test_tile_map_of_a_local_fn_is_exact_away_from_seams() -> None:
    """Convs with a receptive field of radius 3 (three 3x3, x2 nearest upsampling first):
    tiled equals untiled wherever one tile covers a sample at least the receptive field from
    its cut edges; in the overlaps the blend differs but stays bounded."""
    torch.manual_seed(0)
    up = nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode="nearest"),
        *(nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)),
    )
    z = torch.randn(1, 3, 40, 40)
    tile, overlap = 16, 4
    with torch.no_grad():
        full = up(z)
        tiled = tile_map(up, z, tile=tile, overlap=overlap, unit_out=2)
    spans = tile_spans(40, tile, overlap)
    covered = torch.zeros(80, dtype=torch.int64)
    for start, end in spans:
        covered[2 * start : 2 * end] += 1
    alone = covered == 1  # samples only one tile covers
    # ... and away from every cut edge (the receptive field is 3 output samples)
    for start, end in spans:
        for edge in (2 * start, 2 * end):
            if 0 < edge < 80:
                alone[max(edge - 3, 0) : edge + 3] = False
    inside = alone[:, None] & alone[None, :]
    assert inside.sum() > 0.3 * inside.numel()
    err = (tiled - full).abs().amax(dim=1)[0]
    assert err[inside].max() <= 1e-5
    assert err.max() > 1e-3  # the seams do differ: the check above is not vacuous
    assert err.max() < full.abs().max()


def test_tiled_vae_stays_close_to_untiled() -> None:
    """GroupNorm statistics and mid-block attention over a tile differ from the whole
    image's, so tiles are an approximation; on a smooth stationary texture with tiles 8x
    the downsampling factor, the error is bounded (figures in the report)."""
    vae = _vae()
    x = _texture(64, 96)
    with torch.no_grad():
        post = vae.encode(x)
        tiled = vae.encode(x, tile_size=32, tile_overlap=16)
        err = (tiled.mean - post.mean).abs().max() / post.mean.abs().max()
        assert err < 0.3
        one_tile = vae.encode(x, tile_size=96)  # no larger than one tile: untiled, exactly
        torch.testing.assert_close(one_tile.mean, post.mean, rtol=0, atol=0)
        pixels = vae.decode(post.mean)
        decoded = vae.decode(post.mean, tile_size=64, tile_overlap=16)
        assert decoded.shape == pixels.shape
        assert (decoded - pixels).abs().max() / pixels.abs().max() < 0.6
        big_tiles = vae.decode(post.mean, tile_size=128, tile_overlap=32)
        # bigger tiles see more of the image: closer to untiled
        assert (big_tiles - pixels).abs().max() < (decoded - pixels).abs().max()


def _largest_activation(vae: VAE, call) -> tuple[int, set[tuple[int, ...]]]:
    """(largest element count of any module output inside the encoder / decoder, the set
    of input shapes the encoder and decoder were called on)."""
    largest, shapes = 0, set()

    def hook(module, inputs, output) -> None:
        nonlocal largest
        largest = max(largest, output.numel())
        if module is vae.encoder or module is vae.decoder:
            shapes.add(tuple(inputs[0].shape))

    handles = [
        m.register_forward_hook(hook) for m in (*vae.encoder.modules(), *vae.decoder.modules())
    ]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return largest, shapes


def test_tiled_memory_is_flat_in_image_size() -> None:
    vae = _vae()
    # what one full tile holds, alone: the bound of a tiled call, whatever the image size
    enc_tile = _largest_activation(vae, lambda: vae.encode(_texture(32, 32)))[0]
    dec_tile = _largest_activation(vae, lambda: vae.decode(torch.randn(1, 4, 16, 16)))[0]
    untiled = {}
    for size in (64, 128):
        x = _texture(size, size + 32)
        z = torch.randn(1, 4, size // 2, (size + 32) // 2)
        enc = _largest_activation(vae, lambda x=x: vae.encode(x, tile_size=32, tile_overlap=8))
        dec = _largest_activation(vae, lambda z=z: vae.decode(z, tile_size=32, tile_overlap=8))
        untiled[size] = _largest_activation(vae, lambda z=z: vae.decode(z))[0]
        # the networks only ever see one tile, no larger than tile_size (32 px, 16 latent)
        assert all(s[:2] == (1, 3) and max(s[2:]) <= 32 for s in enc[1])
        assert all(s[:2] == (1, 4) and max(s[2:]) <= 16 for s in dec[1])
        assert enc[0] <= enc_tile and dec[0] <= dec_tile
    assert untiled[128] > 3 * untiled[64]  # untiled: grows with the image
