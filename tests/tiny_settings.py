"""Overrides that make each pipeline run in seconds, shared by the cross-package tests."""

# Overrides that make each pipeline run in seconds (the compose-every-config test and the
# pipeline tests use the same ones, so a model trained by one is reused from the cache).
TINY_TEXT = [
    "model/text=tiny",
    "train.max_steps=60",
    "train.max_files=40",
    "train.vocab_size=512",
    "train.seq_len=64",
    "train.batch_size=16",
    "train.trainer.warmup_steps=5",
    "train.trainer.eval_every=0",
    "train.trainer.log_every=20",
    "generation.max_new_tokens=12",
]
TINY_VISION = [
    "pipeline.task=all",
    "model/vision2d=tiny",
    "model/vision3d=tiny",
    "train.image.max_steps=3",
    "train.video.max_steps=3",
    "train.image.batch_size=8",
    "train.video.batch_size=4",
    "train.image.eval_size=16",
    "train.video.eval_size=8",
    "pipeline.progress=false",
]
TINY_AUDIO = [
    "model/audio=tiny",
    "train.max_steps=3",
    "train.batch_size=8",
    "train.eval_size=16",
    "train.vocoder.eval_size=4",
    "train.vocoder.n_iter=4",
    "pipeline.examples=1",
    "pipeline.progress=false",
]
TINY: dict[str, list[str]] = {
    "info": [],
    "text_generation": TINY_TEXT,
    "train_vision": TINY_VISION,
    "train_audio": TINY_AUDIO,
}
