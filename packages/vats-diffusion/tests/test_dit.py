"""DiT: the model contract on the small presets, the big presets' parameter counts, masked
text (padding invariance, the null text condition), class labels with text, RoPE / GQA /
window options against properties they must have, the timestep and position embeddings
against their closed forms, and ValueErrors naming the bad input or config field."""

from __future__ import annotations

import math

import pytest
import torch

from vats_core.attention import attention_backend
from vats_core.testing import (
    check_backward,
    check_config,
    check_dtype_device_moves,
    check_forward,
    check_raises,
    check_save_load_roundtrip,
)
from vats_diffusion.dit import DIT_PRESETS, DiT, DiTConfig, DiTPosEmbed, dit_preset
from vats_diffusion.dit_layers import AdaLNMode, sincos_pos_embed_2d, timestep_embedding

F64 = torch.float64


def _randomize(model: DiT, seed: int = 0) -> DiT:
    """Perturb every weight: the zero init (identity blocks, zero output) would make most
    comparisons between two outputs trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # About the size of a trained weight: std 0.5 / sqrt(fan-in), 0.1 for vectors.
            std = 0.5 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def _model(name: str = "tiny", seed: int = 0, **overrides: object) -> DiT:
    torch.manual_seed(seed)
    return _randomize(DiT(dit_preset(name, **overrides)), seed).eval()


def _inputs(config: DiTConfig, b: int = 2, hw: tuple[int, int] = (8, 12), s: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    out: dict = dict(
        x=torch.randn(b, config.in_channels, *hw, generator=g),
        timestep=torch.tensor([17, 640, 3, 999][:b]),
    )
    if config.num_classes:
        out["class_labels"] = torch.tensor([3, config.num_classes, 0, 1][:b])
    if config.text_dim is not None:
        out["text_states"] = torch.randn(b, s, config.text_dim, generator=g)
        lengths = torch.tensor([s, 2, 4, 1][:b])
        out["text_mask"] = torch.arange(s)[None] < lengths[:, None]
    return out


@pytest.mark.parametrize("name", ["tiny", "pixart-tiny", "shapes"])
def test_preset_contract(name: str, tmp_path) -> None:
    model = _model(name)
    inputs = _inputs(model.config)
    b, _, h, w = inputs["x"].shape
    check_forward(model, inputs, (b, model.config.out_channels, h, w))
    check_backward(model, inputs)
    check_save_load_roundtrip(model, inputs, tmp_path)
    check_dtype_device_moves(model, inputs)


def test_fresh_model_starts_at_zero_and_trains_every_parameter() -> None:
    """DiT's zero init: the output is exactly zero; gradients still reach every parameter."""
    torch.manual_seed(0)
    model = DiT(dit_preset("tiny"))
    inputs = _inputs(model.config)
    with torch.no_grad():
        assert model(**inputs).abs().max() == 0
    check_backward(model, inputs)


@pytest.mark.parametrize(
    ("name", "millions"),
    # DiT paper, Table 1 (Peebles & Xie, 2023): S/2 33M, XL/2 675M parameters.
    # (B/2 130M and L/2 458M hold too; two sizes keep the test short.)
    [("DiT-S/2", 33), ("DiT-XL/2", 675)],
)
def test_imagenet_presets_have_the_paper_sizes(name: str, millions: int) -> None:
    # Blocks are identical: count a 1- and a 2-block model (the full ones are up to 2.7 GB).
    one, two = (
        sum(p.numel() for p in DiT(dit_preset(name, n_layers=n)).parameters()) for n in (1, 2)
    )
    n = one + (DIT_PRESETS[name]["n_layers"] - 1) * (two - one)
    assert abs(n / 1e6 - millions) / millions < 0.01, f"{name}: {n / 1e6:.1f}M parameters"


def test_configs_contract() -> None:
    for name in DIT_PRESETS:
        config = dit_preset(name)
        check_config(config)
        check_config(config.block_config)
    check_config(dit_preset("tiny", sample_size=(8, 16), pos_embed="rope2d"))


# --------------------------------------------------------------------------- masked text


def test_padding_text_changes_nothing() -> None:
    """The same prompts padded to 8 or 77 positions (padding holding garbage, even NaN)
    give the same prediction."""
    model = _model("tiny")
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([5, 500, 900]), torch.tensor([1, 2, 10])
    lengths = torch.tensor([5, 1, 3])
    prompt = torch.randn(3, 5, cfg.text_dim, generator=g)
    outs = []
    for total in (8, 77):
        states = torch.randn(3, total, cfg.text_dim, generator=g) * 100
        states[:, :5] = prompt
        mask = torch.arange(total)[None] < lengths[:, None]
        states[~mask] = float("nan") if total == 77 else states[~mask]
        with torch.no_grad():
            outs.append(model(x, t, class_labels=y, text_states=states, text_mask=mask))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "pixart-tiny"])
