"""The text_to_image pipeline at test size: a tiny end-to-end run whose denoising loss falls,
the files it writes, the stage cache (a DiT setting retrains the DiT alone), the fallback
of a refused enrichment, and bad input refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from tiny_settings import TINY_TEXT_TO_IMAGE

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.generation import enrich as en

# Enough VAE and DiT steps for the DiT's held-out denoising loss to fall clearly: at fixed
# timesteps and noise it is a deterministic function of the weights, 1.997 untrained, 1.85
# after these 60 steps (a tiny VAE's latents hold little structure to learn in 60 steps).
LEARN = [
    *TINY_TEXT_TO_IMAGE,
    "train.vae.max_steps=20",
    "train.enrich.max_steps=4",  # not the tiny run's (test_configs may have cached that one)
    "train.dit.max_steps=60",
    "train.dit.batch_size=16",
    "train.dit.trainer.warmup_steps=5",
    "train.dit.trainer.lr=1e-2",
    "train.dit.ema.decay=0.5",
]


def _cfg(cache: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "pipeline=text_to_image",
                *LEARN,
                f"pipeline.cache_dir={cache}",
                f"pipeline.out_dir={out}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("t2i-out")
    return cache_dir, out, run_pipeline(_cfg(cache_dir, out))


def test_a_tiny_run_trains_every_stage_and_its_denoising_loss_falls(trained):
    _, out, result = trained
    assert result["cached"] == {"vae": False, "enrich": False, "dit": False}
    dit = result["stages"]["dit"]
    assert dit["denoising_loss_after"] < 0.95 * dit["denoising_loss_before"], dit
    vae = result["stages"]["vae"]
    assert vae["latent_std"] > 0 and vae["val_mse"] < 1.0
    for stage in ("vae", "enrich", "dit"):
        assert (out / stage / "metrics.jsonl").is_file()
    scores = result["scores"]
    assert scores["adherence"]["chance"] == pytest.approx(1 / 24)  # the 4 x 6 default world
    assert set(scores["attributes"]) == {"size", "position", "background"}
    words = scores["words"]  # every captioned attribute's word, probed on held-out images
    assert set(words["moved"]) == {"shape", "color", "size", "position", "background"}
    assert all(0 <= v < math.inf for v in words["moved"].values()) and words["samples"] == 32
    assert any(v > 0 for v in words["moved"].values())


def test_the_images_and_their_prompts_are_written(trained, capsys):
    _, out, result = trained
    made = result["generated"]
    folder = out / "a_red_circle-seed0"
    assert made["folder"] == str(folder)
    assert [Image.open(p).size for p in made["images"]] == [(24, 24)] * 2
    assert [Image.open(p).size for p in made["enlarged"]] == [(192, 192)] * 2
    assert Image.open(made["grid"]).size == (2 * 192 + 8, 192)
    records = json.loads((folder / "prompts.json").read_text())
    assert [r["prompt"] for r in records] == ["a red circle"] * 2
    for r in records:  # each image conditioned on its accepted enrichment or the prompt
        assert r["used"] in (r["enriched"], "a red circle")
        assert (r["used"] == "a red circle") == (r["fallback"] is not None)


def test_a_second_run_loads_every_stage_and_its_scores(trained, capsys):
    cache, out, first = trained
    again = run_pipeline(_cfg(cache, out))
    assert again["cached"] == {"vae": True, "enrich": True, "dit": True}
    assert again["scores_cached"] and again["scores"] == first["scores"]
    printed = capsys.readouterr().out
    assert "stage" not in printed  # nothing trained
    assert "caption words read       the DiT's prediction moves shape " in printed


def test_a_dit_setting_retrains_only_the_dit(trained):
    cache, out, first = trained
    other = run_pipeline(
        _cfg(cache, out, "model.dit.text_dropout=0.2", "pipeline.evaluate=false", "prompt=null")
    )
    assert other["cached"] == {"vae": True, "enrich": True, "dit": False}
    assert other["keys"]["vae"] == first["keys"]["vae"]
    assert other["keys"]["dit"] != first["keys"]["dit"]
    assert "scores" not in other and "generated" not in other


def test_a_refused_enrichment_falls_back_to_the_prompt(trained, monkeypatch, capsys):
    cache, out, _ = trained
    blue = "a small blue circle in the center on a plain background"
    red = "a small red circle in the center on a plain background"
    written = iter([blue, blue, "xq zz", blue, red])
    monkeypatch.setattr(en, "enrich", lambda model, tok, prompts, **kw: [next(written)])
    one = ("pipeline.evaluate=false", "generation.num_images=1", "prompt=a red circle")
    result = run_pipeline(_cfg(cache, out, *one, "enrichment.tries=2"))
    printed = capsys.readouterr().out
    assert "contradicts the prompt: color 'red' -> 'blue' (2 samples); using the prompt" in printed
    assert result["generated"]["records"][0]["used"] == "a red circle"
    result = run_pipeline(_cfg(cache, out, *one, "enrichment.tries=1"))
    assert "drops the prompt's color, shape (1 sample); using the prompt" in capsys.readouterr().out
    result = run_pipeline(_cfg(cache, out, *one, "enrichment.tries=2"))  # the second is kept
    assert f"enriched to {red!r} (try 2" in capsys.readouterr().out
    assert result["generated"]["records"][0]["used"] == red


def test_a_prompt_is_read_lowercase_and_its_unknown_words_are_named(trained, capsys):
    cache, out, _ = trained
    typed = "prompt='A Red CIRCLE, please!'"
    result = run_pipeline(
        _cfg(
            cache, out, "pipeline.evaluate=false", "generation.num_images=1", "enrich=false", typed
        )
    )
    printed = capsys.readouterr().out
    assert "prompt: 'A Red CIRCLE, please!' (read as 'a red circle, please'" in printed
    assert "never saw: 'please'; what it has: size small/medium/large; color red/" in printed
    assert result["generated"]["records"][0]["used"] == "a red circle, please"


def test_enrich_false_sends_the_prompt_as_it_is(trained, capsys):
    cache, out, _ = trained
    result = run_pipeline(
        _cfg(cache, out, "pipeline.evaluate=false", "enrich=false", "prompt=a big green cross")
    )
    assert "enrich" not in result["cached"]  # the LM is not even loaded
    assert {r["used"] for r in result["generated"]["records"]} == {"a big green cross"}
    assert "enrich=false" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "generation.scheduler=euler",
            r"generation.scheduler='euler' is invalid.*flow_match_euler",
        ),
        ("generation.scheduler=ddim", r"generation.scheduler='ddim'.*trained with"),
        ("+train.dit.scheduler.prediction_type=epsilon", r"train.dit.scheduler.*prediction_type"),
        ("generation.guidance_scale=0.5", r"generation.guidance_scale=0.5"),
        ("model.dit.text_dropout=0.0", r"guidance_scale=4.0.*text_dropout"),
        ("generation.steps=0", r"generation.steps=0"),
        ("generation.num_images=0", r"generation.num_images=0"),
        ("+model.dit.sample_size=16", r"model.dit.sample_size is set by the pipeline"),
        ("+model.dit.depth=3", r"model.dit.depth is not a DiTConfig field"),
        ("model.dit.learned_sigma=true", r"model.dit.learned_sigma"),
        ("train.dit.max_steps=0", r"train.dit.max_steps=0"),
        ("train.dit.encoder_lr_scale=1.5", r"train.dit.encoder_lr_scale=1.5 is invalid"),
        ("+train.dit.trainer.compile=true", r"set train.compile instead"),
        ("prompt=a red star", r"shape 'star'.*\['circle', 'square', 'triangle', 'cross'\]"),
        ("prompt='!?'", r"prompt='!\?' is invalid: expected a non-empty string"),
        ("prompt=" + " ".join(["red"] * 65), r"too long: 65 words.*64 tokens"),
        ("enrich=maybe", r"enrich='maybe'"),
        ("enrichment.tries=0", r"enrichment.tries=0"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, override: str, message: str):
    cache, out = tmp_path / "cache", tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_pipeline(_cfg(cache, out, override))
    assert not cache.exists() and not out.exists()  # nothing trained, nothing written


def test_a_prompt_of_too_many_tokens_fails_before_any_stage(trained, tmp_path):
    cache, _, _ = trained
    out = tmp_path / "out"
    entries = set((cache / "text_to_image").glob("*/*"))
    with pytest.raises(ValueError, match=r"too long: \d+ tokens, more than .* 64 tokens"):
        run_pipeline(_cfg(cache, out, "prompt=a " + "zqxjv" * 40, "model.dit.text_dropout=0.15"))
    assert set((cache / "text_to_image").glob("*/*")) == entries  # no stage trained
    assert not out.exists()
