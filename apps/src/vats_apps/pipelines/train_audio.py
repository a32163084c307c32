"""``vats pipeline=train_audio``: the audio encoder learns the sounds world, on CPU.

A fresh :class:`~vats_audio.AudioEncoder` is trained with the vats-core trainer to tell
``pitch x timbre`` (16 classes with the default world) from log-mel features of tones of
mixed lengths: every batch holds short (0.5-1.25 s) and long (2-3 s) clips, right-padded
to the batch's longest, with their lengths passed to :class:`~vats_audio.LogMel` and to
the encoder, so padding changes nothing (:mod:`vats_audio.encoder`). Step ``s`` draws
train clips ``s·B .. s·B + B - 1`` of :class:`~vats_apps.data.SoundsWorld`, so no clip
repeats, and the score is taken on ``val`` clips, which the ``train`` split never makes.

Two figures come out, against chance (1/K):

* held-out accuracy (goal >= 95 %), on the first ``train.eval_size`` ``val`` clips;
* the vocoder round trip: the first ``train.vocoder.eval_size`` held-out clips go
  ``LogMel -> GriffinLimVocoder -> waveform -> LogMel`` and are classified again
  (goal >= 90 %): what a generated spectrogram keeps once it is turned into sound. Each
  clip is vocoded on its own frames. The score is a deterministic function of the weights,
  so it is stored with them and a cached run with the same ``train.vocoder`` settings
  reports it without vocoding again (other settings score anew).

Then, when ``pipeline.classify`` names audio files (a path or a list), each is read with
:func:`vats_audio.load` (resampled to the world's rate, downmixed to mono) and its three
likeliest classes are printed: a way to try the model on your own sounds. Those files are
read and checked before anything trains. ``pipeline.examples`` held-out clips are
written to ``<out_dir>/examples`` as WAV files, each beside its vocoded version.

Sections: ``model.audio`` is a ``preset`` of :mod:`vats_audio.presets` plus
AudioEncoderConfig overrides (``n_mels``, ``num_classes``, the rate and the hop come from
the features and the world); ``train`` holds the world (``data``: SoundsConfig fields),
the features (``features``: LogMelConfig fields but the rate), the step count, batch
size, held-out size, ``vocoder`` (``n_iter``, ``eval_size``) and ``trainer``
(TrainerConfig fields).

Each trained model and its report are cached under ``pipeline.cache_dir`` like the
vision models (:mod:`vats_apps.pipelines.cache`): keyed by the resolved model, feature
and world configs, the training settings, the seed and the code; a later run with the
same settings loads the weights. The held-out scores are a deterministic function of the
weights too, so they are kept in the entry's report with the ``train.eval_size`` they were
taken on (its ``eval``), and a cached run prints them without scoring again; one with
another ``train.eval_size``, or whose stored scores are missing or malformed, scores anew
and rewrites the report. ``train.compile`` runs the training steps through
``torch.compile`` (batches then padded to the world's longest clip, so one graph serves
every step); ``pipeline.compile`` scores on the model compiled with inductor's freezing
(when the model is scored: not on a cached run that reuses its scores).

``train.parallel`` trains on the ranks ``torchrun`` starts (``uv run torchrun
--nproc-per-node 2 -m vats_apps pipeline=train_audio train.parallel=fsdp``), as
:mod:`vats_apps.pipelines.distributed` describes: ``train.batch_size`` stays the global
batch (each rank keeps its rows of it, padded to the global batch's longest clip, which
changes nothing), and rank 0 alone scores, classifies, prints and writes.

Shapes: B batch, S samples, M mel bins, T feature frames, K classes.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.data import SoundsConfig, SoundsWorld
from vats_apps.pipelines.cache import (
    REPORT_NAME,
    entry_key,
    reusable,
    scores_reusable,
    staged_entry,
    write_report,
)
from vats_apps.pipelines.compiling import check_compile_switches, compile_flags, trainer_fields
from vats_apps.pipelines.distributed import (
    Ranks,
    gathered_model,
    launched_rank,
    parallel_key,
    parallel_model,
    parallel_training,
)
from vats_apps.pipelines.sections import preset_fields, section
from vats_audio import AudioEncoder, AudioEncoderConfig, GriffinLimVocoder, LogMel, LogMelConfig
from vats_audio import load as load_audio
from vats_audio import save as save_audio
from vats_audio.presets import audio_preset
from vats_core.config import is_int
from vats_core.inference import compile_frozen
from vats_core.parallel import ParallelConfig
from vats_core.training import Trainer, TrainerConfig

GOAL = 0.95  # the held-out pitch x timbre accuracy goal
VOCODER_GOAL = 0.90  # ... and after the vocoder round trip
EVAL_CHUNK = 128  # held-out clips scored per forward
SCORES = ("accuracy", "pitch_accuracy", "timbre_accuracy")  # what held_out_scores returns
CACHE_FORMAT = 1  # bump when what is cached changes meaning
# The packages whose code trains (and whose versions and source key) the cached model.
CODE = ("vats_core", "vats_audio", "vats_apps")
NAME = "train_audio"


class Clips(NamedTuple):
    """A batch of clips as the encoder takes them."""

    features: Tensor  # (B, M, T) log-mel, padded frames hold digital silence
    lengths: Tensor  # (B,) real frames of each clip
    target: Tensor  # (B,) pitch x timbre class


def world_config(cfg: DictConfig) -> SoundsConfig:
    """``train.data`` as the SoundsConfig."""
    return SoundsConfig(**section(cfg, "train.data", NAME))


def features_config(cfg: DictConfig, world: SoundsConfig) -> LogMelConfig:
    """``train.features`` (LogMelConfig fields) at the world's sample rate."""
    node = OmegaConf.select(cfg, "train.features", default=None)
    fields = section(cfg, "train.features", NAME) if node is not None else {}
    if "sample_rate" in fields:
        raise ValueError(
            "train.features.sample_rate is not read: the features take the world's rate, "
            "train.data.sample_rate"
        )
    return LogMelConfig(**fields, sample_rate=world.sample_rate)


