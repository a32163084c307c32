"""``vats pipeline=text_to_audio prompt="a long low sine tone" duration=2.5``: the LM enriches
the prompt, a text encoder reads it, an AudioDiT samples log-mel frames of the requested
length with classifier-free guidance, and the Griffin-Lim vocoder turns them into WAV
files.

The world is the audio proof's (``parts.audio.data``: tones with a pitch, a timbre, a short
or long duration and an optional hiss), so the proof's classifier (``train_audio``'s)
scores what is generated. The text LM and tokenizer are ``text_generation``'s. Both parts
come from their pipelines' caches (trained first when absent).

Training runs in two stages, each cached under a key of the settings that shape its
weights (:mod:`vats_apps.pipelines.cache`):

1. **enrich**: the LM fine-tunes (every weight) on terse prompt -> caption pairs of the
   sounds world (:mod:`vats_apps.generation.enrich`, medium ``audio``).
2. **dit**: a :class:`vats_text.TextEncoder` (the LM's tokenizer) and the AudioDiT
   (``model.audio_dit``) learn together on the LogMel frames of fresh sounds, each padded
   with digital silence to the window of the world's longest sound, conditioned on the
   caption (``train.dit.terse_prob`` of them replaced by a terse prompt) and on the sound's
   length in seconds (:mod:`vats_apps.generation.sounds`), with the DiT's condition
   dropout (the null text that guidance needs) and an EMA of both models' weights. The
   frames are scaled to unit variance by the mean and std of ``train.dit.scale_samples``
   training sounds (stored in the stage's report). The DiT works on the mel frames
   themselves, not on the latents of a mel autoencoder: at 80 bins x 300 frames and 4
   frames per token a window is 75 tokens, which the 2-core CPU trains in minutes, and the
   tones' spectra (a few harmonic lines) leave an autoencoder little to compress.

Generation: the prompt is read first (:func:`~vats_apps.generation.enrich.check_prompt`,
medium ``audio``); a value the world lacks is an error naming the world's values, before
any work. ``duration`` (seconds) must lie in the world's range and agree with a duration the
prompt names ("a short tone" and ``duration=2.5`` is an error); unset, each sound gets a
length drawn (from ``generation.seed``) from the range of the duration its enriched caption
names. Each sound gets its own enrichment, checked as for images (``enrichment.tries``
samples, then the prompt itself). The sounds go to ``<pipeline.out_dir>/<prompt>-seed<seed>/``
as 16-bit WAV files of exactly the requested length, with ``prompts.json``.

Scoring (``pipeline.evaluate``, cached with its settings), on held-out prompts (the
enrichment's ``val`` scenes, training phrasings) naming a pitch and a timbre and any of the
rest, ``train.eval.seeds`` sounds each: pitch x timbre adherence as the audio classifier
reads the vocoded sound (goal >= 80 %, chance 1 / (pitches x timbres)); the length of the
generated sound (where it falls silent, :func:`~vats_apps.generation.sounds.sound_ends`)
within 10 % of the requested length (goal: 95 % of sounds), with the same reading on real
held-out sounds beside it; the enrichment's keep rate; diversity of what the prompt leaves
open; the same prompts without enrichment; the training time of each stage (goal: under 10
minutes).

``train.parallel`` trains both stages on the ranks ``torchrun`` starts (``uv run torchrun
--nproc-per-node 2 -m vats_apps pipeline=text_to_audio train.parallel=ddp``, or ``fsdp``),
as :mod:`vats_apps.pipelines.stages` describes: each ``train.<stage>.batch_size`` stays the
global batch, the ranks train the weights one process trains on it, and rank 0 alone
writes the cache, scores and generates. The parts (the text LM, the audio classifier) must
then be cached already: a run on one process trains them, or their own pipelines do.

Shapes: B batch, M mel bins, L frames, S samples, T text tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.data import DURATIONS, SoundsConfig, SoundsWorld
from vats_apps.generation import enrich as en
from vats_apps.generation.model import Sampling, encode_texts, enrich_all
from vats_apps.generation.scoring import TIME_GOAL, enrichment_scores, goal_note, pct
from vats_apps.generation.sounds import (
    MelScale,
    TextToAudio,
    read_sounds,
    sample_sounds,
    sound_ends,
    vocode,
)
from vats_apps.pipelines import stages, text_generation, train_audio
from vats_apps.pipelines.compiling import compile_flags
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
    enriched_copies,
    enrichment_line,
    load_or_score,
    load_or_train_enricher,
    load_text,
    model_section,
    prompt_line,
    score_spec,
    slug,
    stage_results,
    terse_texts,
    text_encoder_config,
)
from vats_audio import AudioEncoder, GriffinLimVocoder, LogMel, LogMelConfig
from vats_audio import save as save_audio
from vats_core.config import is_number
from vats_diffusion import (
    AudioDiT,
    AudioDiTConfig,
    Diffusion,
    SchedulerConfig,
    audio_dit_preset,
)
from vats_text.encoder import TextEncoder, TextEncoderConfig
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

NAME = "text_to_audio"
CACHE_FORMAT = 1
STAGES = ("enrich", "dit")
CODE = {
    "enrich": ("vats_core", "vats_text", "vats_apps"),
    "dit": ("vats_core", "vats_text", "vats_audio", "vats_diffusion", "vats_apps"),
    "eval": ("vats_core", "vats_text", "vats_audio", "vats_diffusion", "vats_apps"),
}
P = StagedPipeline(NAME, CACHE_FORMAT, CODE)
ADHERENCE_GOAL = 0.80  # the issue's: pitch x timbre of generated sounds
LENGTH_GOAL = 0.95  # ... and the share of sounds whose length is within LENGTH_TOLERANCE
LENGTH_TOLERANCE = 0.10
# Fields of model.audio_dit the pipeline sets from the features, the world and the encoder.
_SET_BY_PIPELINE = ("n_mels", "sample_rate", "hop_length", "max_seconds", "text_dim")


# ----------------------------------------------------------------------------- config


def part_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs ``text_generation`` and ``train_audio`` would compose for the parts."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    out_dir = Path(str(cfg.pipeline.out_dir))
    audio_pipeline = part_pipeline(cfg, out_dir=str(out_dir / "audio"), classify=None, examples=0)
    return {
        "text": OmegaConf.create(
            {
                "model": {"text": model["text"]},
                "train": section(cfg, "parts.text", NAME),
                "pipeline": part_pipeline(cfg),
            }
        ),
        "audio": OmegaConf.create(
            {
                "model": {"audio": model["audio"]},
                "train": section(cfg, "parts.audio", NAME),
                "pipeline": audio_pipeline,
            }
        ),
    }


def world_config(cfg: DictConfig) -> SoundsConfig:
    """The audio proof's world, which the sounds are drawn from."""
    return train_audio.world_config(part_configs(cfg)["audio"])