def test_null_text_row_is_finite_deterministic_and_ignores_its_states(name: str) -> None:
    """An all-False text_mask row is the null condition: finite, the same on every call,
    the same whatever its states hold, the same as text_states=None, and its neighbours'
    rows do not change."""
    model = _model(name)
    inputs = _inputs(model.config, b=2)
    inputs["text_mask"][1] = False
    with torch.no_grad():
        out = model(**inputs)
        again = model(**inputs)
        other = dict(inputs, text_states=inputs["text_states"].clone())
        other["text_states"][1] = torch.randn_like(other["text_states"][1]) * 50
        changed = model(**other)
        no_text = model(**{k: v for k, v in inputs.items() if not k.startswith("text")})
        alone = model(**{k: v[:1] for k, v in inputs.items()})
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    torch.testing.assert_close(changed, out, rtol=0, atol=0)
    torch.testing.assert_close(out[1], no_text[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-6)
    assert (out[0] - no_text[0]).abs().max() > 1e-3  # the text row does read its text


def test_all_rows_null_gives_finite_gradients() -> None:
    model = _model("tiny").train()
    inputs = _inputs(model.config)
    inputs["text_mask"][:] = False
    out = model(**inputs)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pooled_text_reaches_the_conditioning() -> None:
    """With pooled_text the masked mean of the text enters c; without it, c ignores text."""
    model = _model("tiny")
    inputs = _inputs(model.config)
    states, mask = inputs["text_states"], inputs["text_mask"]
    t, y, b = inputs["timestep"], inputs["class_labels"], 2
    with torch.no_grad():
        context, _, _, pooled = model._text(states, mask)
        c_text = model.condition(
            t, class_labels=y, pooled_text=pooled, batch=b, dtype=torch.float32
        )
        c_none = model.condition(t, class_labels=y, batch=b, dtype=torch.float32)
        weights = mask[..., None].float()
        mean = (context * weights).sum(1) / weights.sum(1)
        torch.testing.assert_close(c_text - c_none, model.pooled_text_embed(mean))
    assert _model("tiny", pooled_text=False).pooled_text_embed is None


def test_class_labels_and_text_together() -> None:
    model = _model("tiny")
    k = model.config.num_classes
    inputs = _inputs(model.config)
    with torch.no_grad():
        out = model(**inputs)
        other_label = model(**dict(inputs, class_labels=torch.tensor([4, 4])))
        other_text = model(**dict(inputs, text_states=inputs["text_states"] + 1))
        null = model(**dict(inputs, class_labels=torch.tensor([k, k])))
        none = model(**{n: v for n, v in inputs.items() if n != "class_labels"})
    assert (out - other_label).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # labels matter
    assert (out - other_text).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # text matters
    torch.testing.assert_close(none, null, rtol=0, atol=0)  # None = the null label


def test_class_and_text_dropout_only_in_training() -> None:
    model = _model("tiny", class_dropout=0.5, text_dropout=0.5)
    inputs = _inputs(model.config, b=4)
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs))  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        first = model(**inputs)
        torch.manual_seed(0)
        assert torch.equal(first, model(**inputs))  # seeded: reproducible
        outs = [model(**inputs) for _ in range(8)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])  # training: random drops


def test_text_keep_is_the_dropout_given_instead_of_drawn() -> None:
    """``text_keep`` drops the rows it marks False, in any mode, and draws nothing: given
    the rows text_dropout draws from a seed, training gives the drawn output."""
    model = _model("tiny", text_dropout=0.5)
    inputs = _inputs(model.config, b=4)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        dropped = dict(inputs, text_mask=inputs["text_mask"] & keep[:, None])
        torch.testing.assert_close(
            model(**inputs, text_keep=keep), model(**dropped), rtol=0, atol=0
        )
        model.train()
        torch.manual_seed(0)
        drawn = model(**inputs)
        torch.manual_seed(0)
        given = model(**inputs, text_keep=torch.rand(4) >= 0.5)
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"DiT: text_keep must be a torch.bool \(B,\) = \(4,\)"):
        model(**inputs, text_keep=keep[:2])
    no_text = {k: v for k, v in inputs.items() if not k.startswith("text")}
    with pytest.raises(ValueError, match="text_keep given without text_states"):
        model(**no_text, text_keep=keep)


# --------------------------------------------------------------------------- options


def test_scalar_timestep_equals_a_vector_and_floats_work() -> None:
    model = _model("tiny")
    inputs = _inputs(model.config)
    with torch.no_grad():
        vec = model(**dict(inputs, timestep=torch.tensor([250, 250])))
        scalar = model(**dict(inputs, timestep=torch.tensor(250)))
        floats = model(**dict(inputs, timestep=torch.tensor([250.0, 250.0])))
    torch.testing.assert_close(scalar, vec, rtol=0, atol=0)
    torch.testing.assert_close(floats, vec, rtol=0, atol=0)