def model_config(
    cfg: DictConfig, world: SoundsConfig, features: LogMelConfig
) -> AudioEncoderConfig:
    """``model.audio`` for this world: mel bins, classes, rate and hop come from the data."""
    preset, fields = preset_fields(cfg, "model.audio", NAME)
    for key in ("n_mels", "num_classes", "sample_rate", "hop_length"):
        if key in fields:
            raise ValueError(
                f"model.audio.{key} is set by the data (train.features / train.data), not here"
            )
    fields |= dict(
        n_mels=features.n_mels,
        num_classes=world.num_classes,
        sample_rate=features.sample_rate,
        hop_length=features.hop_length,
    )
    return audio_preset(preset, **fields)


def max_frames(world: SoundsConfig, features: LogMelConfig) -> int:
    """Feature frames of the world's longest clip."""
    return round(world.max_seconds * world.sample_rate) // features.hop_length


def make_drawer(world: SoundsWorld, logmel: LogMel) -> Callable[[range, str, int | None], Clips]:
    """``draw(indices, split, frames)``: the clips' features, padded to the batch's longest
    clip, or to ``frames`` when given (one shape for every batch)."""
    hop = logmel.config.hop_length

    def draw(indices: range, split: str, frames: int | None = None) -> Clips:
        batch = world.clips(indices, split)
        waveform = batch.waveform
        if frames is not None:  # zeros past every clip's end: frames of digital silence
            waveform = F.pad(waveform, (0, max(0, frames * hop - waveform.shape[-1])))
        with torch.no_grad():
            features = logmel(waveform, batch.lengths)
        return Clips(features, logmel.frame_lengths(batch.lengths), batch.target)

    return draw


def _loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    logits = model(batch["x"], batch["lengths"])  # (B, K)
    acc = (logits.argmax(-1) == batch["y"]).float().mean()
    return F.cross_entropy(logits, batch["y"]), {"acc": acc}


@torch.no_grad()
def predict(model: nn.Module, clips: Clips, scorer: Callable | None = None) -> Tensor:
    """(B,) predicted classes of ``clips``."""
    return (scorer or model)(clips.features, clips.lengths).argmax(-1)


