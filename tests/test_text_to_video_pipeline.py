"""The text_to_video pipeline at test size: a tiny end-to-end run whose denoising loss falls,
the GIFs and PNG frames it writes, the VAE shared with text_to_image (one cache entry), the
stage cache (a DiT setting retrains the DiT alone), and bad input refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tiny_settings import TINY_TEXT_TO_IMAGE, TINY_TEXT_TO_VIDEO

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.generation.clips import ClipReading, save_clips
from vats_apps.pipelines import text_to_image as t2i
from vats_apps.pipelines import text_to_video as t2v

# Enough VAE and DiT steps for the DiT's held-out denoising loss to fall clearly: at fixed
# timesteps and noise it is a deterministic function of the weights, 1.991 untrained, 1.760
# after these 60 steps. The VAE's steps differ from text_to_image's test's, whose first run
# must train its own (this one's is a text_to_image entry too: the tests share one cache).
LEARN = [
    *TINY_TEXT_TO_VIDEO,
    "parts.image.vae.max_steps=24",
    "train.enrich.max_steps=4",  # not the tiny run's (test_configs may have cached that one)
    "train.dit.max_steps=60",
    "train.dit.batch_size=8",
    "train.dit.trainer.warmup_steps=5",
    "train.dit.trainer.lr=1e-2",
    "train.dit.ema.decay=0.5",
]


def _compose(pipeline: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"pipeline={pipeline}", *overrides])


def _cfg(cache: Path, out: Path, *overrides: str):
    return _compose(
        "text_to_video",
        [*LEARN, f"pipeline.cache_dir={cache}", f"pipeline.out_dir={out}", *overrides],
    )


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("t2v-out")
    return cache_dir, out, run_pipeline(_cfg(cache_dir, out))


def test_a_tiny_run_trains_its_stages_and_its_denoising_loss_falls(trained):
    cache, out, result = trained
    assert result["cached"]["enrich"] is False and result["cached"]["dit"] is False
    dit = result["stages"]["dit"]
    assert dit["denoising_loss_after"] < 0.95 * dit["denoising_loss_before"], dit
    assert dit["frames"] == 4
    # The VAE is text_to_image's cache entry (trained here, or by text_to_image's tests).
    assert (cache / "text_to_image" / "vae" / result["keys"]["vae"] / "report.json").is_file()
    for stage in ("enrich", "dit"):
        assert (out / stage / "metrics.jsonl").is_file()
    scores = result["scores"]
    assert scores["direction"]["chance"] == pytest.approx(1 / 4)  # left, right, up, down
    assert scores["adherence"]["chance"] == pytest.approx(1 / 24)  # 4 shapes x 6 colours
    assert scores["direction"]["clips"] == 4  # 2 prompts x 2 seeds
    for key in ("real_clips", "round_trip", "plain"):
        assert set(scores[key]) == {"direction", "shape_color", "frames", "consistency"}
    moved = scores["words"]["moved"]  # every captioned attribute's word, on held-out clips
    assert set(moved) == {"shape", "color", "size", "direction", "speed", "background"}
    assert any(v > 0 for v in moved.values())


def test_the_video_dit_starts_from_text_to_image_s_dit(trained):
    """train.dit.init=image: the image DiT stage is a part (its entry, keyed into the DiT
    stage's), and with init=none a fresh VideoDiT trains under another key."""
    cache, out, result = trained
    image_key = result["parts"]["image_dit"]
    assert (cache / "text_to_image" / "dit" / image_key).is_dir()
    fresh = run_pipeline(
        _cfg(cache, out, "train.dit.init=none", "pipeline.evaluate=false", "prompt=null")
    )
    assert fresh["cached"]["dit"] is False and "image_dit" not in fresh["parts"]
    assert fresh["keys"]["dit"] != result["keys"]["dit"]


def test_a_tiny_run_continues_its_first_frames(trained, monkeypatch):
    """train.dit.first_frame=0.5 trains under its own key, its loss falls, and the clips
    are drawn from their first frame (two passes of sampling)."""
    cache, out, _ = trained
    calls = []
    sample = t2v.sample_clips
    monkeypatch.setattr(
        t2v, "sample_clips", lambda *a, **k: calls.append(k["from_first"]) or sample(*a, **k)
    )
    run = run_pipeline(_cfg(cache, out, "train.dit.first_frame=0.5", "pipeline.evaluate=false"))
    dit = run["stages"]["dit"]
    assert run["cached"]["dit"] is False and calls == [True]
    assert dit["denoising_loss_after"] < 0.95 * dit["denoising_loss_before"], dit
    assert len(run["generated"]["records"]) == 2


def test_the_vae_is_text_to_image_s_entry():
    """The same parts and VAE settings key the same entry from either pipeline."""
    cfg = _compose("text_to_image", TINY_TEXT_TO_IMAGE)
    image = t2i.vae_key_spec(cfg, t2i.check_config(cfg))
    video_cfg = _compose("text_to_video", TINY_TEXT_TO_VIDEO)
    video = t2i.vae_key_spec(
        t2v.part_configs(video_cfg)["image"], t2v.check_config(video_cfg).frame_vae
    )
    assert video == image


def test_the_clips_and_their_prompts_are_written(trained):
    _, out, result = trained
    made = result["generated"]
    folder = out / "a_blue_circle_moving_left-seed0"
    assert made["folder"] == str(folder)
    assert len(made["gifs"]) == 2
    for gif, frames in zip(made["gifs"], made["frames"], strict=True):
        with Image.open(gif) as image:
            assert image.n_frames == 4 and image.size == (192, 192)  # x8
            assert image.info["loop"] == 0 and image.info["duration"] == 250  # 4 fps
        assert [Image.open(p).size for p in frames] == [(24, 24)] * 4
    records = json.loads((folder / "prompts.json").read_text())
    assert [r["prompt"] for r in records] == ["a blue circle moving left"] * 2
    for r in records:  # each clip conditioned on its accepted enrichment or the prompt
        assert r["used"] in (r["enriched"], "a blue circle moving left")
        assert r["classifiers"]["direction"] in ("left", "right", "up", "down")


def test_a_second_run_loads_every_stage_and_its_scores(trained, capsys):
    cache, out, first = trained
    again = run_pipeline(_cfg(cache, out))
    assert again["cached"] == {"vae": True, "enrich": True, "dit": True}
    assert again["scores_cached"] and again["scores"] == first["scores"]
    printed = capsys.readouterr().out
    assert ": stage " not in printed, printed  # nothing trained
    assert "caption words read       the DiT's prediction moves shape " in printed
    assert "direction " in printed.split("caption words read")[1].splitlines()[0]


def test_a_dit_setting_retrains_only_the_dit(trained):
    cache, out, first = trained
    other = run_pipeline(
        _cfg(
            cache, out, "model.video_dit.text_dropout=0.2", "pipeline.evaluate=false", "prompt=null"
        )
    )
    assert other["cached"] == {"vae": True, "enrich": True, "dit": False}
    assert other["keys"]["vae"] == first["keys"]["vae"]
    assert other["keys"]["enrich"] == first["keys"]["enrich"]
    assert other["keys"]["dit"] != first["keys"]["dit"]
    assert "scores" not in other and "generated" not in other


def test_clips_of_another_length_without_enrichment(trained, capsys):
    cache, out, _ = trained
    result = run_pipeline(
        _cfg(cache, out, "pipeline.evaluate=false", "enrich=false", "generation.frames=6",
             "prompt=a big green cross moving up")
    )  # fmt: skip
    assert "enrich" not in result["cached"]  # the LM is not even loaded
    assert {r["used"] for r in result["generated"]["records"]} == {"a big green cross moving up"}
    for gif in result["generated"]["gifs"]:
        with Image.open(gif) as image:
            assert image.n_frames == 6
    assert "enrich=false" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prompt=a red star", r"shape 'star'.*\['circle', 'square', 'triangle', 'cross'\]"),
        ("prompt=a red circle moving up-left", r"direction 'up-left'.*\['left', 'right', 'up'"),
        ("prompt=" + " ".join(["red"] * 65), r"too long: 65 words.*64 tokens"),
        (
            "generation.frames=9",
            r"generation.frames=9 is invalid.*null \(the world's 4\).*\[1, 8\]",
        ),
        ("generation.frames=0", r"generation.frames=0 is invalid"),
        ("+model.video_dit.max_frames=2", r"model.video_dit.max_frames=2.*>= 4"),
        (
            "parts.vision.video.data.image_size=32",
            r"video.data.image_size=32 is invalid: expected 24",
        ),
        ("+parts.vision.video.data.colors=[red,blue]", r"video.data.colors=\['red', 'blue'\]"),
        ("generation.scheduler=ddim", r"generation.scheduler='ddim'.*trained with"),
        ("generation.guidance_scale=0.5", r"generation.guidance_scale=0.5"),
        ("model.video_dit.text_dropout=0.0", r"guidance_scale=4.0.*text_dropout"),
        ("generation.num_clips=0", r"generation.num_clips=0"),
        ("generation.fps=0", r"generation.fps=0"),
        ("+model.video_dit.sample_size=16", r"model.video_dit.sample_size is set by the pipeline"),
        ("+model.video_dit.depth=3", r"model.video_dit.depth is not a VideoDiTConfig field"),
        ("model.video_dit.learned_sigma=true", r"model.video_dit.learned_sigma"),
        ("train.dit.max_steps=0", r"train.dit.max_steps=0"),
        ("train.dit.encoder_lr_scale=fast", r"train.dit.encoder_lr_scale='fast' is invalid"),
        ("train.dit.frame_noise=1.5", r"train.dit.frame_noise=1.5 is invalid: .*\[0.0, 1.0\]"),
        ("train.dit.frame_noise=often", r"train.dit.frame_noise='often' is invalid"),
        ("~train.dit.frame_noise", r"train.dit.frame_noise=None is invalid"),
        (
            "train.dit.frame_diff_weight=-1",
            r"train.dit.frame_diff_weight=-1 is invalid: .*\[0.0, 100.0\]",
        ),
        ("~train.dit.frame_diff_weight", r"train.dit.frame_diff_weight=None is invalid"),
        ("train.dit.first_frame=2", r"train.dit.first_frame=2 is invalid: .*\[0.0, 1.0\]"),
        ("~train.dit.first_frame", r"train.dit.first_frame=None is invalid"),
        ("parts.image.vae.max_steps=0", r"parts.image.vae.max_steps=0"),
        ("train.eval.real_clips=0", r"train.eval.real_clips=0"),
        ("enrichment.tries=0", r"enrichment.tries=0"),
        ("enrich=maybe", r"enrich='maybe'"),
        ("train.dit.init=video", r"train.dit.init='video' is invalid: expected none"),
        (
            "+model.video_dit.dim=64",
            r"model.video_dit.dim=64 is invalid: expected unset or the image DiT's 32",
        ),
        ("model.video_dit.pos_embed=rope3d", r"model.video_dit.pos_embed='rope3d'.*sincos_rope"),
        ("train.dit.encoder.max_seq_len=32", r"train.dit.encoder=.*text_to_image's"),
        ("parts.image.dit.max_steps=0", r"parts.image.dit.max_steps=0"),
        ("train.dit.scheduler.name=ddpm", r"train.dit.scheduler=.*image DiT's noise process"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, override: str, message: str):
    cache, out = tmp_path / "cache", tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_pipeline(_cfg(cache, out, override))
    assert not cache.exists() and not out.exists()  # nothing trained, nothing written


def test_the_video_stage_may_draw_its_timesteps_otherwise_than_the_image_dit(tmp_path):
    """With init=image only the noise process (what the DiT predicts) must be the image
    DiT's: a timestep shift or another timestep distribution is a video stage of its own."""
    cfg = _cfg(tmp_path / "cache", tmp_path / "out", "+train.dit.scheduler.shift=3.0")
    s = t2v.check_config(cfg)
    assert s.scheduler.shift == 3.0 and s.init == "image"
    image = t2i.scheduler_config(t2v.part_configs(cfg)["image"])
    assert image.shift == 1.0 and image.noise_process() == s.scheduler.noise_process()


def test_frame_noise_is_read_and_keys_the_dit_stage(tmp_path):
    """train.dit.frame_noise (Diffusion Forcing's share of clips noised frame by frame) is
    0 as shipped, checked with the other settings, and part of the DiT stage's train
    section (its cache key)."""
    cfg = _cfg(tmp_path / "cache", tmp_path / "out")
    assert cfg.train.dit.frame_noise == 0.0
    other = _cfg(tmp_path / "cache", tmp_path / "out", "train.dit.frame_noise=0.5")
    t2v.check_config(other)
    assert t2v.section(other, "train.dit", t2v.NAME)["frame_noise"] == 0.5


def test_first_frame_with_frame_noise_fails_before_any_work(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    both = ("train.dit.first_frame=0.5", "train.dit.frame_noise=0.5")
    with pytest.raises(ValueError, match=r"first_frame=0.5 is invalid: expected 0 while"):
        run_pipeline(_cfg(cache, out, *both))
    assert not cache.exists() and not out.exists()


def test_first_frame_is_read_keys_the_dit_stage_and_samples_from_the_first_frame(tmp_path):
    """train.dit.first_frame is 0 as shipped (one pass of sampling); a share > 0 is part of
    the DiT stage's train section and makes the clips sample from their first frame."""
    cfg = _cfg(tmp_path / "cache", tmp_path / "out")
    assert cfg.train.dit.first_frame == 0.0 and not t2v.check_config(cfg).from_first
    other = _cfg(tmp_path / "cache", tmp_path / "out", "train.dit.first_frame=0.5")
    assert t2v.check_config(other).from_first
    assert t2v.section(other, "train.dit", t2v.NAME)["first_frame"] == 0.5


def test_frame_diff_weight_and_muon_are_shipped_and_key_the_dit_stage(tmp_path):
    """The shipped VideoDiT stage adds the frame-difference loss and trains its block
    matrices with Muon; both are part of the stage's train section (its cache key)."""
    cfg = _cfg(tmp_path / "cache", tmp_path / "out")
    assert cfg.train.dit.frame_diff_weight == 1.0
    assert list(cfg.train.dit.trainer.muon) == [
        f"model.dit.*_blocks.*.{m}.*" for m in ("attn", "cross_attn", "ffn")
    ]
    other = _cfg(tmp_path / "cache", tmp_path / "out", "train.dit.frame_diff_weight=0")
    t2v.check_config(other)
    assert t2v.section(other, "train.dit", t2v.NAME)["frame_diff_weight"] == 0


def test_a_prompt_of_too_many_tokens_fails_before_any_stage(trained, tmp_path):
    cache, _, _ = trained
    out = tmp_path / "out"
    entries = set((cache / "text_to_video").glob("*/*"))
    with pytest.raises(ValueError, match=r"too long: \d+ tokens, more than .* 64 tokens"):
        run_pipeline(
            _cfg(cache, out, "prompt=a " + "zqxjv" * 40, "model.video_dit.text_dropout=0.15")
        )
    assert set((cache / "text_to_video").glob("*/*")) == entries  # no stage trained
    assert not out.exists()


def test_a_clip_reads_as_its_commonest_frame_and_is_consistent_when_all_agree():
    red, blue = {"shape": "circle", "color": "red"}, {"shape": "circle", "color": "blue"}
    mixed = ClipReading("left", [red, blue, red], {"shape": "circle", "color": "red"})
    assert not mixed.consistent
    assert ClipReading("up", [blue, blue], blue).consistent


def test_save_clips_writes_a_gif_and_the_frames_of_each_clip(tmp_path):
    clips = torch.linspace(-1, 1, 2 * 3 * 3 * 24 * 24).reshape(2, 3, 3, 24, 24)
    files = save_clips(clips, tmp_path, scale=2, fps=5)
    for gif, frames in zip(files["gifs"], files["frames"], strict=True):
        with Image.open(gif) as image:
            assert image.n_frames == 3 and image.size == (48, 48) and image.info["duration"] == 200
        assert [Image.open(p).size for p in frames] == [(24, 24)] * 3
    with pytest.raises(ValueError, match=r"clips must be \(B, 3, T, S, S\)"):
        save_clips(clips[:, :, 0], tmp_path, scale=1, fps=5)
