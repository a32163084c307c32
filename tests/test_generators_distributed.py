"""``train.parallel`` in the generating pipelines (text_to_image, text_to_audio,
text_to_video): 2 ranks under torchrun train every stage to the one-process weights (FSDP
for the image pipeline's stages, DDP for the others, whose VideoDiT trains with Muon), rank 0
alone speaks, writes the cache, scores and generates; the default section leaves the cache
keys as they were; settings that do not fit the world, and parts that are not cached on
several ranks, are refused naming the key, before any work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file
from tiny_settings import TINY
from two_ranks import (
    REFUSALS,
    assert_refused_before_any_work,
    batch_refusal,
    compose_tiny,
    torchrun_pipelines,
)

from vats_apps.cli import run_pipeline
from vats_apps.pipelines import text_to_image
from vats_apps.pipelines.stages import Parts, load_text

GENERATORS = ("text_to_video", "text_to_image", "text_to_audio")
# Each run's train.parallel, in one torchrun launch: the image pipeline's VAE and DiT under
# FSDP; the others under DDP (the video pipeline with the image VAE and DiT it trains as
# parts): its VideoDiT trains with Muon, which FSDP refuses.
PARALLEL = {"text_to_video": "ddp", "text_to_image": "fsdp", "text_to_audio": "ddp"}
# Where each part a generator names lives in the cache.
PART_DIRS = {
    "text": "text_generation",
    "vision": "train_vision/image",
    "vision_image": "train_vision/image",
    "vision_video": "train_vision/video",
    "audio": "train_audio",
}


def _compose(name: str, cache: Path, out: Path, *extra: str) -> DictConfig:
    cfg = compose_tiny(name, out, *extra)
    cfg.pipeline.cache_dir = str(cache)
    return cfg


@pytest.fixture(scope="module")
def one_process(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process runs at the tiny settings, in the session's cache (where
    test_configs' runs of the same settings left their stages)."""
    out = tmp_path_factory.mktemp("generators-one")
    return {name: run_pipeline(_compose(name, cache_dir, out / name)) for name in GENERATORS}


def _entries(result: dict[str, Any], pipeline: str) -> dict[str, Path]:
    """``<pipeline dir>/<stage>/<entry>`` of each stage a result names (the VAE, and the
    image DiT of text_to_video, are text_to_image's)."""
    found = {}
    for stage, key in result["keys"].items():
        owner = "text_to_image" if stage == "vae" else pipeline
        found[f"{owner}/{stage}"] = Path(owner) / stage / key
    if "image_dit" in result["parts"]:
        found["text_to_image/dit"] = Path("text_to_image") / "dit" / result["parts"]["image_dit"]
    return found