@torch.no_grad()
def held_out_scores(
    model: AudioEncoder,
    draw: Callable[[range, str, int | None], Clips],
    world: SoundsConfig,
    n: int,
    frames: int,
    *,
    compile: bool = False,
) -> dict[str, float]:
    """Accuracy on val clips ``0 .. n - 1`` (never drawn by training), and of the pitch
    and the timbre alone (read off the predicted class).

    Args:
        frames: every chunk is padded to this many frames (one shape for the compiled
            scorer).
        compile: score on the model compiled with inductor's freezing.
    """
    was_training = model.training
    model.eval()
    timbres = len(world.timbres)
    try:
        scorer = compile_frozen(model) if compile else model
        right = torch.zeros(3)
        for start in range(0, n, EVAL_CHUNK):
            clips = draw(range(start, min(n, start + EVAL_CHUNK)), "val", frames)
            pred, y = predict(model, clips, scorer), clips.target
            right += torch.stack(
                [
                    (pred == y).sum(),
                    (pred // timbres == y // timbres).sum(),
                    (pred % timbres == y % timbres).sum(),
                ]
            ).float()
    finally:
        model.train(was_training)
    acc, pitch, timbre = (right / n).tolist()
    return {"accuracy": acc, "pitch_accuracy": pitch, "timbre_accuracy": timbre}


@torch.no_grad()
def vocoder_accuracy(
    model: AudioEncoder,
    draw: Callable[[range, str, int | None], Clips],
    logmel: LogMel,
    vocoder: GriffinLimVocoder,
    n: int,
) -> float:
    """Accuracy on val clips ``0 .. n - 1`` after ``LogMel -> vocoder -> LogMel``.

    Each clip is vocoded on its own frames (Griffin-Lim over a batch's padding would cost
    as much as over sound), then the waveforms are batched again for LogMel and the model.
    """
    was_training = model.training
    model.eval()
    hop = logmel.config.hop_length
    correct = 0
    try:
        for start in range(0, n, EVAL_CHUNK):
            clips = draw(range(start, min(n, start + EVAL_CHUNK)), "val", None)
            frames = clips.lengths.tolist()
            waves = [vocoder(clips.features[i, :, :t]) for i, t in enumerate(frames)]
            waveform = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (B, S)
            again = Clips(logmel(waveform, clips.lengths * hop), clips.lengths, clips.target)
            correct += int((predict(model, again) == clips.target).sum())
    finally:
        model.train(was_training)
    return correct / n


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the held-out scores depend on besides the weights (stored with them as the
    report's ``eval``)."""
    return {"eval_size": _count(cfg, "train.eval_size", minimum=1)}


def _vocoder_settings(cfg: DictConfig) -> dict[str, int]:
    """What the round trip's score depends on besides the weights (the report's
    ``vocoder_scored``)."""
    return {
        "n_iter": _count(cfg, "train.vocoder.n_iter", minimum=1),
        "eval_size": _count(cfg, "train.vocoder.eval_size", minimum=0),
    }


def cache_key(cfg: DictConfig) -> str:
    """Hash of every setting that changes the trained weights, and of the code."""
    world = world_config(cfg)
    features = features_config(cfg, world)
    train = section(cfg, "train", NAME)
    spec = {
        "format": CACHE_FORMAT,
        "model": model_config(cfg, world, features).to_dict(),
        "world": world.to_dict(),
        "features": features.to_dict(),
        "train": {
            k: v
            for k, v in train.items()
            if k not in ("eval_size", "vocoder", "compile", "parallel")
        },
        "compile": compile_flags(cfg).training,
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    return entry_key(spec, CODE)


def _files(cfg: DictConfig) -> list[Path]:
    """``pipeline.classify`` as a list of paths (None: none)."""
    value = OmegaConf.select(cfg, "pipeline.classify", default=None)
    if value is None:
        return []
    if isinstance(value, str):
        return [Path(value).expanduser()]
    items = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(
            f"pipeline.classify={value!r} is invalid: expected an audio file path or a list"
        )
    return [Path(v).expanduser() for v in items]


def _count(cfg: DictConfig, key: str, *, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    if not is_int(value) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: expected an int >= {minimum}")
    return int(value)


def classify_files(
    model: AudioEncoder, logmel: LogMel, names: list[str], audio: dict[Path, Tensor]
) -> list[dict[str, Any]]:
    """The three likeliest classes of each (already loaded, mono) waveform."""
    model.eval()
    out = []
    with torch.no_grad():
        for path, waveform in audio.items():
            features = logmel(waveform[0])  # (1, M, T)
            probs = model(features).softmax(-1)[0]
            top = probs.topk(min(3, probs.numel()))
            guesses = [(names[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
            out.append(
                {
                    "file": str(path),
                    "seconds": waveform.shape[-1] / logmel.config.sample_rate,
                    "top": guesses,
                }
            )
    return out


def _write_examples(
    out_dir: Path,
    world: SoundsWorld,
    logmel: LogMel,
    vocoder: GriffinLimVocoder,
    n: int,
) -> list[Path]:
    """The first ``n`` held-out clips as WAV files, each beside its vocoded version."""
    if n == 0:
        return []
    batch = world.clips(range(n), "val")
    with torch.no_grad():
        vocoded = vocoder(logmel(batch.waveform, batch.lengths))
    frames = logmel.frame_lengths(batch.lengths)
    hop, sr = logmel.config.hop_length, world.config.sample_rate
    folder = out_dir / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        stem = f"{i:02d}-" + re.sub(r"[^a-z0-9]+", "-", batch.captions[i]).strip("-")
        length = int(batch.lengths[i])
        save_audio(folder / f"{stem}.wav", batch.waveform[i, :length], sr)
        save_audio(folder / f"{stem}-vocoded.wav", vocoded[i, : int(frames[i]) * hop], sr)
        written += [folder / f"{stem}.wav", folder / f"{stem}-vocoded.wav"]
    return written


def _parallel_training(
    cfg: DictConfig,
) -> contextlib.AbstractContextManager[tuple[ParallelConfig, Ranks]]:
    """:func:`~vats_apps.pipelines.distributed.parallel_training` for the encoder: its
    batch and model checked against ``train.parallel`` and the world."""
    world = world_config(cfg)
    config = model_config(cfg, world, features_config(cfg, world))
    batch = {"train.batch_size": _count(cfg, "train.batch_size", minimum=1)}
    return parallel_training(cfg, batch, lambda: [AudioEncoder(config)])


def load_or_train(cfg: DictConfig) -> tuple[AudioEncoder, dict[str, Any], bool, Path]:
    """The audio encoder: from the cache when an entry matches the config, else trained
    from scratch (under ``train.parallel``), scored on held-out clips (and after the
    vocoder round trip) and cached: what the pipelines that use the encoder as a part
    call, on one process.

    Returns:
        As :func:`load_or_train_ranks`.
    """
    with _parallel_training(cfg) as (parallel, _):
        loaded = load_or_train_ranks(cfg, parallel)
    if loaded is None:
        raise ValueError(
            "the audio encoder is trained under train.parallel by pipeline=train_audio "
            "alone: run it (under torchrun) first, then this pipeline on one process"
        )
    return loaded


def _entry_path(cfg: DictConfig) -> Path:
    """The encoder's cache entry for ``cfg`` (written or not)."""
    return Path(str(cfg.pipeline.cache_dir)).expanduser() / NAME / cache_key(cfg)


def cached(cfg: DictConfig) -> tuple[AudioEncoder, dict[str, Any], bool, Path] | None:
    """The encoder from its cache entry for ``cfg``, on the rank that calls it (None when
    there is none, or with ``pipeline.retrain``).

    Returns:
        As :func:`load_or_train_ranks`.
    """
    path = _entry_path(cfg)
    if not reusable(path, cfg.pipeline.retrain):
        return None
    print(f"{NAME}: loading the cached model from {path}", flush=True)
    model = AudioEncoder.from_pretrained(path / "model")
    return model, json.loads((path / REPORT_NAME).read_text()), True, path


def load_or_train_ranks(
    cfg: DictConfig, parallel: ParallelConfig
) -> tuple[AudioEncoder, dict[str, Any], bool, Path] | None:
    """:func:`load_or_train` on every rank of a ``train.parallel`` run, inside its
    :func:`~vats_apps.pipelines.distributed.parallel_training`: rank 0 gets the model, the
    other ranks None (once they have trained it).

    Returns:
        ``(model, report, cached, path)``: the model in eval mode; the report written when
        the weights were trained (with that run's held-out scores); whether it came from the
        cache; the cache entry.
    """
    flags = check_compile_switches(cfg)
    world_cfg = world_config(cfg)
    features = features_config(cfg, world_cfg)
    config = model_config(cfg, world_cfg, features)
    train_section = section(cfg, "train", NAME)
    batch_size = _count(cfg, "train.batch_size", minimum=1)
    steps = _count(cfg, "train.max_steps", minimum=1)
    eval_size = _count(cfg, "train.eval_size", minimum=1)
    vocoder_size = _count(cfg, "train.vocoder.eval_size", minimum=0)
    n_iter = _count(cfg, "train.vocoder.n_iter", minimum=1)
    fields = trainer_fields(train_section.get("trainer", {}), "train.trainer")
    path = _entry_path(cfg)
    if reusable(path, cfg.pipeline.retrain):  # rank 0 loads it (and its stored scores)
        return cached(cfg) if launched_rank().is_main else None

    world, logmel = SoundsWorld(world_cfg), LogMel(features)
    draw = make_drawer(world, logmel)
    frames = max_frames(world_cfg, features)
    seed = int(cfg.pipeline.seed)
    torch.manual_seed(seed)
    model = AudioEncoder(config)
    fixed = frames if flags.training else None  # compiled: one shape for every step

    def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
        first = (step * fields.get("grad_accum_steps", 1) + micro) * batch_size
        clips = draw(range(first, first + batch_size), "train", fixed)
        return {"x": clips.features, "lengths": clips.lengths, "y": clips.target}

    if "warmup_steps" in fields:  # a short run keeps the warmup inside the run
        fields["warmup_steps"] = min(int(fields["warmup_steps"]), steps)
    trainer_config = TrainerConfig(
        **fields,
        max_steps=steps,
        seed=seed,
        out_dir=str(Path(str(cfg.pipeline.out_dir))),
        checkpoint_every=0,
        progress=bool(cfg.pipeline.progress),
        compile=flags.training,
    )
    parameters = sum(p.numel() for p in model.parameters())  # (before FSDP shards them)
    trained = parallel_model(model, parallel)  # the trainer's model (model itself on one process)
    start = time.perf_counter()
    Trainer(trained, trainer_config, data=batch_fn, loss_fn=_loss_fn).fit()
    seconds = time.perf_counter() - start
    gathered = gathered_model(trained, model, parallel)  # every rank takes part
    if gathered is None:  # a rank other than 0: rank 0 scores and caches
        return None
    model = gathered  # type: ignore[assignment]
    report = {
        "task": "audio",
        "chance": 1.0 / world_cfg.num_classes,
        "classes": world_cfg.num_classes,
        "steps": steps,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "goal": GOAL,
        "vocoder_goal": VOCODER_GOAL,
    }
    # Both scores are deterministic given the weights: kept with them, reused when cached.
    report |= held_out_scores(model, draw, world_cfg, eval_size, frames, compile=flags.evaluation)
    report["eval"] = eval_settings(cfg)
    if vocoder_size:
        vocoder = GriffinLimVocoder(features, n_iter=n_iter)
        report["vocoder_accuracy"] = vocoder_accuracy(model, draw, logmel, vocoder, vocoder_size)
        report["vocoder_scored"] = _vocoder_settings(cfg)
    with staged_entry(path) as staging:
        model.save_pretrained(staging / "model")
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return model.eval(), report, False, path


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Train the audio encoder from scratch (or load it from the cache) and score it; on
    every rank of a ``train.parallel`` run (None on ranks but 0).

    Returns:
        ``{"task", "accuracy", "pitch_accuracy", "timbre_accuracy", "vocoder_accuracy",
        "vocoder_clips", "goal", "vocoder_goal", "chance", "classes", "steps", "seconds",
        "threads", "parameters", "eval", "cached", "cache", "classified", "examples"}``;
        ``seconds`` and ``threads`` are those of the run that trained the weights, the scores
        those stored with them (taken again when they were taken under other settings, or
        are missing or malformed).
    """
    # Everything a bad config or a bad file can break is checked before any work.
    flags = check_compile_switches(cfg)
    world_cfg = world_config(cfg)
    features = features_config(cfg, world_cfg)
    model_config(cfg, world_cfg, features)
    section(cfg, "train", NAME)
    for key in ("train.batch_size", "train.max_steps"):  # read by load_or_train
        _count(cfg, key, minimum=1)
    eval_size = _count(cfg, "train.eval_size", minimum=1)
    vocoder_size = _count(cfg, "train.vocoder.eval_size", minimum=0)
    n_examples = _count(cfg, "pipeline.examples", minimum=0)
    n_iter = _count(cfg, "train.vocoder.n_iter", minimum=1)
    trainer_fields(section(cfg, "train", NAME).get("trainer", {}), "train.trainer")
    files = {path: load_audio(path, sample_rate=world_cfg.sample_rate)[0] for path in _files(cfg)}

    with _parallel_training(cfg) as (parallel, _):  # and train.parallel, against the world
        loaded = load_or_train_ranks(cfg, parallel)
    if loaded is None:  # a rank other than 0: rank 0 reports
        return None
    model, report, cached, path = loaded
    world, logmel = SoundsWorld(world_cfg), LogMel(features)
    draw = make_drawer(world, logmel)
    vocoder = GriffinLimVocoder(features, n_iter=n_iter)
    if cached:  # the scores stored with the weights, taken anew where they cannot serve
        rescored = False
        stored = [report.get(k) for k in SCORES]
        if not scores_reusable(report.get("eval"), eval_settings(cfg), stored):
            print(f"{NAME}: scoring the cached model on {eval_size} held-out clips", flush=True)
            frames = max_frames(world_cfg, features)
            report |= held_out_scores(
                model, draw, world_cfg, eval_size, frames, compile=flags.evaluation
            )
            report["eval"] = eval_settings(cfg)
            rescored = True
        vocoded = [report.get("vocoder_accuracy")]
        if vocoder_size and not scores_reusable(
            report.get("vocoder_scored"), _vocoder_settings(cfg), vocoded
        ):
            report["vocoder_accuracy"] = vocoder_accuracy(
                model, draw, logmel, vocoder, vocoder_size
            )
            report["vocoder_scored"] = _vocoder_settings(cfg)
            rescored = True
        elif vocoder_size:
            report["vocoder_reused"] = True  # scored when the weights were trained
        if rescored:  # what the next cached run reuses (before this run's own fields)
            write_report(path, {k: v for k, v in report.items() if k != "vocoder_reused"})
    report["vocoder_clips"] = vocoder_size
    if not vocoder_size:
        report["vocoder_accuracy"] = None
    report["classified"] = classify_files(model, logmel, world_cfg.class_names(), files)
    out_dir = Path(str(cfg.pipeline.out_dir))
    report["examples"] = [
        str(p) for p in _write_examples(out_dir, world, logmel, vocoder, n_examples)
    ]
    return {**report, "cached": cached, "cache": str(path)}


def _line(r: dict[str, Any]) -> str:
    verdict = "met" if r["accuracy"] >= r["goal"] else "NOT met"
    when = " (cached)" if r.get("cached") else ""
    return (
        f"audio    held-out accuracy {r['accuracy']:6.1%} vs chance {r['chance']:5.1%} "
        f"({r['accuracy'] / r['chance']:.1f}x, {r['classes']} classes: pitch "
        f"{r['pitch_accuracy']:.1%}, timbre {r['timbre_accuracy']:.1%}), goal >= "
        f"{r['goal']:.0%} {verdict}; {r['steps']} steps in {r['seconds']:.0f} s on "
        f"{r['threads']} thread(s){when}, {r['parameters'] / 1e6:.2f}M params"
    )


def _vocoder_line(r: dict[str, Any]) -> str:
    if r["vocoder_accuracy"] is None:
        return "vocoder  round trip not scored (train.vocoder.eval_size=0)"
    verdict = "met" if r["vocoder_accuracy"] >= r["vocoder_goal"] else "NOT met"
    when = " (cached)" if r.get("vocoder_reused") else ""
    return (
        f"vocoder  held-out accuracy {r['vocoder_accuracy']:6.1%} vs chance {r['chance']:5.1%} "
        f"after LogMel -> Griffin-Lim -> LogMel ({r['vocoder_clips']} clips), goal >= "
        f"{r['vocoder_goal']:.0%} {verdict}{when}"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or load) the audio encoder, print its held-out figures against chance, then
    classify ``pipeline.classify``'s files."""
    print(f"{NAME}: training the audio encoder on the sounds world ...", flush=True)
    result = train(cfg)
    if result is None:  # a rank other than 0 of a train.parallel run
        return {}
    print(f"{NAME} results:")
    print("  " + _line(result))
    print("  " + _vocoder_line(result))
    for item in result["classified"]:
        guesses = ", ".join(f"{name} {p:.0%}" for name, p in item["top"])
        print(f"  {item['file']} ({item['seconds']:.2f} s): {guesses}")
    if result["examples"]:
        print(
            f"  {len(result['examples'])} example WAV files in {Path(result['examples'][0]).parent}"
        )
    return result
