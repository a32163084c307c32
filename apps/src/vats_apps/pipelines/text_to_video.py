"""``vats pipeline=text_to_video prompt="a blue circle moving left"``: the LM enriches the
prompt, a text encoder reads it, a VideoDiT samples a clip of latents with classifier-free
guidance, and the image VAE decodes it frame by frame; each clip is written as a looping
GIF and its frames as PNGs.

The world is the vision proof's video world (``parts.vision.video.data``: clips of 4 frames
of 24 px, a shape moving left, right, up or down, slowly or quickly), so the proof's two
classifiers score what is generated: the ViT-3D reads the direction of motion, the ViT-2D
(``parts.vision.image``) reads each frame's shape and colour. The text LM and tokenizer are
``text_generation``'s. All three come from their pipelines' caches (trained first when
absent).

Three stages, each cached under a key of the settings that shape its weights
(:mod:`vats_apps.pipelines.cache`):

1. **vae**: ``text_to_image``'s VAE, the very same cache entry (``text_to_image/vae/<key>``):
   its settings are ``text_to_image``'s own (``parts.image`` is that pipeline's train
   section, of which ``parts.image.vae`` is read; ``model.vae`` is the same group), its
   world the vision proof's image world, so whichever of the two pipelines runs first trains
   it and the other loads it. That is right because a clip's frame is one of those images:
   the video world must agree with the image world on everything a frame shows
   (:data:`FRAME_FIELDS`: size, shapes, colours, sizes, backgrounds, rotation, colour
   jitter), which :func:`check_worlds` enforces; only motion (frames, directions, speeds)
   is the video world's own. The shipped configs agree: ``configs/train/vision.yaml`` sets
   ``image_size: 24`` for both and leaves the rest at ShapesConfig's defaults. It is a part
   here: ``pipeline.retrain`` does not retrain it (``text_to_image``'s DiT is trained on it).
2. **enrich**: the LM fine-tunes (every weight) on terse prompt -> caption pairs of clips
   (:mod:`vats_apps.generation.enrich`, medium ``video``: size, colour, shape, direction,
   speed, background).
3. **dit**: a :class:`vats_text.TextEncoder` (the LM's tokenizer) and the VideoDiT
   (``model.video_dit``) learn together on the VAE latents of fresh training clips (each
   frame encoded alone, a posterior sample), conditioned on their captions
   (``train.dit.terse_prob`` of them replaced by a terse prompt, so an un-enriched prompt
   still works), by flow matching as ``text_to_image``, with the DiT's condition dropout
   (the null text that guidance needs) and an EMA of both models' weights, which is what
   is saved and sampled. ``train.dit.frame_noise`` of the clips draw a timestep per frame
   (Diffusion Forcing: each frame noised at its own level, so a noisy frame must be
   denoised from its cleaner neighbours; :func:`~vats_apps.pipelines.stages.diffusion_loss`).
   ``train.dit.frame_diff_weight`` adds the squared error of the prediction's
   frame-to-frame differences to the loss, and the shipped ``train.dit.trainer.muon``
   trains the VideoDiT's block matrices with Muon (AdamW the rest).

   ``train.dit.init=image`` (the shipped setting) starts both from ``text_to_image``'s DiT
   stage, a part like the VAE (``model.dit`` and ``parts.image.dit``; the very same cache
   entry, trained first when absent): its text encoder, and its DiT inflated to frames
   (:func:`vats_diffusion.inflate_dit`: spatial blocks, embedders and final layer copied,
   the temporal blocks starting as the identity), so that at step 0 every frame is the
   image DiT's image of the caption, and training teaches the frames to agree and move.
   The VideoDiT's width, depth, heads and conditioning are then the image DiT's, and
   ``model.video_dit`` may not set them otherwise. A fresh VideoDiT (``init=none``) of
   the same training time drew the caption's colour a third of the time and its shape x
   colour at chance (README).

Generation: the prompt is read first (:func:`~vats_apps.generation.enrich.check_prompt`,
medium ``video``); a value the world lacks ("a circle moving up-left" in a world of four
directions) is an error naming the world's values, before any work. Each clip gets its own
enrichment, checked as for images (``enrichment.tries`` samples, then the prompt itself).
``generation.frames`` sets the clip length (null: the world's; at most the VideoDiT's
``max_frames``). The clips go to ``<pipeline.out_dir>/<prompt>-seed<seed>/`` as
``clip_<i>.gif`` (enlarged ``generation.upscale`` times) and ``clip_<i>_frame_<t>.png``,
with ``prompts.json``.

Scoring (``pipeline.evaluate``, cached with its settings;
:mod:`vats_apps.generation.video_scoring`), on held-out prompts (the enrichment's ``val``
scenes, training phrasings) naming a shape, a colour and a direction and any of the rest,
``train.eval.seeds`` clips each, of the world's length:

* direction adherence, read by the ViT-3D (goal >= 80 %, chance 1 / directions);
* shape x colour adherence, the ViT-2D's commonest reading over a clip's frames (goal
  >= 80 %, chance 1 / (shapes x colours)); size and background where the prompt names them;
* temporal consistency: the share of clips whose every frame reads as the clip's shape x
  colour (goal >= 90 %);
* the enrichment's keep rate; diversity of what the prompts leave open (in the captions);
  the same prompts without enrichment;
* the readers themselves, on real held-out clips and on their VAE round trips (how far
  their figures can be trusted, and what the VAE lets through);
* the training time of its own stages (goal: under 10 minutes in all; the VAE is
  text_to_image's and counted there).

``train.parallel`` trains the stages on the ranks ``torchrun`` starts (``uv run torchrun
--nproc-per-node 2 -m vats_apps pipeline=text_to_video train.parallel=ddp``, or ``fsdp``),
as :mod:`vats_apps.pipelines.stages` describes: each ``train.<stage>.batch_size`` stays the
global batch, the ranks train the weights one process trains on it, and rank 0 alone
writes the cache, scores and generates. The parts ``text_to_image`` trains here (the VAE,
and the image DiT with ``init=image``) train under the same ``train.parallel`` (it replaces
``parts.image.parallel``, and keys their entries as ``text_to_image``'s own run under that
section keys them), and every rank gets them for the stages that follow; the other parts
(the text LM, the vision classifiers) must be cached already: a run on one process trains
them, or their own pipelines do.

Shapes: B clips, T frames, C latent channels, h / w latent side, S frame side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.data import ShapesConfig, ShapesWorld
from vats_apps.generation.clips import (
    ClipReaders,
    TextToVideo,
    clip_pixels,
    sample_clips,
    save_clips,
)
from vats_apps.generation.model import Sampling, encode_texts
from vats_apps.generation.video_scoring import clip_words, evaluate, print_table
from vats_apps.pipelines import text_generation, text_to_image, train_vision
from vats_apps.pipelines.compiling import compile_flags, stage_trainer_config
from vats_apps.pipelines.distributed import launched_rank, parallel_key
from vats_apps.pipelines.sections import part_pipeline, section
from vats_apps.pipelines.stages import (
    Objective,
    Parts,
    Stage,
    StagedPipeline,
    cached_part,
    check_prompt_setting,
    check_prompt_tokens,
    diffusion_loss,
    encoder_lr_scale,
    enriched_copies,
    enrichment_line,
    load_or_score,
    load_or_train_enricher,
    load_text,
    model_section,
    prompt_line,
    scheduler_config,
    score_spec,
    slug,
    stage_results,
    terse_texts,
    text_encoder_config,
)
from vats_core.config import is_int
from vats_diffusion import (
    VAE,
    Diffusion,
    DiT,
    DiTConfig,
    SchedulerConfig,
    VAEConfig,
    VideoDiT,
    VideoDiTConfig,
    VideoPosEmbed,
    inflate_dit,
    vae_preset,
    video_dit_preset,
)
from vats_diffusion.video_dit import INFLATED_FIELDS
from vats_text.encoder import TextEncoder, TextEncoderConfig
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

NAME = "text_to_video"
CACHE_FORMAT = 1
STAGES = ("enrich", "dit")  # trained here; the VAE is text_to_image's
CODE = {
    "enrich": ("vats_core", "vats_text", "vats_apps"),
    "dit": ("vats_core", "vats_text", "vats_diffusion", "vats_apps"),
    "eval": ("vats_core", "vats_text", "vats_vision", "vats_diffusion", "vats_apps"),
}
P = StagedPipeline(NAME, CACHE_FORMAT, CODE)
# What a frame shows: the video world must agree with the image world on these, since the
# frames are decoded by the VAE of the image world and read by its classifier.
FRAME_FIELDS = (
    "image_size", "shapes", "colors", "sizes", "backgrounds", "rotation_deg", "color_jitter",
)  # fmt: skip
# Fields of model.video_dit the pipeline sets from the VAE's latents and the text encoder.
_SET_BY_PIPELINE = ("sample_size", "in_channels", "text_dim")


# ----------------------------------------------------------------------------- config


def part_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs ``text_generation``, ``train_vision`` and ``text_to_image`` would compose
    for the parts: ``model`` sections from here, ``train`` from ``parts.<name>``. The
    ``image`` part holds what ``text_to_image``'s VAE stage reads, and trains under this
    run's ``train.parallel`` (in place of ``parts.image.parallel``)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    out_dir = Path(str(cfg.pipeline.out_dir))
    image_models = {k: model[k] for k in ("text", "vision2d", "vae", "dit") if k in model}
    image_train = {k: v for k, v in section(cfg, "parts.image", NAME).items() if k != "parallel"}
    parallel = OmegaConf.select(cfg, "train.parallel")
    if parallel is not None:
        image_train["parallel"] = (
            OmegaConf.to_container(parallel, resolve=True)
            if isinstance(parallel, DictConfig)
            else parallel
        )
    return {
        "text": OmegaConf.create(
            {
                "model": {"text": model["text"]},
                "train": section(cfg, "parts.text", NAME),
                "pipeline": part_pipeline(cfg),
            }
        ),
        "vision": OmegaConf.create(
            {
                "model": {"vision2d": model["vision2d"], "vision3d": model["vision3d"]},
                "train": section(cfg, "parts.vision", NAME),
                "pipeline": part_pipeline(cfg, out_dir=str(out_dir / "vision")),
            }
        ),
        "image": OmegaConf.create(
            {
                "model": image_models,
                "train": image_train,
                "parts": {
                    "text": section(cfg, "parts.text", NAME),
                    "vision": section(cfg, "parts.vision", NAME),
                },
                "pipeline": part_pipeline(cfg, out_dir=str(out_dir / "image")),
            }
        ),
    }


def world_config(cfg: DictConfig) -> ShapesConfig:
    """The vision proof's video world, which the clips are drawn from."""
    return train_vision.world_config(part_configs(cfg)["vision"], "video")


