"""from_timm: an imported timm VisionTransformer computes timm's function (square and
rectangular img_size, fixed and dynamic_img_size); what it cannot represent is refused with
a ValueError naming the timm option.

Every timm model here is random-init and built locally (nothing downloaded); weights are
perturbed away from timm's init (zero biases, unit norms, near-zero tokens) so that a
wrongly mapped bias, norm or token would show.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import RmsNorm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vats_core.mlp import Activation
from vats_core.norms import NormType
from vats_vision.interop import from_timm
from vats_vision.layers import Pool, PosEmbed

RTOL = 1e-4
SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=7)


def _timm_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-3  # a non-trivial output
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= RTOL, f"relative error {err:.2e}"


def _parity(model: VisionTransformer, x: torch.Tensor, *, intermediates: bool = False) -> None:
    vit = from_timm(model)
    with torch.no_grad():
        _close(vit.forward_features(x), model.forward_features(x))
        _close(vit(x), model(x))
        feats = model.forward_features(x)
        _close(vit.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True))
        if model.num_classes:
            _close(vit.forward_head(feats), model.forward_head(feats))
        if intermediates:
            for fmt in ("NCHW", "NLC"):
                ref_final, ref = model.forward_intermediates(x, indices=2, output_fmt=fmt)
                final, ours = vit.forward_intermediates(x, indices=2, output_fmt=fmt)
                _close(final, ref_final)
                assert len(ours) == len(ref) == 2
                for a, b in zip(ours, ref, strict=True):
                    _close(a, b)


VARIANTS = {
    "token_pool": dict(),
    "avg_pool_fc_norm": dict(global_pool="avg"),  # timm's fc_norm default for avg
    "token_pool_fc_norm": dict(fc_norm=True),
    "no_embed_class": dict(no_embed_class=True),
    "registers": dict(reg_tokens=4),
    "registers_no_embed_class_avg": dict(reg_tokens=2, no_embed_class=True, global_pool="avg"),
    "pre_norm_clip": dict(pre_norm=True),  # also patch conv without bias
    "no_qkv_bias": dict(qkv_bias=False, proj_bias=False),
    "no_pos_embed": dict(pos_embed="none"),
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "no_pooling": dict(class_token=False, global_pool=""),  # head on every token
    "no_head": dict(num_classes=0),
    "layer_scale": dict(init_values=0.1),  # folded into o_proj / fc2
    "gelu_tanh_rmsnorm": dict(act_layer="gelu_tanh", norm_layer="rmsnorm"),
    "rms_qk_norm": dict(qk_norm=True, norm_layer="rmsnorm"),
    "mlp_ratio_heads": dict(mlp_ratio=2.5, num_heads=2, in_chans=1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parity_with_timm(name: str) -> None:
    model = _timm_vit(**VARIANTS[name])
    x = torch.randn(2, model.patch_embed.proj.in_channels, 32, 32)
    _parity(model, x)


def test_vit_small_shape_config_matches_preset_fields() -> None:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1)
    cfg = from_timm(model).config
    assert (cfg.dim, cfg.n_heads, cfg.patch_size, cfg.image_size) == (384, 6, 16, 224)
    assert cfg.mlp_hidden_dim == 1536 and cfg.mlp_activation is Activation.GELU
    assert cfg.norm is NormType.LAYERNORM and cfg.norm_eps == 1e-6
    assert cfg.pos_embed is PosEmbed.LEARNED and cfg.pos_embed_prefix and cfg.class_token
    assert cfg.pool is Pool.TOKEN and not cfg.fc_norm and cfg.num_classes == 0


@pytest.mark.parametrize("extra", [dict(), dict(no_embed_class=True, reg_tokens=2)])
def test_parity_at_other_sizes_with_dynamic_img_size(extra: dict) -> None:
    # Trained at 48 px (a 6 x 6 table), run at 64 x 32: both resample the table.
    model = _timm_vit(img_size=48, dynamic_img_size=True, **extra)
    _parity(model, torch.randn(2, 3, 64, 32))
    _parity(model, torch.randn(1, 3, 48, 48))


RECTANGULAR = {
    "32x48_token": dict(img_size=(32, 48)),
    "48x16_registers": dict(img_size=(48, 16), reg_tokens=2),
    "24x40_no_class_token_avg": dict(img_size=(24, 40), class_token=False, global_pool="avg"),
    "40x24_no_embed_class_registers": dict(img_size=(40, 24), no_embed_class=True, reg_tokens=1),
    "16x64_no_pos_embed": dict(img_size=(16, 64), pos_embed="none", fc_norm=True),
    "64x32_patch16_registers_avg": dict(
        img_size=(64, 32), patch_size=16, reg_tokens=3, global_pool="avg"
    ),
}


@pytest.mark.parametrize("name", sorted(RECTANGULAR))
def test_parity_with_rectangular_timm(name: str) -> None:
    # img_size=(h, w): timm keeps patch_embed.img_size / grid_size as pairs; the ViT2D gets
    # image_size=(h, w), the same (h/p, w/p) table, and timm's features at that size.
    model = _timm_vit(**RECTANGULAR[name])
    h, w = model.patch_embed.img_size
    vit = from_timm(model)
    assert vit.config.image_size == (h, w) and vit.config.grid == model.patch_embed.grid_size
    if model.pos_embed is not None:
        assert vit.pos_embed is not None and vit.pos_embed.shape == model.pos_embed.shape
    _parity(model, torch.randn(2, 3, h, w), intermediates=True)


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(class_token=False, global_pool="avg"),
        dict(no_embed_class=True, reg_tokens=2),
    ],
    ids=["token", "no_class_token", "no_embed_class_registers"],
)
def test_parity_with_rectangular_dynamic_img_size(extra: dict) -> None:
    # Trained at 32 x 48 (a 4 x 6 table), run at its own size, transposed, square and
    # other rectangles: both resample the rectangular table the same way.
    model = _timm_vit(img_size=(32, 48), dynamic_img_size=True, **extra)
    for h, w in ((32, 48), (48, 32), (40, 40), (64, 24), (16, 56)):
        _parity(model, torch.randn(2, 3, h, w), intermediates=True)


def test_parity_with_rectangular_dynamic_img_pad() -> None:
    model = _timm_vit(img_size=(24, 40), dynamic_img_size=True, dynamic_img_pad=True)
    assert from_timm(model).config.pad
    _parity(model, torch.randn(2, 3, 30, 37))
    _parity(model, torch.randn(1, 3, 24, 40), intermediates=True)


def test_parity_with_dynamic_img_pad() -> None:
    model = _timm_vit(dynamic_img_size=True, dynamic_img_pad=True)
    assert from_timm(model).config.pad
    _parity(model, torch.randn(2, 3, 30, 37))


def test_intermediates_match_timm() -> None:
    model = _timm_vit(depth=3, reg_tokens=1)
    vit = from_timm(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_final, ref = model.forward_intermediates(x, indices=2, norm=True)
        final, ours = vit.forward_intermediates(x, indices=2, norm=True)
    _close(final, ref_final)
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref, strict=True):
        _close(a, b)


def test_gradients_flow_and_weights_are_copies() -> None:
    model = _timm_vit()
    vit = from_timm(model).train()
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in vit.parameters())
    with torch.no_grad():
        vit.blocks[0].attn.qkv_proj.weight.zero_()
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0  # timm's weights untouched


def test_keeps_dtype_and_mode() -> None:
    model = _timm_vit().to(torch.float64).train()
    vit = from_timm(model)
    assert vit.training
    assert all(p.dtype == torch.float64 for p in vit.parameters())


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


REFUSED = {
    "global_pool='map'": dict(global_pool="map"),
    "global_pool='max'": dict(global_pool="max"),
    "pool_include_prefix": dict(global_pool="avg", pool_include_prefix=True),
    "final_norm=False": dict(final_norm=False),
    "act_layer=_QuickGELU": dict(act_layer=_QuickGELU),
    "qk_norm=True with LayerNorm": dict(qk_norm=True),
    "scale_attn_norm": dict(scale_attn_norm=True),
    "scale_mlp_norm": dict(scale_mlp_norm=True),
    "embed_norm_layer": dict(embed_norm_layer="layernorm"),
    "block_fn=ResPostBlock": dict(block_fn=timm.models.vision_transformer.ResPostBlock),
    "mlp_layer=SwiGLUPacked": dict(mlp_layer=timm.layers.SwiGLUPacked),
    "img_size=(36, 48)": dict(img_size=(36, 48)),  # not a multiple of the patch size
    "patch_size=(8, 4)": dict(patch_size=(8, 4)),
}


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_unrepresentable_options_are_refused(option: str) -> None:
    model = _timm_vit(**REFUSED[option])
    key = option.split("=")[0].split(" ")[0]
    with pytest.raises(ValueError, match=key):
        from_timm(model)


def test_mixed_norm_eps_is_refused() -> None:
    model = _timm_vit()
    model.norm = nn.LayerNorm(48, eps=1e-5)
    with pytest.raises(ValueError, match="eps"):
        from_timm(model)


def test_mixed_norm_kinds_are_refused() -> None:
    model = _timm_vit()
    model.norm = RmsNorm(48, eps=1e-6)
    with pytest.raises(ValueError, match="norm kind"):
        from_timm(model)


def test_subclasses_and_non_timm_modules_are_refused() -> None:
    deit = timm.models.deit.VisionTransformerDistilled(**SMALL)
    with pytest.raises(ValueError, match="VisionTransformerDistilled"):
        from_timm(deit)
    with pytest.raises(ValueError, match="Linear"):
        from_timm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="VisionTransformer"):
        from_timm("vit_small_patch16_224")  # type: ignore[arg-type]
