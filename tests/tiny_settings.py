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
# The multimodal pipelines read the parts' settings from parts.* (the same files the other
# pipelines read as train), so the parts train as the tiny runs above do.
_PARTS_PREFIX = {"text": "parts.text", "vision": "parts.vision", "audio": "parts.audio"}


def _as_part(override: str, part: str) -> str:
    key, value = override.split("=", 1)
    if key.startswith("train."):
        return f"{_PARTS_PREFIX[part]}.{key[len('train.') :]}={value}"
    return override


TINY_MULTIMODAL = [
    "model/text=tiny",
    "model/vision2d=tiny",
    "model/vision3d=tiny",
    "model/audio=tiny",
    *(_as_part(o, "text") for o in TINY_TEXT if o.startswith("train.")),
    *(_as_part(o, "vision") for o in TINY_VISION if o.startswith("train.")),
    *(_as_part(o, "audio") for o in TINY_AUDIO if o.startswith("train.")),
    "train.encoder_layers.image=1",  # the tiny encoders have 2 blocks
    "train.encoder_layers.video=1",
    "train.batch_size=6",
    "train.align.max_steps=3",
    "train.instruct.max_steps=3",
    "train.eval_per_type=2",
    "train.max_caption_tokens=4",
    "pipeline.progress=false",
]
# Text to image: the tiny text LM and image classifier as parts (as the multimodal runs
# train them), and each stage a few steps.
TINY_TEXT_TO_IMAGE = [
    "model/text=tiny",
    "model/vision2d=tiny",
    "model/vae=tiny",
    "model/dit=tiny",
    *(_as_part(o, "text") for o in TINY_TEXT if o.startswith("train.")),
    *(_as_part(o, "vision") for o in TINY_VISION if o.startswith("train.")),
    "train.vae.max_steps=3",
    "train.vae.batch_size=8",
    "train.vae.scale_samples=16",
    "train.enrich.max_steps=3",
    "train.enrich.batch_size=8",
    "train.dit.max_steps=3",
    "train.dit.batch_size=8",
    "train.eval.prompts=2",
    "train.eval.seeds=2",
    "train.eval.enrich_prompts=4",
    "train.eval.vae_images=8",
    "enrichment.max_new_tokens=8",
    "enrichment.tries=2",
    "generation.steps=2",
    "generation.num_images=2",
    "pipeline.progress=false",
]
# Text to audio: the tiny text LM and audio classifier as parts, each stage a few steps.
TINY_TEXT_TO_AUDIO = [
    "model/text=tiny",
    "model/audio=tiny",
    "model/audio_dit=tiny",
    *(_as_part(o, "text") for o in TINY_TEXT if o.startswith("train.")),
    *(_as_part(o, "audio") for o in TINY_AUDIO if o.startswith("train.")),
    "train.enrich.max_steps=3",
    "train.enrich.batch_size=8",
    "train.dit.max_steps=3",
    "train.dit.batch_size=4",
    "train.dit.scale_samples=8",
    "train.eval.prompts=2",
    "train.eval.seeds=2",
    "train.eval.enrich_prompts=4",
    "train.eval.real_sounds=8",
    "enrichment.max_new_tokens=8",
    "enrichment.tries=2",
    "generation.steps=2",
    "generation.num_sounds=2",
    "generation.griffin_lim_iters=2",
    "pipeline.progress=false",
]
# Text to video: the tiny text LM and both vision classifiers as parts, text_to_image's
# tiny VAE and DiT (parts.image: the same settings as TINY_TEXT_TO_IMAGE's train.vae and
# train.dit, so the two share their cache entries), each stage a few steps.
TINY_TEXT_TO_VIDEO = [
    "model/text=tiny",
    "model/vision2d=tiny",
    "model/vision3d=tiny",
    "model/vae=tiny",
    "model/dit=tiny",
    "model/video_dit=tiny",
    *(_as_part(o, "text") for o in TINY_TEXT if o.startswith("train.")),
    *(_as_part(o, "vision") for o in TINY_VISION if o.startswith("train.")),
    *(
        f"parts.image.{o[len('train.') :]}"
        for o in TINY_TEXT_TO_IMAGE
        if o.startswith(("train.vae.", "train.dit."))
    ),
    "parts.image.eval.vae_images=8",
    "train.enrich.max_steps=3",
    "train.enrich.batch_size=8",
    "train.dit.max_steps=3",
    "train.dit.batch_size=4",
    "train.eval.prompts=2",
    "train.eval.seeds=2",
    "train.eval.enrich_prompts=4",
    "train.eval.real_clips=8",
    "enrichment.max_new_tokens=8",
    "enrichment.tries=2",
    "generation.steps=2",
    "generation.num_clips=2",
    "pipeline.progress=false",
]
TINY: dict[str, list[str]] = {
    "info": [],
    "text_generation": TINY_TEXT,
    "train_vision": TINY_VISION,
    "train_audio": TINY_AUDIO,
    "train_multimodal": TINY_MULTIMODAL,
    "chat": [*TINY_MULTIMODAL, "prompt=Describe the image."],
    "text_to_image": TINY_TEXT_TO_IMAGE,
    "text_to_audio": TINY_TEXT_TO_AUDIO,
    "text_to_video": TINY_TEXT_TO_VIDEO,
    # No runs to read (the test moves out_dir into tmp_path): every pipeline "not run".
    "report": ["pipeline.runs_dir=${pipeline.out_dir}/runs"],
}