def image_world_config(cfg: DictConfig) -> ShapesConfig:
    """The vision proof's image world: the VAE's and the frame classifier's."""
    return train_vision.world_config(part_configs(cfg)["vision"], "image")


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_worlds(image: ShapesConfig, video: ShapesConfig) -> None:
    """The clips' frames are images of the image world (:data:`FRAME_FIELDS` agree)."""
    for field in FRAME_FIELDS:
        a, b = getattr(video, field), getattr(image, field)
        if a != b:
            raise ValueError(
                f"{NAME}: parts.vision.video.data.{field}={_listed(a)!r} is invalid: expected "
                f"{_listed(b)!r}, the image world's (parts.vision.image.data.{field}): the "
                "frames are decoded by the VAE and read by the classifier of that world, so "
                f"the two worlds must draw the same frames ({', '.join(FRAME_FIELDS)})"
            )


def vae_config(cfg: DictConfig, world: ShapesConfig) -> VAEConfig:
    """``model.vae`` (a preset and VAEConfig overrides), checked against the frame size."""
    preset, fields = model_section(P, cfg, "model.vae")
    config = P.built(vae_preset, VAEConfig, "model.vae", preset, **fields)
    f = config.downsample_factor
    if world.image_size % f:
        raise ValueError(
            f"{NAME}: model.vae.block_out_channels={list(config.block_out_channels)} "
            f"downsamples by f={f}, which does not divide the world's image_size="
            f"{world.image_size}: use fewer levels"
        )
    return config


