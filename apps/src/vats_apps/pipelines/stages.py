"""What the generating pipelines (``text_to_image``, ``text_to_audio``, ``text_to_video``)
share: reading and checking config fields under the pipeline's name, cache entries per
training stage, the vats-core trainer run for a stage (under ``train.parallel``), the
enrichment LM's fine-tune, and (at the end) the text part, the DiT's training texts, prompt
errors and printed lines.

A pipeline makes one :class:`StagedPipeline` with its name, cache format and the packages
whose code trains each stage, and reads its settings through it, so that every error names
the pipeline and the field::

    P = StagedPipeline("text_to_audio", 1, {"dit": ("vats_core", "vats_apps")})
    steps = P.int(cfg, "train.dit.max_steps", 1)   # ValueError naming the key otherwise
    path = P.entry(cfg, "dit", spec)                # <cache_dir>/text_to_audio/dit/<key>

Under ``torchrun`` every stage trains on the ranks (:mod:`vats_apps.pipelines.distributed`):
the generators run their stages inside :meth:`StagedPipeline.parallel_training`, each
stage's objective (an :class:`Objective`: the modules it trains and its loss as their
forward) goes to the trainer wrapped by ``train.parallel`` (:meth:`StagedPipeline.fit`),
and ``train.<stage>.batch_size`` stays the global batch, which the trainer splits over the
ranks. So that the ranks train what one process trains on the same global batch:

* every random draw of a loss (the diffusion timesteps and noise, the DiT's condition
  dropout, the VAE's posterior sample) is made for the global batch by every rank, from
  the same RNG state, and each rank takes its rows (:func:`global_draw`): a row draws
  what it draws on one process;
* a loss that weighs rows unequally (the enrichment LM's mean over caption tokens, a
  weighted squared error) is weighed by the rank's share of the global batch, and the MoE
  router losses are the global batch's;
* an EMA averages the plain weights each rank holds (DDP: the whole model; FSDP: the
  rank's shards), and the averaged weights are gathered after training.

Rank 0 alone prints, writes the cache entries, scores and generates; the other ranks
receive a trained stage's weights when a later stage trains from them (the VAE for the
DiT, the image DiT for ``text_to_video``'s ``init=image``) and stop after training. A
cached stage is loaded by every rank. The parts other pipelines train (the text LM, the
vision and audio classifiers) are trained there, on one process or under their own
``train.parallel``: on several ranks a generator loads them from the cache and refuses a
missing one, naming the pipeline that trains it (:func:`cached_part`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vats_apps.generation import enrich as en
from vats_apps.generation.model import Sampling, TextConditioned, enrich_all
from vats_apps.pipelines import text_generation
from vats_apps.pipelines.cache import REPORT_NAME, entry_key, staged_entry
from vats_apps.pipelines.compiling import stage_trainer_config
from vats_apps.pipelines.distributed import (
    Ranks,
    global_lm_loss,
    launched_rank,
    parallel_config,
    parallel_key,
    parallel_model,
    parallel_training,
    scored_tokens,
    trained_part,
)
from vats_apps.pipelines.sections import preset_fields, section
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, is_int, is_number
from vats_core.parallel import ParallelConfig
from vats_core.training import Trainer, TrainerConfig
from vats_diffusion import EMA, Diffusion, SchedulerConfig
from vats_text.encoder import TextEncoder, TextEncoderConfig
from vats_text.model import MoELanguageModel
from vats_text.presets import encoder_preset
from vats_text.tokenizer import Tokenizer

__all__ = [
    "FLOW_SAMPLERS",
    "Fitted",
    "Objective",
    "Parts",
    "Stage",
    "StagedPipeline",
    "cached_part",
    "check_prompt_setting",
    "check_prompt_tokens",
    "diffusion_loss",
    "encoder_lr_scale",
    "enriched_copies",
    "enrichment_line",
    "frame_timesteps",
    "global_draw",
    "load_or_score",
    "load_or_train_enricher",
    "load_text",
    "model_section",
    "prompt_too_long",
    "scheduler_config",
    "slug",
    "terse_texts",
    "text_encoder_config",
    "untied",
]

# The samplers of each noise process's family: what generation.scheduler may name.
FLOW_SAMPLERS = ("flow_match_euler",)
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm_solver")


@dataclasses.dataclass
class Stage:
    """A trained stage: its model, the report written when it was trained, its cache entry
    name, and whether it came from the cache. On a rank other than 0 the model is None
    when no later stage trains from it, and the report holds what that rank knows."""

    model: Any
    report: dict[str, Any]
    key: str
    cached: bool


class Objective(nn.Module):
    """What a stage trains, as one module whose forward is the stage's loss:
    ``forward(batch)`` is ``loss(self, batch)``, which reads the parts as attributes
    (``self.model``, ``self.align``).

    DDP and FSDP run their hooks in the forward of the module they wrap (DDP prepares the
    gradient reduction, FSDP gathers the parameters outside the blocks), so the module
    handed to the trainer must compute the whole loss in its forward, even when the loss
    calls a part's own methods (the VAE's ``encode`` and ``decode``). The parts keep their
    names under it: ``lr_scales`` prefixes and the gathered weights read ``model.encoder``
    and the like.
    """

    def __init__(self, loss: Callable[[Objective, Any], Any], **parts: nn.Module) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)
        self.loss = loss

    def forward(self, batch: Any) -> Any:
        return self.loss(self, batch)


@dataclasses.dataclass
class Fitted:
    """A stage's training run: the trainer's module (the :class:`Objective` as
    ``train.parallel`` wrapped it), its seconds and its logged rows."""

    trained: nn.Module
    seconds: float
    rows: list[dict[str, Any]]

    def part(
        self, cfg: DictConfig, name: str, fresh: Callable[[], nn.Module], *, everywhere: bool
    ) -> Any:
        """The objective's part ``name`` with the trained weights: as is on one process;
        else a fresh plain copy on rank 0 (and on every rank with ``everywhere``), None
        on the other ranks (:func:`~vats_apps.pipelines.distributed.trained_part`)."""
        parallel = parallel_config(cfg)
        return trained_part(self.trained, name, fresh, parallel, everywhere=everywhere)


def global_draw(draw: Callable[[int], Tensor], rows: int) -> Tensor:
    """This rank's ``rows`` rows of ``draw(n)``, a random draw for the ``n`` rows of the
    global batch.

    Every rank draws for the whole global batch from the same RNG state (the trainer seeds
    every rank alike, and every rank draws alike), then keeps the rows the trainer gave it
    (rank r of W: rows ``[r·rows, (r+1)·rows)``). So a row draws what it draws on one
    process, whatever the world size, and the ranks' RNG states stay equal. Without a
    process group: ``draw(rows)`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return draw(rows)
    rank, world = dist.get_rank(), dist.get_world_size()
    return draw(rows * world)[rank * rows : (rank + 1) * rows]


def diffusion_loss(
    diffusion: Diffusion,
    dit: nn.Module,
    x0: Tensor,
    cond: Mapping[str, Tensor],
    weight: Tensor | None = None,
    weight_mean: Tensor | None = None,
    *,
    frame_noise: float = 0.0,
    frame_diff_weight: float = 0.0,
    first_frame: float = 0.0,
) -> Tensor:
    """:meth:`vats_diffusion.Diffusion.loss` on this rank's rows of the global batch: the
    timesteps, the noise and (in training, with the DiT's ``text_dropout``) the rows that
    lose their text, drawn in that order from the global RNG as one process draws them,
    each for the global batch (:func:`global_draw`); then the mean squared error of the
    DiT's prediction against the target.

    Args:
        weight: ``(B, 1, ...)``: each position's squared error weighted; the mean is then
            divided by ``weight_mean``, the mean weight of the global batch (a 0-d tensor
            the batch carries whole), so that the ranks' losses average to the global
            batch's weighted mean.
        frame_noise: clips ``x0 (B, C, T, h, w)`` only: the share of clips whose frames
            each draw their own timestep (Diffusion Forcing), noised each at its own level
            and given to the DiT as a ``(B, T)`` timestep (:func:`frame_timesteps`). 0 (the
            default): one timestep per clip, the draws and the loss exactly as without it.
        frame_diff_weight: clips only, unweighted: adds this times the mean squared error of
            the prediction's frame-to-frame differences against the target's
            (``pred[:, :, 1:] - pred[:, :, :-1]``). The plain loss weighs an error shared by
            every frame as much as one that differs from frame to frame; this term weighs
            only the second, what frames that should agree (or move together) get wrong
            between them. 0 (the default): the loss exactly as without it; nothing is
            added for a one-frame clip.
        first_frame: clips only, unweighted: the share of clips whose first frame (first
            tubelet) is given clean, at timestep 0, while the rest are noised at the clip's
            timestep, and left out of the loss (with the differences that involve it): the
            VideoDiT learns to continue a given frame, as image-to-video models are trained,
            which :func:`~vats_apps.generation.clips.sample_clips` uses to draw the clip's
            other frames from its first. Drawn last, for the global batch. 0 (the default):
            the draws and the loss exactly as without it.
    """
    if not (is_number(frame_noise) and 0 <= frame_noise <= 1):
        raise ValueError(
            f"diffusion_loss: frame_noise={frame_noise!r} is invalid: expected a number in [0, 1]"
        )
    if not (is_number(frame_diff_weight) and 0 <= frame_diff_weight < math.inf):
        raise ValueError(
            f"diffusion_loss: frame_diff_weight={frame_diff_weight!r} is invalid: expected a "
            "finite number >= 0"
        )
    if not (is_number(first_frame) and 0 <= first_frame <= 1):
        raise ValueError(
            f"diffusion_loss: first_frame={first_frame!r} is invalid: expected a number in [0, 1]"
        )
    if first_frame > 0 and frame_noise > 0:
        raise ValueError(
            f"diffusion_loss: first_frame={first_frame} and frame_noise={frame_noise} both "
            "set the frames' timesteps: expected one of them 0"
        )
    if first_frame > 0 and weight is not None:
        raise ValueError(
            f"diffusion_loss: first_frame={first_frame} is for the unweighted loss: expected "
            "weight=None"
        )
    clip_only = {
        "frame_noise": frame_noise, "frame_diff_weight": frame_diff_weight,
        "first_frame": first_frame,
    }  # fmt: skip
    for name, value in clip_only.items():
        if value > 0 and x0.ndim != 5:
            raise ValueError(
                f"diffusion_loss: {name}={value} needs clips x0 (B, C, T, h, w), got "
                f"{tuple(x0.shape)}"
            )
    if frame_diff_weight > 0 and weight is not None:
        raise ValueError(
            f"diffusion_loss: frame_diff_weight={frame_diff_weight} is for the unweighted "
            "loss: expected weight=None"
        )
    b = x0.shape[0]
    cpu = torch.device("cpu")  # (as Diffusion.loss: the numbers depend on the seed alone)
    t = global_draw(lambda n: diffusion.sample_timesteps(n, device=cpu), b).to(x0.device)
    noise = global_draw(lambda n: torch.randn((n, *x0.shape[1:])), b)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    p = float(dit.config.text_dropout)  # type: ignore[union-attr]
    if dit.training and p > 0 and cond.get("text_states") is not None:
        # (drawn where the DiT draws it, on the text's device)
        keep = global_draw(lambda n: torch.rand(n, device=x0.device) >= p, b)
        cond = {**cond, "text_keep": keep}
    if first_frame > 0:
        return _first_frame_loss(diffusion, dit, x0, noise, t, cond, first_frame, frame_diff_weight)
    if frame_noise == 0:
        pred = dit(diffusion.add_noise(x0, noise, t), t, **cond)
        target = diffusion.target(x0, noise, t)
    else:
        tubelet = int(getattr(dit.config, "patch_frames", 1))
        t = frame_timesteps(diffusion, t, x0.shape[2], tubelet, frame_noise)  # (B, T)
        # Each frame noised at its own level: the clip's frames as a batch of images.
        x0_f, noise_f = (rearrange(v, "b c t h w -> (b t) c h w") for v in (x0, noise))
        t_f = t.reshape(-1)  # (B·T,)
        x_t = diffusion.add_noise(x0_f, noise_f, t_f)
        target = diffusion.target(x0_f, noise_f, t_f)
        x_t, target = (rearrange(v, "(b t) c h w -> b c t h w", b=b) for v in (x_t, target))
        pred = dit(x_t, t, **cond)
    if weight is None:
        if frame_diff_weight == 0 or x0.shape[2] == 1:
            return F.mse_loss(pred.float(), target.float())
        # the differences' error is the error's difference: one subtraction for both terms
        err = pred.float() - target.float()
        return err.square().mean() + frame_diff_weight * err.diff(dim=2).square().mean()
    err = (pred.float() - target.float()) ** 2
    assert weight_mean is not None, "a weighted loss needs the global batch's mean weight"
    return (weight * err).mean() / weight_mean


def _first_frame_loss(
    diffusion: Diffusion,
    dit: nn.Module,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Mapping[str, Tensor],
    share: float,
    frame_diff_weight: float,
) -> Tensor:
    """:func:`diffusion_loss` with ``first_frame=share``: the chosen clips' first tubelet
    clean at timestep 0, the loss over the other frames only."""
    b, frames = x0.shape[0], x0.shape[2]
    given = int(getattr(dit.config, "patch_frames", 1))  # the frames of the first token
    chosen = global_draw(lambda n: torch.rand(n) < share, b).to(x0.device)  # (B,)
    is_given = torch.zeros(b, frames, dtype=torch.bool, device=x0.device)
    is_given[:, :given] = chosen[:, None]
    x_t = diffusion.add_noise(x0, noise, t)
    x_t = torch.where(is_given[:, None, :, None, None], x0, x_t)
    t_frames = torch.where(is_given, torch.zeros_like(t)[:, None], t[:, None])  # (B, T)
    pred = dit(x_t, t_frames, **cond)
    err = pred.float() - diffusion.target(x0, noise, t).float()
    keep = (~is_given).to(err.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    per_frame = err.shape[1] * err.shape[3] * err.shape[4]  # C·h·w numbers a frame
    loss = (err.square() * keep).sum() / (keep.sum() * per_frame).clamp_min(1)
    if frame_diff_weight > 0 and frames > 1:
        pair = keep[:, :, 1:] * keep[:, :, :-1]  # both frames of a difference are noised
        diff = (err.diff(dim=2).square() * pair).sum() / (pair.sum() * per_frame).clamp_min(1)
        loss = loss + frame_diff_weight * diff
    return loss


def frame_timesteps(
    diffusion: Diffusion, t: Tensor, frames: int, tubelet: int, share: float
) -> Tensor:
    """Diffusion Forcing's timesteps (Chen et al., 2024, arXiv:2407.01392): each clip of
    this rank's rows keeps its timestep ``t (B,)`` on every frame, or with probability
    ``share`` draws one per frame (per tubelet of ``tubelet`` frames, which share one
    token). Drawn after :func:`diffusion_loss`'s own draws, in this order and each for the
    global batch (:func:`global_draw`): which clips, then one timestep for every tubelet of
    every clip, from :meth:`~vats_diffusion.Diffusion.sample_timesteps` (B·T / tubelet
    draws). A clip that keeps its timestep has its draws of ``frame_noise=0``.

    Returns:
        ``(B, T)`` on ``t``'s device.
    """
    b, groups, cpu = t.shape[0], frames // tubelet, torch.device("cpu")
    own = global_draw(lambda n: torch.rand(n) < share, b)  # (B,) bool
    drawn = global_draw(
        lambda n: diffusion.sample_timesteps(n * groups, device=cpu).view(n, groups), b
    )  # (B, T / tubelet)
    per_group = torch.where(own[:, None], drawn, t.cpu()[:, None])
    return per_group.repeat_interleave(tubelet, dim=1).to(t.device)  # (B, T)


def cached_part(found: Any, p: StagedPipeline, cfg: DictConfig, part: str, trains: str) -> Any:
    """``found``, a part loaded from its pipeline's cache (None: absent), or the error of
    a run on several ranks, which train the stages from cached parts (a rank cannot train
    a part alone while the others wait).

    Raises:
        ValueError: naming the part and the pipeline (``trains``) that trains it.
    """
    if found is None:
        world = launched_rank().world
        raise ValueError(
            f"{p.name}: train.parallel: {world} ranks train the stages from cached parts, and "
            f"the {part} part (pipeline={trains}) of these settings is not in "
            f"{cfg.pipeline.cache_dir}: run this pipeline once on one process first (or "
            f"{trains} with these parts.* settings as its train section)"
        )
    return found


@dataclasses.dataclass(frozen=True)
class StagedPipeline:
    """A pipeline's name, cache format and per-stage code (see the module docstring)."""

    name: str
    cache_format: int  # bump when what is cached changes meaning
    code: Mapping[str, tuple[str, ...]]  # stage -> packages whose code trains its weights

    # ---- config fields -------------------------------------------------------------------

    def fail(self, key: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"{self.name}: {key}={value!r} is invalid: expected {allowed}")

    @contextlib.contextmanager
    def parallel_training(
        self,
        cfg: DictConfig,
        batch_keys: Sequence[str],
        meta_models: Callable[[], Iterable[nn.Module]],
    ) -> Iterator[Ranks]:
        """``train.parallel`` read and checked, then its process group for the life of the
        block, in which the pipeline loads its parts and trains its stages
        (:func:`~vats_apps.pipelines.distributed.parallel_training`).

        Before any work: the section, each global batch of ``batch_keys`` (a multiple of
        the ranks), and the stages' models ``meta_models()`` builds on the meta device.

        Raises:
            ValueError: naming the field that does not fit.
        """
        batches = {key: self.int(cfg, key, 1) for key in batch_keys}
        with parallel_training(cfg, batches, meta_models) as (_, ranks):
            yield ranks

    def int(self, cfg: DictConfig, key: str, minimum: int) -> int:
        value = OmegaConf.select(cfg, key)
        if not is_int(value) or value < minimum:
            raise self.fail(key, value, f"an int >= {minimum}")
        return int(value)

    def number(self, cfg: DictConfig, key: str, low: float, high: float = math.inf) -> float:
        value = OmegaConf.select(cfg, key)
        if not is_number(value) or not low <= value <= high:
            raise self.fail(key, value, f"a number in [{low}, {high}]")
        return float(value)

    def flag(self, cfg: DictConfig, key: str) -> bool:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    def built(
        self,
        factory: Callable[..., Config],
        cls: type,
        where: str,
        preset: str | None,
        **fields: Any,
    ) -> Any:
        """``factory(preset, **fields)`` (``factory(**fields)`` without a preset), with
        unknown fields and invalid values reported under the config key ``where``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"{self.name}: {where}.{unknown[0]} is not a {cls.__name__} field: expected "
                f"some of {sorted(known)}"
            )
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        try:
            return factory(**fields) if preset is None else factory(preset, **fields)
        except ValueError as e:
            raise ValueError(f"{self.name}: {where}: {e}") from None

    def sampling(
        self, cfg: DictConfig, scheduler: SchedulerConfig, text_dropout: float, dropout_key: str
    ) -> Sampling:
        """``generation.{scheduler, steps, guidance_scale}`` and ``enrichment.*``, checked
        against the trained noise process and the DiT's condition dropout
        (``text_dropout``, the config key ``dropout_key``)."""
        family = FLOW_SAMPLERS if scheduler.is_flow else DDPM_SAMPLERS
        name = OmegaConf.select(cfg, "generation.scheduler")
        name = scheduler.name.value if name is None else name
        if name not in family:
            raise self.fail(
                "generation.scheduler",
                name,
                f"null (the training scheduler) or one of {list(family)}: the DiT is trained "
                f"with train.dit.scheduler.name={scheduler.name.value!r}",
            )
        guidance = self.number(cfg, "generation.guidance_scale", 1.0)
        if guidance > 1 and text_dropout == 0:
            raise self.fail(
                "generation.guidance_scale",
                guidance,
                f"1 with {dropout_key}=0: guidance needs the null condition, which the DiT "
                "learns only through text_dropout > 0",
            )
        min_p = OmegaConf.select(cfg, "enrichment.min_p")
        if min_p is not None and (not is_number(min_p) or not 0 <= min_p <= 1):
            raise self.fail("enrichment.min_p", min_p, "null or a number in [0, 1]")
        steps = self.int(cfg, "generation.steps", 1)
        if steps > scheduler.num_train_timesteps:
            raise self.fail("generation.steps", steps, f"<= {scheduler.num_train_timesteps}")
        return Sampling(
            scheduler=name,
            steps=steps,
            guidance_scale=guidance,
            temperature=self.number(cfg, "enrichment.temperature", 0.0),
            min_p=None if min_p is None else float(min_p),
            max_new_tokens=self.int(cfg, "enrichment.max_new_tokens", 1),
            tries=self.int(cfg, "enrichment.tries", 1),
        )

    # ---- cache entries -------------------------------------------------------------------

    def entry(self, cfg: DictConfig, stage: str, spec: dict[str, Any]) -> Path:
        """The cache directory of ``stage`` trained under ``spec`` (and the stage's code)."""
        key = entry_key({"format": self.cache_format, "stage": stage, **spec}, self.code[stage])
        return Path(str(cfg.pipeline.cache_dir)).expanduser() / self.name / stage / key

    @staticmethod
    def cached(path: Path, cfg: DictConfig) -> bool:
        return (path / REPORT_NAME).is_file() and not cfg.pipeline.retrain

    @staticmethod
    def load_report(path: Path) -> dict[str, Any]:
        return json.loads((path / REPORT_NAME).read_text())

    @staticmethod
    def save_conditioned(path: Path, model: TextConditioned, report: dict[str, Any]) -> None:
        """A text encoder + DiT stage's entry: ``encoder/``, ``dit/`` and the report,
        written atomically."""
        report = report | {
            "parameters": {
                "encoder": sum(p.numel() for p in model.encoder.parameters()),
                "dit": sum(p.numel() for p in model.dit.parameters()),
            }
        }
        with staged_entry(path) as staging:
            model.encoder.save_pretrained(staging / "encoder")
            model.dit.save_pretrained(staging / "dit")  # type: ignore[operator]
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))

    @staticmethod
    def load_conditioned(path: Path, dit_class: type[PretrainedMixin]) -> tuple[TextEncoder, Any]:
        """The text encoder and DiT of an entry :meth:`save_conditioned` wrote."""
        return TextEncoder.from_pretrained(path / "encoder"), dit_class.from_pretrained(
            path / "dit"
        )

    # ---- training ------------------------------------------------------------------------

    def trainer(self, cfg: DictConfig, stage: str, steps: int, out_dir: Path) -> TrainerConfig:
        """``train.<stage>.trainer`` as the vats-core trainer's config."""
        return stage_trainer_config(
            section(cfg, f"train.{stage}", self.name).get("trainer", {}),
            f"{self.name}: train.{stage}.trainer",
            steps=steps,
            seed=int(cfg.pipeline.seed),
            out_dir=out_dir,
            progress=bool(cfg.pipeline.progress),
        )

    def fit(
        self,
        cfg: DictConfig,
        stage: str,
        objective: Objective,
        batch_fn: Callable[[int, int], Any],
        *,
        ema: Mapping[str, Any] | None = None,
        lr_scales: dict[str, float] | None = None,
    ) -> Fitted:
        """Train ``stage``'s objective with the vats-core trainer, wrapped as
        ``train.parallel`` says (in place on one process).

        Args:
            ema: ``{"decay", "warmup"}``: an EMA of the objective's plain weights (each
                rank's shards under FSDP), updated after every step and copied into them
                at the end: the averaged weights are the ones the stage keeps.
            lr_scales: parameter-name prefix -> multiplier of the stage's lr.
        """
        steps = int(OmegaConf.select(cfg, f"train.{stage}.max_steps"))
        out = Path(str(cfg.pipeline.out_dir)) / stage
        config = self.trainer(cfg, stage, steps, out)
        trained = parallel_model(objective, parallel_config(cfg))
        plain = trained.module if isinstance(trained, DistributedDataParallel) else trained
        # made after parallelize: under FSDP it averages the rank's shards (DTensors)
        average = None
        if ema is not None:
            average = EMA(plain, float(ema["decay"]), warmup=bool(ema["warmup"]))
        start = time.perf_counter()
        rows = Trainer(
            trained,
            config,
            data=batch_fn,
            loss_fn=_objective_loss,
            on_step=None if average is None else lambda _, m: average.update(m),
            lr_scales=lr_scales,
        ).fit()
        if average is not None:
            average.copy_to(plain)
        return Fitted(trained, time.perf_counter() - start, rows)

    def first(self, step: int, micro: int, cfg: DictConfig, stage: str) -> int:
        """Index of the first sample of a micro-batch: no sample repeats within a stage."""
        train = section(cfg, f"train.{stage}", self.name)
        accum = int(train.get("trainer", {}).get("grad_accum_steps", 1))
        return (step * accum + micro) * int(train["batch_size"])

    def train_enricher(
        self,
        cfg: DictConfig,
        path: Path,
        worlds: Sequence[tuple[str, en.World]],
        lm: MoELanguageModel,
        tokenizer: Tokenizer,
        *,
        stage: str = "enrich",
    ) -> Stage:
        """The LM fine-tuned (every weight, head untied) on terse prompt -> caption pairs of
        ``worlds`` (``(medium, world)``, taken in turn, one medium per row), saved at
        ``path`` by rank 0 (the other ranks' Stage has no model)."""
        model = untied(lm)
        b = int(OmegaConf.select(cfg, f"train.{stage}.batch_size"))
        ranked = parallel_config(cfg) != ParallelConfig()

        def batch_fn(step: int, micro: int) -> dict[str, Tensor]:
            first = self.first(step, micro, cfg, stage)
            media = [worlds[i % len(worlds)] for i in range(first, first + b)]
            pairs = [
                en.example(w, "train", i, medium=m)
                for i, (m, w) in zip(range(first, first + b), media, strict=True)
            ]
            batch = en.lm_batch(
                tokenizer,
                [p.prompt for p in pairs],
                [p.caption for p in pairs],
                [m for m, _ in media],
            )
            # 0-d, kept whole by the trainer's split: what a rank's loss is weighed by
            batch["caption_tokens"] = scored_tokens(batch["labels"]).sum()
            batch["rows"] = torch.tensor(b)
            return batch

        def loss(o: Objective, bt: dict[str, Tensor]) -> Tensor:
            out = o.model(bt["input_ids"], attention_mask=bt["attention_mask"], labels=bt["labels"])
            if not ranked:
                return out.loss
            labels, config = bt["labels"], o.model.config
            return global_lm_loss(out, labels, bt["caption_tokens"], bt["rows"], config)

        fitted = self.fit(cfg, stage, Objective(loss, model=model), batch_fn)
        rows = fitted.rows
        report = {"seconds": fitted.seconds, "final_loss": rows[-1]["loss"] if rows else None}
        fresh = functools.partial(MoELanguageModel, model.config)
        trained = fitted.part(cfg, "model", fresh, everywhere=False)
        if trained is None:  # a rank other than 0: rank 0 writes the entry
            return Stage(None, report, path.name, False)
        trained.eval()
        with staged_entry(path) as staging:
            trained.save_pretrained(staging / "model")
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
        return Stage(trained, report, path.name, False)


def _objective_loss(objective: nn.Module, batch: Any) -> Any:
    """The trainer's ``loss_fn`` for an :class:`Objective` (or its DDP / FSDP wrapper)."""
    return objective(batch)


def untied(lm: MoELanguageModel) -> MoELanguageModel:
    """A copy of ``lm`` whose head is its own weight, initialised to the embedding.

    Tied, the fine-tune pulls together the rows of words that fill the same slot of a
    caption (the head must score "left" and "right" alike where the position is open) until
    the input side cannot tell them apart: on the small LM, the cosine of "left" and
    "right" went from 0.57 to 0.97 in 600 steps and "left" was copied as "right" half the
    time. Untied, the head learns the slot and the embedding keeps the word.
    """
    out = MoELanguageModel(lm.config.replace(tie_embeddings=False))
    out.load_state_dict(lm.state_dict())
    return out.requires_grad_(True)


# ---- what the generating pipelines share besides the stages -------------------------------


@dataclasses.dataclass
class Parts:
    """The text part (``text_generation``'s tokenizer and LM) and, as a pipeline loads
    them, the other parts' cache entry names and reports."""

    tokenizer: Tokenizer
    lm: MoELanguageModel
    keys: dict[str, str]  # part -> its cache entry name
    reports: dict[str, dict[str, Any]]


def load_text(p: StagedPipeline, cfg: DictConfig, sub: DictConfig) -> Parts:
    """The tokenizer and LM of ``text_generation``'s cache for its config ``sub`` (trained
    first when absent, on one process; several ranks require it cached:
    :func:`cached_part`)."""
    if launched_rank().world > 1:
        lm = cached_part(text_generation.cached(sub), p, cfg, "text", "text_generation")
    else:
        lm = text_generation.load_or_train(sub)
    return Parts(
        lm.tokenizer, lm.model, {"text": text_generation.cache_key(sub)}, {"text": lm.report}
    )


def prompt_too_long(name: str, prompt: str, n: int, limit: int, unit: str) -> ValueError:
    """The error of a prompt of ``n`` ``unit`` (words or tokens) past the text encoder's
    context of ``limit`` tokens."""
    return ValueError(
        f"{name}: prompt={prompt!r} is too long: {n} {unit}, more than the text encoder's "
        f"context of {limit} tokens (train.dit.encoder.max_seq_len): shorten it"
    )


def slug(prompt: str) -> str:
    """A folder name for a prompt: lower-case words joined by ``_``, at most 48 characters."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or "prompt"


def terse_texts(batch: Any, first: int, terse_prob: float, medium: str, tag: str) -> list[str]:
    """A DiT's training texts: each sample's caption (``batch.captions``), or with
    probability ``terse_prob`` a terse prompt of it naming each attribute of ``medium``
    with probability 1/2; sample ``first + i``'s draw is seeded by ``"<tag>/<first + i>"``."""
    texts = []
    for i, text in enumerate(batch.captions):
        rng = random.Random(f"{tag}/{first + i}")
        if rng.random() < terse_prob:
            keep = [a for a in en.attributes(medium) if rng.random() < 0.5]
            text = en.terse_prompt(batch.names(i), keep, rng, "train", medium)
        texts.append(text)
    return texts


def enrichment_line(noun: str, i: int, o: en.Enrichment, enrich: bool) -> str:
    """The line generation prints for sample ``i`` (``noun``: image, clip, sound): the
    enriched prompt it was made from, or why the enrichment was not used."""
    if not enrich:
        return f"  {noun} {i}: {o.used!r}"
    if o.accepted:
        again = f" (try {o.tries}: the earlier ones changed the prompt)" if o.tries > 1 else ""
        return f"  {noun} {i}: enriched to {o.used!r}{again}"
    samples = f"{o.tries} sample{'s' if o.tries > 1 else ''}"
    return (
        f"  {noun} {i}: the enrichment {o.written!r} is not used, {o.reason} ({samples}); "
        "using the prompt"
    )


def model_section(
    p: StagedPipeline, cfg: DictConfig, key: str, set_by_pipeline: Sequence[str] = ()
) -> tuple[str, dict[str, Any]]:
    """A model section's preset and overrides, refusing the fields the pipeline sets
    (``set_by_pipeline``: from the data and the other parts)."""
    preset, fields = preset_fields(cfg, key, p.name)
    for name in set_by_pipeline:
        if name in fields:
            raise ValueError(f"{p.name}: {key}.{name} is set by the pipeline, not the config")
    return preset, fields


def text_encoder_config(p: StagedPipeline, cfg: DictConfig, vocab_size: int) -> TextEncoderConfig:
    """``train.dit.encoder`` (a text-encoder preset and overrides) for the LM's tokenizer of
    ``vocab_size`` pieces."""
    preset, fields = model_section(p, cfg, "train.dit.encoder", ("vocab_size",))
    return p.built(
        encoder_preset,
        TextEncoderConfig,
        "train.dit.encoder",
        preset,
        vocab_size=vocab_size,
        **fields,
    )


def encoder_lr_scale(p: StagedPipeline, cfg: DictConfig) -> float:
    """``train.dit.encoder_lr_scale``: the text encoder's learning rate as a fraction of the
    DiT's, a number in (0, 1].

    The encoder and the DiT learn together from nothing. At the DiT's rate the encoder's
    states keep moving while the DiT learns to read them, and the DiT learns to rely on
    what moves least: the timestep, the length, the average caption. A word that decides
    only a few bins or pixels (a pitch, a position) then stops mattering. In 400 steps of
    the AudioDiT, a tone followed its pitch word 38 % of the time with the encoder at the
    full rate (two-word captions), 94 % at 0.1, and 97 % with the encoder frozen at its
    random init. On full captions, 0.1 gave 62 % and the frozen encoder 91 %, so text to
    audio uses 0.01: the words stay apart, and the encoder still learns. The image DiT
    did not gain from it (configs/train/text_to_image.yaml)."""
    value = OmegaConf.select(cfg, "train.dit.encoder_lr_scale")
    if not is_number(value) or not 0 < value <= 1:
        raise p.fail("train.dit.encoder_lr_scale", value, "a number in (0, 1]")
    return float(value)


def scheduler_config(p: StagedPipeline, cfg: DictConfig) -> SchedulerConfig:
    """``train.dit.scheduler``: the noise process the DiT learns (SchedulerConfig fields)."""
    fields = section(cfg, "train.dit.scheduler", p.name)
    return p.built(SchedulerConfig, SchedulerConfig, "train.dit.scheduler", None, **fields)


def check_prompt_setting(
    p: StagedPipeline, cfg: DictConfig, world: en.World, medium: str, limit: int
) -> tuple[str | None, dict[str, str]]:
    """``prompt``: null, or a non-empty string naming only values of ``world`` (read as
    ``medium``) in at most ``limit`` words (the exact token count needs the tokenizer:
    :func:`check_prompt_tokens`). Returns the prompt as the models read it
    (:func:`~vats_apps.generation.enrich.read_prompt`: lowercase, no marks around it) and
    the attributes it names."""
    typed = OmegaConf.select(cfg, "prompt")
    if typed is None:
        return None, {}
    prompt = en.read_prompt(typed) if isinstance(typed, str) else ""
    if not prompt:
        raise ValueError(f"{p.name}: prompt={typed!r} is invalid: expected a non-empty string")
    given = en.check_prompt(prompt, world, medium=medium)
    # A token never spans whitespace: more words than the context is surely too long.
    if len(prompt.split()) > limit:
        raise prompt_too_long(p.name, prompt, len(prompt.split()), limit, "words")
    return prompt, given


def prompt_line(cfg: DictConfig, prompt: str, enrich: bool, world: en.World, medium: str) -> str:
    """What a generator prints of the prompt: the user's, how the models read it where that
    differs, and the words of it that no prompt or caption of ``world`` uses (the models
    never saw them, so they change nothing), with the values the world has."""
    typed = OmegaConf.select(cfg, "prompt")
    line = f"prompt: {typed!r}"
    if typed != prompt:
        line += f" (read as {prompt!r}, as the world's prompts are written)"
    if not enrich:
        line += " (enrich=false: used as it is)"
    unknown = en.unknown_words(prompt, world, medium)
    if unknown:
        values = "; ".join(f"{a} {'/'.join(v)}" for a, v in en.world_values(world, medium).items())
        line += (
            f"\n  not words of this world, which the models never saw: "
            f"{', '.join(map(repr, unknown))}; what it has: {values}"
        )
    return line


def check_prompt_tokens(p: StagedPipeline, prompt: str, tokenizer: Tokenizer, limit: int) -> None:
    """The prompt fits the text encoder's context of ``limit`` tokens (it reads the prompt
    when enrichment is off or falls back)."""
    n = len(tokenizer.encode(prompt))
    if n > limit:
        raise prompt_too_long(p.name, prompt, n, limit, "tokens")


def load_or_train_enricher(
    p: StagedPipeline,
    cfg: DictConfig,
    parts: Parts,
    world: en.World,
    medium: str,
    step: str,
) -> Stage:
    """The LM fine-tuned to rewrite terse prompts of ``medium`` into captions of ``world``
    (the ``enrich`` stage, cached under ``train.enrich``; ``step`` as "2/3" in what it
    prints when it trains)."""
    spec = {
        "text": parts.keys["text"],
        "world": world.to_dict(),
        "train": section(cfg, "train.enrich", p.name),
        "seed": int(cfg.pipeline.seed),
        **parallel_key(cfg),
    }
    path = p.entry(cfg, "enrich", spec)
    if p.cached(path, cfg):
        print(f"{p.name}: loading the cached enrichment LM from {path}", flush=True)
        model = MoELanguageModel.from_pretrained(path / "model")
        return Stage(model, p.load_report(path), path.name, True)
    print(
        f"{p.name}: stage {step}, enrich: the LM learns to write captions from prompts", flush=True
    )
    return p.train_enricher(cfg, path, [(medium, world)], parts.lm, parts.tokenizer)


def enriched_copies(
    lm: MoELanguageModel | None,
    tokenizer: Tokenizer,
    prompt: str,
    given: dict[str, str],
    n: int,
    world: en.World,
    sampling: Sampling,
    seed: int,
    medium: str,
) -> list[en.Enrichment]:
    """``n`` enrichments of one prompt (sampled from ``seed``), each checked against the
    attributes it names; without an LM (``enrich=false``) the prompt itself ``n`` times."""
    if lm is None:
        return [en.Enrichment(prompt, "", prompt, dict(given), None)] * n
    return enrich_all(
        lm, tokenizer, [prompt] * n, [given] * n, world, sampling,
        torch.Generator().manual_seed(seed), medium,
    )  # fmt: skip


def stage_results(done: Mapping[str, Stage], parts: Parts) -> dict[str, Any]:
    """What a generating pipeline returns about its stages: each one's report (as recorded
    when it trained), cache entry name and whether it came from the cache, and the parts'
    entry names."""
    return {
        "stages": {k: v.report for k, v in done.items()},
        "keys": {k: v.key for k, v in done.items()},
        "cached": {k: v.cached for k, v in done.items()},
        "parts": parts.keys,
    }


def score_spec(
    p: StagedPipeline, cfg: DictConfig, result: dict[str, Any], sampling: Sampling, **extra: Any
) -> dict[str, Any]:
    """The settings the cached scores depend on: every stage's and part's entry,
    ``train.eval``, the sampling, and ``extra``."""
    return {
        "keys": result["keys"] | result["parts"],
        "eval": section(cfg, "train.eval", p.name),
        "sampling": dataclasses.asdict(sampling),
        **extra,
    }


def load_or_score(
    p: StagedPipeline, cfg: DictConfig, spec: dict[str, Any], score: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """The scores cached under ``spec`` (the ``eval`` stage), or ``score()`` cached there:
    ``(scores, cached)``."""
    path = p.entry(cfg, "eval", spec)
    if p.cached(path, cfg):
        return p.load_report(path), True
    print(f"{p.name}: scoring the held-out prompts", flush=True)
    scores = score()
    with staged_entry(path) as staging:
        (staging / REPORT_NAME).write_text(json.dumps(scores, indent=2))
    return scores, False
