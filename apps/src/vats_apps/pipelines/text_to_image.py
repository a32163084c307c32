"""``vats pipeline=text_to_image prompt="a red circle"``: the LM enriches the prompt, a text
encoder reads it, a DiT samples latents with classifier-free guidance and the VAE decoder
turns them into images of the shapes world; PNGs and a grid are written.

The world is the vision proof's (``parts.vision.image.data``: 24 px images, 4 shapes x 6
colours by default), so the proof's image classifier (``train_vision``'s, with its aux
heads) scores what is generated. The text LM and tokenizer are ``text_generation``'s. Both
parts come from their pipelines' caches (trained first when absent), as in
``train_multimodal``.

Training runs in three stages, each cached under a key of the settings that shape its
weights (:mod:`vats_apps.pipelines.cache`), so a changed setting retrains only the stages
it reaches (a DiT setting: the DiT stage alone):

1. **vae**: the VAE (``model.vae``, f = 2: 24 px -> 12 x 12 x 4 latents) learns to
   reconstruct fresh world images (MSE + a small KL, LDM's objective). Then its latents are
   standardised as SD3 does: ``scaling_factor`` = 1 / std and ``shift_factor`` = mean of the
   latents of a batch of images, so the DiT sees about unit-variance, centred latents.
2. **enrich**: the LM fine-tunes (every weight) on terse prompt -> full caption pairs
   (:mod:`vats_apps.generation.enrich`): a prompt names a random subset of a scene's
   attributes in varied words, the target is the world's caption of the scene.
3. **dit**: a :class:`vats_text.TextEncoder` (the LM's tokenizer) and the DiT
   (``model.dit``) learn together on VAE latents of fresh images, conditioned on their
   captions (``train.dit.terse_prob`` of them replaced by a terse prompt, so an un-enriched
   prompt still works), with the DiT's condition dropout (``text_dropout``: the null
   condition that guidance needs) and an EMA of both models' weights, which is what is
   saved and sampled.

Generation: the prompt is read first (:func:`~vats_apps.generation.enrich.check_prompt`):
a value the world lacks ("a red star" when the world has no star) is an error naming the
world's values, before any work; words the parser does not know are ignored. Each image
gets its own enrichment (sampled from ``generation.seed``, so attributes the prompt leaves
open vary from image to image); one that drops or contradicts the prompt's attributes, or
does not parse, is sampled again (``enrichment.tries`` samples in all), then falls back to
the prompt itself, with a message. ``enrich=false`` skips the
LM. The images go to ``<pipeline.out_dir>/<prompt>-seed<seed>/`` at their own size and
enlarged (nearest neighbour), with a grid and ``prompts.json``.

Scoring (``pipeline.evaluate``, cached with its settings): on held-out prompts (the
enrichment's held-out phrasings, ``val`` scenes) that name a shape and a colour, and a
random subset of the rest, ``train.eval.seeds`` images each: shape x colour adherence by
the classifier's target head (goal >= 85 %), the other attributes by its aux heads; the
enrichment's keep rate on prompts naming any subset (goal >= 99 %); diversity (distinct
values of each open attribute over the seeds, in the captions and in the images, against
uniform draws); the same adherence without enrichment; the training time of each stage
(goal: all under 10 minutes). Each figure is printed against chance.

``train.parallel`` trains the three stages on the ranks ``torchrun`` starts (``uv run
torchrun --nproc-per-node 2 -m vats_apps pipeline=text_to_image train.parallel=ddp``, or
``fsdp``), as :mod:`vats_apps.pipelines.stages` describes: each ``train.<stage>.batch_size``
stays the global batch, the ranks train the weights one process trains on it (every
random draw made for the global batch, the EMA of the plain weights), every rank gets the
trained VAE for the DiT stage, and rank 0 alone writes the cache, scores and generates.
The parts (the text LM, the image classifier) must then be cached already: a run on one
process trains them, or their own pipelines do.

Shapes: B batch, C latent channels, h / w latent side, S image side, T text tokens, D width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.data import ShapesConfig, ShapesWorld
from vats_apps.generation import enrich as en
from vats_apps.generation.images import save_images
from vats_apps.generation.model import (
    Sampling,
    TextToImage,
    TokenAlignment,
    denoising_loss,
    encode_texts,
    read_images,
    sample_images,
)
from vats_apps.generation.scoring import evaluate, image_words, print_table
from vats_apps.pipelines import stages as shared
from vats_apps.pipelines import text_generation, train_vision
from vats_apps.pipelines.cache import REPORT_NAME, staged_entry
from vats_apps.pipelines.compiling import compile_flags
from vats_apps.pipelines.distributed import launched_rank, parallel_key
from vats_apps.pipelines.sections import part_pipeline, preset_fields, section
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
    global_draw,
    load_or_score,
    load_or_train_enricher,
    load_text,
    prompt_line,
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
    dit_preset,
    vae_preset,
)
from vats_text.encoder import TextEncoder, TextEncoderConfig
from vats_text.model import MoELanguageModel

NAME = "text_to_image"
CACHE_FORMAT = 1  # bump when what is cached changes meaning
STAGES = ("vae", "enrich", "dit")
# The packages whose code trains (and whose versions and source key) each stage's weights.
CODE = {
    "vae": ("vats_core", "vats_diffusion", "vats_apps"),
    "enrich": ("vats_core", "vats_text", "vats_apps"),
    "dit": ("vats_core", "vats_text", "vats_diffusion", "vats_apps"),
    "eval": ("vats_core", "vats_text", "vats_vision", "vats_diffusion", "vats_apps"),
}
# Fields the pipeline sets from the data and the other parts, not the config.
_SET_BY_PIPELINE = {
    "model.dit": ("sample_size", "in_channels", "text_dim"),
    "train.dit.encoder": ("vocab_size",),
}


# ----------------------------------------------------------------------------- config


_P = StagedPipeline(NAME, CACHE_FORMAT, CODE)
_fail, _int, _number, _flag, _built = _P.fail, _P.int, _P.number, _P.flag, _P.built


def _preset_section(cfg: DictConfig, key: str) -> tuple[str, dict[str, Any]]:
    preset, fields = preset_fields(cfg, key, NAME)
    for name in _SET_BY_PIPELINE.get(key, ()):
        if name in fields:
            raise ValueError(f"{NAME}: {key}.{name} is set by the pipeline, not the config")
    return preset, fields


def part_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs ``text_generation`` and ``train_vision`` would compose for the parts:
    ``model`` sections from here, ``train`` from ``parts.<name>``."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    out_dir = Path(str(cfg.pipeline.out_dir))
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
                "model": {"vision2d": model["vision2d"]},
                "train": section(cfg, "parts.vision", NAME),
                "pipeline": part_pipeline(cfg, out_dir=str(out_dir / "vision")),
            }
        ),
    }


def world_config(cfg: DictConfig) -> ShapesConfig:
    """The world of the vision proof's image classifier, which the images are drawn from."""
    return train_vision.world_config(part_configs(cfg)["vision"], "image")


