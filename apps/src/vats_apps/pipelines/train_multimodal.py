"""``vats pipeline=train_multimodal``: the MoE LM learns to answer questions about images,
video clips and sounds, through projectors from the project's own encoders.

The parts come from the other pipelines' caches (each trained first when absent, under
its own key): the tokenizer and MoE LM of ``text_generation``, the ViT-2D (shape x colour,
with size, position and background as aux labels) and ViT-3D (direction of motion) of
``train_vision``, the audio encoder (pitch x timbre) of ``train_audio``. A clip is read by
both vision encoders (``train.video_image_frames``): the ViT-3D for the motion, the ViT-2D
on its middle frame for what moves. Their settings are this config's ``parts.*`` sections,
the same files the other pipelines read, so ``make demo`` trains each part once. They are
assembled into a :class:`~vats_apps.multimodal.MultimodalLM` (the encoders' classifier
heads dropped; the model reads their patch / frame features) and trained in two stages
with the vats-core trainer (LLaVA's recipe):

1. **align**: only the projectors learn; encoders and LM are frozen. Each sample is a
   "describe" question answered by the world's caption.
2. **instruct**: the projectors and the whole LM learn (the encoders stay frozen) on
   questions of every type with their answers (:mod:`vats_apps.multimodal.questions`),
   captions included. The LM is small (4.7 M parameters): training it whole costs little
   more than training its top layers, since the projectors' gradients flow back through
   every layer anyway, and it has to learn a new output vocabulary (colour, shape, pitch
   words after a medium), which its last layers alone learn more slowly.

Every step draws one medium (image, video, audio in turn) and ``train.batch_size`` fresh
train samples of it (no sample repeats). Batches are left-padded, so every answer ends in
the last column; the loss covers the answer tokens and EOS only.

Scoring: for each question type, ``train.eval_per_type`` held-out (``val``) samples asked
with the held-out phrasing, answered greedily; short answers by exact match
(:func:`~vats_apps.multimodal.questions.normalize_answer`), descriptions by the share of
caption attributes parsed right (:func:`~vats_apps.multimodal.questions.score_caption`).
Each figure is printed against chance and, where the issue sets one, its goal. The scores
are a deterministic function of the weights, so they are stored with them and a cached run
prints them without generating again.

Each stage is cached (:mod:`vats_apps.pipelines.cache`) under a key of the parts' cache
keys, the resolved multimodal config, the stage's settings, the seed and the code; the
instruct entry also holds the tokenizer, so ``vats pipeline=chat`` loads one directory.

``train.parallel`` trains both stages on the ranks ``torchrun`` starts (``uv run torchrun
--nproc-per-node 2 -m vats_apps pipeline=train_multimodal train.parallel=fsdp``), as
:mod:`vats_apps.pipelines.distributed` describes: ``train.batch_size`` stays the global
batch, and rank 0 alone scores, prints and writes the cache. What is particular here:

* A batch's media go to the trainer as one tensor with the rows first (waveforms padded
  to the longest, cut back to their lengths in the loss), so that it can split the rows.
* Each rank's loss is the global batch's share that its rows hold (:func:`_loss_fn`): the
  answer tokens' cross-entropy weighed by the rank's share of them, the MoE router losses
  over the global batch's routing. So 2 ranks train the one-process weights.
* Each stage wraps the model anew after freezing what it freezes (DDP reduces the
  parameters that required grad when it wrapped the model; FSDP shards frozen and
  trainable ones alike and reduces the gradients there are), and the instruct stage
  starts on every rank from the align stage's weights.
* The parts are not trained on several ranks: every rank loads them from their caches,
  under the ``parts.*`` settings (a run on one process trains the missing ones first);
  a part that is not cached is refused, naming the pipeline that trains it.

Shapes: B batch, T tokens, S samples, C channels, F frames.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.data import ShapesConfig, ShapesWorld, SoundsConfig, SoundsWorld
from vats_apps.multimodal import KINDS, MultimodalConfig, MultimodalLM, ProjectorConfig
from vats_apps.multimodal.inputs import MultimodalBatch, build_inputs
from vats_apps.multimodal.questions import (
    QUESTION_TYPES,
    caption_attributes,
    make_qa,
    normalize_answer,
    parse_caption,
    score_caption,
)
from vats_apps.pipelines import text_generation, train_audio, train_vision
from vats_apps.pipelines.cache import REPORT_NAME, entry_key, reusable, staged_entry
from vats_apps.pipelines.compiling import check_compile_switches, trainer_fields
from vats_apps.pipelines.distributed import (
    Ranks,
    gathered_model,
    global_lm_loss,
    parallel_key,
    parallel_model,
    parallel_training,
    replicated_model,
    scored_tokens,
)
from vats_apps.pipelines.sections import part_pipeline, section
from vats_audio import AudioEncoderConfig, LogMelConfig
from vats_core.config import is_int, is_number
from vats_core.parallel import ParallelConfig
from vats_core.training import Trainer, TrainerConfig
from vats_text.model import MoELMConfig
from vats_text.tokenizer import Tokenizer
from vats_vision.vit2d import ViT2DConfig
from vats_vision.vit3d import ViT3DConfig

NAME = "train_multimodal"
CACHE_FORMAT = 1  # bump when what is cached changes meaning
CODE = ("vats_core", "vats_text", "vats_vision", "vats_audio", "vats_apps")
STAGES = ("align", "instruct")
# The pipeline that trains and caches each part.
PART_PIPELINES = {
    "text": "text_generation",
    "image": "train_vision",
    "video": "train_vision",
    "audio": "train_audio",
}
# The goals: exact match >= 90 % for the question types whose encoder proof reaches
# >= 95 % (shape and colour: ViT-2D; direction: ViT-3D; pitch and timbre: the audio encoder),
# and >= 80 % of the caption attributes.
GOALS = {
    ("image", "shape"): 0.90,
    ("image", "color"): 0.90,
    ("video", "direction"): 0.90,
    ("audio", "pitch"): 0.90,
    ("audio", "timbre"): 0.90,
}
CAPTION_GOAL = 0.80
TIME_GOAL = 360.0  # seconds: both stages' training, first run (the parts not counted)
MAX_ANSWER_TOKENS = 8  # short answers are 1-4 tokens; a caption gets max_caption_tokens


@dataclasses.dataclass
class Parts:
    """The trained parts and the worlds they were trained on."""

    tokenizer: Tokenizer
    lm: nn.Module
    encoders: dict[str, nn.Module]  # kind -> encoder (with its classifier head)
    reports: dict[str, dict[str, Any]]  # "text", "image", "video", "audio" -> part report
    keys: dict[str, str]  # part -> its cache entry name
    image_world: ShapesConfig
    video_world: ShapesConfig
    sound_world: SoundsConfig
    features: Any  # LogMelConfig of the audio encoder


@dataclasses.dataclass
class Trained:
    model: MultimodalLM
    tokenizer: Tokenizer
    report: dict[str, Any]
    path: Path
    parts: Parts
    cached: bool


# ----------------------------------------------------------------------------- parts


def part_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configs the text, vision and audio pipelines would compose for the parts:
    ``model`` sections from here, ``train`` from ``parts.<name>``."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    out_dir = Path(str(cfg.pipeline.out_dir))
    text = {"model": {"text": model["text"]}, "train": section(cfg, "parts.text", NAME)}
    vision = {
        "model": {"vision2d": model["vision2d"], "vision3d": model["vision3d"]},
        "train": section(cfg, "parts.vision", NAME),
    }
    audio = {"model": {"audio": model["audio"]}, "train": section(cfg, "parts.audio", NAME)}
    return {
        "text": OmegaConf.create({**text, "pipeline": part_pipeline(cfg)}),
        "vision": OmegaConf.create(
            {**vision, "pipeline": part_pipeline(cfg, out_dir=str(out_dir / "vision"))}
        ),
        "audio": OmegaConf.create(
            {
                **audio,
                "pipeline": part_pipeline(
                    cfg, out_dir=str(out_dir / "audio"), classify=None, examples=0
                ),
            }
        ),
    }


def load_parts(cfg: DictConfig, world: int = 1) -> Parts:
    """The tokenizer, LM and encoders from their pipelines' caches, trained when absent on
    one process. On several ranks (``world`` > 1) every rank loads them and none is trained
    here.

    Raises:
        ValueError: on several ranks, a part not cached, named with what trains it.
    """
    subs = part_configs(cfg)
    image_world = train_vision.world_config(subs["vision"], "image")
    video_world = train_vision.world_config(subs["vision"], "video")
    sound_world = train_audio.world_config(subs["audio"])
    features = train_audio.features_config(subs["audio"], sound_world)
    keys = {
        "text": text_generation.cache_key(subs["text"]),
        "image": train_vision.cache_key(subs["vision"], "image"),
        "video": train_vision.cache_key(subs["vision"], "video"),
        "audio": train_audio.cache_key(subs["audio"]),
    }
    trains = world == 1  # several ranks: each loads the cached parts, none trains one here
    text = text_generation.load_or_train if trains else text_generation.cached
    vision = train_vision.load_or_train if trains else train_vision.cached
    audio = train_audio.load_or_train if trains else train_audio.cached
    found: dict[str, Any] = {
        "text": text(subs["text"]),
        "image": vision(subs["vision"], "image"),
        "video": vision(subs["vision"], "video"),
        "audio": audio(subs["audio"]),
    }
    missing = [
        f"{name} (pipeline={PART_PIPELINES[name]})" for name, v in found.items() if v is None
    ]
    if missing:
        raise ValueError(
            f"train.parallel: {world} ranks train the stages from cached parts, and the "
            f"{', '.join(missing)} part(s) of these settings are not in "
            f"{cfg.pipeline.cache_dir}: run this pipeline once on one process first (or those "
            "pipelines with the parts.* sections as their train sections)"
        )
    lm = found["text"]
    return Parts(
        tokenizer=lm.tokenizer,
        lm=lm.model,
        encoders={kind: found[kind][0] for kind in KINDS},
        reports={"text": lm.report, **{kind: found[kind][1] for kind in KINDS}},
        keys=keys,
        image_world=image_world,
        video_world=video_world,
        sound_world=sound_world,
        features=features,
    )


def projector_config(cfg: DictConfig, kind: str, in_dim: int, out_dim: int) -> ProjectorConfig:
    """``train.projectors.<kind>`` (ProjectorConfig fields but the widths, which the parts
    set)."""
    fields = section(cfg, f"train.projectors.{kind}", NAME)
    for key in ("in_dim", "out_dim"):
        if key in fields:
            raise ValueError(f"train.projectors.{kind}.{key} is set by the encoder and the LM")
    return ProjectorConfig(in_dim=in_dim, out_dim=out_dim, **fields)


def encoder_depth(cfg: DictConfig, kind: str, have: int) -> int:
    """``train.encoder_layers.<kind>`` (null: all ``have`` blocks of the trained encoder)."""
    layers = OmegaConf.select(cfg, f"train.encoder_layers.{kind}")
    if layers is None:
        return have
    if not is_int(layers) or not 1 <= layers <= have:
        raise ValueError(
            f"train.encoder_layers.{kind}={layers!r} is invalid: expected null (all) or an "
            f"int in [1, {have}] (the {kind} encoder's blocks)"
        )
    return int(layers)


def video_image_frames(cfg: DictConfig) -> int:
    """``train.video_image_frames``: frames of each clip the image encoder also reads."""
    value = OmegaConf.select(cfg, "train.video_image_frames", default=0)
    if not is_int(value) or value < 0:
        raise ValueError(
            f"train.video_image_frames={value!r} is invalid: expected an int >= 0 (frames of "
            "each clip the image encoder also reads; 0 = none)"
        )
    return int(value)


def multimodal_config(
    cfg: DictConfig,
    lm: MoELMConfig,
    encoders: dict[str, ViT2DConfig | ViT3DConfig | AudioEncoderConfig],
    features: LogMelConfig,
) -> MultimodalConfig:
    """The parts' configs (the LM's, each encoder's without its heads, the audio features)
    and the projectors."""
    enc = {
        kind: encoder.replace(num_classes=0, n_layers=encoder_depth(cfg, kind, encoder.n_layers))
        for kind, encoder in encoders.items()
    }
    return MultimodalConfig(
        lm=lm,
        image_encoder=enc["image"],
        image_projector=projector_config(cfg, "image", enc["image"].dim, lm.dim),
        video_encoder=enc["video"],
        video_projector=projector_config(cfg, "video", enc["video"].dim, lm.dim),
        audio_features=features,
        audio_encoder=enc["audio"],
        audio_projector=projector_config(cfg, "audio", enc["audio"].dim, lm.dim),
        video_image_frames=video_image_frames(cfg),
    )


def parts_config(cfg: DictConfig, parts: Parts) -> MultimodalConfig:
    """:func:`multimodal_config` of the loaded parts."""
    encoders = {kind: encoder.config for kind, encoder in parts.encoders.items()}
    return multimodal_config(cfg, parts.lm.config, encoders, parts.features)


def planned_part_configs(
    cfg: DictConfig,
) -> tuple[MoELMConfig, dict[str, ViT2DConfig | ViT3DConfig | AudioEncoderConfig], LogMelConfig]:
    """The parts' model configs as their pipelines resolve them, none loaded or trained: the
    LM's (at the tokenizer's asked vocabulary size), the encoders', the audio features'."""
    subs = part_configs(cfg)
    vision = subs["vision"]
    sounds = train_audio.world_config(subs["audio"])
    features = train_audio.features_config(subs["audio"], sounds)
    lm = text_generation.model_config(subs["text"], int(subs["text"].train.vocab_size))
    encoders = {
        "image": train_vision.image_model_config(
            vision, train_vision.world_config(vision, "image")
        ),
        "video": train_vision.video_model_config(
            vision, train_vision.world_config(vision, "video"), temporal=True
        ),
        "audio": train_audio.model_config(subs["audio"], sounds, features),
    }
    return lm, encoders, features


# ----------------------------------------------------------------------------- samples


@dataclasses.dataclass
class Samples:
    """Samples of one medium with a question each."""

    kind: str
    media: list[Tensor]  # images (C, S, S) / clips (C, F, S, S) in [-1, 1]; waveforms (S,)
    names: list[dict[str, str]]  # label names
    captions: list[str]
    questions: list[str]
    answers: list[str]
    qtypes: list[str]

    def prompts(self) -> list[str]:
        return [prompt(self.kind, q) for q in self.questions]


def prompt(kind: str, question: str) -> str:
    """The prompt template: the medium, then the question on its own line."""
    return f"<{kind}>\n{question}\n"


class SampleSource:
    """Samples of the three worlds as the encoders were trained on them, with questions."""

    def __init__(self, parts: Parts) -> None:
        self.worlds = {
            "image": ShapesWorld(parts.image_world),
            "video": ShapesWorld(parts.video_world),
            "audio": SoundsWorld(parts.sound_world),
        }

    def draw(
        self, kind: str, indices: range, split: str, types: tuple[str, ...] | None = None
    ) -> Samples:
        """Samples ``indices`` of ``split`` with a question each (``make_qa``'s choice among
        ``types``, default every type of the medium)."""
        world = self.worlds[kind]
        if kind == "image":
            batch = world.images(indices, split)  # type: ignore[union-attr]
            media = list((batch.pixels * 2 - 1).unbind(0))  # (C, S, S) in [-1, 1]
        elif kind == "video":
            batch = world.videos(indices, split)  # type: ignore[union-attr]
            clips = (batch.pixels * 2 - 1).permute(0, 2, 1, 3, 4)  # (B, C, F, S, S)
            media = list(clips.unbind(0))
        else:
            batch = world.clips(indices, split)  # type: ignore[union-attr]
            media = [batch.waveform[i, :n] for i, n in enumerate(batch.lengths.tolist())]
        names = [batch.names(i) for i in range(len(indices))]
        qas = [
            make_qa(kind, names[i], batch.captions[i], split=split, index=index, types=types)
            for i, index in enumerate(indices)
        ]
        return Samples(
            kind=kind,
            media=media,
            names=names,
            captions=list(batch.captions),
            questions=[qa.question for qa in qas],
            answers=[qa.answer for qa in qas],
            qtypes=[qa.qtype for qa in qas],
        )


def media_kwargs(kind: str, media: list[Tensor]) -> dict[str, list[Tensor]]:
    return {f"{kind}s": media}


# ----------------------------------------------------------------------------- training


def training_batch(model: MultimodalLM, tokenizer: Tokenizer, samples: Samples) -> dict[str, Any]:
    """``samples`` as the trainer's batch: every tensor with the batch (row) axis first, so
    that the trainer can split the rows over ranks (a media list could not be split).

    ``media`` stacks the items, each one's first axis padded to the longest (a waveform's
    samples; images and clips are all alike), and ``lengths`` gives them back. The global
    batch's answer tokens and rows (0-d, kept whole by the split) let each rank weigh its
    loss: :func:`_loss_fn`.
    """
    b = build_inputs(
        model,
        tokenizer,
        samples.prompts(),
        answers=samples.answers,
        **media_kwargs(samples.kind, samples.media),
    )
    assert b.labels is not None
    return {
        "input_ids": b.input_ids,  # (B, T)
        "attention_mask": b.attention_mask,
        "labels": b.labels,
        "media": nn.utils.rnn.pad_sequence(samples.media, batch_first=True),  # (B, ...)
        "lengths": torch.tensor([item.shape[0] for item in samples.media]),  # (B,)
        "kind": samples.kind,
        "answer_tokens": scored_tokens(b.labels).sum(),  # ()
        "rows": torch.tensor(len(samples.media)),  # ()
    }


def _loss_fn(model: nn.Module, batch: dict[str, Any], *, lm: MoELMConfig) -> Tensor:
    """The LM's training loss on this rank's rows of a :func:`training_batch` (``lm``: the
    LM's config), weighed so that the mean over ranks, which the trainer takes of the
    gradients, is the loss of the global batch: one process's.

    The cross-entropy is a mean over the rank's answer tokens, and rows differ in answer
    length: it is multiplied by the rank's share of the global batch's answer tokens over
    its share of the rows (exactly 1 on one process). The MoE router losses (weighted as
    the LM weighs them in training) are the global batch's too
    (:func:`~vats_core.parallel.global_router_losses`): the load-balancing loss is no mean
    over tokens, and the rank's own would pull the router toward its rows' balance.
    """
    items = [row[:n] for row, n in zip(batch["media"], batch["lengths"].tolist(), strict=True)]
    labels = batch["labels"]
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        labels=labels,
        **media_kwargs(batch["kind"], items),
    )
    return global_lm_loss(out, labels, batch["answer_tokens"], batch["rows"], lm)


PART_GROUPS = ("projectors", "lm", "encoders")


def trainable_parts(cfg: DictConfig, stage: str) -> tuple[str, ...]:
    """``train.<stage>.trainable``: which of :data:`PART_GROUPS` learn in ``stage``."""
    chosen = OmegaConf.select(cfg, f"train.{stage}.trainable")
    parts = OmegaConf.to_container(chosen) if chosen is not None else None
    if not isinstance(parts, list) or not parts or any(p not in PART_GROUPS for p in parts):
        raise ValueError(
            f"train.{stage}.trainable={parts!r} is invalid: expected a non-empty list of "
            f"{list(PART_GROUPS)}"
        )
    return tuple(parts)


def lr_scales(cfg: DictConfig, stage: str) -> dict[str, float]:
    """``train.<stage>.lr_scale``: ``{group: multiplier of the stage's lr}`` for trainable
    groups of :data:`PART_GROUPS` (absent: every group at the stage's lr), as the module
    prefixes the trainer takes (``{"encoders": 0.1}`` -> each ``<kind>_encoder`` at 0.1)."""
    chosen = OmegaConf.select(cfg, f"train.{stage}.lr_scale")
    if chosen is None:
        return {}
    scales = OmegaConf.to_container(chosen) if isinstance(chosen, DictConfig) else chosen
    trainable = trainable_parts(cfg, stage)
    if not isinstance(scales, dict) or any(
        g not in trainable or not is_number(v) or not 0 < v < math.inf for g, v in scales.items()
    ):
        raise ValueError(
            f"train.{stage}.lr_scale={scales!r} is invalid: expected a mapping from trainable "
            f"groups of this stage {list(trainable)} to numbers > 0"
        )
    modules = {
        "projectors": [f"{k}_projector" for k in KINDS],
        "lm": ["lm"],
        "encoders": [f"{k}_encoder" for k in KINDS],
    }
    return {m: float(v) for g, v in scales.items() for m in modules[g]}


def _freeze(model: MultimodalLM, parts: tuple[str, ...]) -> None:
    """Only the modules of ``parts`` (projectors, lm, encoders) require grad."""
    for name, module in model.named_children():
        group = (
            "lm" if name == "lm" else "projectors" if name.endswith("_projector") else "encoders"
        )
        module.requires_grad_(group in parts)


def question_types(cfg: DictConfig) -> dict[str, tuple[str, ...]]:
    """``train.questions``: null = every question type of every medium; else a list of
    ``"<kind>"`` (all of its types) and ``"<kind>/<type>"`` entries. Media without an entry
    are not trained on (stage 1 still aligns each selected medium on its captions)."""
    chosen = OmegaConf.select(cfg, "train.questions")
    if chosen is None:
        return {k: QUESTION_TYPES[k] for k in KINDS}
    every = [*KINDS, *(f"{k}/{q}" for k in KINDS for q in QUESTION_TYPES[k])]
    entries = OmegaConf.to_container(chosen) if not isinstance(chosen, str) else [chosen]
    if not isinstance(entries, list) or not entries or any(e not in every for e in entries):
        raise ValueError(
            f"train.questions={entries!r} is invalid: expected null or a non-empty list of {every}"
        )
    out: dict[str, tuple[str, ...]] = {}
    for kind in KINDS:
        picked = [q for q in QUESTION_TYPES[kind] if kind in entries or f"{kind}/{q}" in entries]
        if picked:
            out[kind] = tuple(picked)
    return out


def _count(cfg: DictConfig, key: str, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    if not is_int(value) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: expected an int >= {minimum}")
    return int(value)


def train_stage(
    cfg: DictConfig,
    model: MultimodalLM,
    parts: Parts,
    source: SampleSource,
    stage: str,
    parallel: ParallelConfig,
) -> tuple[nn.Module, float]:
    """Train ``stage`` from ``model`` (plain, the same weights on every rank) under
    ``parallel``, with the parts the stage freezes frozen before the model is wrapped.

    Returns:
        The trainer's model (``model`` itself on one process, trained in place) and the
        stage's seconds.
    """
    fields = section(cfg, f"train.{stage}", NAME)
    steps = _count(cfg, f"train.{stage}.max_steps", 1)
    batch_size = _count(cfg, "train.batch_size", 1)
    trainer = trainer_fields(fields.get("trainer", {}), f"train.{stage}.trainer")
    if "warmup_steps" in trainer:  # a short run keeps the warmup inside the run
        trainer["warmup_steps"] = min(int(trainer["warmup_steps"]), steps)
    selected = question_types(cfg)
    kinds = tuple(selected)
    types = {k: ("describe",) if stage == "align" else selected[k] for k in kinds}
    tokenizer = parts.tokenizer

    def batch_fn(step: int, micro: int) -> dict[str, Any]:
        kind = kinds[step % len(kinds)]
        first = (step // len(kinds) * trainer.get("grad_accum_steps", 1) + micro) * batch_size
        s = source.draw(kind, range(first, first + batch_size), "train", types[kind])
        return training_batch(model, tokenizer, s)

    _freeze(model, trainable_parts(cfg, stage))
    # A step trains the projector of its medium only: DDP must look for the unused ones.
    trained = parallel_model(model, parallel, find_unused_parameters=True)
    config = TrainerConfig(
        **trainer,
        max_steps=steps,
        seed=int(cfg.pipeline.seed),
        out_dir=str(Path(str(cfg.pipeline.out_dir)) / stage),
        checkpoint_every=0,
        progress=bool(cfg.pipeline.progress),
    )
    start = time.perf_counter()
    Trainer(
        trained,
        config,
        data=batch_fn,
        loss_fn=functools.partial(_loss_fn, lm=parts.lm.config),
        items_fn=lambda b: int(b["input_ids"].shape[0]),
        lr_scales=lr_scales(cfg, stage),
    ).fit()
    return trained, time.perf_counter() - start


def _frozen(model: nn.Module) -> MultimodalLM:
    """A trained stage's plain model in eval mode with nothing requiring grad."""
    model.eval()
    return model.requires_grad_(False)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def answer_batch(
    model: MultimodalLM,
    tokenizer: Tokenizer,
    kind: str,
    media: list[Tensor],
    questions: list[str],
    *,
    max_new_tokens: int,
    compile: bool = False,
) -> list[str]:
    """Greedy answers to ``questions`` about ``media`` (one question per item), batched with
    left padding."""
    b: MultimodalBatch = build_inputs(
        model,
        tokenizer,
        [prompt(kind, q) for q in questions],
        max_new_tokens=max_new_tokens,
        **media_kwargs(kind, media),
    )
    out = model.generate(
        b.input_ids,
        b.attention_mask,
        max_new_tokens=max_new_tokens,
        compile=compile,
        **b.media(),
    )
    new = out[:, b.input_ids.shape[1] :]
    return [tokenizer.decode(row).strip() for row in new.tolist()]


def chance(parts: Parts, kind: str, qtype: str) -> float:
    """The score of guessing uniformly among the world's names."""
    world = parts.sound_world if kind == "audio" else getattr(parts, f"{kind}_world")
    sizes = _option_counts(kind, world)
    if qtype == "describe":
        attrs = caption_attributes(kind)
        return sum(1 / sizes[a] for a in attrs) / len(attrs)
    return 1 / sizes[qtype]


def _option_counts(kind: str, world: Any) -> dict[str, int]:
    if kind == "audio":
        from vats_apps.data import DURATIONS, SOUND_BACKGROUNDS

        return {
            "pitch": len(world.pitches),
            "timbre": len(world.timbres),
            "duration": len(DURATIONS),
            "background": len(SOUND_BACKGROUNDS),
        }
    from vats_apps.data import POSITIONS

    return {
        "shape": len(world.shapes),
        "color": len(world.colors),
        "size": len(world.sizes),
        "position": len(POSITIONS),
        "background": len(world.backgrounds),
        "direction": len(world.directions),
        "speed": len(world.speeds),
    }


def evaluate(
    model: MultimodalLM,
    parts: Parts,
    source: SampleSource,
    n: int,
    *,
    max_caption_tokens: int,
    types: dict[str, tuple[str, ...]],
    compile: bool = False,
    chunk: int = 64,
) -> dict[str, dict[str, Any]]:
    """Each of ``types`` (kind -> question types) on ``n`` held-out samples ->
    ``{"kind/qtype": {...}}``."""
    scores: dict[str, dict[str, Any]] = {}
    for kind, qtypes in types.items():
        for qtype in qtypes:
            right = total = 0
            examples = []
            per_attr: dict[str, int] = {}  # describe: captions with each attribute right
            for start in range(0, n, chunk):
                s = source.draw(kind, range(start, min(n, start + chunk)), "val", (qtype,))
                limit = max_caption_tokens if qtype == "describe" else MAX_ANSWER_TOKENS
                got = answer_batch(
                    model,
                    parts.tokenizer,
                    kind,
                    s.media,
                    s.questions,
                    max_new_tokens=limit,
                    compile=compile,
                )
                for i, text in enumerate(got):
                    if qtype == "describe":
                        r, t = score_caption(kind, text, s.names[i])
                        parsed = parse_caption(kind, text)
                        for attr, name in parsed.items():
                            per_attr[attr] = per_attr.get(attr, 0) + int(name == s.names[i][attr])
                    else:
                        r, t = int(normalize_answer(text) == normalize_answer(s.answers[i])), 1
                    right, total = right + r, total + t
                    if len(examples) < 2:
                        examples.append({"question": s.questions[i], "answer": s.answers[i],
                                         "generated": text})  # fmt: skip
            entry: dict[str, Any] = {
                "kind": kind,
                "qtype": qtype,
                "accuracy": right / total,
                "chance": chance(parts, kind, qtype),
                "samples": n,
                "examples": examples,
            }
            if per_attr:
                entry["attributes"] = {a: c / n for a, c in per_attr.items()}
            goal = CAPTION_GOAL if qtype == "describe" else GOALS.get((kind, qtype))
            if goal is not None:
                entry["goal"] = goal
            scores[f"{kind}/{qtype}"] = entry
    return scores


# ----------------------------------------------------------------------------- stages


def _stage_key(cfg: DictConfig, parts: Parts, config: MultimodalConfig, stage: str) -> str:
    spec: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "stage": stage,
        "parts": parts.keys,
        "model": config.to_dict(),
        "batch_size": cfg.train.batch_size,
        "align": section(cfg, "train.align", NAME),
        "media": list(question_types(cfg)),
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    if stage == "instruct":
        spec["instruct"] = section(cfg, "train.instruct", NAME)
        spec["questions"] = {k: list(v) for k, v in question_types(cfg).items()}
    return entry_key(spec, CODE)


def check_config(cfg: DictConfig) -> None:
    """Everything the pipeline reads that can be wrong, before any part trains."""
    flags = check_compile_switches(cfg)
    if flags.training:
        raise ValueError(
            "train.compile is not supported by train_multimodal: its batches change shape "
            "every step (media kind, prompt and answer lengths); use pipeline.compile for "
            "compiled generation"
        )
    _count(cfg, "train.batch_size", 1)
    _count(cfg, "train.eval_per_type", 1)
    _count(cfg, "train.max_caption_tokens", 1)
    question_types(cfg)
    for stage in STAGES:
        _count(cfg, f"train.{stage}.max_steps", 1)
        trainable_parts(cfg, stage)
        lr_scales(cfg, stage)
        fields = section(cfg, f"train.{stage}", NAME)
        TrainerConfig(**trainer_fields(fields.get("trainer", {}), f"train.{stage}.trainer"))
    for kind in KINDS:
        projector_config(cfg, kind, 8, 8)  # field names and values; widths come later
    _, encoders, _ = planned_part_configs(cfg)  # as the parts' pipelines resolve them
    for kind, encoder in encoders.items():
        encoder_depth(cfg, kind, encoder.n_layers)
    frames = train_vision.world_config(part_configs(cfg)["vision"], "video").frames
    if video_image_frames(cfg) > frames:
        raise ValueError(
            f"train.video_image_frames={video_image_frames(cfg)} is invalid: the clips have "
            f"{frames} frames (parts.vision.video.data.frames)"
        )


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the held-out scores depend on besides the weights."""
    return {
        "per_type": int(cfg.train.eval_per_type),
        "max_caption_tokens": int(cfg.train.max_caption_tokens),
        "questions": {k: list(v) for k, v in question_types(cfg).items()},
    }


def score(cfg: DictConfig, model: MultimodalLM, parts: Parts) -> dict[str, Any]:
    """Held-out scores of every selected question type, with the settings they used."""
    settings = eval_settings(cfg)
    t0 = time.perf_counter()
    scores = evaluate(
        model,
        parts,
        SampleSource(parts),
        settings["per_type"],
        max_caption_tokens=settings["max_caption_tokens"],
        types=question_types(cfg),
        compile=check_compile_switches(cfg).evaluation,
    )
    return {"scores": scores, "eval": settings, "eval_seconds": time.perf_counter() - t0}


def load_or_train(cfg: DictConfig) -> Trained:
    """The trained multimodal model for this config, on one process: what ``chat`` calls.
    As :func:`load_or_train_ranks`."""
    trained = load_or_train_ranks(cfg)
    if trained is None:
        raise ValueError(
            "the multimodal model is trained under train.parallel by "
            "pipeline=train_multimodal alone: run it (under torchrun) first, then this "
            "pipeline on one process"
        )
    return trained


def load_or_train_ranks(cfg: DictConfig) -> Trained | None:
    """The trained multimodal model for this config: from the cache, or its parts loaded
    (or trained) and both stages run under ``train.parallel``, then scored and cached. On
    every rank of a ``train.parallel`` run: rank 0 gets the model, the other ranks None
    (once they have trained it).

    Raises:
        ValueError: before any work, for a setting :func:`check_config` refuses or a
            ``train.parallel`` that does not fit the world, the batch or the model.
    """
    check_config(cfg)
    batch = {"train.batch_size": _count(cfg, "train.batch_size", 1)}

    def meta_models() -> list[nn.Module]:
        return [MultimodalLM(multimodal_config(cfg, *planned_part_configs(cfg)))]

    with parallel_training(cfg, batch, meta_models) as (parallel, ranks):
        return _load_or_train(cfg, parallel, ranks)


def _load_or_train(cfg: DictConfig, parallel: ParallelConfig, ranks: Ranks) -> Trained | None:
    parts = load_parts(cfg, ranks.world)
    config = parts_config(cfg, parts)
    root = Path(str(cfg.pipeline.cache_dir)).expanduser() / NAME
    final = root / "instruct" / _stage_key(cfg, parts, config, "instruct")
    if reusable(final, cfg.pipeline.retrain):
        if not ranks.is_main:  # rank 0 loads and reports it
            return None
        print(f"{NAME}: loading the cached model from {final}", flush=True)
        model = MultimodalLM.from_pretrained(final / "model")
        report = json.loads((final / REPORT_NAME).read_text())
        if report.get("eval") != eval_settings(cfg):  # scored with other settings: again
            report |= score(cfg, model, parts)
        return Trained(model, Tokenizer.from_pretrained(final), report, final, parts, True)

    print(f"{NAME}: no cached model for this config: training the projectors and the LM")
    source = SampleSource(parts)
    aligned = root / "align" / _stage_key(cfg, parts, config, "align")
    seconds: dict[str, float] = {}
    if reusable(aligned, cfg.pipeline.retrain):  # every rank loads it
        print(f"{NAME}: loading the aligned projectors from {aligned}", flush=True)
        model = MultimodalLM.from_pretrained(aligned / "model")
        seconds["align"] = json.loads((aligned / REPORT_NAME).read_text())["seconds"]
    else:
        torch.manual_seed(int(cfg.pipeline.seed))
        model = MultimodalLM(config)
        model.load_part("lm", parts.lm)
        for kind in KINDS:
            model.load_part(f"{kind}_encoder", parts.encoders[kind])
        print(f"{NAME}: stage 1/2, align: the projectors learn the captions", flush=True)
        trained, seconds["align"] = train_stage(cfg, model, parts, source, "align", parallel)
        # every rank goes on from the aligned weights, under a wrapper of its own (instruct
        # trains other parts)
        model = _frozen(replicated_model(trained, model, parallel))
        if ranks.is_main:
            with staged_entry(aligned) as staging:
                model.save_pretrained(staging / "model")
                (staging / REPORT_NAME).write_text(json.dumps({"seconds": seconds["align"]}))
    print(f"{NAME}: stage 2/2, instruct: the projectors and the LM learn the answers", flush=True)
    trained, seconds["instruct"] = train_stage(cfg, model, parts, source, "instruct", parallel)
    gathered = gathered_model(trained, model, parallel)  # every rank takes part
    if gathered is None:  # a rank other than 0: rank 0 scores and caches
        return None
    model = _frozen(gathered)
    report = {
        **score(cfg, model, parts),
        "seconds": seconds,
        "train_seconds": sum(seconds.values()),
        "threads": torch.get_num_threads(),
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in model.named_children()
        },
        "parts": {k: {"accuracy": r.get("accuracy")} for k, r in parts.reports.items()},
    }
    with staged_entry(final) as staging:
        model.save_pretrained(staging / "model")
        parts.tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return Trained(model, parts.tokenizer, report, final, parts, False)


def _line(name: str, r: dict[str, Any]) -> str:
    what = "caption attributes" if r["qtype"] == "describe" else "exact match"
    goal = ""
    if "goal" in r:
        verdict = "met" if r["accuracy"] >= r["goal"] else "NOT met"
        goal = f", goal >= {r['goal']:.0%} {verdict}"
    attrs = ""
    if "attributes" in r:
        attrs = " [" + ", ".join(f"{a} {v:.0%}" for a, v in r["attributes"].items()) + "]"
    return (
        f"{name:18s} {r['accuracy']:6.1%} vs chance {r['chance']:5.1%} ({what}, "
        f"{r['samples']} held-out samples){goal}{attrs}"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or load) the multimodal model and print its held-out answers per question type."""
    trained = load_or_train_ranks(cfg)
    if trained is None:  # a rank other than 0 of a train.parallel run: rank 0 reports
        return {}
    r = trained.report
    when = " (cached)" if trained.cached else ""
    print(f"{NAME} results{when}:")
    for name, entry in r["scores"].items():
        print("  " + _line(name, entry))
    s = r["seconds"]
    print(
        f"  training: {r['train_seconds']:.0f} s (align {s['align']:.0f} s, instruct "
        f"{s['instruct']:.0f} s) on {r['threads']} thread(s), goal < {TIME_GOAL:.0f} s "
        f"{'met' if r['train_seconds'] < TIME_GOAL else 'NOT met'}; encoders: image "
        f"{_pct(r['parts']['image'])}, video {_pct(r['parts']['video'])}, audio "
        f"{_pct(r['parts']['audio'])} held-out"
    )
    for name, entry in r["scores"].items():
        if entry["qtype"] == "describe":
            ex = entry["examples"][0]
            print(
                f"  e.g. {name}: {ex['question']!r} -> {ex['generated']!r} (truth {ex['answer']!r})"
            )
    return {**r, "cached": trained.cached, "cache": str(trained.path)}


def _pct(report: dict[str, Any]) -> str:
    acc = report.get("accuracy")
    return "?" if acc is None else f"{acc:.1%}"
