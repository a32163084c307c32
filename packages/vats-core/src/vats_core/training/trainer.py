"""The generic trainer: AdamW (or Muon on chosen matrices), warmup + cosine, clipping, accumulation, exact resume.

The trainer knows nothing about the model's API: a ``loss_fn(model, batch)`` computes
the loss (and optional extra metrics), a :class:`~vats_core.training.data.BatchSource`
(or a plain ``batch_fn(step, micro)``) supplies micro-batches. One optimizer step:

1. set the learning rate from :func:`~vats_core.training.schedule.lr_at`;
2. for each of ``grad_accum_steps`` micro-batches: forward + loss (bf16 autocast on
   CUDA if asked; through ``torch.compile`` if ``config.compile``), backward of
   ``loss / grad_accum_steps``;
3. stop with :class:`NonFiniteLossError` if the loss or the gradient norm is NaN/inf,
   before the optimizer touches the weights;
4. clip the global gradient norm, ``optimizer.step()``, zero the gradients, call the
   ``on_step`` hook if given (e.g. an EMA update);
5. log (tqdm and ``out_dir/metrics.jsonl``), evaluate, checkpoint.

Checkpoints hold the model, the optimizer, every RNG, the data position and the step,
so ``fit(resume=True)`` continues bit for bit where the saved run stood, in a new process
too: the numbers depend on the machine and the thread count only, with no flag or
environment variable to set.

``TrainerConfig.compile`` wraps ``loss_fn`` in ``torch.compile`` once, when the trainer is
built: the model's forward and the loss are traced into a graph (graph breaks fall back to
eager Python for their part) and AOTAutograd compiles the matching backward, which
``loss.backward()`` runs. Dynamo guards the graph on the batch's shapes and dtypes and the
model's mode, so a run with a fixed batch shape compiles on its first step and never
again (a different last batch compiles once more). ``eval_fn`` stays eager. The first step
on CPU takes tens of seconds to compile; compiled numbers differ from eager ones at float
rounding (fused kernels), so resume a compiled run compiled and an eager run eager.

Under ``torchrun`` (an initialized default process group), pass the model that
:func:`vats_core.parallel.parallelize` returned (DDP or FSDP2): every rank draws the same
global micro-batches and keeps its share of the rows, gradients are averaged across ranks,
the logged loss and metrics are global means, and only rank 0 prints and writes
``metrics.jsonl``. Checkpoints are gathered to rank 0 in the single-process format, or,
with ``TrainerConfig.sharded_checkpoints``, written by every rank as its own shards
(:mod:`vats_core.parallel.sharded`); either resumes on another world size. The rules are
in :mod:`vats_core.parallel.runtime`. Without a process group nothing of this runs: the
single-process path is unchanged.

Example (classification; for language models pass ``items_fn=lambda b: b["ids"].numel()``
and ``items_name="tokens"`` to see tokens/s)::

    from vats_core.training import TensorBatches, Trainer, TrainerConfig

    x, y = torch.randn(512, 16), torch.randint(0, 4, (512,))
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

    def loss_fn(model, batch):  # -> loss, or (loss, {name: value} to log)
        logits = model(batch["x"])
        acc = (logits.argmax(-1) == batch["y"]).float().mean()
        return F.cross_entropy(logits, batch["y"]), {"acc": acc}

    config = TrainerConfig(max_steps=200, lr=1e-3, warmup_steps=20, checkpoint_every=50,
                           out_dir="runs/mlp")
    data = TensorBatches({"x": x, "y": y}, batch_size=32, seed=0)
    Trainer(model, config, data=data, loss_fn=loss_fn).fit(resume=True)  # resumes if it can
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.util
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from vats_core.checkpoint import atomic_write_text
from vats_core.config import is_number
from vats_core.moe import COMPILE_SETTINGS
from vats_core.training.config import TrainerConfig
from vats_core.training.data import BatchSource, FunctionBatches, default_batch_items
from vats_core.training.muon import MuonAdamW
from vats_core.training.schedule import lr_at
from vats_core.training.state import (
    MODEL_FILE,
    begin_checkpoint,
    capture_rng_state,
    finish_checkpoint,
    is_sharded,
    latest_checkpoint,
    list_step_dirs,
    load_training_checkpoint,
    read_trainer_state,
    read_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
    seed_everything,
    step_dir_name,
    temporary_step_dir,
)

if TYPE_CHECKING:
    from vats_core.parallel.runtime import DataParallelRun

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]
EvalFn = Callable[[nn.Module], Mapping[str, Any]]

METRICS_FILE = "metrics.jsonl"
# torch.compile backend of the training step; tests swap in "aot_eager" (dynamo + AOTAutograd,
# no code generation) to check the plumbing and the guards in seconds.
_COMPILE_BACKEND: str | Callable[..., Any] = "inductor"
# TrainerConfig fields that do not change the numbers: resuming with other values is fine.
_HARMLESS_CHANGES = {
    "out_dir",
    "progress",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sharded_checkpoints",  # the format: a run resumes from either
}
CHECKPOINT_DIR = "checkpoints"


class _StepResult(NamedTuple):
    loss: float  # mean over the step's micro-batches
    grad_norm: float  # global L2 norm before clipping
    lr: float
    items: int  # samples/tokens seen, for throughput
    metrics: dict[str, float]  # loss_fn's extra metrics, mean over micro-batches


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the optimizer did not step."""

    def __init__(self, step: int, what: str, value: float) -> None:
        self.step = step
        super().__init__(
            f"non-finite {what} ({value}) at step {step}: training stopped before the "
            "optimizer step, so the weights and the last checkpoint are those of the last "
            "good step (lower the lr, enable grad_clip, or check the data)"
        )