def vae_config(cfg: DictConfig, world: ShapesConfig) -> VAEConfig:
    """``model.vae`` (a preset and VAEConfig overrides), checked against the image size."""
    preset, fields = _preset_section(cfg, "model.vae")
    config = _built(vae_preset, VAEConfig, "model.vae", preset, **fields)
    f = config.downsample_factor
    if world.image_size % f or world.image_size // f < 1:
        raise ValueError(
            f"{NAME}: model.vae.block_out_channels={list(config.block_out_channels)} "
            f"downsamples by f={f}, which does not divide the world's image_size="
            f"{world.image_size}: use fewer levels"
        )
    return config


def encoder_config(cfg: DictConfig, vocab_size: int) -> TextEncoderConfig:
    """``train.dit.encoder`` (a text-encoder preset and overrides) for the LM's tokenizer."""
    return text_encoder_config(_P, cfg, vocab_size)


def dit_config(cfg: DictConfig, vae: VAEConfig, world: ShapesConfig, text_dim: int) -> DiTConfig:
    """``model.dit`` on the VAE's latents (size, channels) and the encoder's width."""
    preset, fields = _preset_section(cfg, "model.dit")
    side = world.image_size // vae.downsample_factor
    config = _built(
        dit_preset,
        DiTConfig,
        "model.dit",
        preset,
        sample_size=side,
        in_channels=vae.latent_channels,
        text_dim=text_dim,
        **fields,
    )
    if config.learned_sigma:
        raise _fail("model.dit.learned_sigma", True, "false (the loss is the mean's MSE)")
    if config.num_classes:
        raise _fail("model.dit.num_classes", config.num_classes, "0 (text is the condition)")
    return config