INIT_CHOICES = ("none", "image")


def init_setting(cfg: DictConfig) -> str:
    """``train.dit.init``: ``none`` (a fresh VideoDiT) or ``image`` (text_to_image's text
    encoder and DiT, the DiT inflated: :func:`vats_diffusion.inflate_dit`)."""
    value = OmegaConf.select(cfg, "train.dit.init", default="none")
    if value not in INIT_CHOICES:
        raise P.fail(
            "train.dit.init",
            value,
            "none (a fresh VideoDiT) or image (text_to_image's text encoder and DiT, the "
            "DiT inflated to frames)",
        )
    return str(value)


def dit_config(
    cfg: DictConfig,
    vae: VAEConfig,
    world: ShapesConfig,
    text_dim: int,
    image: DiTConfig | None = None,
) -> VideoDiTConfig:
    """``model.video_dit`` on the VAE's latents (side, channels) and the encoder's width,
    long enough for the world's clips. From an ``image`` DiT (``train.dit.init=image``),
    the fields of :data:`~vats_diffusion.video_dit.INFLATED_FIELDS` are that DiT's, and
    ``model.video_dit`` may set them only to the same values."""
    preset, fields = model_section(P, cfg, "model.video_dit", _SET_BY_PIPELINE)
    inherited: dict[str, Any] = {}
    if image is not None:
        for name in INFLATED_FIELDS:
            if name in fields and fields[name] != getattr(image, name):
                raise P.fail(
                    f"model.video_dit.{name}",
                    fields[name],
                    f"unset or the image DiT's {_listed(getattr(image, name))!r} "
                    f"(model.dit.{name}) with train.dit.init=image",
                )
        inherited = {n: getattr(image, n) for n in INFLATED_FIELDS if n not in _SET_BY_PIPELINE}
    config = P.built(
        video_dit_preset,
        VideoDiTConfig,
        "model.video_dit",
        preset,
        sample_size=world.image_size // vae.downsample_factor,
        in_channels=vae.latent_channels,
        text_dim=text_dim,
        **{**inherited, **fields},
    )
    if config.max_frames < world.frames or world.frames % config.patch_frames:
        raise P.fail(
            "model.video_dit.max_frames",
            config.max_frames,
            f">= {world.frames}, the world's clip length (parts.vision.video.data.frames), "
            f"which must also be a multiple of patch_frames={config.patch_frames}",
        )
    if config.learned_sigma:
        raise P.fail("model.video_dit.learned_sigma", True, "false (the loss is the mean's MSE)")
    if image is not None and config.pos_embed is VideoPosEmbed.ROPE3D:
        raise P.fail(
            "model.video_dit.pos_embed",
            config.pos_embed.value,
            "sincos_rope or sincos with train.dit.init=image (the image DiT's positions)",
        )
    return config


