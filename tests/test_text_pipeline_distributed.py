"""``train.parallel``: the text pipeline trained by 2 ranks under torchrun equals the
one-process run, rank 0 alone speaks and writes; settings that do not fit the world are
refused naming the key, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_text_pipeline import compose_text
from tiny_settings import TINY_TEXT
from two_ranks import assert_refused_before_any_work, assert_same_weights, torchrun_pipeline

from vats_apps.cli import run_pipeline
from vats_apps.pipelines.distributed import parallel_config
from vats_core.parallel import ParallelConfig

STEPS = ["train.max_steps=6", "generation.max_new_tokens=4"]  # after TINY_TEXT: override it


@pytest.mark.slow  # two ranks start under torchrun: ~35-50 s on 2 busy cores
def test_two_ranks_under_torchrun_train_the_one_process_model(tmp_path: Path) -> None:
    stdout, two = torchrun_pipeline(
        tmp_path, "pipeline=text_generation", "train.parallel=fsdp", *TINY_TEXT, *STEPS
    )
    # rank 0 alone prints and reports
    assert stdout.count("validation cross-entropy") == 1, stdout
    assert stdout.count("no cached model") == 1
    assert two["trained_now"] is True and len(two["samples"]) == 3

    one = run_pipeline(compose_text(tmp_path / "one", *STEPS))
    # the same global batches, the same weights up to float rounding of the split sums
    assert two["val_ce"] == pytest.approx(one["val_ce"], rel=1e-4)
    # the MoE router losses are the global batch's on each rank, not the rank's own rows'
    assert_same_weights(two, one, atol=1e-5)
    assert two["val_ce"] != pytest.approx(two["unigram_ce"], rel=1e-3)  # it trained


def test_checkpointing_alone_on_one_process_trains_the_plain_model(tmp_path: Path) -> None:
    """``train.parallel.activation_checkpointing`` with ``data_parallel=none`` makes no
    process group: the trained model comes back as the plain run's (recomputed
    activations, the same numbers), without asking a group for ranks."""
    steps = ["train.max_steps=6", "generation.max_new_tokens=2"]
    ckpt = run_pipeline(
        compose_text(tmp_path / "ckpt", *steps, "train.parallel.activation_checkpointing=true")
    )
    plain = run_pipeline(compose_text(tmp_path / "plain", *steps))
    assert ckpt["cache"] != plain["cache"]  # the section is part of the key
    assert_same_weights(ckpt, plain, atol=1e-6)


def test_parallel_accepts_the_shorthand_and_the_fields() -> None:
    cfg = OmegaConf.create({"train": {"parallel": "fsdp"}})
    assert parallel_config(cfg) == ParallelConfig(data_parallel="fsdp")
    cfg = OmegaConf.create({"train": {"parallel": {"data_parallel": "ddp", "compile": False}}})
    assert parallel_config(cfg) == ParallelConfig(data_parallel="ddp")
    assert parallel_config(OmegaConf.create({"train": {}})) == ParallelConfig()


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (["train.parallel=zero3"], {}, r"train.parallel: ParallelConfig.data_parallel='zero3'"),
        (["+train.parallel.tensor_parallel=2"], {}, r"train.parallel: .*no field"),
        (
            ["train.parallel.data_parallel=fsdp", "train.parallel.expert_parallel=3"],
            {},
            r"train.parallel: ParallelConfig.expert_parallel=3 .*divisor of the world size 1",
        ),
        ([], {"WORLD_SIZE": "2"}, r"train.parallel.data_parallel='none' with 2 ranks"),
        (
            ["train.parallel=ddp", "train.batch_size=15"],
            {"WORLD_SIZE": "2"},
            r"train.batch_size=15 .*multiple of 2",
        ),
    ],
)
def test_settings_that_do_not_fit_the_world_fail_before_any_work(
    tmp_path: Path, overrides: list[str], env: dict[str, str], message: str
) -> None:
    assert_refused_before_any_work(compose_text(tmp_path, *overrides), tmp_path, env, message)
