"""The train_audio pipeline at test size: the tiny audio encoder learns pitch x timbre of
held-out tones of mixed lengths well above chance in seconds, the vocoder round trip keeps
what it learned, the model is cached with its held-out scores (a cached run prints them
without scoring again), and user files are classified (or refused before any work).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.data import SoundsWorld
from vats_apps.pipelines import train_audio
from vats_audio import AudioEncoder, save

SHORT = [
    "model/audio=tiny",
    "pipeline.progress=false",
    "train.batch_size=16",
    "train.eval_size=64",
    "train.vocoder.eval_size=16",
    "train.vocoder.n_iter=8",
    "pipeline.examples=0",
]


def _cfg(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "pipeline=train_audio",
                *SHORT,
                f"pipeline.out_dir={tmp_path / 'out'}",
                f"pipeline.cache_dir={tmp_path / 'cache'}",
                *overrides,
            ],
        )


def _table(out: str) -> list[str]:
    """The figures of the printed results (the audio and vocoder lines), the marks of a
    cached run left out."""
    lines = out.split("train_audio results:\n", 1)[1].splitlines()
    return [
        line.replace(" (cached)", "")
        for line in lines
        if line.startswith(("  audio ", "  vocoder "))
    ]


def _refuse(*args, **kwargs):
    raise AssertionError("a cached run scored the model again")


def test_audio_classifier_learns_and_survives_the_vocoder(tmp_path):
    # 40 steps of 16 clips (~6 s on one core) take the tiny encoder to 72-81 % on 16 classes
    # (seeds 0-2; the pitch is learned first, 100 %, the timbre after). A model that learned
    # only the pitch, or only the timbre, stays at or under 25 %.
    result = run_pipeline(_cfg(tmp_path, "train.max_steps=40", "train.trainer.warmup_steps=5"))
    assert result["chance"] == pytest.approx(1 / 16)
    assert result["accuracy"] >= 0.5, result
    assert result["pitch_accuracy"] >= result["accuracy"]
    assert result["timbre_accuracy"] >= result["accuracy"]
    # the round trip through Griffin-Lim keeps most of it
    assert result["vocoder_accuracy"] >= 0.5 * result["accuracy"], result
    assert (tmp_path / "out" / "metrics.jsonl").is_file()
    assert not result["cached"]


def test_training_batches_mix_durations_and_padding_is_silence(tmp_path):
    cfg = _cfg(tmp_path)
    world_cfg = train_audio.world_config(cfg)
    features = train_audio.features_config(cfg, world_cfg)
    logmel = train_audio.LogMel(features)
    draw = train_audio.make_drawer(SoundsWorld(world_cfg), logmel)
    clips = draw(range(32), "train", None)
    seconds = clips.lengths.float() * features.hop_length / features.sample_rate
    assert seconds.min() < 1.3 and seconds.max() > 1.9  # short and long clips in one batch
    assert clips.features.shape[-1] == int(clips.lengths.max())
    fixed = draw(range(32), "train", train_audio.max_frames(world_cfg, features))
    assert fixed.features.shape[-1] == 300  # 3 s at a 10 ms hop
    # padding to a fixed length changes no real frame
    for i in range(32):
        n = int(clips.lengths[i])
        torch.testing.assert_close(fixed.features[i, :, :n], clips.features[i, :, :n])


def test_cache_reuse_and_user_files_are_classified(tmp_path, capsys, monkeypatch):
    short = ["train.max_steps=3", "pipeline.examples=1"]
    vocoded = mock.Mock(wraps=train_audio.vocoder_accuracy)
    monkeypatch.setattr(train_audio, "vocoder_accuracy", vocoded)
    first = run_pipeline(_cfg(tmp_path, *short))
    assert vocoded.call_count == 1
    assert not first["cached"] and len(first["examples"]) == 2  # the clip and its vocoded twin
    # a user's file: a held-out clip written as 44.1 kHz stereo WAV, resampled and downmixed
    clip = SoundsWorld().clips([0], "val")
    wave = torch.nn.functional.interpolate(
        clip.waveform[None], scale_factor=44100 / 16000, mode="linear"
    )[0]
    path = tmp_path / "mine.wav"
    save(path, torch.cat([wave, wave]), 44100)
    second = run_pipeline(_cfg(tmp_path, *short, f"pipeline.classify={path}"))
    assert second["cached"] and second["cache"] == first["cache"]
    assert second["accuracy"] == first["accuracy"]  # the scores stored with the weights
    assert second["seconds"] == first["seconds"]
    # the round trip's score is stored with the weights: not vocoded again
    assert second["vocoder_accuracy"] == first["vocoder_accuracy"] and vocoded.call_count == 1
    (item,) = second["classified"]
    assert item["file"] == str(path) and len(item["top"]) == 3
    assert item["seconds"] == pytest.approx(float(clip.seconds[0]), abs=0.01)
    assert sum(p for _, p in item["top"]) <= 1.0 + 1e-6
    out = capsys.readouterr().out
    assert "(cached)" in out and "mine.wav" in out
    model = AudioEncoder.from_pretrained(f"{first['cache']}/model")
    assert model.config.num_classes == 16
    other = run_pipeline(_cfg(tmp_path, *short, "train.trainer.lr=5e-4"))
    assert not other["cached"] and other["cache"] != first["cache"]
    # the vocoder's settings score, they do not train: same entry
    again = run_pipeline(_cfg(tmp_path, *short, "train.vocoder.n_iter=4"))
    assert again["cached"] and again["cache"] == first["cache"]
    assert vocoded.call_count == 3  # (the lr run scored its own) other settings score anew


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("pipeline.classify=/nonexistent/tone.wav", FileNotFoundError, r"tone\.wav"),
        ("+model.audio.n_mels=64", ValueError, r"model\.audio\.n_mels is set by the data"),
        ("+train.features.sample_rate=8000", ValueError, r"train\.features\.sample_rate"),
        ("+train.features.n_mels=0", ValueError, "n_mels"),
        ("+train.data.pitches=[low,loud]", ValueError, "pitches"),
        ("train.batch_size=0", ValueError, r"train\.batch_size"),
        ("train.vocoder.n_iter=0", ValueError, r"train\.vocoder\.n_iter"),
        ("pipeline.compile=yes", ValueError, r"pipeline\.compile='yes' is invalid"),
        ("+train.trainer.compile=true", ValueError, r"train\.trainer\.compile is not read"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, override, error, match):
    with pytest.raises(error, match=match):
        run_pipeline(_cfg(tmp_path, override))
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists()


def test_corrupt_user_file_fails_before_training(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    with pytest.raises(ValueError, match=r"broken\.wav"):
        run_pipeline(_cfg(tmp_path, f"pipeline.classify=[{bad}]"))
    assert not (tmp_path / "cache").exists()


def test_compile_switches_reach_training_and_scoring(tmp_path, monkeypatch):
    # train.compile reaches the Trainer (recorded, then trained eagerly: the compiled step is
    # vats-core's to test) and pads every batch to one shape; pipeline.compile scores on
    # compile_frozen's model, here with dynamo's eager backend standing in for inductor.
    from vats_core import inference

    monkeypatch.setattr(inference, "_BACKEND", "eager")
    frozen = mock.Mock(wraps=train_audio.compile_frozen)
    monkeypatch.setattr(train_audio, "compile_frozen", frozen)
    seen: list[tuple[bool, int]] = []
    real_trainer = train_audio.Trainer

    def recording_trainer(model, config, *, data, **kwargs):
        seen.append((config.compile, data(0, 0)["x"].shape[-1]))
        return real_trainer(model, config.replace(compile=False), data=data, **kwargs)

    monkeypatch.setattr(train_audio, "Trainer", recording_trainer)
    short = ["train.max_steps=2", "train.vocoder.eval_size=0"]
    eager = run_pipeline(_cfg(tmp_path, *short))
    compiled = run_pipeline(_cfg(tmp_path, *short, "train.compile=true"))
    assert seen[0][0] is False and seen[0][1] < 300  # eager: the batch's longest clip
    assert seen[1] == (True, 300)  # compiled: the world's longest clip, every step
    assert compiled["cache"] != eager["cache"] and frozen.call_count == 0
    # A cached run prints the stored scores: nothing to compile.
    reused = run_pipeline(_cfg(tmp_path, *short, "pipeline.compile=true"))
    assert reused["cached"] and reused["cache"] == eager["cache"] and frozen.call_count == 0
    assert reused["accuracy"] == eager["accuracy"]
    assert reused["vocoder_accuracy"] is None
    # Scores taken anew (other eval sizes: 32 eagerly, then 64 again) go through the
    # frozen compiled model under pipeline.compile, and it gets the eager score.
    smaller = run_pipeline(_cfg(tmp_path, *short, "train.eval_size=32"))
    assert smaller["cached"] and smaller["cache"] == eager["cache"] and frozen.call_count == 0
    rescored = run_pipeline(_cfg(tmp_path, *short, "pipeline.compile=true"))
    assert rescored["cached"] and rescored["cache"] == eager["cache"]
    assert frozen.call_count == 1 and isinstance(frozen.call_args.args[0], AudioEncoder)
    assert rescored["accuracy"] == eager["accuracy"]


def test_cached_run_prints_the_stored_scores_without_scoring_again(tmp_path, capsys, monkeypatch):
    short = ["train.max_steps=3"]
    first = run_pipeline(_cfg(tmp_path, *short))
    table = _table(capsys.readouterr().out)
    report = json.loads((Path(first["cache"]) / "report.json").read_text())
    assert report["eval"] == {"eval_size": 64}  # stored with the weights, with its settings
    assert report["accuracy"] == first["accuracy"]
    monkeypatch.setattr(train_audio, "held_out_scores", _refuse)
    monkeypatch.setattr(train_audio, "vocoder_accuracy", _refuse)
    second = run_pipeline(_cfg(tmp_path, *short))
    assert second["cached"] and second["cache"] == first["cache"]
    out = capsys.readouterr().out
    assert "(cached)" in out and "scoring" not in out
    assert _table(out) == table  # the same figures, to the last digit
    for key in ("accuracy", "pitch_accuracy", "timbre_accuracy", "vocoder_accuracy"):
        assert second[key] == first[key], key


def test_stored_scores_that_cannot_serve_are_taken_again_and_stored(tmp_path, capsys, monkeypatch):
    # One entry, its report's scores broken in turn: each cached run scores again (and
    # only what is broken), prints what the first run printed and stores the report the
    # training run wrote.
    short = ["train.max_steps=3"]
    first = run_pipeline(_cfg(tmp_path, *short))
    table = _table(capsys.readouterr().out)
    path = Path(first["cache"]) / "report.json"
    written = json.loads(path.read_text())
    scored = mock.Mock(wraps=train_audio.held_out_scores)
    vocoded = mock.Mock(wraps=train_audio.vocoder_accuracy)
    monkeypatch.setattr(train_audio, "held_out_scores", scored)
    monkeypatch.setattr(train_audio, "vocoder_accuracy", vocoded)

    def drop(key):
        return lambda r: r.pop(key)

    breakages = [  # (what breaks the stored scores, held-out scored again, vocoded again)
        (drop("eval"), True, False),  # an entry written before scores were stored
        (drop("timbre_accuracy"), True, False),
        (lambda r: r.update(accuracy="n/a"), True, False),
        (lambda r: r.update(pitch_accuracy=1.5), True, False),
        (lambda r: r.update(accuracy=math.nan), True, False),
        (lambda r: r.update(eval={"eval_size": 7}), True, False),  # other settings
        (lambda r: r.update(vocoder_accuracy=None), False, True),
        (drop("vocoder_scored"), False, True),
    ]
    for i, (breakage, rescores, revocodes) in enumerate(breakages):
        broken = json.loads(path.read_text())
        breakage(broken)
        path.write_text(json.dumps(broken))
        calls = scored.call_count, vocoded.call_count
        again = run_pipeline(_cfg(tmp_path, *short))
        assert again["cached"] and again["cache"] == first["cache"], i
        assert (scored.call_count - calls[0], vocoded.call_count - calls[1]) == (
            int(rescores),
            int(revocodes),
        ), i
        assert _table(capsys.readouterr().out) == table, i
        assert json.loads(path.read_text()) == written, i  # stored again, as trained
    again = run_pipeline(_cfg(tmp_path, *short))  # and reused from then on
    assert again["cached"] and scored.call_count == 6 and vocoded.call_count == 2
    assert not list(path.parent.glob(".*"))  # no temporary file left in the entry
