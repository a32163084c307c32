"""The pipelines' compile switches, read and checked before any work.

``pipeline.compile`` (default false): evaluation loops run on the model compiled with
inductor's freezing (:func:`vats_core.inference.compile_frozen`), and text generation
compiles its decode step (``vats_text.generation.generate(..., compile=True)``).
``train.compile`` (default false): the training step runs through ``torch.compile``
(:attr:`vats_core.training.TrainerConfig.compile`).

Both need setuptools at run time (inductor's CPU code generation); a missing one is
reported here, before a tokenizer or a model is trained.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from vats_core.training import TrainerConfig


class CompileFlags(NamedTuple):
    evaluation: bool  # pipeline.compile: frozen compiled evaluation (and generation)
    training: bool  # train.compile: TrainerConfig.compile


def _flag(cfg: DictConfig, key: str) -> bool:
    value = OmegaConf.select(cfg, key, default=False)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is invalid: expected true or false")
    return value


def compile_flags(cfg: DictConfig) -> CompileFlags:
    """``pipeline.compile`` and ``train.compile`` as bools (absent: false).

    Raises:
        ValueError: a flag that is not a bool.
    """
    return CompileFlags(_flag(cfg, "pipeline.compile"), _flag(cfg, "train.compile"))


def check_compile_switches(cfg: DictConfig) -> CompileFlags:
    """:func:`compile_flags`, and the code generation they need: a pipeline's first check.

    Raises:
        ValueError: a flag that is not a bool, or a flag on without setuptools.
    """
    flags = compile_flags(cfg)
    if any(flags) and importlib.util.find_spec("setuptools") is None:
        raise ValueError(
            "pipeline.compile / train.compile run torch.compile, whose CPU code generation "
            "needs setuptools: pip install setuptools (or leave both false)"
        )
    return flags


def trainer_fields(section: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``trainer`` section's TrainerConfig fields, refusing ``compile`` there: the switch
    is ``train.compile``, one place for every pipeline."""
    if "compile" in section:
        raise ValueError(f"{where}.compile is not read: set train.compile instead")
    return dict(section)


def stage_trainer_config(
    section: dict[str, Any],
    where: str,
    *,
    steps: int,
    seed: int,
    out_dir: Path,
    progress: bool,
    compile: bool = False,
) -> TrainerConfig:
    """The TrainerConfig of one training stage of a pipeline: the ``trainer`` section's
    fields (``where`` names it in errors) with the steps, seed, output directory and
    progress the pipeline sets, and no checkpoints (stages are cached whole). A warmup
    longer than a short run (``max_steps=3`` in tests) is cut to the run.

    Raises:
        ValueError: naming ``where`` and the unknown or invalid fields.
    """
    fields = trainer_fields(section, where)
    if "warmup_steps" in fields:
        fields["warmup_steps"] = min(int(fields["warmup_steps"]), steps)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TrainerConfig)})
    if unknown:
        raise ValueError(f"{where}: {unknown} are not TrainerConfig fields")
    try:
        return TrainerConfig(
            **fields,
            max_steps=steps,
            seed=seed,
            out_dir=str(out_dir),
            checkpoint_every=0,
            progress=progress,
            compile=compile,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
