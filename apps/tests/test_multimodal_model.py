"""MultimodalLM: placeholders, projectors, batching, losses, generation, saving, bad input.

Tiny random parts (test presets of every package) in float64, so batched and one-by-one
numbers agree to rounding and greedy choices never sit on a tie.
"""

from __future__ import annotations

import json

import pytest
import torch

from vats_apps.multimodal import MultimodalConfig, MultimodalLM, Projector, ProjectorConfig
from vats_apps.multimodal.inputs import build_inputs
from vats_apps.multimodal.model import frame_indices
from vats_audio import LogMelConfig
from vats_audio.presets import audio_preset
from vats_text.corpus import load_corpus
from vats_text.model import IGNORE_INDEX
from vats_text.presets import lm_preset
from vats_text.tokenizer import AUDIO_ID, IMAGE_ID, VIDEO_ID, Tokenizer
from vats_vision.presets import vit2d_preset, vit3d_preset


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(load_corpus("train", max_files=8), vocab_size=400)


def tiny_config(vocab_size: int, **lm_overrides) -> MultimodalConfig:
    lm = lm_preset("tiny", vocab_size=vocab_size, **lm_overrides)
    image = vit2d_preset(
        "small", image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2, mlp_hidden_dim=64
    )
    video = vit3d_preset(
        "small",
        image_size=16,
        num_frames=4,
        patch_size=8,
        tubelet_size=2,
        dim=24,
        n_layers=1,
        n_heads=2,
        mlp_hidden_dim=48,
    )
    audio = audio_preset("tiny", n_mels=32, pos_embed="rope")
    return MultimodalConfig(
        lm=lm,
        image_encoder=image,
        image_projector=ProjectorConfig(in_dim=32, out_dim=lm.dim, mean_token=True),
        video_encoder=video,
        video_projector=ProjectorConfig(in_dim=24, out_dim=lm.dim, stack=2),
        audio_features=LogMelConfig(n_mels=32),
        audio_encoder=audio,
        audio_projector=ProjectorConfig(
            in_dim=audio.dim, out_dim=lm.dim, stack=4, norm=True, activation="swiglu"
        ),
    )


@pytest.fixture(scope="module")
def model(tokenizer) -> MultimodalLM:
    torch.manual_seed(0)
    m = MultimodalLM(tiny_config(tokenizer.vocab_size)).double().eval()
    for p in m.parameters():  # livelier random features: media visibly move the logits
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.2)
    return m


