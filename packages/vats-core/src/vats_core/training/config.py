"""``TrainerConfig``: every knob of :class:`~vats_core.training.Trainer`, validated."""

from __future__ import annotations

import dataclasses
import math

from vats_core.config import Config, check


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig(Config):
    """Optimization, schedule, checkpointing and logging settings.

    Steps count optimizer updates; one step consumes ``grad_accum_steps`` micro-batches.
    """

    max_steps: int = 1000  # optimizer steps in the whole run (the schedule spans them)
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps up to lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on >= 2-D weights only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float | None = 1.0  # max global grad L2 norm; None turns clipping off
    grad_accum_steps: int = 1  # micro-batches per optimizer step; loss scaled by 1/accum
    checkpoint_every: int = 0  # steps between checkpoints; 0 turns checkpointing off
    keep_checkpoints: int = 3  # newest step checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl rows (and the last step)
    eval_every: int = 0  # steps between eval_fn calls; 0 turns evaluation off
    out_dir: str = "runs/default"  # checkpoints/ and metrics.jsonl go here
    seed: int = 0  # seeds torch, python random (and numpy if installed) on a fresh run
    bf16_autocast: bool = False  # bf16 autocast for forward + loss; CUDA only
    compile: bool = False  # run forward + loss (and its backward) through torch.compile
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, self, "max_steps", self.max_steps, "an int >= 1")
        check(math.isfinite(self.lr) and self.lr > 0, self, "lr", self.lr, "a finite float > 0")
        check(
            0.0 <= self.min_lr_ratio <= 1.0,
            self,
            "min_lr_ratio",
            self.min_lr_ratio,
            "a float in [0, 1]",
        )
        check(
            0 <= self.warmup_steps <= self.max_steps,
            self,
            "warmup_steps",
            self.warmup_steps,
            f"an int in [0, max_steps={self.max_steps}]",
        )
        check(self.weight_decay >= 0, self, "weight_decay", self.weight_decay, "a float >= 0")
        check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            self,
            "betas",
            self.betas,
            "two floats in [0, 1)",
        )
        check(self.eps > 0, self, "eps", self.eps, "a float > 0")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            self,
            "grad_clip",
            self.grad_clip,
            "None (off) or a float > 0",
        )
        check(
            self.grad_accum_steps >= 1,
            self,
            "grad_accum_steps",
            self.grad_accum_steps,
            "an int >= 1",
        )
        check(
            self.checkpoint_every >= 0,
            self,
            "checkpoint_every",
            self.checkpoint_every,
            "an int >= 0 (0 = off)",
        )
        check(
            self.keep_checkpoints >= 1,
            self,
            "keep_checkpoints",
            self.keep_checkpoints,
            "an int >= 1",
        )
        check(self.log_every >= 1, self, "log_every", self.log_every, "an int >= 1")
        check(self.eval_every >= 0, self, "eval_every", self.eval_every, "an int >= 0 (0 = off)")
        check(bool(self.out_dir), self, "out_dir", self.out_dir, "a non-empty path")
        check(self.seed >= 0, self, "seed", self.seed, "an int >= 0")
        for flag in ("bf16_autocast", "compile", "progress"):
            value = getattr(self, flag)
            check(isinstance(value, bool), self, flag, value, "true or false")