@dataclasses.dataclass(frozen=True)
class Generation:
    """The ``generation`` and ``enrichment`` sections, checked."""

    sampling: Sampling
    num_clips: int
    frames: int  # T of the generated clips
    seed: int  # the enrichments and the initial noise
    upscale: int  # the GIFs' enlargement
    fps: float  # the GIFs' frame rate


def check_frames(value: Any, world: ShapesConfig, dit: VideoDiTConfig) -> int:
    """``generation.frames``: null (the world's clip length) or a length the VideoDiT
    takes."""
    if value is None:
        return world.frames
    pt = dit.patch_frames
    if not is_int(value) or not 1 <= value <= dit.max_frames or value % pt:
        raise P.fail(
            "generation.frames",
            value,
            f"null (the world's {world.frames}) or an int in [1, {dit.max_frames}] "
            "(model.video_dit.max_frames)"
            + (f", a multiple of patch_frames={pt}" if pt > 1 else ""),
        )
    return int(value)


def generation_settings(
    cfg: DictConfig, scheduler: SchedulerConfig, dit: VideoDiTConfig, world: ShapesConfig
) -> Generation:
    return Generation(
        sampling=P.sampling(cfg, scheduler, dit.text_dropout, "model.video_dit.text_dropout"),
        num_clips=P.int(cfg, "generation.num_clips", 1),
        frames=check_frames(OmegaConf.select(cfg, "generation.frames"), world, dit),
        seed=P.int(cfg, "generation.seed", 0),
        upscale=P.int(cfg, "generation.upscale", 1),
        fps=P.number(cfg, "generation.fps", 0.1, 100.0),
    )


@dataclasses.dataclass(frozen=True)
class FrameVAE:
    """What ``text_to_image``'s VAE stage reads of its settings: the VAE and its world."""

    vae: VAEConfig
    world: ShapesConfig  # the image world


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the run reads, checked (:func:`check_config`)."""

    world: ShapesConfig  # the clips'
    frame_vae: FrameVAE
    dit: VideoDiTConfig
    init: str  # train.dit.init
    scheduler: SchedulerConfig
    generation: Generation
    prompt: str | None
    given: dict[str, str]  # the attributes the prompt names
    enrich: bool
    evaluate: bool
    # train.dit.first_frame > 0: the VideoDiT learned to continue a given first frame, and
    # clips are sampled in two passes (generation.clips.sample_clips(from_first=True))
    from_first: bool = False


def _check_vae_part(cfg: DictConfig) -> None:
    """``parts.image``'s VAE settings, which ``text_to_image``'s VAE stage reads."""
    steps = P.int(cfg, "parts.image.vae.max_steps", 1)
    P.int(cfg, "parts.image.vae.batch_size", 1)
    P.number(cfg, "parts.image.vae.kl_weight", 0.0)
    P.number(cfg, "parts.image.vae.shape_weight", 0.0)
    P.int(cfg, "parts.image.vae.scale_samples", 2)
    P.int(cfg, "parts.image.eval.vae_images", 1)
    _check_part_trainer(cfg, "vae", steps)


def _check_part_trainer(cfg: DictConfig, stage: str, steps: int) -> None:
    """``parts.image.<stage>.trainer``, as text_to_image's stage reads it."""
    stage_trainer_config(
        section(cfg, f"parts.image.{stage}", NAME).get("trainer", {}),
        f"{NAME}: parts.image.{stage}.trainer",
        steps=steps,
        seed=0,
        out_dir=Path("unused"),
        progress=False,
    )


def _check_image_dit_part(cfg: DictConfig) -> None:
    """``parts.image``'s DiT settings, which ``text_to_image``'s DiT stage reads."""
    steps = P.int(cfg, "parts.image.dit.max_steps", 1)
    P.int(cfg, "parts.image.dit.batch_size", 1)
    P.number(cfg, "parts.image.dit.terse_prob", 0.0, 1.0)
    P.number(cfg, "parts.image.dit.shape_weight", 0.0)
    P.number(cfg, "parts.image.dit.encoder_lr_scale", 0.0, 1.0)
    P.number(cfg, "parts.image.dit.ema.decay", 0.0, 0.999999)
    P.flag(cfg, "parts.image.dit.ema.warmup")
    _check_part_trainer(cfg, "dit", steps)