def _image(*hw: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _clip(frames: int, seed: int = 0, h: int = 16, w: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, h, w, generator=g, dtype=torch.float64)


def _wave(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(samples, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- projector


def test_projector_mean_token_is_the_mean_of_the_rows_own_tokens():
    torch.manual_seed(0)
    proj = Projector(ProjectorConfig(in_dim=3, out_dim=5, stack=2, mean_token=True))
    x = torch.randn(2, 6, 3)
    out, lengths = proj(x, torch.tensor([6, 3]))
    assert out.shape == (2, 4, 5) and lengths.tolist() == [4, 3]
    stacked = x[1, :4].reshape(2, 6)
    stacked[1, 3:] = 0  # frame 3 is padding: zero, as in the row run alone
    torch.testing.assert_close(out[1, 0], proj.mlp(stacked.mean(0)), rtol=0, atol=1e-6)
    alone, _ = proj(x[1:, :3])
    torch.testing.assert_close(out[1, :3], alone[0], rtol=0, atol=1e-6)


def test_projector_stacks_frames_and_ignores_padding():
    torch.manual_seed(0)
    proj = Projector(ProjectorConfig(in_dim=3, out_dim=5, stack=2, norm=True, activation="swiglu"))
    x = torch.randn(2, 5, 3)
    out, lengths = proj(x, torch.tensor([5, 3]))
    assert out.shape == (2, 3, 5) and lengths.tolist() == [3, 2]
    # row 1 alone (3 frames): frames past its length are zeros, as in the padded batch
    alone, _ = proj(x[1:, :3])
    torch.testing.assert_close(out[1, :2], alone[0], rtol=0, atol=1e-6)
    # token j holds frames 2j, 2j+1 concatenated (hand-computed for the first token)
    stacked = torch.cat([x[0, 0], x[0, 1]])
    torch.testing.assert_close(out[0, 0], proj.mlp(proj.norm(stacked)))


# ----------------------------------------------------------------------------- placeholders


def test_placeholders_expand_to_each_items_token_count(model, tokenizer):
    images = [_image(16, 16), _image(8, 12)]  # 16 and 6 patches of 4 px, + the mean token
    videos = [_clip(4)]  # 2 tubelets x 4 patches = 8 features, stacked 2 -> 4 tokens
    audios = [_wave(3200)]  # 20 frames -> 10 encoder frames -> ceil(10 / 4) = 3 tokens
    counts = model.media_token_counts(images=images, videos=videos, audios=audios)
    assert counts == {"image": [17, 7], "video": [4], "audio": [3]}
    b = build_inputs(
        model,
        tokenizer,
        ["<image> a <audio>", "b <video><image>"],
        images=images,
        videos=videos,
        audios=audios,
        padding_side="right",
    )
    bos = tokenizer.bos_id
    a, space_b = tokenizer.encode(" a "), tokenizer.encode("b ")
    row0 = [bos, *[IMAGE_ID] * 17, *a, *[AUDIO_ID] * 3]
    row1 = [bos, *space_b, *[VIDEO_ID] * 4, *[IMAGE_ID] * 7]
    width = max(len(row0), len(row1))
    assert b.input_ids[0, : len(row0)].tolist() == row0
    assert b.input_ids[1, : len(row1)].tolist() == row1
    assert b.attention_mask.sum(1).tolist() == [len(row0), len(row1)]
    assert b.input_ids.shape == (2, width) and b.labels is None


def test_features_are_scattered_at_the_placeholders_in_order(model, tokenizer):
    images = [_image(16, 16, seed=1), _image(8, 12, seed=2)]
    b = build_inputs(model, tokenizer, ["x <image>", "<image> y"], images=images)
    embeds = model.embed(b.input_ids, b.attention_mask, images=b.images)
    text = model.lm.embed_tokens(b.input_ids)
    features = model.encode("image", images)  # (17 + 7, D) in order
    where = b.input_ids == IMAGE_ID
    torch.testing.assert_close(embeds[where], features, rtol=0, atol=0)
    torch.testing.assert_close(embeds[~where], text[~where], rtol=0, atol=0)
    # the second row's features are image 1's, computed alone
    alone = model.encode("image", [images[1]])
    torch.testing.assert_close(embeds[1][where[1]], alone, rtol=0, atol=1e-12)


def test_frame_indices_are_the_middles_of_equal_spans():
    assert frame_indices(4, 1) == [2] and frame_indices(5, 1) == [2]
    assert frame_indices(4, 2) == [1, 3] and frame_indices(8, 4) == [1, 3, 5, 7]
    assert frame_indices(3, 3) == [0, 1, 2]


@pytest.fixture(scope="module")
def framed(model, tokenizer) -> MultimodalLM:
    """The model with the image encoder also reading 2 frames of every clip."""
    m = MultimodalLM(model.config.replace(video_image_frames=2)).double().eval()
    m.load_state_dict(model.state_dict())
    return m


def test_clip_frames_through_the_image_encoder_follow_the_clips_tokens(framed, model, tokenizer):
    # 4 frames of 16x16: 2 tubelets x 4 patches / stack 2 = 4 tokens, + 2 frames x (16 + 1)
    # image tokens; 6 frames of 8x16: 3 x 2 / 2 = 3 tokens, + 2 frames x (8 + 1)
    counts = framed.media_token_counts(videos=[_clip(4), _clip(6, h=8, w=16)])
    assert counts == {"video": [4 + 2 * 17, 3 + 2 * 9]}
    clips = [_clip(4, seed=11), _clip(6, seed=12)]  # ViT3D batches clips of one frame size
    got = framed.encode("video", clips)
    want = torch.cat([
        model.encode("video", [clips[0]]),
        model.encode("image", [clips[0][:, 1], clips[0][:, 3]]),  # frame_indices(4, 2)
        model.encode("video", [clips[1]]),
        model.encode("image", [clips[1][:, 1], clips[1][:, 4]]),  # frame_indices(6, 2)
    ])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # a batch with clips of different lengths, left-padded, equals each clip alone
    prompts = ["<video> what moves?\n", "A clip: <video>\n"]
    batch = build_inputs(framed, tokenizer, prompts, videos=clips, max_new_tokens=4)
    together = framed.generate(
        batch.input_ids, batch.attention_mask, max_new_tokens=4, **batch.media()
    )
    t = batch.input_ids.shape[1]
    for i, (p, clip) in enumerate(zip(prompts, clips, strict=True)):
        one = build_inputs(framed, tokenizer, [p], videos=[clip])
        alone = framed.generate(one.input_ids, one.attention_mask, max_new_tokens=4, **one.media())
        assert together[i, t:].tolist() == alone[0, one.input_ids.shape[1] :].tolist()


def test_clip_frames_need_the_image_encoder_and_enough_frames(framed, tokenizer):
    cfg = tiny_config(tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"video_image_frames.*image_encoder"):
        cfg.replace(image_encoder=None, image_projector=None, video_image_frames=1)
    with pytest.raises(ValueError, match=r"video_image_frames"):
        cfg.replace(video_image_frames=-1)
    framed3 = MultimodalLM(cfg.replace(video_image_frames=3))
    with pytest.raises(ValueError, match=r"video 0 has 2 frames.*video_image_frames=3"):
        framed3.media_token_counts(videos=[_clip(2).float()])


# ----------------------------------------------------------------------------- batching


def test_left_padded_batch_equals_each_sample_alone(model, tokenizer):
    prompts = [
        "<image> What is it?\n",
        "Say: <video> and <audio>\n",
        "<audio>\n",
        "A longer question about <image> and its colour, please?\n",
    ]
    images = [_image(16, 16, seed=3), _image(12, 8, seed=4)]
    videos = [_clip(4, seed=5)]
    audios = [_wave(4000, seed=6), _wave(1700, seed=7)]
    per_row = [
        {"images": [images[0]]},
        {"videos": videos, "audios": [audios[0]]},
        {"audios": [audios[1]]},
        {"images": [images[1]]},
    ]
    batch = build_inputs(
        model, tokenizer, prompts, images=images, videos=videos, audios=audios, max_new_tokens=6
    )
    together = model.generate(
        batch.input_ids, batch.attention_mask, max_new_tokens=6, **batch.media()
    )
    logits = model(batch.input_ids, batch.attention_mask, **batch.media()).logits[:, -1]
    t = batch.input_ids.shape[1]
    for i, (p, media) in enumerate(zip(prompts, per_row, strict=True)):
        one = build_inputs(model, tokenizer, [p], **media)
        alone = model.generate(one.input_ids, one.attention_mask, max_new_tokens=6, **one.media())
        assert together[i, t:].tolist() == alone[0, one.input_ids.shape[1] :].tolist()
        own = model(one.input_ids, one.attention_mask, **one.media()).logits[0, -1]
        torch.testing.assert_close(logits[i], own, rtol=0, atol=1e-9)
    # the media matter: another image changes the first row's logits
    other = build_inputs(model, tokenizer, [prompts[0]], images=[_image(16, 16, seed=99)])
    moved = model(other.input_ids, other.attention_mask, **other.media()).logits[0, -1]
    assert (moved - logits[0]).abs().max() > 1e-3


def test_generation_runs_each_encoder_once_and_reads_the_cache(model, tokenizer, monkeypatch):
    calls = {"image": 0, "audio": 0}

    def counting(kind, method):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return method(*args, **kwargs)

        return wrapper

    for name in ("forward_features", "forward_features_padded"):
        monkeypatch.setattr(
            model.image_encoder, name, counting("image", getattr(model.image_encoder, name))
        )
    monkeypatch.setattr(
        model.audio_encoder,
        "forward_features",
        counting("audio", model.audio_encoder.forward_features),
    )
    lengths = []
    hook = model.lm.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append(
            kwargs["inputs_embeds"].shape[1]
            if kwargs.get("inputs_embeds") is not None
            else args[0].shape[1]
        ),
        with_kwargs=True,
    )
    try:
        b = build_inputs(
            model,
            tokenizer,
            ["<image> <audio>", "<audio> <image>"],
            images=[_image(16, 16), _image(8, 8)],
            audios=[_wave(2000), _wave(3000)],
        )
        model.generate(b.input_ids, b.attention_mask, max_new_tokens=5, **b.media())
    finally:
        hook.remove()
    # one encoder call for the whole batch (both samples), at the prefill only
    assert calls == {"image": 1, "audio": 1}
    # the prefill reads the whole prompt once, then one token per step through the caches
    assert lengths[0] == b.input_ids.shape[1] and lengths[1:] == [1] * 4


def test_generation_through_sliding_window_caches(tokenizer):
    # an LM whose windows are shorter than the media: the rolling caches serve the decode
    torch.manual_seed(1)
    config = tiny_config(tokenizer.vocab_size, layer_windows=(8, 8, 8))
    m = MultimodalLM(config).double().eval()
    b = build_inputs(m, tokenizer, ["<image> colour?\n"], images=[_image(16, 16)])
    assert b.input_ids.shape[1] > 8
    out = m.generate(b.input_ids, b.attention_mask, max_new_tokens=6, images=b.images)
    # no cache: each step re-reads the whole sequence
    ids = b.input_ids
    for _ in range(6):
        logits = m(ids, images=b.images).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


# ----------------------------------------------------------------------------- training


def test_loss_is_masked_to_the_answer_tokens(model, tokenizer):
    images = [_image(16, 16, seed=8), _image(16, 16, seed=9)]
    b = build_inputs(
        model,
        tokenizer,
        ["<image>\nWhat colour is the shape?\n", "<image>\nWhich shape?\n"],
        answers=["red", "a small circle"],
        images=images,
    )
    labelled = b.labels != IGNORE_INDEX
    # the answer and EOS are labelled, nothing else; left padding ends every row together
    for i, answer in enumerate(["red", "a small circle"]):
        want = [*tokenizer.encode(answer), tokenizer.eos_id]
        assert b.labels[i][labelled[i]].tolist() == want
        assert labelled[i, -len(want) :].all() and labelled[i].sum() == len(want)
    out = model(b.input_ids, b.attention_mask, labels=b.labels, **b.media())
    # by hand, from every position's logits: next-token cross-entropy at the answers only
    # (the model's head ran on the last positions only)
    every = model(b.input_ids, b.attention_mask, **b.media()).logits
    assert out.logits.shape[1] < every.shape[1]
    logp = every.double().log_softmax(-1)[:, :-1]
    target = b.labels[:, 1:]
    keep = target != IGNORE_INDEX
    by_hand = -logp[keep].gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, by_hand)
    # a different question with the same answer: the labels outside the answer stay ignored
    q2 = build_inputs(
        model, tokenizer, ["<image>\nName the colour!\n"], answers=["red"], images=images[:1]
    )
    assert (q2.labels[0] != IGNORE_INDEX).sum() == labelled[0].sum()


def test_frozen_encoders_keep_no_graph_and_projectors_learn(tokenizer):
    torch.manual_seed(2)
    m = MultimodalLM(tiny_config(tokenizer.vocab_size))
    m.requires_grad_(False)
    m.image_projector.requires_grad_(True)
    b = build_inputs(m, tokenizer, ["<image>\n"], answers=["red"], images=[torch.rand(3, 16, 16)])
    loss = m(b.input_ids, b.attention_mask, labels=b.labels, **b.media()).loss
    loss.backward()
    assert all(p.grad is not None for p in m.image_projector.parameters())
    assert all(p.grad is None for p in m.image_encoder.parameters())
    assert all(p.grad is None for p in m.lm.parameters())


# ----------------------------------------------------------------------------- saving


def test_save_and_load_give_identical_answers(model, tokenizer, tmp_path):
    b = build_inputs(
        model,
        tokenizer,
        ["<video> go\n", "<audio>?"],
        videos=[_clip(4, seed=10)],
        audios=[_wave(5000, seed=11)],
    )
    before = model.generate(b.input_ids, b.attention_mask, max_new_tokens=5, **b.media())
    model.save_pretrained(tmp_path / "mm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mm", dtype=torch.float64)
    after = loaded.generate(b.input_ids, b.attention_mask, max_new_tokens=5, **b.media())
    assert before.tolist() == after.tolist()
    for (name, p), (_, q) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("lm", "dim", 48), ("image_encoder", "dim", 48), ("audio_encoder", "n_layers", 3)],
)
def test_loading_a_config_that_disagrees_with_the_weights_names_the_section(
    tokenizer, tmp_path, section, field, value
):
    m = MultimodalLM(tiny_config(tokenizer.vocab_size))
    m.save_pretrained(tmp_path / "mm")
    path = tmp_path / "mm" / "config.json"
    data = json.loads(path.read_text())
    data[section][field] = value
    if section == "lm":  # keep the config valid: projectors follow the LM's width
        for kind in ("image", "video", "audio"):
            data[f"{kind}_projector"]["out_dim"] = value
    if section == "image_encoder":
        data["image_projector"]["in_dim"] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"`{section}` disagrees"):
        MultimodalLM.from_pretrained(tmp_path / "mm")


