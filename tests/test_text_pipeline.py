"""The text demo pipeline end to end at a tiny size: train, cache, reload, generate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tiny_settings import TINY_TEXT

from vats_apps.cli import config_dir, run_pipeline


def compose_text(cache_dir: Path, *extra: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["pipeline=text_generation", *TINY_TEXT, *extra])
    cfg.pipeline.cache_dir = str(cache_dir)
    return cfg


def test_trains_beats_unigram_then_reuses_the_cache(cache_dir: Path, capsys):
    first = run_pipeline(compose_text(cache_dir))
    # Even 60 tiny steps must beat word frequencies on held-out text.
    assert first["val_ce"] < first["unigram_ce"] - 0.1, first
    assert len(first["samples"]) == 3
    second = run_pipeline(compose_text(cache_dir))
    out = capsys.readouterr().out
    assert second["trained_now"] is False and "loading the cached model" in out
    assert second["cache"] == first["cache"]
    assert second["val_ce"] == first["val_ce"]
    # Same weights, same seed: the same continuations.
    assert second["samples"] == first["samples"]
    assert "validation cross-entropy" in out and "unigram baseline" in out


def test_a_changed_setting_trains_a_new_model(cache_dir: Path):
    base = run_pipeline(compose_text(cache_dir, "generation.max_new_tokens=4"))
    other = run_pipeline(compose_text(cache_dir, "train.max_steps=20"))
    assert other["trained_now"] is True
    assert other["cache"] != base["cache"]


def test_single_prompt_override_and_greedy(cache_dir: Path):
    out = run_pipeline(compose_text(cache_dir, "prompt='The value'", "generation.temperature=0.0"))
    assert len(out["samples"]) == 1 and out["samples"][0].startswith("The value")


def test_bad_settings_fail_before_training(cache_dir: Path, tmp_path: Path):
    cfg = compose_text(tmp_path, "generation.max_new_tokens=-1")
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_pipeline(cfg)
    assert not any(tmp_path.iterdir()), "nothing may be written before the error"
    with pytest.raises(ValueError, match="unknown LM preset"):
        run_pipeline(compose_text(tmp_path, "model.text.preset=huge"))


def test_compile_switches_reach_training_evaluation_and_generation(tmp_path, monkeypatch):
    # train.compile reaches the Trainer's config; pipeline.compile scores the validation set
    # on compile_frozen's model and generates with compile=True. Only the plumbing is
    # checked here: the stand-ins record the switches and run eagerly (dynamo tracing the
    # MoE LM costs tens of seconds); the compiled paths are tested where they live
    # (vats-core: trainer, inference; vats-text: generation).
    from unittest import mock

    from vats_apps.pipelines import text_generation

    frozen = mock.Mock(side_effect=lambda model: model)
    monkeypatch.setattr(text_generation, "compile_frozen", frozen)
    streamed: list[bool] = []
    real_stream = text_generation.stream

    def recording_stream(*args, compile, **kwargs):
        streamed.append(compile)
        return real_stream(*args, compile=False, **kwargs)

    monkeypatch.setattr(text_generation, "stream", recording_stream)
    trained: list[bool] = []
    real_trainer = text_generation.Trainer

    def recording_trainer(model, config, **kwargs):
        trained.append(config.compile)
        return real_trainer(model, config.replace(compile=False), **kwargs)

    monkeypatch.setattr(text_generation, "Trainer", recording_trainer)
    short = ["train.max_steps=6", "prompt='The'", "generation.max_new_tokens=3"]
    out = run_pipeline(
        compose_text(tmp_path, *short, "train.compile=true", "pipeline.compile=true")
    )
    assert out["trained_now"] and trained == [True] and streamed == [True]
    assert frozen.call_count == 1 and not frozen.call_args.args[0].training
    # The cached model: evaluation is not redone, generation compiles only on request.
    again = run_pipeline(compose_text(tmp_path, *short, "train.compile=true"))
    assert not again["trained_now"] and again["cache"] == out["cache"]
    assert trained == [True] and streamed == [True, False] and frozen.call_count == 1
    # train.compile=false trains another entry; pipeline.compile does not change the key.
    eager = run_pipeline(compose_text(tmp_path, *short, "pipeline.compile=true"))
    assert eager["trained_now"] and eager["cache"] != out["cache"] and trained == [True, False]


def test_bad_compile_switches_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"train\.compile=1 is invalid: expected true or false"):
        run_pipeline(compose_text(tmp_path, "train.compile=1"))
    with pytest.raises(ValueError, match=r"train\.trainer\.compile is not read"):
        run_pipeline(compose_text(tmp_path, "+train.trainer.compile=true"))
    assert not any(tmp_path.iterdir()), "nothing may be written before the error"
