"""``train.parallel`` in the multimodal pipeline: 2 ranks under torchrun train both stages
to the one-process weights from the same cached parts, with the frozen parts unchanged;
FSDP and DDP on one process are the plain trainer; the default section leaves the cache
keys as they were; settings that do not fit the world are refused naming the key, before
any work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file
from tiny_settings import TINY_MULTIMODAL
from two_ranks import (
    REFUSALS,
    assert_refused_before_any_work,
    assert_same_weights,
    batch_refusal,
    compose_tiny,
    torchrun_pipeline,
)

from vats_apps.cli import run_pipeline
from vats_apps.pipelines.train_multimodal import load_parts

# The tiny text part in a tenth of its steps: the parts only have to exist here (the runs
# compared load the same ones).
PARTS = ["parts.text.max_steps=6", "parts.text.trainer.warmup_steps=2"]


def compose_multimodal(tmp_path: Path, *extra: str) -> DictConfig:
    return compose_tiny("train_multimodal", tmp_path, *PARTS, *extra)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The plain one-process run at the tiny settings: its cache (the parts, trained here
    once, and both stages) and its result."""
    tmp = tmp_path_factory.mktemp("multimodal-one")
    return tmp, run_pipeline(compose_multimodal(tmp))


def _cache_with_parts(one: Path, tmp_path: Path) -> None:
    """``tmp_path/cache``: the one-process run's parts, without its stages."""
    shutil.copytree(one / "cache", tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache" / "train_multimodal")


def _weights(entry: Path) -> dict[str, torch.Tensor]:
    return load_file(entry / "model" / "model.safetensors")


def _only_entry(folder: Path) -> Path:
    (entry,) = folder.iterdir()
    return entry


@pytest.mark.slow  # two ranks start under torchrun: ~25-30 s on 2 busy cores
def test_two_ranks_under_torchrun_train_the_one_process_stages(
    one_process: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    one_dir, one = one_process
    _cache_with_parts(one_dir, tmp_path)
    stdout, two = torchrun_pipeline(
        tmp_path, "pipeline=train_multimodal", "train.parallel=fsdp", *TINY_MULTIMODAL, *PARTS
    )
    # rank 0 alone prints, reports and writes one entry per stage (and the parts, loaded
    # from the cache, keep their one entry each: checked below)
    assert stdout.count("train_multimodal results:") == 1, stdout
    stages = tmp_path / "cache" / "train_multimodal"
    assert _only_entry(stages / "instruct") == Path(two["cache"])
    assert not two["cached"] and two["parameters"] == one["parameters"]

    # the same global batches, each rank's loss weighed by its share of the answer tokens
    # and the router losses taken over the global batch: the one-process weights after
    # each stage, up to float rounding of the split sums
    one_stages = one_dir / "cache" / "train_multimodal"
    aligned = _weights(_only_entry(stages / "align"))
    one_aligned = _weights(_only_entry(one_stages / "align"))
    assert aligned.keys() == one_aligned.keys()
    for name, tensor in aligned.items():
        torch.testing.assert_close(tensor, one_aligned[name], rtol=0, atol=1e-5, msg=name)
    assert_same_weights(two, one, atol=1e-5)

    # frozen parts stay exactly the parts: the encoders through both stages, the LM
    # through align (FSDP sharded and gathered them, and reduced no gradient into them)
    final = _weights(Path(two["cache"]))
    for prefix, (trained, folder) in {
        "lm.": (aligned, tmp_path / "cache" / "text_generation"),
        "image_encoder.": (final, tmp_path / "cache" / "train_vision" / "image"),
        "video_encoder.": (final, tmp_path / "cache" / "train_vision" / "video"),
        "audio_encoder.": (final, tmp_path / "cache" / "train_audio"),
    }.items():
        part = _weights(_only_entry(folder))
        names = [n for n in trained if n.startswith(prefix)]
        assert names, prefix
        for name in names:
            assert torch.equal(trained[name], part[name.removeprefix(prefix)]), name


# DDP: a step trains one medium's projector, the others get no gradient (DDP must look for
# them, and leave them without one, as one process does).
@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_one_rank_is_the_plain_trainer(
    one_process: tuple[Path, dict[str, Any]], tmp_path: Path, data_parallel: str
) -> None:
    one_dir, plain = one_process
    _cache_with_parts(one_dir, tmp_path)
    parallel = run_pipeline(compose_multimodal(tmp_path, f"train.parallel={data_parallel}"))
    assert Path(parallel["cache"]).name != Path(plain["cache"]).name  # parallel enters the key
    assert parallel["scores"] == plain["scores"]
    assert_same_weights(parallel, plain, atol=1e-6)


def test_the_default_section_keeps_the_cache_keys(
    one_process: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    # a config without the section (an older run's) finds the default section's entries
    one_dir, plain = one_process
    cfg = compose_multimodal(tmp_path)
    cfg.pipeline.cache_dir = str(one_dir / "cache")
    with open_dict(cfg):
        del cfg.train["parallel"]
    again = run_pipeline(cfg)
    assert again["cached"] and again["cache"] == plain["cache"]


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        *REFUSALS,
        (
            ["train.parallel.data_parallel=fsdp", "train.parallel.compile=maybe"],
            {},
            r"train.parallel: ParallelConfig.compile",
        ),
        batch_refusal("train.batch_size", 5),
    ],
)
def test_settings_that_do_not_fit_the_world_fail_before_any_work(
    tmp_path: Path, overrides: list[str], env: dict[str, str], message: str
) -> None:
    cfg = compose_multimodal(tmp_path, *overrides)
    assert_refused_before_any_work(cfg, tmp_path, env, message)


def test_several_ranks_refuse_parts_that_are_not_cached(tmp_path: Path) -> None:
    cfg = compose_multimodal(tmp_path)
    with pytest.raises(ValueError, match=r"text \(pipeline=text_generation\), image .*audio"):
        load_parts(cfg, world=2)
    assert not any(tmp_path.iterdir()), "no part may be trained"