def build_optimizer(
    model: nn.Module, config: TrainerConfig, lr_scales: Mapping[str, float] | None = None
) -> torch.optim.Optimizer:
    """AdamW with weight decay on >= 2-D parameters only; with ``config.muon``, Muon on the
    2-D weights those patterns name (:class:`~vats_core.training.muon.MuonAdamW`).

    Matrices (linear and conv weights, embeddings) are decayed; biases and norm gains
    (1-D) are not: shrinking them toward zero only fights the normalization and the
    offsets, the GPT-2/nanoGPT convention. Frozen parameters are left out.

    ``lr_scales`` maps parameter-name prefixes (module paths, ``"image_encoder"``) to a
    multiplier of the scheduled learning rate, kept in each param group as ``lr_scale``
    (the longest matching prefix wins; other parameters get 1). A prefix that matches no
    trainable parameter, or a scale that is not a positive finite number, is refused.

    The update runs as torch's fused AdamW kernel (one pass over each parameter and its
    moments) wherever it exists for the parameters' device, as HF's Trainer does by default.
    The per-parameter loop torch falls back to on CPU allocates and walks five temporaries
    per tensor: on a 152 M-parameter model (2 threads) its step took 671 ms, the fused one
    109 ms, with the same result to float rounding.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    scales = dict(lr_scales or {})
    for prefix, scale in scales.items():
        if not (isinstance(prefix, str) and prefix):
            raise ValueError(f"lr_scales keys must be parameter-name prefixes, got {prefix!r}")
        if not (is_number(scale) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"lr_scales[{prefix!r}]={scale!r} is invalid: expected a number > 0")
        if not any(_under(name, prefix) for name, _ in named):
            raise ValueError(
                f"lr_scales[{prefix!r}] matches no trainable parameter of "
                f"{type(model).__name__} (a module path such as "
                f"{named[0][0].rsplit('.', 1)[0]!r} is expected)"
            )

    def scale_of(name: str) -> float:
        hits = [prefix for prefix in scales if _under(name, prefix)]
        return float(scales[max(hits, key=len)]) if hits else 1.0

    scale_by_name = {name: scale_of(name) for name, _ in named}
    muon = _muon_names(named, config.muon, type(model).__name__)
    # per scale, a decayed and an undecayed group (as without scales: [decay, no_decay]),
    # and with Muon a group of its matrices
    param_groups: list[dict[str, Any]] = []
    muon_groups: list[dict[str, Any]] = []
    for scale in sorted(set(scale_by_name.values()), reverse=True):
        mine = [(name, p) for name, p in named if scale_by_name[name] == scale]
        adamw = [p for name, p in mine if name not in muon]
        param_groups += [
            {"params": [p for p in adamw if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in adamw if p.ndim < 2], "weight_decay": 0.0},
        ]
        for group in param_groups[-2:]:
            group["lr_scale"] = scale
        matrices = [p for name, p in mine if name in muon]
        if matrices:
            muon_groups.append(
                {"params": matrices, "weight_decay": config.weight_decay, "lr_scale": scale}
            )
    devices = {p.device.type for _, p in named}
    fused = len(devices) == 1 and devices <= _FUSED_ADAMW_DEVICES
    if muon_groups:
        return MuonAdamW(
            param_groups,
            muon_groups,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            fused=fused or None,
            momentum=config.muon_momentum,
        )
    return torch.optim.AdamW(
        param_groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )


def _muon_names(
    named: list[tuple[str, nn.Parameter]], patterns: tuple[str, ...], owner: str
) -> set[str]:
    """The names of the 2-D parameters matching any of ``patterns`` (fnmatch); a pattern
    matching no 2-D trainable parameter is refused."""
    out: set[str] = set()
    for pattern in patterns:
        hits = {n for n, p in named if p.ndim == 2 and fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(
                f"TrainerConfig.muon pattern {pattern!r} matches no 2-D trainable parameter of "
                f"{owner} (names such as {named[0][0]!r}; Muon updates weight matrices only)"
            )
        out |= hits
    return out


def _under(name: str, prefix: str) -> bool:
    """``name`` is the parameter ``prefix`` or lies inside the module ``prefix``."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