def image_dit_config(
    cfg: DictConfig,
    image_world: ShapesConfig,
    vae: VAEConfig,
    encoder: TextEncoderConfig,
    vocab: int,
) -> DiTConfig:
    """With ``train.dit.init=image``: text_to_image's DiT config (``model.dit`` and
    ``parts.image``), whose text encoder must be this stage's (``train.dit.encoder``)."""
    if OmegaConf.select(cfg, "model.dit") is None:
        raise P.fail(
            "train.dit.init", "image", "none, or add the image DiT's config group (/model/dit)"
        )
    image = part_configs(cfg)["image"]
    if text_to_image.encoder_config(image, vocab) != encoder:
        raise P.fail(
            "train.dit.encoder",
            section(cfg, "train.dit", NAME).get("encoder"),
            "text_to_image's (parts.image.dit.encoder) with train.dit.init=image: the "
            "encoder is that stage's",
        )
    config = text_to_image.dit_config(image, vae, image_world, encoder.dim)
    text_to_image.check_alignment(image, config, image_world)
    _check_image_dit_part(cfg)
    return config


def check_config(cfg: DictConfig) -> Settings:
    """Every setting and the prompt, before any part trains or any file is written.

    Raises:
        ValueError: naming the field (or the prompt) and what is allowed.
    """
    if any(compile_flags(cfg)):
        raise ValueError(f"{NAME}: pipeline.compile / train.compile are not supported here")
    world, image_world = world_config(cfg), image_world_config(cfg)
    check_worlds(image_world, world)
    vae = vae_config(cfg, image_world)
    vocab = OmegaConf.select(cfg, "parts.text.vocab_size")
    vocab = int(vocab) if is_int(vocab) else 4096
    encoder = text_encoder_config(P, cfg, vocab)
    init = init_setting(cfg)
    image = image_dit_config(cfg, image_world, vae, encoder, vocab) if init == "image" else None
    dit = dit_config(cfg, vae, world, encoder.dim, image)
    scheduler = scheduler_config(P, cfg)
    if image is not None:
        image_scheduler = text_to_image.scheduler_config(part_configs(cfg)["image"])
        # the same function of (x_t, t) to learn; which timesteps training draws may differ
        if scheduler.noise_process() != image_scheduler.noise_process():
            raise P.fail(
                "train.dit.scheduler",
                section(cfg, "train.dit", NAME).get("scheduler"),
                f"the image DiT's noise process {image_scheduler.noise_process()} "
                "(parts.image.dit.scheduler) with train.dit.init=image: the VideoDiT starts "
                "from that DiT's predictions (shift, timestep_sampling and logit_* may differ)",
            )
    generation = generation_settings(cfg, scheduler, dit, world)
    _check_vae_part(cfg)
    for stage in STAGES:
        steps = P.int(cfg, f"train.{stage}.max_steps", 1)
        P.int(cfg, f"train.{stage}.batch_size", 1)
        P.trainer(cfg, stage, steps, Path("unused"))
    P.number(cfg, "train.dit.terse_prob", 0.0, 1.0)
    frame_noise = P.number(cfg, "train.dit.frame_noise", 0.0, 1.0)
    first_frame = P.number(cfg, "train.dit.first_frame", 0.0, 1.0)
    if first_frame > 0 and frame_noise > 0:
        raise P.fail("train.dit.first_frame", first_frame, "0 while train.dit.frame_noise > 0")
    if first_frame > 0 and world.frames <= dit.patch_frames:
        raise P.fail("train.dit.first_frame", first_frame, "0 for clips of one tubelet")
    P.number(cfg, "train.dit.frame_diff_weight", 0.0, 100.0)
    encoder_lr_scale(P, cfg)
    P.number(cfg, "train.dit.ema.decay", 0.0, 0.999999)
    P.flag(cfg, "train.dit.ema.warmup")
    for key in ("prompts", "seeds", "enrich_prompts", "real_clips"):
        P.int(cfg, f"train.eval.{key}", 1)
    P.flag(cfg, "train.eval.without_enrichment")
    prompt, given = check_prompt_setting(P, cfg, world, "video", encoder.max_seq_len)
    return Settings(
        world=world,
        frame_vae=FrameVAE(vae, image_world),
        dit=dit,
        init=init,
        scheduler=scheduler,
        generation=generation,
        prompt=prompt,
        given=given,
        enrich=P.flag(cfg, "enrich"),
        evaluate=P.flag(cfg, "pipeline.evaluate"),
        from_first=first_frame > 0,
    )


# ----------------------------------------------------------------------------- parts


def load_readers(cfg: DictConfig, parts: Parts) -> ClipReaders:
    """``train_vision``'s image and video classifiers (each trained first when absent, on
    one process; several ranks require them cached)."""
    sub = part_configs(cfg)["vision"]
    found = {}
    for task in ("image", "video"):
        parts.keys[f"vision_{task}"] = train_vision.cache_key(sub, task)
        if launched_rank().world > 1:
            loaded = train_vision.cached(sub, task)
            model, report, _, _ = cached_part(loaded, P, cfg, f"vision {task}", "train_vision")
        else:
            model, report, _, _ = train_vision.load_or_train(sub, task)
        parts.reports[f"vision_{task}"] = report
        found[task] = model.eval()
    heads = train_vision.heads(sub, "image", image_world_config(cfg))
    return ClipReaders(found["image"], heads, found["video"], world_config(cfg))


