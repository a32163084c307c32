"""``train.parallel`` in the vision pipeline: 2 ranks under torchrun train the one-process
models, rank 0 alone speaks and writes; FSDP on one process is the plain trainer; the
default section leaves the cache keys as they were; settings that do not fit the world
are refused naming the key, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict
from tiny_settings import TINY_VISION
from two_ranks import (
    REFUSALS,
    assert_refused_before_any_work,
    assert_same_weights,
    batch_refusal,
    compose_tiny,
    torchrun_pipeline,
)

from vats_apps.cli import run_pipeline
from vats_apps.pipelines.train_vision import cache_key

# The image task's aux labels in a phase after the proof: the weights are gathered twice.
AUX_PHASE = ["train.image.aux.from_start=false", "train.image.aux.max_steps=2"]


def compose_vision(tmp_path: Path, *extra: str) -> DictConfig:
    return compose_tiny("train_vision", tmp_path, *extra)


@pytest.mark.slow  # two ranks start under torchrun: ~20-30 s on 2 busy cores
def test_two_ranks_under_torchrun_train_the_one_process_models(tmp_path: Path) -> None:
    stdout, two = torchrun_pipeline(
        tmp_path, "pipeline=train_vision", "train.parallel=fsdp", *TINY_VISION, *AUX_PHASE
    )
    # rank 0 alone prints, reports and writes one cache entry per task
    assert stdout.count("train_vision results:") == 1, stdout
    assert set(two) == {"image", "video", "video_no_temporal"}
    for task in two:
        assert [p.name for p in (tmp_path / "cache" / "train_vision" / task).iterdir()] == [
            Path(two[task]["cache"]).name
        ]
    assert two["image"]["aux_steps"] == 2

    one = run_pipeline(compose_vision(tmp_path / "one", *AUX_PHASE))
    for task in two:
        assert not two[task]["cached"] and two[task]["parameters"] == one[task]["parameters"]
        # the same global batches: the same weights up to float rounding of the split sums
        assert_same_weights(two[task], one[task], atol=1e-5)


@pytest.mark.parametrize("aux", [[], AUX_PHASE], ids=["proof", "aux-phase"])
def test_fsdp_on_one_process_is_the_plain_trainer_and_the_default_keeps_the_key(
    tmp_path: Path, aux: list[str]
) -> None:
    plain_cfg = compose_vision(tmp_path, "pipeline.task=image", *aux)
    plain = run_pipeline(plain_cfg)["image"]
    fsdp = run_pipeline(
        compose_vision(tmp_path, "pipeline.task=image", *aux, "train.parallel=fsdp")
    )
    fsdp = fsdp["image"]
    assert fsdp["cache"] != plain["cache"]  # its own entry: parallel enters the key
    assert fsdp["accuracy"] == plain["accuracy"]
    assert fsdp.get("accuracy_before_aux") == plain.get("accuracy_before_aux")
    assert_same_weights(fsdp, plain, atol=1e-6)

    # the default section adds nothing to the key: caches of older runs stay valid
    with open_dict(plain_cfg):
        del plain_cfg.train["parallel"]
    assert cache_key(plain_cfg, "image") == Path(plain["cache"]).name


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        *REFUSALS,
        (
            ["train.parallel.data_parallel=fsdp", "train.parallel.activation_checkpointing=yes"],
            {},
            r"train.parallel: ParallelConfig.activation_checkpointing",
        ),
        batch_refusal("train.video.batch_size", 5),
    ],
)
def test_settings_that_do_not_fit_the_world_fail_before_any_work(
    tmp_path: Path, overrides: list[str], env: dict[str, str], message: str
) -> None:
    assert_refused_before_any_work(compose_vision(tmp_path, *overrides), tmp_path, env, message)
