"""The text_to_audio pipeline at test size: a tiny end-to-end run whose denoising loss falls,
the WAV files it writes at the requested length, the stage cache, and bad input (settings,
prompts, durations) refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile
from hydra import compose, initialize_config_dir
from tiny_settings import TINY_TEXT_TO_AUDIO

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.data import SoundsConfig
from vats_apps.pipelines import text_to_audio as t2a

# Enough DiT steps for its held-out denoising loss to fall clearly (fixed timesteps and
# noise: a deterministic function of the weights).
LEARN = [
    *TINY_TEXT_TO_AUDIO,
    "train.enrich.max_steps=4",  # not the tiny run's (test_configs may have cached that one)
    "train.dit.max_steps=40",
    "train.dit.batch_size=8",
    "train.dit.trainer.warmup_steps=5",
    "train.dit.trainer.lr=3e-3",
    "train.dit.ema.decay=0.5",
]


def _cfg(cache: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "pipeline=text_to_audio",
                *LEARN,
                f"pipeline.cache_dir={cache}",
                f"pipeline.out_dir={out}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("t2a-out")
    return cache_dir, out, run_pipeline(_cfg(cache_dir, out, "duration=2.5"))


def test_a_tiny_run_trains_both_stages_and_its_denoising_loss_falls(trained):
    _, out, result = trained
    assert result["cached"] == {"enrich": False, "dit": False}
    dit = result["stages"]["dit"]
    assert dit["denoising_loss_after"] < 0.9 * dit["denoising_loss_before"], dit
    assert dit["mel_std"] > 0 and dit["window_frames"] == 300  # 3 s of 10 ms frames
    for stage in ("enrich", "dit"):
        assert (out / stage / "metrics.jsonl").is_file()
    scores = result["scores"]
    assert scores["adherence"]["chance"] == pytest.approx(1 / 16)  # 4 pitches x 4 timbres
    assert scores["real_lengths"] >= 0.95  # the length reading is right on real sounds


def test_the_sounds_are_written_at_the_requested_length(trained):
    _, out, result = trained
    made = result["generated"]
    folder = out / "a_long_low_sine_tone-seed0"
    assert made["folder"] == str(folder)
    for file in made["files"]:
        audio, rate = soundfile.read(file)
        assert rate == 16000 and audio.shape == (40000,)  # 2.5 s exactly
    records = json.loads((folder / "prompts.json").read_text())
    assert [r["seconds"] for r in records] == [2.5, 2.5]
    for r in records:
        assert r["used"] in (r["enriched"], "a long low sine tone")
        assert 0 <= r["silent_at"] <= 3.0


def test_a_second_run_loads_both_stages_and_its_scores(trained, capsys):
    cache, out, first = trained
    again = run_pipeline(_cfg(cache, out, "duration=2.5"))
    assert again["cached"] == {"enrich": True, "dit": True}
    assert again["scores_cached"] and again["scores"] == first["scores"]
    assert "stage" not in capsys.readouterr().out


def test_without_a_duration_each_sound_takes_a_length_of_its_caption(trained):
    cache, out, _ = trained
    result = run_pipeline(
        _cfg(cache, out, "pipeline.evaluate=false", "enrich=false", "prompt=a short high tone")
    )
    assert result["cached"] == {"dit": True}  # enrich=false: the LM is not even loaded
    for r in result["generated"]["records"]:  # "short" is 0.5-1.25 s
        assert r["used"] == "a short high tone" and 0.5 <= r["seconds"] <= 1.25
        audio, _ = soundfile.read(r["file"])
        assert len(audio) == round(r["seconds"] * 16000)


def test_duration_classes_follow_the_world():
    world = SoundsConfig()
    assert t2a.duration_class(0.7, world) == "short"
    assert t2a.duration_class(2.9, world) == "long"
    assert t2a.duration_class(1.5, world) == "short"  # between the classes: the nearer
    assert t2a.duration_class(1.9, world) == "long"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("duration=3.5", r"duration=3.5 is invalid: expected seconds in \[0.5, 3.0\]"),
        ("duration=0.1", r"duration=0.1 is invalid"),
        ("duration=fast", r"duration='fast' is invalid"),
        ("duration=0.8", r"duration=0.8 s is a short sound but the prompt asks for a long one"),
        ("prompt=a breathy tone", r"timbre 'breathy'.*\['sine', 'square', 'sawtooth', 'plucked'\]"),
        ("prompt=" + " ".join(["low"] * 65), r"too long: 65 words.*64 tokens"),
        ("generation.scheduler=ddim", r"generation.scheduler='ddim'.*trained with"),
        ("generation.guidance_scale=0.5", r"generation.guidance_scale=0.5"),
        ("model.audio_dit.text_dropout=0.0", r"guidance_scale=4.0.*text_dropout"),
        ("generation.num_sounds=0", r"generation.num_sounds=0"),
        ("generation.griffin_lim_iters=0", r"generation.griffin_lim_iters=0"),
        ("+model.audio_dit.n_mels=64", r"model.audio_dit.n_mels is set by the pipeline"),
        ("+model.audio_dit.depth=3", r"model.audio_dit.depth is not a AudioDiTConfig field"),
        ("model.audio_dit.max_frames=200", r"model.audio_dit.max_frames=200.*>= 300"),
        ("train.dit.max_steps=0", r"train.dit.max_steps=0"),
        ("train.dit.encoder_lr_scale=0", r"train.dit.encoder_lr_scale=0 is invalid.*\(0, 1\]"),
        ("train.eval.real_sounds=0", r"train.eval.real_sounds=0"),
        ("enrichment.tries=0", r"enrichment.tries=0"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, override: str, message: str):
    cache, out = tmp_path / "cache", tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_pipeline(_cfg(cache, out, override))
    assert not cache.exists() and not out.exists()  # nothing trained, nothing written