def features_config(cfg: DictConfig, world: SoundsConfig) -> LogMelConfig:
    """The audio proof's LogMel: the frames the DiT makes and the classifier reads."""
    return train_audio.features_config(part_configs(cfg)["audio"], world)


def window_frames(world: SoundsConfig, features: LogMelConfig, patch: int) -> int:
    """L: frames of the world's longest sound, rounded up to the DiT's patch."""
    frames = math.ceil(world.max_seconds * world.sample_rate / features.hop_length)
    return -(-frames // patch) * patch


def encoder_config(cfg: DictConfig, vocab_size: int) -> TextEncoderConfig:
    """``train.dit.encoder`` for the LM's tokenizer."""
    return text_encoder_config(P, cfg, vocab_size)


def dit_config(
    cfg: DictConfig, world: SoundsConfig, features: LogMelConfig, text_dim: int
) -> AudioDiTConfig:
    """``model.audio_dit`` on the proof's frames (bins, rate, hop) and the world's longest
    sound, reading the encoder's states."""
    preset, fields = model_section(P, cfg, "model.audio_dit", _SET_BY_PIPELINE)
    config = P.built(
        audio_dit_preset,
        AudioDiTConfig,
        "model.audio_dit",
        preset,
        n_mels=features.n_mels,
        sample_rate=features.sample_rate,
        hop_length=features.hop_length,
        max_seconds=world.max_seconds,
        text_dim=text_dim,
        **fields,
    )
    window = window_frames(world, features, config.patch_size)
    if config.max_frames < window:
        raise P.fail(
            "model.audio_dit.max_frames",
            config.max_frames,
            f">= {window}, the frames of the world's longest sound ({world.max_seconds} s)",
        )
    if config.learned_sigma:
        raise P.fail("model.audio_dit.learned_sigma", True, "false (the loss is the mean's MSE)")
    return config


@dataclasses.dataclass(frozen=True)
class Generation:
    """The ``generation`` and ``enrichment`` sections, checked."""

    sampling: Sampling
    num_sounds: int
    seed: int
    griffin_lim_iters: int


def generation_settings(
    cfg: DictConfig, scheduler: SchedulerConfig, dit: AudioDiTConfig
) -> Generation:
    return Generation(
        sampling=P.sampling(cfg, scheduler, dit.text_dropout, "model.audio_dit.text_dropout"),
        num_sounds=P.int(cfg, "generation.num_sounds", 1),
        seed=P.int(cfg, "generation.seed", 0),
        griffin_lim_iters=P.int(cfg, "generation.griffin_lim_iters", 1),
    )


def duration_class(seconds: float, world: SoundsConfig) -> str:
    """The world's duration class of a length: the one whose range holds it, else the
    nearest."""

    def gap(name: str) -> float:
        low, high = DURATIONS[name]
        return max(low - seconds, 0.0, seconds - high)

    return min(world.durations, key=gap)


def check_duration(value: Any, given: dict[str, str], world: SoundsConfig) -> float | None:
    """``duration`` (seconds, or None): in the world's range and agreeing with a duration
    the prompt names."""
    if value is None:
        return None
    low = min(DURATIONS[d][0] for d in world.durations)
    high = world.max_seconds
    if not is_number(value) or not low <= value <= high:
        raise ValueError(
            f"{NAME}: duration={value!r} is invalid: expected seconds in [{low}, {high}], the "
            f"lengths the model was trained on (the world's durations {list(world.durations)})"
        )
    named = given.get("duration")
    implied = duration_class(float(value), world)
    if named is not None and named != implied:
        raise ValueError(
            f"{NAME}: duration={value} s is a {implied} sound but the prompt asks for a "
            f"{named} one ({DURATIONS[named][0]}-{DURATIONS[named][1]} s): change one of them"
        )
    return float(value)


@dataclasses.dataclass(frozen=True)
class Settings:
    world: SoundsConfig
    features: LogMelConfig
    dit: AudioDiTConfig
    window: int  # L
    scheduler: SchedulerConfig
    generation: Generation
    prompt: str | None
    given: dict[str, str]
    duration: float | None
    enrich: bool
    evaluate: bool


def check_config(cfg: DictConfig) -> Settings:
    """Every setting, the prompt and the duration, before any part trains or any file is
    written.

    Raises:
        ValueError: naming the field (or the prompt) and what is allowed.
    """
    if any(compile_flags(cfg)):
        raise ValueError(f"{NAME}: pipeline.compile / train.compile are not supported here")
    world = world_config(cfg)
    features = features_config(cfg, world)
    vocab = OmegaConf.select(cfg, "parts.text.vocab_size")
    encoder = encoder_config(cfg, int(vocab) if isinstance(vocab, int) else 4096)
    dit = dit_config(cfg, world, features, encoder.dim)
    scheduler = stages.scheduler_config(P, cfg)
    generation = generation_settings(cfg, scheduler, dit)
    for stage in STAGES:
        steps = P.int(cfg, f"train.{stage}.max_steps", 1)
        P.int(cfg, f"train.{stage}.batch_size", 1)
        P.trainer(cfg, stage, steps, Path("unused"))
    P.number(cfg, "train.dit.terse_prob", 0.0, 1.0)
    stages.encoder_lr_scale(P, cfg)
    P.int(cfg, "train.dit.scale_samples", 2)
    P.number(cfg, "train.dit.ema.decay", 0.0, 0.999999)
    P.flag(cfg, "train.dit.ema.warmup")
    for key in ("prompts", "seeds", "enrich_prompts", "real_sounds"):
        P.int(cfg, f"train.eval.{key}", 1)
    P.flag(cfg, "train.eval.without_enrichment")
    prompt, given = check_prompt_setting(P, cfg, world, "audio", encoder.max_seq_len)
    duration = check_duration(OmegaConf.select(cfg, "duration"), given, world)
    if duration is not None and prompt is None:
        raise ValueError(f"{NAME}: duration={duration} needs a prompt to generate")
    if duration is not None:
        given["duration"] = duration_class(duration, world)
    return Settings(
        world=world,
        features=features,
        dit=dit,
        window=window_frames(world, features, dit.patch_size),
        scheduler=scheduler,
        generation=generation,
        prompt=prompt,
        given=given,
        duration=duration,
        enrich=P.flag(cfg, "enrich"),
        evaluate=P.flag(cfg, "pipeline.evaluate"),
    )


# ----------------------------------------------------------------------------- parts


def load_classifier(cfg: DictConfig, parts: Parts) -> AudioEncoder:
    """``train_audio``'s classifier (trained first when absent, on one process; several
    ranks require it cached)."""
    sub = part_configs(cfg)["audio"]
    parts.keys["audio"] = train_audio.cache_key(sub)
    if launched_rank().world > 1:
        found = train_audio.cached(sub)
        model, report, _, _ = cached_part(found, P, cfg, "audio", "train_audio")
    else:
        model, report, _, _ = train_audio.load_or_train(sub)
    parts.reports["audio"] = report
    return model.eval()


# ----------------------------------------------------------------------------- stage 2: DiT


class _Frames:
    """Training sounds as the DiT's input: LogMel frames padded to the window with digital
    silence, their lengths in seconds, and their captions."""

    def __init__(self, s: Settings) -> None:
        self.world, self.window = SoundsWorld(s.world), s.window
        self.logmel = LogMel(s.features)
        self.hop, self.rate = s.features.hop_length, s.world.sample_rate

    @torch.no_grad()
    def __call__(self, indices: range, split: str) -> tuple[Tensor, Tensor, Any]:
        batch = self.world.clips(indices, split)
        wave = F.pad(batch.waveform, (0, self.window * self.hop - batch.waveform.shape[-1]))
        features = self.logmel(wave, batch.lengths)[..., : self.window]  # (B, M, L)
        return features, batch.lengths.float() / self.rate, batch


def mel_scale(frames: _Frames, n: int) -> MelScale:
    """Mean and std of the padded frames of ``n`` training sounds."""
    chunks = [frames(range(i, min(n, i + 256)), "train")[0] for i in range(0, n, 256)]
    flat = torch.cat(chunks).flatten()
    return MelScale(float(flat.mean()), float(flat.std()))


@torch.no_grad()
def denoising_loss(
    model: TextToAudio, frames: _Frames, scale: MelScale, diffusion: Diffusion,
    tokenizer: Tokenizer, n: int,
) -> float:  # fmt: skip
    """The diffusion loss on ``n`` held-out sounds with their captions, at fixed timesteps
    and noise: the same numbers before and after training, so the two compare."""
    features, seconds, batch = frames(range(n), "val")
    ids, mask = encode_texts(tokenizer, list(batch.captions), model.encoder.config.max_seq_len)
    was = model.training
    model.eval()
    cond = model.condition(ids, mask) | model.timing(seconds)
    loss = diffusion.loss(
        model.dit, scale.normalize(features), cond, generator=torch.Generator().manual_seed(0)
    )
    model.train(was)
    return float(loss)


def load_or_train_dit(cfg: DictConfig, s: Settings, parts: Parts) -> Stage:
    """Stage 2: the text encoder and the AudioDiT (EMA weights); the report holds the
    frames' scale."""
    encoder_cfg = encoder_config(cfg, parts.tokenizer.vocab_size)
    dit_cfg = dit_config(cfg, s.world, s.features, encoder_cfg.dim)
    train = section(cfg, "train.dit", NAME)
    spec = {
        "text": parts.keys["text"],
        "encoder": encoder_cfg.to_dict(),
        "model": dit_cfg.to_dict(),
        "features": s.features.to_dict(),
        "scheduler": s.scheduler.to_dict(),
        "world": s.world.to_dict(),
        "train": {k: v for k, v in train.items() if k != "encoder"},
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    path = P.entry(cfg, "dit", spec)
    if P.cached(path, cfg):  # every rank loads it
        print(f"{NAME}: loading the cached text encoder and AudioDiT from {path}", flush=True)
        model = TextToAudio(*P.load_conditioned(path, AudioDiT))
        return Stage(model.eval(), P.load_report(path), path.name, True)
    print(f"{NAME}: stage 2/2, dit: the text encoder and the AudioDiT learn the sounds", flush=True)
    t0 = time.perf_counter()
    frames, diffusion = _Frames(s), Diffusion(s.scheduler)
    scale = mel_scale(frames, int(train["scale_samples"]))
    torch.manual_seed(int(cfg.pipeline.seed))
    model = TextToAudio(TextEncoder(encoder_cfg), AudioDiT(dit_cfg))
    tokenizer, b = parts.tokenizer, int(train["batch_size"])
    terse_prob, limit = float(train["terse_prob"]), encoder_cfg.max_seq_len

    def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
        first = P.first(step, micro, cfg, "dit")
        features, seconds, batch = frames(range(first, first + b), "train")
        ids, mask = encode_texts(
            tokenizer, terse_texts(batch, first, terse_prob, "audio", "audio-dit"), limit
        )
        return {"x": scale.normalize(features), "seconds": seconds, "ids": ids, "mask": mask}

    def loss(o: Objective, bt: dict[str, Tensor]) -> Tensor:
        t2a = o.model
        cond = t2a.condition(bt["ids"], bt["mask"]) | t2a.timing(bt["seconds"])
        return diffusion_loss(diffusion, t2a.dit, bt["x"], cond)

    prep = time.perf_counter() - t0
    main = launched_rank().is_main  # (rank 0 scores the stage)
    before = denoising_loss(model, frames, scale, diffusion, tokenizer, 64) if main else None
    # with the EMA: the averaged weights are the ones sampled and saved
    scales = {"model.encoder": stages.encoder_lr_scale(P, cfg)}
    fitted = P.fit(
        cfg, "dit", Objective(loss, model=model), batch_fn, ema=train["ema"], lr_scales=scales
    )

    def fresh() -> TextToAudio:
        return TextToAudio(TextEncoder(encoder_cfg), AudioDiT(dit_cfg))

    model = fitted.part(cfg, "model", fresh, everywhere=False)
    seconds, rows = fitted.seconds, fitted.rows
    if model is None:  # a rank other than 0: rank 0 writes the entry
        return Stage(None, {"seconds": seconds + prep}, path.name, False)
    model.eval()
    report = {
        "seconds": seconds + prep,
        "denoising_loss_before": before,
        "denoising_loss_after": denoising_loss(model, frames, scale, diffusion, tokenizer, 64),
        "mel_mean": scale.mean,
        "mel_std": scale.std,
        "window_frames": s.window,
        "losses": [r["loss"] for r in rows],
    }
    P.save_conditioned(path, model, report)
    return Stage(model, report, path.name, False)


# ----------------------------------------------------------------------------- sounds


def draw_seconds(
    names: list[dict[str, str]], world: SoundsConfig, rng: random.Random
) -> list[float]:
    """A length for each sound, uniform in the range of the duration its caption names (a
    text that names none, an un-enriched prompt: one of the world's durations at random),
    to the hundredth of a second."""
    out = []
    for n in names:
        low, high = DURATIONS[n.get("duration") or rng.choice(world.durations)]
        out.append(round(rng.uniform(low, high), 2))
    return out


@dataclasses.dataclass
class Made:
    """Sounds made from texts: the features of the whole window, where each falls silent,
    the requested lengths, the waveforms cut to them, and the classifier's reading."""

    features: Tensor  # (B, M, L)
    ends: Tensor  # (B,) seconds where each sound falls silent
    seconds: list[float]  # requested
    waveforms: list[Tensor]
    classes: Tensor  # (B,) pitch x timbre as the classifier reads it
    confidence: Tensor  # (B,)


class Maker:
    """Makes sounds with the trained models (one vocoder, one LogMel)."""

    def __init__(self, s: Settings, model: TextToAudio, scale: MelScale, tokenizer: Tokenizer):
        self.s, self.model, self.scale, self.tokenizer = s, model, scale, tokenizer
        self.diffusion = Diffusion(s.scheduler)
        self.logmel = LogMel(s.features)
        self.vocoder = GriffinLimVocoder(s.features, n_iter=s.generation.griffin_lim_iters)

    def __call__(
        self,
        texts: list[str],
        seconds: list[float],
        seed: int,
        classifier: nn.Module | None,
        *,
        progress: bool = False,
        chunk: int = 64,
    ) -> Made:
        hop, rate = self.s.features.hop_length, self.s.world.sample_rate
        parts = []
        for start in range(0, len(texts), chunk):
            parts.append(
                sample_sounds(
                    self.model, self.diffusion, self.tokenizer, texts[start : start + chunk],
                    torch.tensor(seconds[start : start + chunk]), self.s.window, self.scale,
                    self.s.generation.sampling, torch.Generator().manual_seed(seed + start),
                    progress=progress,
                )
            )  # fmt: skip
        features = torch.cat(parts)
        ends = sound_ends(features).float() * hop / rate
        frames = torch.tensor([min(self.s.window, math.ceil(x * rate / hop)) for x in seconds])
        waves = [
            w[: round(x * rate)]
            for w, x in zip(vocode(self.vocoder, features, frames), seconds, strict=True)
        ]
        if classifier is None:
            classes = confidence = torch.full((len(texts),), -1)
        else:
            classes, confidence = read_sounds(classifier, self.logmel, waves)
        return Made(features, ends, seconds, waves, classes, confidence)


def class_names(world: SoundsConfig, k: int) -> dict[str, str]:
    """The pitch and timbre of class ``k``."""
    timbres = len(world.timbres)
    return {"pitch": world.pitches[k // timbres], "timbre": world.timbres[k % timbres]}


def _in_length(end: float, want: float) -> bool:
    return abs(end - want) <= LENGTH_TOLERANCE * want


# ----------------------------------------------------------------------------- scoring


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def evaluate(
    s: Settings,
    settings: dict[str, Any],
    tokenizer: Tokenizer,
    lm: MoELanguageModel,
    maker: Maker,
    classifier: nn.Module,
) -> dict[str, Any]:
    """The held-out scores (module docstring)."""
    world, sampling = s.world, s.generation.sampling
    values = en.world_values(world, "audio")
    t0 = time.perf_counter()
    enrichment = enrichment_scores(
        world, "audio", int(settings["enrich_prompts"]), lm, tokenizer, sampling
    )
    k = int(settings["seeds"])
    prompts = [
        en.example(world, "val", i, always=("pitch", "timbre"), phrasing="train", medium="audio")
        for i in range(int(settings["prompts"]))
    ]
    rows = [p for p in prompts for _ in range(k)]
    outs = enrich_all(
        lm, tokenizer, [p.prompt for p in rows], [p.kept for p in rows], world, sampling,
        torch.Generator().manual_seed(1), "audio",
    )  # fmt: skip
    seconds = draw_seconds([o.names for o in outs], world, random.Random(2))
    made = maker([o.used for o in outs], seconds, 2, classifier)
    read = [class_names(world, int(c)) for c in made.classes]
    hits = [r == {"pitch": p.kept["pitch"], "timbre": p.kept["timbre"]} for p, r in
            zip(rows, read, strict=True)]  # fmt: skip
    lengths = [_in_length(float(e), x) for e, x in zip(made.ends, seconds, strict=True)]
    scores: dict[str, Any] = {
        "adherence": {
            "accuracy": _share(hits),
            "pitch": _share(
                [r["pitch"] == p.kept["pitch"] for p, r in zip(rows, read, strict=True)]
            ),
            "timbre": _share(
                [r["timbre"] == p.kept["timbre"] for p, r in zip(rows, read, strict=True)]
            ),
            "chance": 1 / world.num_classes,
            "sounds": len(rows),
            "prompts": len(prompts),
            "goal": ADHERENCE_GOAL,
        },
        "length": {
            "within": _share(lengths),
            "tolerance": LENGTH_TOLERANCE,
            "goal": LENGTH_GOAL,
            "mean_abs_error_s": sum(
                abs(float(e) - x) for e, x in zip(made.ends, seconds, strict=True)
            )
            / len(seconds),
        },
        "enrichment": enrichment,
    }
    # Diversity: what each prompt leaves open, over its k sounds (captions; the classifier
    # reads pitch and timbre).
    spread: dict[str, list[float]] = {"captions": [], "sounds": [], "uniform": []}
    for j, p in enumerate(prompts):
        block = range(j * k, (j + 1) * k)
        for a in (a for a in en.attributes("audio") if a not in p.kept):
            spread["captions"].append(len({outs[i].names.get(a) for i in block} - {None}))
            spread["uniform"].append(len(values[a]) * (1 - (1 - 1 / len(values[a])) ** k))
    scores["diversity"] = {m: sum(v) / len(v) if v else None for m, v in spread.items()}
    scores["diversity"] |= {"seeds": k, "open": len(spread["uniform"])}
    if settings["without_enrichment"]:
        plain = maker([p.prompt for p in rows], seconds, 2, classifier)
        read = [class_names(world, int(c)) for c in plain.classes]
        scores["plain"] = {
            "accuracy": _share(
                [
                    r == {"pitch": p.kept["pitch"], "timbre": p.kept["timbre"]}
                    for p, r in zip(rows, read, strict=True)
                ]
            ),
            "chance": 1 / world.num_classes,
        }
    # The length reading on real held-out sounds.
    real = _Frames(s)
    features, true_seconds, _ = real(range(int(settings["real_sounds"])), "val")
    ends = sound_ends(features).float() * s.features.hop_length / world.sample_rate
    scores["real_lengths"] = _share(
        [_in_length(float(e), float(x)) for e, x in zip(ends, true_seconds, strict=True)]
    )
    scores["seconds"] = time.perf_counter() - t0
    return scores


def print_table(scores: dict[str, Any], seconds: dict[str, float], audio: dict[str, Any]) -> None:
    a, length, e, d = (scores[k] for k in ("adherence", "length", "enrichment", "diversity"))
    print(f"{NAME} results:")
    print(
        f"  pitch x timbre adherence {pct(a['accuracy'])} vs chance {a['chance']:5.1%} "
        f"({a['sounds']} sounds of {a['prompts']} held-out prompts, read by the audio "
        f"classifier after the vocoder){goal_note(a['accuracy'], a['goal'])}; pitch "
        f"{pct(a['pitch']).strip()}, timbre {pct(a['timbre']).strip()}"
    )
    print(
        f"  length within {length['tolerance']:.0%}     {pct(length['within'])} of the sounds "
        f"fall silent within 10 % of the requested length (mean error "
        f"{length['mean_abs_error_s']:.2f} s; read right on {pct(scores['real_lengths']).strip()} "
        f"of real held-out sounds){goal_note(length['within'], length['goal'])}"
    )
    if "plain" in scores:
        p = scores["plain"]
        print(
            f"  without enrichment       {pct(p['accuracy'])} vs chance {p['chance']:5.1%} "
            "(pitch x timbre, the same prompts straight to the text encoder)"
        )
    seen, other = e["phrasings_seen"], e["phrasings_held_out"]
    print(
        f"  enrichment keeps prompts {pct(seen['accuracy'])} vs chance {seen['chance']:5.1%} "
        f"({seen['prompts']} held-out sounds, up to {e['tries']} samples each; "
        f"{pct(seen['first_try']).strip()} at the first){goal_note(seen['accuracy'], e['goal'])}; "
        f"in held-out phrasings {pct(other['accuracy']).strip()}"
    )
    print(
        f"  diversity: an attribute the prompt leaves open takes {d['captions'] or 0:.2f} "
        f"distinct values in the captions over {d['seeds']} seeds (uniform draws "
        f"{d['uniform'] or 0:.2f}, a fixed choice 1; {d['open']} open attributes)"
    )
    total = sum(seconds.values())
    print(
        "  training: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + f" = {total:.0f} s, goal < {TIME_GOAL:.0f} s "
        + ("met" if total < TIME_GOAL else "NOT met")
        + f"; the classifier reads pitch x timbre on {pct(audio.get('accuracy')).strip()} of "
        f"real held-out sounds, {pct(audio.get('vocoder_accuracy')).strip()} after the vocoder"
    )


# ----------------------------------------------------------------------------- generation


def generate_sounds(
    cfg: DictConfig,
    s: Settings,
    parts: Parts,
    lm: MoELanguageModel | None,
    maker: Maker,
    classifier: nn.Module | None,
) -> dict[str, Any]:
    """``generation.num_sounds`` sounds of the prompt, written and printed."""
    assert s.prompt is not None
    gen, prompt, n = s.generation, s.prompt, s.generation.num_sounds
    outs = enriched_copies(
        lm if s.enrich else None, parts.tokenizer, prompt, s.given, n, s.world, gen.sampling,
        gen.seed, "audio",
    )  # fmt: skip
    if s.duration is not None:
        seconds = [s.duration] * n
    else:
        seconds = draw_seconds([o.names for o in outs], s.world, random.Random(gen.seed))
    made = maker([o.used for o in outs], seconds, gen.seed, classifier,
                 progress=bool(cfg.pipeline.progress))  # fmt: skip
    folder = Path(str(cfg.pipeline.out_dir)) / f"{slug(prompt)}-seed{gen.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    print(prompt_line(cfg, prompt, s.enrich, s.world, "audio"))
    for i, o in enumerate(outs):
        file = folder / f"{i:02d}.wav"
        save_audio(file, made.waveforms[i], s.world.sample_rate)
        line = enrichment_line("sound", i, o, s.enrich)
        line += f", {made.seconds[i]:.2f} s (falls silent at {float(made.ends[i]):.2f} s)"
        read = None
        if classifier is not None:
            read = class_names(s.world, int(made.classes[i]))
            line += (
                f" [read back: {read['pitch']} {read['timbre']}, p={float(made.confidence[i]):.2f}]"
            )
        print(line)
        records.append(
            {"prompt": prompt, "enriched": o.written, "used": o.used, "fallback": o.reason,
             "seconds": made.seconds[i], "silent_at": float(made.ends[i]), "classifier": read,
             "file": str(file)}
        )  # fmt: skip
    (folder / "prompts.json").write_text(json.dumps(records, indent=2))
    print(f"wrote {n} sound(s) ({s.world.sample_rate} Hz WAV) to {folder}")
    return {"folder": str(folder), "files": [r["file"] for r in records], "records": records}


# ----------------------------------------------------------------------------- run


def stage_models(cfg: DictConfig, s: Settings) -> list[nn.Module]:
    """The models the stages train (the untied LM, the text encoder and the AudioDiT), for
    ``train.parallel``'s checks on the meta device."""
    text = part_configs(cfg)["text"]
    vocab = int(text.train.vocab_size)
    lm = text_generation.model_config(text, vocab).replace(tie_embeddings=False)
    dit = dit_config(cfg, s.world, s.features, encoder_config(cfg, vocab).dim)
    return [
        MoELanguageModel(lm),
        TextToAudio(TextEncoder(encoder_config(cfg, vocab)), AudioDiT(dit)),
    ]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, load the parts, train (or load) the stages (on every rank of a
    ``train.parallel`` run), then score and generate (on rank 0)."""
    s = check_config(cfg)  # a bad setting, prompt or duration fails here, before any work
    trained = [st for st in STAGES if st != "enrich" or s.enrich or s.evaluate]
    batches = [f"train.{stage}.batch_size" for stage in trained]
    with P.parallel_training(cfg, batches, lambda: stage_models(cfg, s)) as ranks:
        parts = load_text(P, cfg, part_configs(cfg)["text"])
        limit = encoder_config(cfg, parts.tokenizer.vocab_size).max_seq_len
        if s.prompt is not None:
            check_prompt_tokens(P, s.prompt, parts.tokenizer, limit)
        wanted = s.evaluate or s.prompt is not None
        classifier = load_classifier(cfg, parts) if wanted else None
        done = {}
        if s.enrich or s.evaluate:
            done["enrich"] = load_or_train_enricher(P, cfg, parts, s.world, "audio", "1/2")
        done["dit"] = load_or_train_dit(cfg, s, parts)
    if not ranks.is_main:  # the other ranks have trained: rank 0 scores and generates
        return {}
    model, report = done["dit"].model, done["dit"].report
    maker = Maker(s, model, MelScale(report["mel_mean"], report["mel_std"]), parts.tokenizer)
    lm = done["enrich"].model if "enrich" in done else None
    result = stage_results(done, parts)
    stages = result["stages"]  # as recorded when each stage trained
    if s.evaluate:
        assert lm is not None and classifier is not None
        spec = score_spec(
            P, cfg, result, s.generation.sampling, griffin_lim_iters=s.generation.griffin_lim_iters
        )
        settings = section(cfg, "train.eval", NAME)
        scores, result["scores_cached"] = load_or_score(
            P, cfg, spec, lambda: evaluate(s, settings, parts.tokenizer, lm, maker, classifier)
        )
        result["scores"] = scores
        print_table(scores, {k: r["seconds"] for k, r in stages.items()}, parts.reports["audio"])
    if s.prompt is not None:
        result["generated"] = generate_sounds(cfg, s, parts, lm, maker, classifier)
    return result
