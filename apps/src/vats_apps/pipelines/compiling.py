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

import importlib.util
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf


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
