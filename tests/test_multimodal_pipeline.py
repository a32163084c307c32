"""The train_multimodal and chat pipelines at test size: tiny parts trained by their own
pipelines, both stages, held-out answers above chance, the cache, and chat on a user's
files (or a clear error before any work)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tiny_settings import TINY_MULTIMODAL

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.data import ShapesConfig, ShapesWorld
from vats_audio import save

# Tiny parts and colour questions only (train.questions): the tiny LM learns to name the
# colour of held-out images in a few dozen steps.
LEARN = [
    *TINY_MULTIMODAL,
    "train.questions=[image/color]",
    "train.batch_size=16",
    "train.align.max_steps=10",
    "train.instruct.max_steps=200",
    "train.instruct.trainer.lr=3e-3",
    "train.eval_per_type=48",
]


def _cfg(pipeline: str, cache, out, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"pipeline={pipeline}",
                *LEARN,
                f"pipeline.cache_dir={cache}",
                f"pipeline.out_dir={out}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mm-cache")
    out = tmp_path_factory.mktemp("mm-out")
    result = run_pipeline(_cfg("train_multimodal", cache, out))
    return cache, out, result


def test_the_lm_learns_to_answer_from_the_image(trained):
    _, out, result = trained
    assert not result["cached"]
    scores = result["scores"]
    assert set(scores) == {"image/color"}  # only what train.questions selects
    color = scores["image/color"]
    assert color["chance"] == pytest.approx(1 / 6)
    assert color["accuracy"] >= 3 * color["chance"], color
    assert result["train_seconds"] > 0
    for stage in ("align", "instruct"):
        assert (out / stage / "metrics.jsonl").is_file()


def test_a_second_run_loads_the_cache_and_reports_the_same(trained):
    cache, out, first = trained
    again = run_pipeline(_cfg("train_multimodal", cache, out))
    assert again["cached"]
    assert again["scores"] == first["scores"]


def test_chat_answers_about_a_users_image(trained, tmp_path, capsys):
    cache, out, _ = trained
    # a 64 px PNG of a held-out red shape, resized to the model's 24 px by the pipeline
    world = ShapesWorld(ShapesConfig(image_size=64, colors=("red",)))
    pixels = world.images([0], "test").pixels[0]
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(tmp_path / "mine.png")
    result = run_pipeline(
        _cfg(
            "chat",
            cache,
            out,
            f"image={tmp_path / 'mine.png'}",
            "prompt=What colour is the shape?",
        )
    )
    printed = capsys.readouterr().out
    assert result["prompt"] == "<image>\nWhat colour is the shape?\n"
    assert result["answer"] and result["answer"] in printed
    assert "training" not in printed  # the cached model was loaded


def test_chat_refuses_a_file_that_is_not_its_medium_before_any_work(tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"notes\.txt"):
        run_pipeline(_cfg("chat", cache, tmp_path, f"image={not_image}", "prompt=What?"))
    wav = tmp_path / "tone.wav"
    save(wav, torch.zeros(1600), 16000)
    with pytest.raises(ValueError, match=r"tone\.wav.*audio"):
        run_pipeline(_cfg("chat", cache, tmp_path, f"image={wav}", "prompt=What?"))
    with pytest.raises(FileNotFoundError, match=r"missing\.gif"):
        run_pipeline(_cfg("chat", cache, tmp_path, f"video={tmp_path / 'missing.gif'}", "prompt=?"))
    assert not cache.exists()  # nothing was trained or written


def test_bad_settings_fail_before_any_part_trains(tmp_path):
    cache = tmp_path / "cache"
    for override, message in [
        ("train.instruct.max_steps=0", "train.instruct.max_steps=0"),
        ("+train.compile=true", "train.compile is not supported"),
        ("+train.projectors.audio.in_dim=3", "in_dim is set by the encoder"),
        ("train.projectors.video.stack=0", "stack"),
        ("train.encoder_layers.image=5", r"encoder_layers.image=5 .*\[1, 2\]"),
        ("train.questions=[image/smell]", "train.questions"),
        ("+train.instruct.lr_scale={encoders: 0.1}", r"lr_scale=.*trainable groups"),
        ("+train.align.lr_scale={projectors: 0}", r"train.align.lr_scale=.*numbers > 0"),
        ("train.video_image_frames=5", r"video_image_frames=5 .*4 frames"),
        ("train.video_image_frames=-1", r"video_image_frames=-1 .*int >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_pipeline(_cfg("train_multimodal", cache, tmp_path, override))
    assert not cache.exists()