def test_rope2d_runs_any_grid_and_differs_from_sincos() -> None:
    """RoPE and sin-cos models hold the same weights (neither has position parameters) but
    compute different functions; RoPE runs on any grid."""
    sincos = _model("tiny")
    rope = DiT(sincos.config.replace(pos_embed=DiTPosEmbed.ROPE2D)).eval()
    rope.load_state_dict(sincos.state_dict())
    inputs = _inputs(sincos.config)
    with torch.no_grad():
        a, b = sincos(**inputs), rope(**inputs)
        wide = rope(**dict(inputs, x=torch.randn(2, 4, 6, 20)))
    assert (a - b).abs().max() > 1e-3
    assert wide.shape == (2, 8, 6, 20) and torch.isfinite(wide).all()


@pytest.mark.parametrize("pos_embed", ["sincos", "rope2d"])
def test_window_one_makes_each_patch_independent(pos_embed: str) -> None:
    """With window=1 each token attends to itself only: changing one patch of the latent
    changes only that patch of the prediction (cross-attention and the conditioning do
    not mix tokens)."""
    model = _model("tiny", window=1, pos_embed=pos_embed)
    inputs = _inputs(model.config)
    x = inputs["x"].clone()
    x[:, :, 2:4, 4:6] += 1.0  # one 2×2 patch: grid cell (1, 2)
    with torch.no_grad():
        diff = (model(**inputs) - model(**dict(inputs, x=x))).abs()
    changed = diff.amax(dim=(0, 1)) > 1e-6  # (h, w)
    expected = torch.zeros_like(changed)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)
    full = _model("tiny", pos_embed=pos_embed)  # without the window, every patch changes
    with torch.no_grad():
        assert ((full(**inputs) - full(**dict(inputs, x=x))).abs().amax(dim=(0, 1)) > 1e-6).all()


def test_gqa_equals_mha_with_repeated_key_value_heads() -> None:
    """n_kv_heads=2 of 4 heads is the MHA model whose key/value heads are each repeated for
    the two query heads of their group."""
    gqa = _model("tiny").double()
    mha = DiT(gqa.config.replace(n_kv_heads=None)).double().eval()
    state = dict(gqa.state_dict())
    dh, hq, hkv = 8, 4, 2

    def expand(w: torch.Tensor, n_q_rows: int) -> torch.Tensor:
        q, k, v = w[:n_q_rows], *w[n_q_rows:].chunk(2)
        rep = [
            t.unflatten(0, (hkv, dh)).repeat_interleave(hq // hkv, 0).flatten(0, 1) for t in (k, v)
        ]
        return torch.cat([q, *rep])

    for name in list(state):
        if name.endswith("attn.qkv_proj.weight") or name.endswith("attn.qkv_proj.bias"):
            state[name] = expand(state[name], hq * dh)
        if name.endswith("cross_attn.kv_proj.weight") or name.endswith("cross_attn.kv_proj.bias"):
            state[name] = expand(state[name], 0)
    mha.load_state_dict(state)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in _inputs(gqa.config).items()}
    with torch.no_grad():
        torch.testing.assert_close(mha(**inputs), gqa(**inputs), rtol=1e-10, atol=1e-10)


def test_attention_backends_agree() -> None:
    model = _model("tiny", window=3)
    inputs = _inputs(model.config)
    with torch.no_grad():
        with attention_backend("math"):
            reference = model(**inputs)
        for backend in ("sdpa",):  # flex compiles on first use: slow here, proven in vats-core
            with attention_backend(backend):
                torch.testing.assert_close(model(**inputs), reference, rtol=1e-5, atol=1e-5)
        # local serves the windowed self-attention; cross-attention falls back to auto
        local = DiT(model.config.replace(attention_backend="local")).eval()
        local.load_state_dict(model.state_dict())
        torch.testing.assert_close(local(**inputs), reference, rtol=1e-5, atol=1e-5)


def test_adaln_single_and_zero_layouts() -> None:
    zero, single = _model("tiny"), _model("pixart-tiny")
    assert zero.blocks[0].adaln is not None and zero.adaln_single is None
    assert single.blocks[0].scale_shift_table.shape == (6, 32)
    assert single.adaln_single is not None and single.final_scale_shift_table is not None
    assert single.pooled_text_embed is None and single.class_embed is None


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("flip", "shift"), [(True, 1.0), (True, 0.0), (False, 0.0)])
def test_timestep_embedding_closed_form(flip: bool, shift: float) -> None:
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=flip, freq_shift=shift).double()
    for row, tv in zip(emb, t.tolist(), strict=True):
        freqs = [math.exp(-math.log(10000) * i / (4 - shift)) for i in range(4)]
        sin = [math.sin(tv * f) for f in freqs]
        cos = [math.cos(tv * f) for f in freqs]
        expected = torch.tensor(cos + sin if flip else sin + cos, dtype=F64)
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-4)