# ----------------------------------------------------------------------------- stage 1: VAE


def load_vae(cfg: DictConfig, s: Settings) -> Stage:
    """Stage 1: ``text_to_image``'s VAE, loaded from (or trained into) that pipeline's
    cache entry (module docstring)."""
    print(f"{NAME}: the frames' VAE is text_to_image's (parts.image.vae, one cache entry)")
    # load_or_train_vae reads only the ``vae`` and ``world`` of its settings.
    image = part_configs(cfg)["image"]
    return text_to_image.load_or_train_vae(image, s.frame_vae)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- stage 3: DiT


class _Clips:
    """Clips of the world as the VideoDiT's latents ``(B, C, T, h, w)``, with their
    batch (captions, labels)."""

    def __init__(self, world: ShapesConfig, vae: VAE) -> None:
        self.world, self.vae = ShapesWorld(world), vae

    @torch.no_grad()
    def __call__(self, indices: range, split: str, seed: int) -> tuple[Tensor, Any]:
        """A posterior sample of each frame (as LDM trains), drawn from ``seed``."""
        x, batch = clip_pixels(self.world, indices, split)
        z = self.vae.encode_frames(x, generator=torch.Generator().manual_seed(seed))
        return z, batch


@torch.no_grad()
def denoising_loss(
    model: TextToVideo, clips: _Clips, diffusion: Diffusion, tokenizer: Tokenizer, n: int
) -> float:
    """The diffusion loss on ``n`` held-out clips with their captions, at fixed timesteps
    and noise: the same numbers before and after training, so the two compare."""
    latents, batch = clips(range(n), "val", 0)
    ids, mask = encode_texts(tokenizer, list(batch.captions), model.encoder.config.max_seq_len)
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    loss = diffusion.loss(model.dit, latents, model.condition(ids, mask), generator=g)
    model.train(was)
    return float(loss)


def load_image_dit(cfg: DictConfig, s: Settings, parts: Parts, vae_stage: Stage) -> Stage:
    """``train.dit.init=image``: text_to_image's text encoder and DiT, loaded from (or
    trained into) that pipeline's cache entry, as its own run would (``parts.image``,
    ``model.dit``, the same VAE, text LM and vision classifier)."""
    print(f"{NAME}: the VideoDiT starts from text_to_image's DiT (train.dit.init=image)")
    image = part_configs(cfg)["image"]
    settings = text_to_image.Settings(
        world=s.frame_vae.world,
        vae=s.frame_vae.vae,
        scheduler=text_to_image.scheduler_config(image),
        generation=None,  # type: ignore[arg-type]  (the DiT stage does not generate)
        prompt=None,
        given={},
        enrich=False,
        evaluate=False,
    )
    own = dataclasses.replace(parts, keys=dict(parts.keys), reports=dict(parts.reports))
    teacher = None
    if text_to_image.alignment_settings(image)[0] > 0:
        teacher, _ = text_to_image.load_classifier(image, own)
    # every rank: the VideoDiT stage starts from it
    stage = text_to_image.load_or_train_dit(
        image, settings, own, vae_stage, teacher, everywhere=True
    )
    parts.keys["image_dit"] = stage.key
    return stage


