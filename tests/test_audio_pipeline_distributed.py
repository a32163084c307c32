"""``train.parallel`` in the audio pipeline: 2 ranks under torchrun train the one-process
encoder, rank 0 alone speaks and writes; FSDP on one process is the plain trainer; the
default section leaves the cache key as it was; settings that do not fit the world are
refused naming the key, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict
from tiny_settings import TINY_AUDIO
from two_ranks import (
    REFUSALS,
    assert_refused_before_any_work,
    assert_same_weights,
    batch_refusal,
    compose_tiny,
    torchrun_pipeline,
)

from vats_apps.cli import run_pipeline
from vats_apps.pipelines.train_audio import cache_key


def compose_audio(tmp_path: Path, *extra: str) -> DictConfig:
    return compose_tiny("train_audio", tmp_path, *extra)


@pytest.mark.slow  # two ranks start under torchrun: ~20-30 s on 2 busy cores
def test_two_ranks_under_torchrun_train_the_one_process_encoder(tmp_path: Path) -> None:
    stdout, two = torchrun_pipeline(
        tmp_path, "pipeline=train_audio", "train.parallel=ddp", *TINY_AUDIO
    )
    # rank 0 alone prints, reports and writes (one cache entry, one example pair)
    assert stdout.count("train_audio results:") == 1, stdout
    assert [p.name for p in (tmp_path / "cache" / "train_audio").iterdir()] == [
        Path(two["cache"]).name
    ]
    assert len(list((tmp_path / "runs" / "examples").iterdir())) == 2

    one = run_pipeline(compose_audio(tmp_path / "one"))
    assert not two["cached"] and two["parameters"] == one["parameters"]
    # the same global batches (each rank's rows padded to the global batch's longest
    # clip, which changes nothing): the same weights up to float rounding
    assert_same_weights(two, one, atol=1e-5)


def test_fsdp_on_one_process_is_the_plain_trainer_and_the_default_keeps_the_key(
    tmp_path: Path,
) -> None:
    plain_cfg = compose_audio(tmp_path)
    plain = run_pipeline(plain_cfg)
    fsdp = run_pipeline(compose_audio(tmp_path, "train.parallel=fsdp"))
    assert fsdp["cache"] != plain["cache"]  # its own entry: parallel enters the key
    assert fsdp["accuracy"] == plain["accuracy"]
    assert_same_weights(fsdp, plain, atol=1e-6)

    # the default section adds nothing to the key: caches of older runs stay valid
    with open_dict(plain_cfg):
        del plain_cfg.train["parallel"]
    assert cache_key(plain_cfg) == Path(plain["cache"]).name


@pytest.mark.parametrize(
    ("overrides", "env", "message"), [*REFUSALS, batch_refusal("train.batch_size", 7)]
)
def test_settings_that_do_not_fit_the_world_fail_before_any_work(
    tmp_path: Path, overrides: list[str], env: dict[str, str], message: str
) -> None:
    assert_refused_before_any_work(compose_audio(tmp_path, *overrides), tmp_path, env, message)