def _weights(entry: Path) -> dict[str, torch.Tensor]:
    return {
        f"{path.parent.name}/{name}": tensor
        for path in sorted(entry.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


@pytest.mark.slow  # two ranks start under torchrun once for the three pipelines: ~30-40 s
def test_two_ranks_under_torchrun_train_the_one_process_stages(
    cache_dir: Path, one_process: dict[str, Any], tmp_path: Path
) -> None:
    # the parts the one-process runs loaded, alone in the 2-rank run's cache
    for result in one_process.values():
        for part, key in result["parts"].items():
            if part in PART_DIRS:
                folder = Path(PART_DIRS[part]) / key
                shutil.copytree(cache_dir / folder, tmp_path / "cache" / folder, dirs_exist_ok=True)
    runs = {
        name: [f"pipeline={name}", *TINY[name], f"train.parallel={PARALLEL[name]}"]
        for name in GENERATORS
    }
    stdout, two = torchrun_pipelines(tmp_path, runs)

    for name in GENERATORS:
        # rank 0 alone prints, scores and generates
        assert stdout.count(f"{name} results:") == 1, stdout
        assert two[name]["scores"] and two[name]["generated"]
        assert two[name]["keys"] != one_process[name]["keys"]  # parallel enters the keys
    # rank 0 alone writes: one complete entry per stage and settings, nothing half-written
    # (the video run trained the VAE and the image DiT under DDP, the image run its own
    # under FSDP, so text_to_image holds two of each)
    cache = tmp_path / "cache"
    written: dict[Path, set[str]] = {}
    for name in GENERATORS:
        for entry in _entries(two[name], name).values():
            written.setdefault(entry.parent, set()).add(entry.name)
    assert len(written[Path("text_to_image/vae")]) == 2
    for folder, names in written.items():
        assert {p.name for p in (cache / folder).iterdir()} == names, folder
    for name in GENERATORS:
        assert len(list((cache / name / "eval").iterdir())) == 1, name
    assert not any(two["text_to_image"]["cached"].values())

    # the same global batches, every random draw made for them: the one-process weights
    # (the EMA of them), up to float rounding of the split sums
    for name in GENERATORS:
        ones = _entries(one_process[name], name)
        twos = _entries(two[name], name)
        assert ones.keys() == twos.keys()
        for stage, entry in twos.items():
            mine, reference = _weights(cache / entry), _weights(cache_dir / ones[stage])
            assert mine.keys() == reference.keys(), stage
            for key, tensor in mine.items():
                _assert_same_weight(tensor, reference[key], f"{name}: {stage} {key}")


def _assert_same_weight(mine: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Equal to 1e-5, but for the key third of a fused ``qkv_proj.bias`` (the VAE's
    attention), to 1e-4: the softmax ignores a key bias, so its gradient is rounding noise,
    which Adam's normalised step turns into steps of the learning rate's size, of either
    sign (2e-5 apart after 3 steps, where every other weight is 5e-7 apart)."""
    if what.endswith("qkv_proj.bias"):
        q, k, v = mine.chunk(3)
        q_ref, k_ref, v_ref = reference.chunk(3)
        torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-4, msg=what)
        mine, reference = torch.cat([q, v]), torch.cat([q_ref, v_ref])
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5, msg=what)


def test_the_default_section_keeps_the_cache_keys(
    cache_dir: Path, one_process: dict[str, Any], tmp_path: Path
) -> None:
    # a config without the section (an older run's) finds the default section's entries
    for name in GENERATORS:
        cfg = _compose(name, cache_dir, tmp_path / name, "pipeline.evaluate=false", "prompt=null")
        with open_dict(cfg):
            del cfg.train["parallel"]
        again = run_pipeline(cfg)
        assert all(again["cached"].values()), name
        assert again["keys"].items() <= one_process[name]["keys"].items(), name


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        *REFUSALS,
        batch_refusal("train.dit.batch_size", 5),
        (
            ["train.parallel.data_parallel=ddp", "train.parallel.activation_checkpointing=yes"],
            {},
            r"train.parallel: ParallelConfig.activation_checkpointing",
        ),
    ],
)
def test_settings_that_do_not_fit_the_world_fail_before_any_work(
    name: str, tmp_path: Path, overrides: list[str], env: dict[str, str], message: str
) -> None:
    cfg = compose_tiny(name, tmp_path, *overrides)
    assert_refused_before_any_work(cfg, tmp_path, env, message)


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("text_to_image", ["+train.dit.trainer.muon=[model.dit.blocks.*.ffn.*]"], "train.dit"),
        ("text_to_video", [], "train.dit"),  # the shipped settings: the VideoDiT's Muon
        (
            "text_to_video",
            ["train.dit.trainer.muon=[]", "+parts.image.dit.trainer.muon=[model.dit.blocks.*]"],
            "parts.image.dit",
        ),
    ],
)
def test_muon_under_fsdp_is_refused_naming_the_stage(
    name: str, overrides: list[str], field: str, tmp_path: Path
) -> None:
    cfg = compose_tiny(name, tmp_path, "train.parallel.data_parallel=fsdp", *overrides)
    assert_refused_before_any_work(cfg, tmp_path, {}, rf"{field}.trainer.muon=.*'fsdp'")


def test_the_image_parts_of_the_video_pipeline_take_its_batches(tmp_path: Path) -> None:
    overrides, env, message = batch_refusal("parts.image.vae.batch_size", 7)
    cfg = compose_tiny("text_to_video", tmp_path, *overrides)
    assert_refused_before_any_work(cfg, tmp_path, env, message)


def test_several_ranks_refuse_parts_that_are_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_tiny("text_to_image", tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"text part \(pipeline=text_generation\) .* not in"):
        load_text(text_to_image._P, cfg, text_to_image.part_configs(cfg)["text"])
    with pytest.raises(ValueError, match=r"vision part \(pipeline=train_vision\)"):
        text_to_image.load_classifier(cfg, Parts(None, None, {}, {}))  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir()), "no part may be trained"