_FUSED_ADAMW_DEVICES = {"cpu", "cuda", "xpu", "mps"}  # where torch ships a fused AdamW


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch; leave everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32, to sum metrics over micro-batches (float64 stays float64)."""
    return t.float() if t.dtype.itemsize < 4 else t


def _json_float(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    return value if math.isfinite(value) else None


def _check_scalar(value: Any, what: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    elif not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number or a scalar tensor, got {type(value).__name__}")


def _as_float(value: Any, what: str) -> float:
    _check_scalar(value, what)
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _compiled(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` through torch.compile; a missing code-generation dependency is reported
    here, when the trainer is built, before any work."""
    if _COMPILE_BACKEND == "inductor" and importlib.util.find_spec("setuptools") is None:
        raise ValueError(
            "TrainerConfig.compile=True runs torch.compile, whose CPU code generation needs "
            "setuptools: pip install setuptools (or set compile=False)"
        )
    compiled = torch.compile(loss_fn, backend=_COMPILE_BACKEND)

    @functools.wraps(loss_fn)
    def forward_loss(model: nn.Module, batch: Any) -> Any:
        # (MoE expert groups: data-dependent sizes inside the graph, not a graph break)
        with torch._dynamo.config.patch(**COMPILE_SETTINGS):
            return compiled(model, batch)

    return forward_loss