# ----------------------------------------------------------------------------- bad input


def test_placeholder_and_media_mismatches_fail_before_any_encoder_runs(model, tokenizer):
    calls = []
    hook = model.image_encoder.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    image = _image(16, 16)
    try:
        with pytest.raises(ValueError, match="<image> placeholder with no image"):
            build_inputs(model, tokenizer, ["<image> and <image>"], images=[image])
        with pytest.raises(ValueError, match=r"1 image item.* have no placeholder"):
            build_inputs(model, tokenizer, ["<image>", "no media"], images=[image, image])
        with pytest.raises(ValueError, match=r"1 audio item.* have no placeholder"):
            build_inputs(model, tokenizer, ["text only"], audios=[_wave(2000)])
        # ids whose placeholder run does not match the features: named, with both counts
        ids = torch.tensor([[tokenizer.bos_id, *[IMAGE_ID] * 16, 50]])
        with pytest.raises(ValueError, match=r"image: the prompt holds 16 <image>.*yield 17"):
            model(ids, images=[image])
        with pytest.raises(ValueError, match=r"holds 0 <video>.*yield 4"):
            model(torch.tensor([[2, 50, 51]]), videos=[_clip(4)])
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize(
    ("media", "message"),
    [
        ({"images": [torch.rand(3, 16, 16)]}, "image 0 is torch.float32 but the image encoder"),
        ({"images": [_image(16, 14)]}, "image 0 is 16x14 pixels"),
        ({"images": [_image(16, 16)[:1]]}, "image 0 has 1 channels"),
        ({"images": [_image(16, 16)[None]]}, r"image 0 must be a \(C, H, W\)"),
        ({"videos": [_clip(3)]}, "video 0 has 3 frames"),
        ({"audios": [_wave(100)]}, "audio 0 has 100 samples, fewer than one feature frame"),
        ({"audios": [_wave(3000).reshape(2, 1500)]}, r"audio 0 must be a \(S,\) float"),
        ({"images": torch.rand(3, 16, 16)}, r"images must be a list of \(C, H, W\)"),
    ],
)
def test_media_that_do_not_fit_their_encoder_are_refused(model, tokenizer, media, message):
    kind = next(iter(media))[:-1]
    with pytest.raises(ValueError, match=message):
        build_inputs(model, tokenizer, [f"<{kind}>"], **media)


