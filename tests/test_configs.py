"""Every config in configs/ composes and its pipeline runs at a tiny size.

A renamed field or a broken `_target_` fails here, in CI, not in a user's run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import open_dict
from tiny_settings import TINY

from vats_apps.cli import config_dir, run_pipeline

PIPELINES = sorted(p.stem for p in (config_dir() / "pipeline").glob("*.yaml"))


def test_config_dir_is_the_repository_tree():
    assert config_dir() == Path(__file__).resolve().parents[1] / "configs"


def test_every_pipeline_has_tiny_overrides():
    assert set(PIPELINES) == set(TINY), "add tiny overrides for each new pipeline to TINY"


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_composes_and_runs(name: str, cache_dir: Path, tmp_path: Path):
    overrides = [f"pipeline={name}", *TINY[name]]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        if "cache_dir" in cfg.pipeline:
            cfg.pipeline.cache_dir = str(cache_dir)
        if "out_dir" in cfg.pipeline:  # nothing is written into the repository
            cfg.pipeline.out_dir = str(tmp_path / "out")
    assert callable(get_method(cfg.pipeline._target_))
    assert run_pipeline(cfg) is not None


def test_pipeline_without_target_is_refused():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config")
    with open_dict(cfg):
        del cfg.pipeline["_target_"]
    with pytest.raises(ValueError, match="_target_"):
        run_pipeline(cfg)


@pytest.mark.parametrize("name", ["text_to_image", "text_to_audio", "text_to_video"])
def test_generators_on_several_torchrun_ranks_need_a_parallel_section(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under torchrun with two ranks the generators train their stages under
    ``train.parallel`` (tests/test_generators_distributed.py): the default section, one
    process, is refused before any work, naming the key to set."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"pipeline={name}", *TINY[name]])
        cfg.pipeline.cache_dir = str(tmp_path / "cache")
        cfg.pipeline.out_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"train.parallel.data_parallel='none' with 2 ranks"):
        run_pipeline(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