class Trainer:
    """Train ``model`` with ``loss_fn`` on batches from ``data``; see the module docstring.

    Args:
        model: any nn.Module, already on its device (batches are moved to the device of
            its first parameter); under torchrun, what
            :func:`vats_core.parallel.parallelize` returned for it.
        config: optimization, schedule, checkpoint and logging settings.
        data: a :class:`BatchSource`, or ``batch_fn(step, micro) -> batch`` with the
            0-based step and micro-batch index.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss tensor, or
            ``(loss, metrics)`` with ``metrics`` a dict of numbers/scalar tensors that is
            averaged over micro-batches and logged.
        eval_fn: ``eval_fn(model) -> dict[str, float]``, called every ``eval_every``
            steps and at the last step, in eval mode under ``torch.no_grad``; logged with
            an ``eval/`` prefix. Under torchrun every rank calls it (an FSDP model's forward
            gathers its shards) with the plain model (DDP's ``.module``); rank 0's figures
            are logged.
        items_fn: counts the items in a batch for throughput (default: the leading size
            of its first tensor, i.e. samples); for language models count tokens.
        items_name: the unit of ``items_fn`` ("samples", "tokens"), shown in the
            progress bar and logged as ``throughput_unit``.
        on_step: ``on_step(step, model)``, called after every optimizer step with the
            number of steps done (1, 2, ...) and the updated (plain) model, before that step's
            logging, evaluation and checkpoint: e.g. an EMA of the weights
            (``ema.update(model)``). Whatever it keeps is its own state, not part of the
            trainer's checkpoints.
        lr_scales: parameter-name prefix -> multiplier of the scheduled learning rate
            (e.g. ``{"image_encoder": 0.1}`` fine-tunes an encoder ten times more gently
            than the rest); see :func:`build_optimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        *,
        data: BatchSource | Callable[[int, int], Any],
        loss_fn: LossFn,
        eval_fn: EvalFn | None = None,
        items_fn: Callable[[Any], int] | None = None,
        items_name: str = "samples",
        on_step: Callable[[int, nn.Module], None] | None = None,
        lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(config, TrainerConfig):
            raise ValueError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if on_step is not None and not callable(on_step):
            raise ValueError(
                f"on_step must be None or a callable on_step(step, model), got "
                f"{type(on_step).__name__}"
            )
        if isinstance(data, BatchSource):
            self.data: BatchSource = data
        elif callable(data):
            self.data = FunctionBatches(data, config.grad_accum_steps)
        else:
            raise ValueError(
                "data must be a BatchSource (next_batch/state_dict/load_state_dict) or a "
                f"callable batch_fn(step, micro), got {type(data).__name__}"
            )
        # None: one process, the path as it always was. Else the rank's part of a
        # data-parallel run (refuses a plain model on several ranks).
        self._dp: DataParallelRun | None = _data_parallel_run(model)
        self.model = model
        # the plain model: the optimizer's parameter names, checkpoints, eval_fn, on_step
        self.module: nn.Module = model if self._dp is None else self._dp.module
        self.config = config
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.items_fn = items_fn or default_batch_items
        self.items_name = items_name
        self.on_step = on_step
        self.optimizer = build_optimizer(self.module, config, lr_scales)
        self.device = next(model.parameters()).device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_root = self.out_dir / CHECKPOINT_DIR
        self.metrics_path = self.out_dir / METRICS_FILE
        self.step = 0  # optimizer steps completed
        self._elapsed_before = 0.0  # training seconds of earlier sessions of this run
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._main = self._dp is None or self._dp.is_main  # prints and writes files
        self._amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        # The step's forward + loss: loss_fn itself, or wrapped once here (never per step);
        # dynamo reuses the graph it traced at the first step while its guards hold.
        self._forward_loss: LossFn = _compiled(loss_fn) if config.compile else loss_fn

    # ----------------------------------------------------------------------- public API

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train up to ``config.max_steps`` (or ``stop_after``) optimizer steps.

        Args:
            resume: continue from ``out_dir/checkpoints/latest`` when it exists (a warning
                and a fresh start otherwise). Without it, an ``out_dir`` that already holds
                checkpoints is refused rather than overwritten.
            stop_after: stop once this many steps are done (and checkpoint, if
                checkpointing is on), e.g. to split a run over several jobs; the schedule
                still spans ``max_steps``.

        Returns:
            The metric rows logged during this call (also appended to metrics.jsonl).

        Raises:
            NonFiniteLossError: the loss or gradient norm is NaN/inf.
        """
        cfg = self.config
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after={stop_after} is invalid: expected None or an int >= 1")
        if self._main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start(resume)
        end = min(cfg.max_steps, stop_after if stop_after is not None else cfg.max_steps)
        self._amp = self._autocast()  # chosen once: the CPU note is printed once
        rows: list[dict[str, Any]] = []
        self.model.train()
        saved_at = self.step
        session_start = time.perf_counter()
        window_start, window_items = session_start, 0
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and self._main),
            desc="train",
            dynamic_ncols=True,
        )
        try:
            while self.step < end:
                result = self._train_step()
                self.step += 1
                if self.on_step is not None:
                    self.on_step(self.step, self.module)
                window_items += result.items
                bar.update(1)
                elapsed = self._elapsed_before + time.perf_counter() - session_start
                last = self.step == cfg.max_steps
                row: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    throughput = window_items / max(now - window_start, 1e-9)
                    window_start, window_items = now, 0
                    row = self._train_row(result, throughput, elapsed)
                    bar.set_postfix(
                        loss=f"{result.loss:.4f}",
                        lr=f"{result.lr:.2e}",
                        **{f"{self.items_name}/s": f"{throughput:.0f}"},
                    )
                if self._eval_due(last):
                    row.update(step=self.step, **self._evaluate())
                if row:
                    if self._main:
                        self._append_metrics(row)
                    rows.append(row)
                if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(elapsed)
                    saved_at = self.step
            if cfg.checkpoint_every > 0 and saved_at != self.step:
                self.save_checkpoint(self._elapsed_before + time.perf_counter() - session_start)
        finally:
            bar.close()
        self._elapsed_before += time.perf_counter() - session_start
        return rows

    def save_checkpoint(self, elapsed: float | None = None) -> Path:
        """Write a checkpoint of the current step; returns its directory.

        Under torchrun every rank must call it (FSDP gathers the shards); rank 0 writes,
        and every rank returns once the checkpoint is complete.
        """
        state = {
            "step": self.step,
            "elapsed": self._elapsed_before if elapsed is None else elapsed,
            "data": self.data.state_dict(),
            "rng": capture_rng_state(),
            # The schedule is a pure function of the step: its whole state is the step.
            "scheduler": {"step": self.step},
            "trainer_config": self.config.to_dict(),
        }
        if self.config.sharded_checkpoints:
            return self._save_sharded(state)
        if self._dp is None:
            return save_training_checkpoint(
                self.checkpoint_root,
                self.step,
                self.model,
                self.optimizer,
                state,
                keep=self.config.keep_checkpoints,
            )
        model_state, optimizer_state = self._dp.gathered_state(self.optimizer)
        path = self.checkpoint_root / step_dir_name(self.step)
        if self._main:
            path = save_training_checkpoint(
                self.checkpoint_root,
                self.step,
                self.module,
                self.optimizer,
                state,
                keep=self.config.keep_checkpoints,
                model_state=model_state,
                optimizer_state=optimizer_state,
            )
        self._barrier()  # no rank reads or resumes from a checkpoint still being written
        return path

    def _save_sharded(self, state: dict[str, Any]) -> Path:
        """Every rank writes its shards into the temporary step directory rank 0 made; rank 0
        adds the trainer state and renames it into place once DCP has all shards on disk."""
        from vats_core.parallel.sharded import save_sharded

        root, step = self.checkpoint_root, self.step
        tmp = temporary_step_dir(root, step)
        if self._main:
            begin_checkpoint(root, step)
        self._barrier()
        try:
            # returns once every rank's is written (AdamW's state is made if none exists yet)
            with self._optimizer_context():
                save_sharded(tmp, self.model, self.optimizer)
        except BaseException:
            if self._main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        path = root / step_dir_name(step)
        if self._main:
            path = finish_checkpoint(root, step, tmp, state, self.config.keep_checkpoints)
        self._barrier()
        return path

    def _load_state(self, path: Path) -> dict[str, Any]:
        """Load the model's and optimizer's state from ``path``; the trainer state."""
        if is_sharded(path):
            from vats_core.parallel.sharded import load_sharded

            load_sharded(path, self.model, self.optimizer)
            return read_trainer_state(path)
        if self._dp is None:
            return load_training_checkpoint(path, self.model, self.optimizer)
        tensors, optimizer_state, state = read_training_checkpoint(path)
        self._dp.load_state(self.optimizer, tensors, optimizer_state, path / MODEL_FILE)
        return state

    def _optimizer_context(self) -> contextlib.AbstractContextManager[Any]:
        # (FSDP with expert parallelism: sharded DTensors beside the plain expert weights)
        return contextlib.nullcontext() if self._dp is None else self._dp.optimizer_context()

    def _barrier(self) -> None:
        if self._dp is not None:
            self._dp.barrier()

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore model, optimizer, data position, RNG and step; returns the step.

        Args:
            path: a step directory; default: the one ``checkpoints/latest`` names.

        Raises:
            ValueError: the checkpoint was written with another global batch
                (``grad_accum_steps``, or the data source's batch size), before any step.
        """
        path = Path(path) if path is not None else latest_checkpoint(self.checkpoint_root)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.checkpoint_root}")
        with self._optimizer_context():
            state = self._load_state(path)
        saved = state.get("trainer_config", {})
        current = self.config.to_dict()
        accum = saved.get("grad_accum_steps", current["grad_accum_steps"])
        if accum != current["grad_accum_steps"]:
            raise ValueError(
                f"TrainerConfig.grad_accum_steps={current['grad_accum_steps']} is invalid for "
                f"resuming {path}: it was written with grad_accum_steps={accum}, and a changed "
                "global batch would not continue that run (the number of ranks may change; "
                "the global batch may not)"
            )
        changed = sorted(
            k for k in current.keys() - _HARMLESS_CHANGES if saved.get(k, current[k]) != current[k]
        )
        if changed and self._main:  # once per run, not once per rank
            warnings.warn(
                f"resuming {path} with changed TrainerConfig fields {changed}: the run "
                "will not match an uninterrupted one",
                stacklevel=2,
            )
        self.data.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed", 0.0))
        return self.step

    # ----------------------------------------------------------------------- internals

    def _start(self, resume: bool) -> None:
        """Resume from the latest checkpoint, or seed a fresh run."""
        has_checkpoints = bool(list_step_dirs(self.checkpoint_root))
        if resume:
            path = latest_checkpoint(self.checkpoint_root)
            if path is not None:
                self.load_checkpoint(path)
                if self._main:
                    self._truncate_metrics()
                return
            if self._main:
                warnings.warn(
                    f"resume=True but {self.checkpoint_root} holds no checkpoint: starting fresh",
                    stacklevel=3,
                )
        elif has_checkpoints:
            raise ValueError(
                f"{self.checkpoint_root} already holds checkpoints: pass resume=True to "
                "continue that run, or choose another out_dir"
            )
        seed_everything(self.config.seed)
        self.step = 0
        self._elapsed_before = 0.0
        if self._main:
            self.metrics_path.unlink(missing_ok=True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.config.bf16_autocast:
            return contextlib.nullcontext()
        if self.device.type != "cuda":
            warnings.warn(
                f"bf16_autocast is ignored on {self.device.type}: it is for CUDA only "
                "(bf16 matmuls are slow on CPU); training in the model's dtype",
                stacklevel=3,
            )
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def _split_loss(self, out: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        loss, extras = (out[0], out[1]) if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return a scalar tensor or (scalar tensor, dict); got "
                f"{type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        if not isinstance(extras, Mapping):
            raise ValueError(f"loss_fn's metrics must be a dict, got {type(extras).__name__}")
        return loss.reshape(()), extras

    def _train_step(self) -> _StepResult:
        """One optimizer step over grad_accum_steps micro-batches."""
        cfg = self.config
        accum = cfg.grad_accum_steps
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum: torch.Tensor | float = 0.0
        extras_sum: dict[str, Any] = {}
        items = 0
        for micro in range(accum):
            batch = self.data.next_batch()
            items += self.items_fn(batch)  # the global batch's: throughput of all ranks
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self._dp is not None:
                batch = self._dp.shard(batch)  # this rank's rows
                sync = self._dp.gradient_sync(micro == accum - 1)
            batch = _to_device(batch, self.device)
            with sync:
                with self._amp:
                    loss, extras = self._split_loss(self._forward_loss(self.model, batch))
                # Mean over micro-batches: each contributes 1/accum of the gradient.
                (loss / accum).backward()
            loss_sum = loss_sum + _wide(loss.detach())
            for k, v in extras.items():
                value = _wide(v.detach()) if isinstance(v, torch.Tensor) else v
                extras_sum[k] = extras_sum.get(k, 0.0) + value
        if self._dp is not None:  # the global means, one all-reduce
            for k, v in extras_sum.items():
                _check_scalar(v, f"metric {k!r}")
            loss_sum, *means = self._dp.mean([loss_sum, *extras_sum.values()])
            extras_sum = dict(zip(extras_sum, means, strict=True))
        loss_value = float(loss_sum) / accum  # the one host sync per step
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "loss", loss_value)
        grads = [p.grad for p in self._params if p.grad is not None]
        if self._dp is not None:  # FSDP's and expert-parallel shards: the global norm
            norm = self._dp.grad_norm(grads)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = float(norm.item())
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "gradient norm", grad_norm)
        with self._optimizer_context():
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(self._params, cfg.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        extras_mean = {k: _as_float(v, f"metric {k!r}") / accum for k, v in extras_sum.items()}
        return _StepResult(loss_value, grad_norm, lr, items, extras_mean)

    def _train_row(self, result: _StepResult, throughput: float, elapsed: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "throughput": throughput,
            "throughput_unit": f"{self.items_name}/s",
            "elapsed": elapsed,
            **{k: _json_float(v) for k, v in result.metrics.items()},
        }

    def _eval_due(self, last: bool) -> bool:
        every = self.config.eval_every
        return self.eval_fn is not None and every > 0 and (self.step % every == 0 or last)

    def _evaluate(self) -> dict[str, Any]:
        assert self.eval_fn is not None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._amp:
                result = self.eval_fn(self.module)
        finally:
            self.model.train(was_training)
        if not isinstance(result, Mapping):
            raise ValueError(f"eval_fn must return a dict, got {type(result).__name__}")
        return {
            f"eval/{k}": _json_float(_as_float(v, f"eval metric {k!r}")) for k, v in result.items()
        }

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()

    def _truncate_metrics(self) -> None:
        """Drop rows past the resumed step: the abandoned run logged them, this one redoes them."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= self.step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))


def _data_parallel_run(model: nn.Module) -> DataParallelRun | None:
    """The rank's part of a data-parallel run, or None without a process group (or with one
    rank and a plain model): the single-process path, which imports nothing distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from vats_core.parallel.runtime import DataParallelRun

    run = DataParallelRun(model)  # refuses a plain model on several ranks
    return None if run.kind == "none" else run


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a metrics.jsonl file row by row."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