def load_or_train_dit(
    cfg: DictConfig, s: Settings, parts: Parts, vae_stage: Stage, image: Stage | None = None
) -> Stage:
    """Stage 3: the text encoder and the VideoDiT on the VAE's latents (EMA weights); from
    ``image`` (text_to_image's DiT stage) when ``train.dit.init=image``."""
    encoder_cfg = text_encoder_config(P, cfg, parts.tokenizer.vocab_size)
    image_dit = image.model.dit.config if image is not None else None
    dit_cfg = dit_config(cfg, s.frame_vae.vae, s.world, encoder_cfg.dim, image_dit)
    train = section(cfg, "train.dit", NAME)
    spec = {
        "vae": vae_stage.key,
        **({"init": image.key} if image is not None else {}),
        "text": parts.keys["text"],
        "encoder": encoder_cfg.to_dict(),
        "model": dit_cfg.to_dict(),
        "scheduler": s.scheduler.to_dict(),
        "world": s.world.to_dict(),
        "train": {k: v for k, v in train.items() if k != "encoder"},
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    path = P.entry(cfg, "dit", spec)
    if P.cached(path, cfg):  # every rank loads it
        print(f"{NAME}: loading the cached text encoder and VideoDiT from {path}", flush=True)
        model = TextToVideo(*P.load_conditioned(path, VideoDiT))
        return Stage(model.eval(), P.load_report(path), path.name, True)
    print(f"{NAME}: stage 3/3, dit: the text encoder and the VideoDiT learn the clips", flush=True)
    clips, diffusion = _Clips(s.world, vae_stage.model), Diffusion(s.scheduler)
    torch.manual_seed(int(cfg.pipeline.seed))
    if image is not None:
        encoder = copy.deepcopy(image.model.encoder).train()
        model = TextToVideo(encoder, inflate_dit(image.model.dit, dit_cfg))
    else:
        model = TextToVideo(TextEncoder(encoder_cfg), VideoDiT(dit_cfg))
    tokenizer, b = parts.tokenizer, int(train["batch_size"])
    terse_prob, limit = float(train["terse_prob"]), encoder_cfg.max_seq_len
    frame_noise = float(train["frame_noise"])
    frame_diff_weight = float(train["frame_diff_weight"])
    first_frame = float(train["first_frame"])

    def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
        first = P.first(step, micro, cfg, "dit")
        latents, batch = clips(range(first, first + b), "train", first)
        texts = terse_texts(batch, first, terse_prob, "video", "video-dit")
        ids, mask = encode_texts(tokenizer, texts, limit)
        return {"latents": latents, "ids": ids, "mask": mask}

    def loss(o: Objective, bt: dict[str, Tensor]) -> Tensor:
        t2v = o.model
        cond = t2v.condition(bt["ids"], bt["mask"])
        return diffusion_loss(
            diffusion,
            t2v.dit,
            bt["latents"],
            cond,
            frame_noise=frame_noise,
            frame_diff_weight=frame_diff_weight,
            first_frame=first_frame,
        )

    main = launched_rank().is_main  # (rank 0 scores the stage)
    before = denoising_loss(model, clips, diffusion, tokenizer, 64) if main else None
    # with the EMA: the averaged weights are the ones sampled and saved
    scales = {"model.encoder": encoder_lr_scale(P, cfg)}
    fitted = P.fit(
        cfg, "dit", Objective(loss, model=model), batch_fn, ema=train["ema"], lr_scales=scales
    )

    def fresh() -> TextToVideo:
        return TextToVideo(TextEncoder(encoder_cfg), VideoDiT(dit_cfg))

    model = fitted.part(cfg, "model", fresh, everywhere=False)
    seconds, rows = fitted.seconds, fitted.rows
    if model is None:  # a rank other than 0: rank 0 writes the entry
        return Stage(None, {"seconds": seconds}, path.name, False)
    model.eval()
    report = {
        "seconds": seconds,
        "denoising_loss_before": before,
        "denoising_loss_after": denoising_loss(model, clips, diffusion, tokenizer, 64),
        "frames": s.world.frames,
        "losses": [r["loss"] for r in rows],
    }
    P.save_conditioned(path, model, report)
    return Stage(model, report, path.name, False)


# ----------------------------------------------------------------------------- clips


class Maker:
    """Makes clips with the trained models, ``chunk`` texts a sampling call."""

    def __init__(
        self, s: Settings, model: TextToVideo, vae: VAE, tokenizer: Tokenizer, chunk: int = 32
    ) -> None:
        self.s, self.model, self.vae, self.tokenizer = s, model, vae, tokenizer
        self.diffusion = Diffusion(s.scheduler)
        self.chunk = chunk

    def __call__(
        self, texts: list[str], frames: int, seed: int, *, progress: bool = False
    ) -> Tensor:
        """Clips ``(B, 3, frames, S, S)`` in [-1, 1]; the noise of texts ``i ..`` from
        ``seed + i`` (``i`` a multiple of ``chunk``)."""
        out = [
            sample_clips(
                self.model, self.vae, self.diffusion, self.tokenizer,
                texts[i : i + self.chunk], frames, self.s.generation.sampling,
                torch.Generator().manual_seed(seed + i), progress=progress,
                from_first=self.s.from_first,
            )
            for i in range(0, len(texts), self.chunk)
        ]  # fmt: skip
        return torch.cat(out)


# ----------------------------------------------------------------------------- generation


def generate_clips(
    cfg: DictConfig,
    s: Settings,
    parts: Parts,
    lm: Any,
    maker: Maker,
    readers: ClipReaders | None,
) -> dict[str, Any]:
    """``generation.num_clips`` clips of the prompt, written and printed."""
    assert s.prompt is not None
    gen, prompt = s.generation, s.prompt
    outs = enriched_copies(
        lm if s.enrich else None, parts.tokenizer, prompt, s.given, gen.num_clips, s.world,
        gen.sampling, gen.seed, "video",
    )  # fmt: skip
    clips = maker(
        [o.used for o in outs], gen.frames, gen.seed, progress=bool(cfg.pipeline.progress)
    )
    read = readers(clips) if readers is not None else [None] * len(outs)
    folder = Path(str(cfg.pipeline.out_dir)) / f"{slug(prompt)}-seed{gen.seed}"
    files = save_clips(clips, folder, scale=gen.upscale, fps=gen.fps)
    records = []
    print(prompt_line(cfg, prompt, s.enrich, s.world, "video"))
    for i, (o, r) in enumerate(zip(outs, read, strict=True)):
        line, seen = enrichment_line("clip", i, o, s.enrich), None
        if r is not None:
            seen = {**r.majority, "direction": r.direction, "consistent": r.consistent}
            line += f" [read back: {r.majority['color']} {r.majority['shape']} moving {r.direction}"
            if not r.consistent:
                line += "; the frames read " + ", ".join(
                    f"{f['color']} {f['shape']}" for f in r.frames
                )
            line += "]"
        print(line)
        records.append(
            {"prompt": prompt, "enriched": o.written, "used": o.used, "fallback": o.reason,
             "classifiers": seen, "gif": files["gifs"][i], "frames": files["frames"][i]}
        )  # fmt: skip
    (folder / "prompts.json").write_text(json.dumps(records, indent=2))
    print(
        f"wrote {len(outs)} clip(s) of {gen.frames} frames ({s.world.image_size} px; GIFs "
        f"x{gen.upscale} at {gen.fps:g} fps) to {folder}"
    )
    return {"folder": str(folder), **files, "records": records}


# ----------------------------------------------------------------------------- run


def stage_models(cfg: DictConfig, s: Settings) -> list[nn.Module]:
    """The models the stages train here (the VAE and, with ``init=image``, the image DiT of
    ``text_to_image``; the untied LM; the text encoder and the VideoDiT), for
    ``train.parallel``'s checks on the meta device."""
    text = part_configs(cfg)["text"]
    vocab = int(text.train.vocab_size)
    encoder = text_encoder_config(P, cfg, vocab)
    lm = text_generation.model_config(text, vocab).replace(tie_embeddings=False)
    models: list[nn.Module] = [
        VAE(s.frame_vae.vae),
        MoELanguageModel(lm),
        TextToVideo(TextEncoder(encoder), VideoDiT(s.dit)),
    ]
    if s.init == "image":
        image = part_configs(cfg)["image"]
        dit = text_to_image.dit_config(image, s.frame_vae.vae, s.frame_vae.world, encoder.dim)
        models.append(DiT(dit))
    return models


def batch_keys(s: Settings) -> list[str]:
    """The global batches of the stages a run may train, ``text_to_image``'s included."""
    keys = ["parts.image.vae.batch_size"]
    if s.init == "image":
        keys.append("parts.image.dit.batch_size")
    if s.enrich or s.evaluate:
        keys.append("train.enrich.batch_size")
    return [*keys, "train.dit.batch_size"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, load the parts, train (or load) the stages (on every rank of a
    ``train.parallel`` run), then score and generate (on rank 0)."""
    s = check_config(cfg)  # a bad setting or prompt fails here, before any work
    with P.parallel_training(cfg, batch_keys(s), lambda: stage_models(cfg, s)) as ranks:
        parts = load_text(P, cfg, part_configs(cfg)["text"])
        limit = text_encoder_config(P, cfg, parts.tokenizer.vocab_size).max_seq_len
        if s.prompt is not None:
            check_prompt_tokens(P, s.prompt, parts.tokenizer, limit)
        readers = load_readers(cfg, parts) if s.evaluate or s.prompt is not None else None
        done = {"vae": load_vae(cfg, s)}
        if s.enrich or s.evaluate:  # generating with enrich=false alone needs no LM
            done["enrich"] = load_or_train_enricher(P, cfg, parts, s.world, "video", "2/3")
        image = load_image_dit(cfg, s, parts, done["vae"]) if s.init == "image" else None
        done["dit"] = load_or_train_dit(cfg, s, parts, done["vae"], image)
    if not ranks.is_main:  # the other ranks have trained: rank 0 scores and generates
        return {}
    vae, model = done["vae"].model, done["dit"].model
    maker = Maker(s, model, vae, parts.tokenizer)
    lm = done["enrich"].model if "enrich" in done else None
    result = stage_results(done, parts)
    stages = result["stages"]  # as recorded when each stage trained
    if s.evaluate:
        assert lm is not None and readers is not None
        spec = score_spec(P, cfg, result, s.generation.sampling)
        result["scores"], result["scores_cached"] = load_or_score(
            P, cfg, spec, lambda: {
                **evaluate(
                    s.world, section(cfg, "train.eval", NAME), s.generation.sampling,
                    parts.tokenizer, lm, lambda texts: maker(texts, s.world.frames, 2), readers,
                    vae,
                ),
                "words": clip_words(s.world, vae, model, Diffusion(s.scheduler), parts.tokenizer),
            },
        )  # fmt: skip
        classifiers = {k: parts.reports[f"vision_{k}"] for k in ("image", "video")}
        print_table(
            NAME, result["scores"], {k: r["seconds"] for k, r in stages.items()}, classifiers
        )
    if s.prompt is not None:
        result["generated"] = generate_clips(cfg, s, parts, lm, maker, readers)
    return result
