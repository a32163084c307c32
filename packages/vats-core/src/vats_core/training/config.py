"""``TrainerConfig``: every knob of :class:`~vats_core.training.Trainer`, validated."""

from __future__ import annotations

import dataclasses

from vats_core.config import Config, check, check_at_least, check_positive


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
    # Parameter-name patterns (fnmatch: "dit.blocks.*.ffn.*") of the 2-D weight matrices
    # that Muon updates instead of AdamW (vats_core.training.muon); () = AdamW for all.
    muon: tuple[str, ...] = ()
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    grad_clip: float | None = 1.0  # max global grad L2 norm; None turns clipping off
    grad_accum_steps: int = 1  # micro-batches per optimizer step; loss scaled by 1/accum
    checkpoint_every: int = 0  # steps between checkpoints; 0 turns checkpointing off
    keep_checkpoints: int = 3  # newest step checkpoints kept on disk
    # torch.distributed.checkpoint: every rank writes its own shards, nothing is gathered
    # on one rank (FSDP models larger than a host); else one safetensors file of the full
    # weights. Both resume on any world size; a run resumes from either.
    sharded_checkpoints: bool = False
    log_every: int = 10  # steps between metrics.jsonl rows (and the last step)
    eval_every: int = 0  # steps between eval_fn calls; 0 turns evaluation off
    out_dir: str = "runs/default"  # checkpoints/ and metrics.jsonl go here
    seed: int = 0  # seeds torch, python random (and numpy if installed) on a fresh run
    bf16_autocast: bool = False  # bf16 autocast for forward + loss; CUDA only
    compile: bool = False  # run forward + loss (and its backward) through torch.compile
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        check_positive(self, "max_steps", "lr", "eps", "grad_clip", "grad_accum_steps")
        check_positive(self, "keep_checkpoints", "log_every")
        check_at_least(self, 0, "weight_decay", "seed")
        check(
            0.0 <= self.min_lr_ratio <= 1.0,
            self,
            "min_lr_ratio",
            self.min_lr_ratio,
            "a number in [0, 1]",
        )
        check(
            0 <= self.warmup_steps <= self.max_steps,
            self,
            "warmup_steps",
            self.warmup_steps,
            f"an int in [0, max_steps={self.max_steps}]",
        )
        check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            self,
            "betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        check(
            all(isinstance(m, str) and m for m in self.muon),
            self,
            "muon",
            self.muon,
            "a list of non-empty parameter-name patterns (fnmatch)",
        )
        check(
            0.0 <= self.muon_momentum < 1.0,
            self,
            "muon_momentum",
            self.muon_momentum,
            "a number in [0, 1)",
        )
        for name in ("checkpoint_every", "eval_every"):
            value = getattr(self, name)
            check(value >= 0, self, name, value, "an int >= 0 (0 = off)")
        check(bool(self.out_dir), self, "out_dir", self.out_dir, "a non-empty path")