def test_a_model_without_an_encoder_refuses_that_medium(tokenizer):
    cfg = tiny_config(tokenizer.vocab_size)
    cfg = cfg.replace(video_encoder=None, video_projector=None)
    m = MultimodalLM(cfg)
    with pytest.raises(ValueError, match="no video encoder"):
        build_inputs(m, tokenizer, ["<video>"], videos=[torch.rand(3, 4, 16, 16)])


def test_a_prompt_too_long_after_expansion_says_by_how_much(tokenizer):
    m = MultimodalLM(tiny_config(tokenizer.vocab_size, max_seq_len=20))
    image = torch.rand(3, 16, 16)  # 17 tokens
    with pytest.raises(
        ValueError,
        match=r"prompt 0 is \d+ tokens .*17 of them media.*\d+ more than the LM's max_seq_len=20",
    ):
        build_inputs(m, tokenizer, ["<image> What colour is it?"], images=[image])
    with pytest.raises(ValueError, match=r"\+ 10 to generate"):
        build_inputs(m, tokenizer, ["<image>"], images=[image], max_new_tokens=10)


def test_configs_that_do_not_fit_together_are_refused(tokenizer):
    cfg = tiny_config(tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"image_projector.*in_dim=32"):
        cfg.replace(image_projector=ProjectorConfig(in_dim=31, out_dim=cfg.lm.dim))
    with pytest.raises(ValueError, match=r"audio_features.*n_mels"):
        cfg.replace(audio_features=LogMelConfig(n_mels=40))
    with pytest.raises(ValueError, match=r"video_projector.*set exactly when"):
        cfg.replace(video_encoder=None)
    with pytest.raises(ValueError, match=r"token_id=4 .*no other medium uses"):
        cfg.replace(audio_token_id=IMAGE_ID)