def test_sincos_positions_closed_form() -> None:
    """Columns in the first half, rows in the second; stretched onto the base grid."""
    d, (gh, gw), base = 8, (3, 6), (3, 3)
    table = sincos_pos_embed_2d(d, (gh, gw), base_grid=base, interpolation_scale=2.0)
    omega = [10000 ** (-k / 2) for k in range(2)]

    def axis(pos: float) -> list[float]:
        return [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]

    for r in range(gh):
        for c in range(gw):
            row_pos, col_pos = r * base[0] / gh / 2.0, c * base[1] / gw / 2.0
            expected = torch.tensor(axis(col_pos) + axis(row_pos), dtype=F64)
            torch.testing.assert_close(table[r * gw + c], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument() -> None:
    model = _model("tiny")
    good = _inputs(model.config)

    def call(**changes: object) -> object:
        return lambda: model(**{**good, **changes})

    cases = [
        (call(x=good["x"][:, :3]), r"in_channels=4"),
        (call(x=good["x"][0]), r"x must be"),
        (call(x=good["x"].long()), r"x must be"),
        (call(x=good["x"][..., :7]), r"patch_size=2"),
        (call(timestep=torch.tensor([1, 2, 3])), r"timestep"),
        (call(timestep=torch.ones(2, 1)), r"timestep"),
        (call(timestep=torch.ones(2, dtype=torch.bool)), r"timestep"),
        (call(text_states=good["text_states"][..., :5]), r"text_states.*text_dim"),
        (call(text_states=good["text_states"][0]), r"text_states"),
        (call(text_states=good["text_states"][:, :0], text_mask=None), r"text_states"),
        (call(text_mask=good["text_mask"][:, :3]), r"text_mask has shape"),
        (call(text_mask=good["text_mask"].long()), r"text_mask must be a torch.bool"),
        (call(text_states=None), r"text_mask given without text_states"),
        (call(class_labels=torch.tensor([0, 11])), r"class_labels out of range"),
        (call(class_labels=torch.tensor([-1, 0])), r"class_labels out of range"),
        (call(class_labels=torch.tensor([0.0, 1.0])), r"class_labels must be an integer"),
        (call(class_labels=torch.tensor([0])), r"class_labels must be"),
    ]
    for fn, match in cases:
        check_raises(fn, ValueError, match)
    text_only = _model("pixart-tiny")
    check_raises(
        lambda: text_only(good["x"], good["timestep"], class_labels=good["class_labels"]),
        ValueError,
        r"num_classes=0",
    )
    no_text = _model("tiny", text_dim=None)
    check_raises(
        lambda: no_text(good["x"], good["timestep"], text_states=good["text_states"]),
        ValueError,
        r"text_dim=None",
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(sample_size=9), r"DiTConfig\.sample_size=9"),
        (dict(sample_size=(8, 8, 8)), r"DiTConfig\.sample_size"),
        (dict(dim=30, n_heads=3, n_kv_heads=None), r"DiTConfig\.dim=30.*multiple of 4"),
        (dict(n_kv_heads=3), r"DiTConfig\.n_kv_heads=3"),
        (dict(pos_embed="rope2d", head_dim=5), r"DiTConfig\.head_dim=5"),
        (dict(pos_embed="learned"), r"DiTConfig\.pos_embed"),
        (dict(adaln="none"), r"DiTConfig\.adaln"),
        (dict(text_dim=None, text_dropout=0.1), r"DiTConfig\.text_dropout"),
        (dict(num_classes=0, class_dropout=0.1), r"DiTConfig\.class_dropout"),
        (dict(class_dropout=1.0), r"DiTConfig\.class_dropout"),
        (dict(timestep_channels=7), r"DiTConfig\.timestep_channels"),
        (dict(timestep_freq_shift=128.0), r"DiTConfig\.timestep_freq_shift"),
        (dict(num_classes=-1), r"DiTConfig\.num_classes"),
        (dict(window=0), r"DiTConfig\.window"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, match: str) -> None:
    check_raises(lambda: dit_preset("tiny", **overrides), ValueError, match)


def test_unknown_preset_and_enum_values() -> None:
    check_raises(lambda: dit_preset("nope"), ValueError, r"unknown DiT preset 'nope'")
    assert DiTConfig(adaln="single").adaln is AdaLNMode.SINGLE
