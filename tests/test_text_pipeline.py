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