def scheduler_config(cfg: DictConfig) -> SchedulerConfig:
    """``train.dit.scheduler``: the noise process the DiT learns (SchedulerConfig fields)."""
    return shared.scheduler_config(_P, cfg)


@dataclasses.dataclass(frozen=True)
class Generation:
    """The ``generation`` and ``enrichment`` sections, checked."""

    sampling: Sampling  # how each image is made (also what the scores use)
    num_images: int
    seed: int  # the enrichments and the initial noise
    upscale: int  # the enlarged copies and the grid


def generation_settings(cfg: DictConfig, scheduler: SchedulerConfig, dit: DiTConfig) -> Generation:
    """``generation.*``, checked against the trained noise process and the DiT."""
    return Generation(
        sampling=_P.sampling(cfg, scheduler, dit.text_dropout, "model.dit.text_dropout"),
        num_images=_int(cfg, "generation.num_images", 1),
        seed=_int(cfg, "generation.seed", 0),
        upscale=_int(cfg, "generation.upscale", 1),
    )


_trainer = _P.trainer


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the run reads, checked (:func:`check_config`)."""

    world: ShapesConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    generation: Generation
    prompt: str | None
    given: dict[str, str]  # the attributes the prompt names
    enrich: bool
    evaluate: bool


def check_config(cfg: DictConfig) -> Settings:
    """Every setting and the prompt, before any part trains or any file is written.

    Raises:
        ValueError: naming the field (or the prompt) and what is allowed.
    """
    flags = compile_flags(cfg)
    if any(flags):
        raise ValueError(
            f"{NAME}: pipeline.compile / train.compile are not supported here: the stages are "
            "small and their batch shapes change (caption lengths)"
        )
    world = world_config(cfg)
    vae = vae_config(cfg, world)
    vocab = OmegaConf.select(cfg, "parts.text.vocab_size")
    encoder = encoder_config(cfg, int(vocab) if is_int(vocab) else 4096)
    dit = dit_config(cfg, vae, world, encoder.dim)
    scheduler = scheduler_config(cfg)
    generation = generation_settings(cfg, scheduler, dit)
    check_alignment(cfg, dit, world)
    for stage in STAGES:
        steps = _int(cfg, f"train.{stage}.max_steps", 1)
        _int(cfg, f"train.{stage}.batch_size", 1)
        _trainer(cfg, stage, steps, Path("unused"))
    _number(cfg, "train.vae.kl_weight", 0.0)
    _number(cfg, "train.vae.shape_weight", 0.0)
    _int(cfg, "train.vae.scale_samples", 2)
    _number(cfg, "train.dit.terse_prob", 0.0, 1.0)
    encoder_lr_scale(_P, cfg)
    _number(cfg, "train.dit.shape_weight", 0.0)
    _number(cfg, "train.dit.ema.decay", 0.0, 0.999999)
    _flag(cfg, "train.dit.ema.warmup")
    for key in ("prompts", "seeds", "enrich_prompts", "vae_images"):
        _int(cfg, f"train.eval.{key}", 1)
    _flag(cfg, "train.eval.without_enrichment")
    prompt, given = check_prompt_setting(_P, cfg, world, "image", encoder.max_seq_len)
    return Settings(
        world=world,
        vae=vae,
        scheduler=scheduler,
        generation=generation,
        prompt=prompt,
        given=given,
        enrich=_flag(cfg, "enrich"),
        evaluate=_flag(cfg, "pipeline.evaluate"),
    )


# ----------------------------------------------------------------------------- parts


def load_classifier(cfg: DictConfig, parts: Parts) -> tuple[nn.Module, list[tuple[str, int]]]:
    """``train_vision``'s image classifier (trained first when absent, on one process;
    several ranks require it cached) and its heads."""
    sub = part_configs(cfg)["vision"]
    parts.keys["vision"] = train_vision.cache_key(sub, "image")
    if launched_rank().world > 1:
        found = train_vision.cached(sub, "image")
        model, report, _, _ = cached_part(found, _P, cfg, "vision", "train_vision")
    else:
        model, report, _, _ = train_vision.load_or_train(sub, "image")
    parts.reports["vision"] = report
    return model.eval(), train_vision.heads(sub, "image", world_config(cfg))


_entry, _cached, _fit, _first, _load_report = _P.entry, _P.cached, _P.fit, _P.first, _P.load_report


def _pixels(world: ShapesWorld, indices: range, split: str) -> Tensor:
    return world.images(indices, split).pixels * 2 - 1  # (B, 3, S, S) in [-1, 1]


# ----------------------------------------------------------------------------- stage 1: VAE


def vae_key_spec(cfg: DictConfig, s: Settings) -> dict[str, Any]:
    return {
        "model": s.vae.to_dict(),
        "world": s.world.to_dict(),
        "train": section(cfg, "train.vae", NAME),
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }


def vae_loss(
    vae: VAE,
    x: Tensor,
    mask: Tensor,
    *,
    kl_weight: float,
    shape_weight: float,
    weight_mean: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:meth:`VAE.loss` with the shape's pixels weighted ``1 + shape_weight`` (``mask``,
    ``(B, 1, S, S)``, is the shape's coverage): the squared error is averaged with weights
    that sum to the pixel count, so ``shape_weight=0`` is :meth:`VAE.loss` itself.

    A shape covers a few percent of the image and the textured backgrounds most of the
    error, so plain MSE spends the decoder on backgrounds and blurs small shapes, whose
    outline is all that tells a triangle from a circle.

    On a rank of a ``train.parallel`` run, ``x`` holds the rank's rows: the posterior
    sample is drawn for the global batch (:func:`~vats_apps.pipelines.stages.global_draw`)
    and ``weight_mean`` is the global batch's mean weight (default: ``x``'s own)."""
    posterior = vae.encode(x)
    mean = posterior.mean
    eps = global_draw(
        lambda n: torch.randn((n, *mean.shape[1:]), device=mean.device, dtype=mean.dtype),
        mean.shape[0],
    )  # as DiagonalGaussian.sample draws it
    recon = vae.decode(mean + posterior.std * eps)
    w = 1 + shape_weight * mask  # (B, 1, S, S)
    mse = (w * (recon.float() - x.float()) ** 2).mean() / (
        w.mean() if weight_mean is None else weight_mean
    )
    kl = posterior.kl().float().mean()
    return mse + kl_weight * kl / x[0].numel(), {"recon": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def _latent_stats(vae: VAE, world: ShapesWorld, n: int) -> tuple[float, float]:
    """Mean and std of the unscaled posterior samples of ``n`` train images."""
    z = [
        vae.encode(_pixels(world, range(i, min(n, i + 256)), "train")).sample(
            torch.Generator().manual_seed(i)
        )
        for i in range(0, n, 256)
    ]
    flat = torch.cat(z).flatten()
    return float(flat.mean()), float(flat.std())


@torch.no_grad()
def _reconstruction(vae: VAE, world: ShapesWorld, n: int) -> dict[str, float]:
    x = _pixels(world, range(n), "val")
    mse = float(((vae(x).clamp(-1, 1) - x) ** 2).mean())
    return {"val_mse": mse, "val_psnr": 10 * math.log10(4 / max(mse, 1e-12))}  # range 2


def load_or_train_vae(cfg: DictConfig, s: Settings) -> Stage:
    """Stage 1 (module docstring): the VAE with standardised latents, on every rank (the
    DiT stage's batches are its latents); rank 0 scores it and writes the entry."""
    path = _entry(cfg, "vae", vae_key_spec(cfg, s))
    if _cached(path, cfg):  # every rank loads it
        print(f"{NAME}: loading the cached VAE from {path}", flush=True)
        return Stage(VAE.from_pretrained(path / "model"), _load_report(path), path.name, True)
    print(f"{NAME}: stage 1/3, vae: the autoencoder learns the world's images", flush=True)
    world = ShapesWorld(s.world)
    torch.manual_seed(int(cfg.pipeline.seed))
    vae = VAE(s.vae)
    kl_weight, shape_weight = float(cfg.train.vae.kl_weight), float(cfg.train.vae.shape_weight)
    b = int(cfg.train.vae.batch_size)

    def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
        first = _first(step, micro, cfg, "vae")
        batch = world.images(range(first, first + b), "train")
        # (0-d, kept whole by the trainer's split)
        weight_mean = (1 + shape_weight * batch.mask).mean()
        return {"x": batch.pixels * 2 - 1, "mask": batch.mask, "weight_mean": weight_mean}

    def loss(o: Objective, bt: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, mask, weight_mean = bt["x"], bt["mask"], bt["weight_mean"]
        return vae_loss(
            o.model,
            x,
            mask,
            kl_weight=kl_weight,
            shape_weight=shape_weight,
            weight_mean=weight_mean,
        )

    fitted = _fit(cfg, "vae", Objective(loss, model=vae), batch_fn)
    vae = fitted.part(cfg, "model", lambda: VAE(s.vae), everywhere=True).eval()
    t0 = time.perf_counter()
    mean, std = _latent_stats(vae, world, int(cfg.train.vae.scale_samples))
    vae.config = vae.config.replace(scaling_factor=1 / std, shift_factor=mean)
    rows = fitted.rows
    report = {
        "seconds": fitted.seconds + time.perf_counter() - t0,
        "latent_mean": mean,
        "latent_std": std,
        "final_loss": rows[-1]["loss"] if rows else None,
    }
    if not launched_rank().is_main:  # rank 0 scores it and writes the entry
        return Stage(vae, report, path.name, False)
    report |= {
        **_reconstruction(vae, world, int(cfg.train.eval.vae_images)),
        "parameters": sum(p.numel() for p in vae.parameters()),
    }
    with staged_entry(path) as staging:
        vae.save_pretrained(staging / "model")
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return Stage(vae, report, path.name, False)


# ----------------------------------------------------------------------------- stage 2: LM


# ----------------------------------------------------------------------------- stage 3: DiT


@dataclasses.dataclass
class DiTTraining:
    """What the DiT stage trains with: the objective the trainer updates (the model, and
    the alignment MLP when REPA is on, with the stage's loss) and its batches."""

    model: TextToImage
    objective: Objective  # model=..., [align=...]
    batch_fn: Callable[[int, int], dict[str, Tensor]]
    alignment: TokenAlignment | None


def alignment_settings(cfg: DictConfig) -> tuple[float, int]:
    """``train.dit.align``: (weight, block) of representation alignment (weight 0: off)."""
    weight = _number(cfg, "train.dit.align.weight", 0.0)
    block = _int(cfg, "train.dit.align.block", 1)
    return weight, block


def check_alignment(cfg: DictConfig, dit: DiTConfig, world: ShapesConfig) -> None:
    """The aligned block exists and the vision encoder's patch grid is the DiT's."""
    weight, block = alignment_settings(cfg)
    if weight == 0:
        return
    if block > dit.n_layers:
        raise _fail("train.dit.align.block", block, f"an int in [1, {dit.n_layers}] (DiT blocks)")
    vision = train_vision.image_model_config(part_configs(cfg)["vision"], world)
    teacher = (world.image_size // vision.patch_size,) * 2
    if teacher != dit.grid:
        raise _fail(
            "train.dit.align.weight",
            weight,
            f"0 here: the vision encoder's patch grid {teacher} is not the DiT's {dit.grid} "
            "(image_size / vision patch_size must equal latent size / DiT patch_size)",
        )


def dit_training(
    cfg: DictConfig,
    s: Settings,
    parts: Parts,
    vae: VAE,
    teacher: nn.Module | None,
) -> DiTTraining:
    """A fresh text encoder and DiT, and how the DiT stage trains them (module docstring)."""
    encoder_cfg = encoder_config(cfg, parts.tokenizer.vocab_size)
    dit_cfg = dit_config(cfg, s.vae, s.world, encoder_cfg.dim)
    train = section(cfg, "train.dit", NAME)
    world, diffusion = ShapesWorld(s.world), Diffusion(s.scheduler)
    torch.manual_seed(int(cfg.pipeline.seed))
    model = TextToImage(TextEncoder(encoder_cfg), DiT(dit_cfg))
    weight, block = alignment_settings(cfg)
    alignment = None
    if weight > 0:
        assert teacher is not None
        teacher_dim = teacher.config.dim  # type: ignore[union-attr]
        alignment = TokenAlignment(model.dit, block, teacher_dim)
    tokenizer, b = parts.tokenizer, int(train["batch_size"])
    terse_prob, limit = float(train["terse_prob"]), encoder_cfg.max_seq_len
    shape_weight = float(train["shape_weight"])

    def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
        first = _first(step, micro, cfg, "dit")
        batch = world.images(range(first, first + b), "train")
        pixels = batch.pixels * 2 - 1
        out = {}
        with torch.no_grad():  # a posterior sample per image, as LDM trains
            out["latents"] = vae.encode_latents(
                pixels, generator=torch.Generator().manual_seed(first)
            )
            if alignment is not None:
                out["teacher"] = teacher.forward_features(pixels)  # type: ignore[union-attr]
        out["input_ids"], out["mask"] = encode_texts(
            tokenizer, terse_texts(batch, first, terse_prob, "image", "dit"), limit
        )
        if shape_weight:  # the shape's coverage of each latent position, (B, 1, h, w)
            out["shape"] = F.avg_pool2d(batch.mask, s.vae.downsample_factor)
            # the global batch's mean weight (0-d, kept whole by the trainer's split)
            out["shape_mean"] = (1 + shape_weight * out["shape"]).mean()
        return out

    def loss(o: Objective, bt: dict[str, Tensor]) -> Any:
        t2i = o.model
        cond = t2i.condition(bt["input_ids"], bt["mask"])
        if shape_weight:  # each latent position's squared error weighted
            shape = 1 + shape_weight * bt["shape"]
            loss = diffusion_loss(diffusion, t2i.dit, bt["latents"], cond, shape, bt["shape_mean"])
        else:
            loss = diffusion_loss(diffusion, t2i.dit, bt["latents"], cond)
        if alignment is None:
            return loss
        align = alignment.loss(bt["teacher"])
        return loss + weight * align, {"diffusion": loss.detach(), "align": align.detach()}

    parts_trained = {"model": model} if alignment is None else {"model": model, "align": alignment}
    return DiTTraining(model, Objective(loss, **parts_trained), batch_fn, alignment)


def load_or_train_dit(
    cfg: DictConfig,
    s: Settings,
    parts: Parts,
    vae_stage: Stage,
    teacher: nn.Module | None,
    *,
    everywhere: bool = False,
) -> Stage:
    """Stage 3: the text encoder and the DiT on the VAE's latents (EMA weights), aligned to
    the vision encoder's features when ``train.dit.align.weight > 0``. Trained here on
    several ranks, the model is rank 0's alone, or every rank's with ``everywhere`` (a
    later stage trains from it)."""
    encoder_cfg = encoder_config(cfg, parts.tokenizer.vocab_size)
    dit_cfg = dit_config(cfg, s.vae, s.world, encoder_cfg.dim)
    train = section(cfg, "train.dit", NAME)
    spec = {
        "vae": vae_stage.key,
        "text": parts.keys["text"],
        "teacher": parts.keys["vision"] if alignment_settings(cfg)[0] > 0 else None,
        "encoder": encoder_cfg.to_dict(),
        "model": dit_cfg.to_dict(),
        "scheduler": s.scheduler.to_dict(),
        "world": s.world.to_dict(),
        "train": {k: v for k, v in train.items() if k != "encoder"},
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    path = _entry(cfg, "dit", spec)
    if _cached(path, cfg):  # every rank loads it
        print(f"{NAME}: loading the cached text encoder and DiT from {path}", flush=True)
        model = TextToImage(*_P.load_conditioned(path, DiT))
        return Stage(model.eval(), _load_report(path), path.name, True)
    print(f"{NAME}: stage 3/3, dit: the text encoder and the DiT learn the latents", flush=True)
    vae, world, diffusion = vae_stage.model, ShapesWorld(s.world), Diffusion(s.scheduler)
    t = dit_training(cfg, s, parts, vae, teacher)
    main = launched_rank().is_main  # (rank 0 scores the stage)
    before = denoising_loss(t.model, vae, diffusion, parts.tokenizer, world, 128) if main else None
    # with the EMA: the averaged weights are the ones sampled and saved
    scales = {"model.encoder": encoder_lr_scale(_P, cfg)}
    fitted = _fit(cfg, "dit", t.objective, t.batch_fn, ema=train["ema"], lr_scales=scales)
    if t.alignment is not None:
        t.alignment.remove()

    def fresh() -> TextToImage:
        return TextToImage(TextEncoder(encoder_cfg), DiT(dit_cfg))

    model = fitted.part(cfg, "model", fresh, everywhere=everywhere)
    if not main:  # rank 0 scores it and writes the entry
        model = None if model is None else model.eval()
        return Stage(model, {"seconds": fitted.seconds}, path.name, False)
    model.eval()
    report = {
        "seconds": fitted.seconds,
        "denoising_loss_before": before,
        "denoising_loss_after": denoising_loss(model, vae, diffusion, parts.tokenizer, world, 128),
        "losses": [r["loss"] for r in fitted.rows],
    }
    _P.save_conditioned(path, model, report)
    return Stage(model, report, path.name, False)


# ----------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------- generation


def generate_images(
    cfg: DictConfig,
    s: Settings,
    parts: Parts,
    vae: VAE,
    lm: MoELanguageModel | None,
    model: TextToImage,
    classifier: tuple[nn.Module, list[tuple[str, int]]] | None,
) -> dict[str, Any]:
    """``generation.num_images`` images of the prompt, written and printed."""
    assert s.prompt is not None
    gen, prompt = s.generation, s.prompt
    n = gen.num_images
    outs = enriched_copies(
        lm if s.enrich else None, parts.tokenizer, prompt, s.given, n, s.world, gen.sampling,
        gen.seed, "image",
    )  # fmt: skip
    images = sample_images(
        model,
        vae,
        Diffusion(s.scheduler),
        parts.tokenizer,
        [o.used for o in outs],
        gen.sampling,
        torch.Generator().manual_seed(gen.seed),
        progress=bool(cfg.pipeline.progress),
    )
    seen = read_images(*classifier, s.world, images) if classifier else [None] * n
    folder = Path(str(cfg.pipeline.out_dir)) / f"{slug(prompt)}-seed{gen.seed}"
    files = save_images(images, folder, scale=gen.upscale)
    records = []
    print(prompt_line(cfg, prompt, s.enrich, s.world, "image"))
    for i, (o, r) in enumerate(zip(outs, seen, strict=True)):
        line = enrichment_line("image", i, o, s.enrich)
        if r is not None:
            line += f" [read back: {en.caption(r) if len(r) == 5 else r}]"
        print(line)
        records.append(
            {"prompt": prompt, "enriched": o.written, "used": o.used, "fallback": o.reason,
             "classifier": r, "file": files["images"][i]}
        )  # fmt: skip
    (folder / "prompts.json").write_text(json.dumps(records, indent=2))
    size = s.world.image_size
    print(
        f"wrote {n} image(s) ({size} px, and x{gen.upscale} for viewing) to {folder}\n"
        f"grid: {files['grid']}"
    )
    return {"folder": str(folder), **files, "records": records}


# ----------------------------------------------------------------------------- run


def stage_models(cfg: DictConfig, s: Settings) -> list[nn.Module]:
    """The models the stages train (the VAE, the untied LM, the text encoder and the DiT),
    for ``train.parallel``'s checks on the meta device."""
    text = part_configs(cfg)["text"]
    vocab = int(text.train.vocab_size)
    encoder = encoder_config(cfg, vocab)
    lm = text_generation.model_config(text, vocab).replace(tie_embeddings=False)
    return [
        VAE(s.vae),
        MoELanguageModel(lm),
        TextToImage(TextEncoder(encoder), DiT(dit_config(cfg, s.vae, s.world, encoder.dim))),
    ]


def trained_stages(s: Settings) -> list[str]:
    """The stages a run may train (the enrichment LM only when it enriches or scores)."""
    return [stage for stage in STAGES if stage != "enrich" or s.enrich or s.evaluate]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, load the parts, train (or load) the stages (on every rank of a
    ``train.parallel`` run), then score and generate (on rank 0)."""
    s = check_config(cfg)  # a bad setting or prompt fails here, before any work
    batches = [f"train.{stage}.batch_size" for stage in trained_stages(s)]
    with _P.parallel_training(cfg, batches, lambda: stage_models(cfg, s)) as ranks:
        parts = load_text(_P, cfg, part_configs(cfg)["text"])
        limit = encoder_config(cfg, parts.tokenizer.vocab_size).max_seq_len
        if s.prompt is not None:
            check_prompt_tokens(_P, s.prompt, parts.tokenizer, limit)
        align = alignment_settings(cfg)[0] > 0
        classifier = load_classifier(cfg, parts) if s.evaluate or align else None
        done = {"vae": load_or_train_vae(cfg, s)}
        if s.enrich or s.evaluate:  # generating with enrich=false alone needs no LM
            done["enrich"] = load_or_train_enricher(_P, cfg, parts, s.world, "image", "2/3")
        teacher = classifier[0] if classifier else None
        done["dit"] = load_or_train_dit(cfg, s, parts, done["vae"], teacher)
    if not ranks.is_main:  # the other ranks have trained: rank 0 scores and generates
        return {}
    vae, model = done["vae"].model, done["dit"].model
    lm = done["enrich"].model if "enrich" in done else None
    result = stage_results(done, parts)
    stages = result["stages"]  # as recorded when each stage trained
    if s.evaluate:
        assert lm is not None and classifier is not None
        spec = score_spec(_P, cfg, result, s.generation.sampling)
        settings = section(cfg, "train.eval", NAME)
        scores, result["scores_cached"] = load_or_score(
            _P,
            cfg,
            spec,
            lambda: {
                **evaluate(
                    s.world,
                    Diffusion(s.scheduler),
                    s.generation.sampling,
                    settings,
                    parts.tokenizer,
                    vae,
                    lm,
                    model,
                    *classifier,
                ),
                "words": image_words(s.world, vae, model, Diffusion(s.scheduler), parts.tokenizer),
            },
        )
        result["scores"] = scores
        seconds = {k: r["seconds"] for k, r in stages.items()}
        print_table(NAME, scores, seconds, parts.reports["vision"])
    if s.prompt is not None:
        result["generated"] = generate_images(cfg, s, parts, vae, lm, model, classifier)
    return result
