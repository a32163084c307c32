"""Training checkpoints on disk: RNG capture, step directories, the ``latest`` pointer.

Layout under ``out_dir/checkpoints``::

    step_00000200/
        model.safetensors     weights (safetensors; never pickled)
        config.json           only for PretrainedMixin models: from_pretrained works here
        optimizer.pt          optimizer.state_dict(), read back with weights_only=True
        trainer_state.pt      step, elapsed time, data position, RNG states, schedule
    step_00000400/
    latest                    text: the name of the newest complete step directory

A step directory is written in full under a temporary name, fsynced and renamed into
place; only then is ``latest`` replaced (atomically). A crash at any moment leaves
``latest`` naming a complete checkpoint. With ``TrainerConfig.sharded_checkpoints`` the
weights and optimizer state are a ``sharded/`` directory instead, every rank writing its
own shards (:mod:`vats_core.parallel.sharded`), under the same temporary-then-rename rule.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vats_core.checkpoint import (
    PretrainedMixin,
    atomic_write_text,
    load_pretrained_state,
    load_safetensors,
    save_pretrained,
    save_safetensors,
)

STATE_FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint's files (vats_core.parallel.sharded)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_sharded(step_dir: str | os.PathLike[str]) -> bool:
    """The step directory holds a sharded (DCP) checkpoint, else the single-file format."""
    return (Path(step_dir) / SHARDED_DIR / ".metadata").is_file()


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), python ``random`` and numpy if installed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional: vats-core does not depend on it
        return None
    return numpy


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG the training loop may draw from, as weights_only-loadable values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": None,
    }
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise ValueError(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA device(s) but this "
                f"machine has {torch.cuda.device_count() if torch.cuda.is_available() else 0}: "
                "the resumed run could not be exact"
            )
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np = _numpy()
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- step directories


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete step directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``root/latest`` names, or None when there is no checkpoint yet."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path}, which does not exist")
    return path


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def temporary_step_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    return root / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """Create the empty temporary directory a checkpoint of ``step`` is written into.

    Its name is a function of the step, so every rank of a sharded save writes into the
    same one; :func:`finish_checkpoint` renames it into place.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_step_dir(root, step)
    if tmp.exists():  # debris of a crash during an earlier write of this step
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(
    root: Path, step: int, tmp: Path, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Add the trainer state to ``tmp``, fsync it, rename it to ``root/step_<step>``, point
    ``latest`` at it and prune: step directories newer than ``step`` (left by an abandoned
    run that this one resumed before), then all but the newest ``keep``.

    Until the rename nothing of the previous checkpoints changes, so a crash leaves
    ``latest`` naming a complete one.
    """
    final = root / step_dir_name(step)
    try:
        torch.save({"format_version": STATE_FORMAT_VERSION, **trainer_state}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # same step from an abandoned timeline: replace it
            trash = root / f".old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    for old_step, path in list_step_dirs(root):
        if old_step > step:
            shutil.rmtree(path)
    kept = list_step_dirs(root)
    for _, path in kept[: max(0, len(kept) - keep)]:
        shutil.rmtree(path)
    return final


def save_training_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically, point ``latest`` at it, prune old ones.

    See :func:`finish_checkpoint` for the pruning. ``model_state`` and ``optimizer_state``
    replace ``model.state_dict()`` and ``optimizer.state_dict()``: the full state a
    data-parallel run gathered to the writing rank.
    """
    if model_state is None:
        model_state = model.state_dict()
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    tmp = begin_checkpoint(root, step)
    try:
        if isinstance(model, PretrainedMixin):
            save_pretrained(model, tmp, state_dict=model_state)  # config.json + weights
        else:
            save_safetensors(model_state, tmp / MODEL_FILE)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(root, step, tmp, trainer_state, keep)


def load_training_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer from a step directory; return the trainer state dict.

    All three files are read, and the weights checked against the model, before the
    model or the optimizer is modified.

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        ValueError: a file is corrupt or truncated, or the weights do not fit the model.
    """
    tensors, optim_state, state = read_training_checkpoint(path)
    load_pretrained_state(model, tensors, path / MODEL_FILE)
    optimizer.load_state_dict(optim_state)
    return state


def read_training_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a step directory's weights, optimizer state and trainer state, all on CPU.

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        ValueError: a file is corrupt or truncated, or of a newer format.
    """
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path / name}")
    tensors = load_safetensors(path / MODEL_FILE)
    optim_state = _torch_load(path / OPTIMIZER_FILE)
    return tensors, optim_state, read_trainer_state(path)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A step directory's ``trainer_state.pt``: step, elapsed, data position, RNG, config."""
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path / STATE_FILE}")
    state = _torch_load(path / STATE_FILE)
    if state.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path / STATE_FILE} has format_version={state.get('format_version')}; this "
            f"vats_core reads <= {STATE_FORMAT_VERSION}"
        )
    return state


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # bad archives
        raise ValueError(f"checkpoint in {path.parent} is corrupt or truncated ({e})") from e
