"""Training targets and sampling loops over diffusers' noise schedulers, with guidance.

One object, :class:`Diffusion`, built from a :class:`SchedulerConfig`, serves both sides of
a diffusion or flow-matching model:

* training: :meth:`Diffusion.sample_timesteps`, :meth:`Diffusion.add_noise`,
  :meth:`Diffusion.target` and the MSE :meth:`Diffusion.loss`, with condition dropout
  (:func:`drop_condition`) so the model also learns the null condition;
* inference: :meth:`Diffusion.sample` drives diffusers' ``DDPMScheduler`` (Ho et al., 2020,
  arXiv:2006.11239), ``DDIMScheduler`` (Song et al., 2021, arXiv:2010.02502),
  ``DPMSolverMultistepScheduler`` (DPM-Solver++, Lu et al., 2022, arXiv:2211.01095) or
  ``FlowMatchEulerDiscreteScheduler`` (rectified flow: Liu et al., 2023, arXiv:2209.03003;
  Lipman et al., 2023, arXiv:2210.02747; SD3's shift and logit-normal timesteps: Esser et
  al., 2024, arXiv:2403.03206) with classifier-free guidance (Ho & Salimans, 2022,
  arXiv:2207.12598).

Nothing here knows a model: a model is any callable ``model(x, t, **cond) -> prediction``
with ``x`` of any shape ``(B, ...)`` (images ``(B, C, h, w)``, clips ``(B, C, T, h, w)``,
mel sequences ``(B, C, T)``) and a prediction of the same shape.

Conventions (diffusers'):

* DDPM family (``ddpm``, ``ddim``, ``dpm_solver``): ``t`` is an int64 timestep in
  ``[0, N)``, ``x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε``; the model predicts ``epsilon`` (ε),
  ``v_prediction`` (v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0, Salimans & Ho, 2022, arXiv:2202.00512,
  diffusers' ``get_velocity``) or ``sample`` (x0). Any of the three schedulers samples a
  model trained with any of them (``sample(..., scheduler="dpm_solver")``).
* Flow matching (``flow_match_euler``): ``t = σ·N`` is a float32 in ``[0, N]``,
  ``x_t = (1 − σ)·x0 + σ·ε``, and the model predicts the velocity ``flow`` = ε − x0, or
  ``sample`` (x0, trained against x0; the sampler turns it into the velocity
  ``(x_t − x0)/σ``). Predict x0 where a token holds more numbers than the model's width
  (80 mel bins × 4 frames into a width of 128): ε and the velocity are full of noise that
  such a model cannot carry through its narrower stream, x0 is not (Li & He, 2025, "Back
  to Basics: Let Denoising Generative Models Denoise", arXiv:2511.13720).

A sampling call builds a fresh diffusers scheduler from the config, so no scheduler state
(DPM-Solver's history of model outputs, step indices) ever leaks from one call into the
next (diffusers#6631). Random numbers come from the caller's ``generator`` (initial noise,
the noise DDPM, DDIM with ``eta > 0`` and SDE-DPM-Solver++ add at each step), so a seeded
sample repeats bit for bit on the same machine.

Shapes: B batch, ``...`` the sample's own axes (C, h, w / C, T, h, w / C, T), N the number
of training timesteps.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vats_core.config import Config, check, check_at_least, check_positive, is_int, is_number

__all__ = [
    "BetaSchedule",
    "Diffusion",
    "DpmAlgorithm",
    "PredictionType",
    "SchedulerConfig",
    "SchedulerName",
    "TimestepSampling",
    "TimestepSpacing",
    "classifier_free_guidance",
    "drop_condition",
]

Model = Callable[..., Tensor]  # model(x (B, ...), t (B,), **cond) -> (B, ...)
Cond = Mapping[str, Tensor | None]


class SchedulerName(enum.StrEnum):
    DDPM = "ddpm"
    DDIM = "ddim"
    DPM_SOLVER = "dpm_solver"
    FLOW_MATCH_EULER = "flow_match_euler"


class PredictionType(enum.StrEnum):
    EPSILON = "epsilon"  # the noise ε
    V_PREDICTION = "v_prediction"  # v = √ᾱ·ε − √(1 − ᾱ)·x0
    SAMPLE = "sample"  # x0
    FLOW = "flow"  # the velocity ε − x0 (flow matching)


class BetaSchedule(enum.StrEnum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"  # linear in √β (Stable Diffusion)
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"  # cosine ᾱ (Nichol & Dhariwal, 2021)


class TimestepSpacing(enum.StrEnum):
    """How inference timesteps are spread (Lin et al., 2024, arXiv:2305.08891, Table 2)."""

    LINSPACE = "linspace"
    LEADING = "leading"
    TRAILING = "trailing"


class TimestepSampling(enum.StrEnum):
    """How training draws u ∈ (0, 1), the fraction of the way to pure noise."""

    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"  # u = sigmoid(m + s·z), SD3's default for flow matching


class DpmAlgorithm(enum.StrEnum):
    DPMSOLVER_PP = "dpmsolver++"  # deterministic
    SDE_DPMSOLVER_PP = "sde-dpmsolver++"  # adds noise at every step (uses the generator)


_FLOW_SCHEDULERS = (SchedulerName.FLOW_MATCH_EULER,)
_DDPM_SCHEDULERS = (SchedulerName.DDPM, SchedulerName.DDIM, SchedulerName.DPM_SOLVER)
_DDPM_PREDICTIONS = (PredictionType.EPSILON, PredictionType.V_PREDICTION, PredictionType.SAMPLE)
_FLOW_PREDICTIONS = (PredictionType.FLOW, PredictionType.SAMPLE)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _values(members: tuple[enum.StrEnum, ...]) -> list[str]:
    return [m.value for m in members]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig(Config):
    """The noise process a model is trained on and the sampler that reverses it.

    Fields apply to one family, as their comments say; a field of the other family left at
    a non-default value is refused (it would be silently ignored).
    """

    name: SchedulerName = SchedulerName.DDPM
    # What the model predicts; None: epsilon for the DDPM family, flow for flow matching
    # (which also takes sample: x0).
    prediction_type: PredictionType | None = None
    num_train_timesteps: int = 1000  # N
    # DDPM family: the β schedule (diffusers' names and defaults).
    beta_schedule: BetaSchedule = BetaSchedule.LINEAR
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # ᾱ_{N-1} = 0 (Lin et al., 2024): the last step sees pure noise. Needs v_prediction or
    # sample (ε cannot give x0 where ᾱ = 0) and is best sampled with trailing spacing.
    rescale_betas_zero_snr: bool = False
    timestep_spacing: TimestepSpacing | None = None  # None: each scheduler's own default
    clip_sample: bool = False  # DDPM/DDIM: clamp predicted x0 to ±range (pixel models only)
    clip_sample_range: float = 1.0
    eta: float = 0.0  # DDIM: 0 deterministic, 1 as much noise as DDPM
    solver_order: int = 2  # DPM-Solver++: 1, 2 or 3
    dpm_algorithm: DpmAlgorithm = DpmAlgorithm.DPMSOLVER_PP
    # Flow matching: σ -> shift·σ / (1 + (shift − 1)·σ) in training and sampling (SD3: 3).
    shift: float = 1.0
    # Training timesteps: u ~ timestep_sampling, then t = ⌊u·N⌋ (DDPM) or σ = shift(u).
    timestep_sampling: TimestepSampling = TimestepSampling.UNIFORM
    logit_mean: float = 0.0  # logit_normal: m
    logit_std: float = 1.0  # logit_normal: s

    def __post_init__(self) -> None:
        flow = self.name in _FLOW_SCHEDULERS
        if self.prediction_type is None:
            default = PredictionType.FLOW if flow else PredictionType.EPSILON
            object.__setattr__(self, "prediction_type", default)
        allowed = _FLOW_PREDICTIONS if flow else _DDPM_PREDICTIONS
        check(
            self.prediction_type in allowed,
            self,
            "prediction_type",
            self.prediction_type.value,
            f"one of {_values(allowed)} for name={self.name.value!r}",
        )
        check_at_least(self, 2, "num_train_timesteps")
        check_positive(self, "beta_start", "beta_end", "clip_sample_range", "shift", "logit_std")
        check(
            self.beta_start < self.beta_end < 1,
            self,
            "beta_end",
            self.beta_end,
            f"a number in (beta_start={self.beta_start}, 1)",
        )
        check(0 <= self.eta <= 1, self, "eta", self.eta, "a number in [0, 1]")
        check(self.solver_order in (1, 2, 3), self, "solver_order", self.solver_order, "1, 2 or 3")
        check(
            math.isfinite(self.logit_mean), self, "logit_mean", self.logit_mean, "a finite number"
        )
        check(
            not (self.rescale_betas_zero_snr and self.prediction_type is PredictionType.EPSILON),
            self,
            "rescale_betas_zero_snr",
            True,
            "False with prediction_type='epsilon' (ε cannot give x0 where ᾱ = 0): "
            "use v_prediction or sample",
        )
        family = "flow matching" if flow else "the DDPM family"
        other = _DDPM_ONLY if flow else _FLOW_ONLY
        defaults = SchedulerConfig.__dataclass_fields__
        for field in other:
            value, default = _plain(getattr(self, field)), _plain(defaults[field].default)
            check(
                value == default,
                self,
                field,
                value,
                f"{default!r}: the field does not apply to {family} (name={self.name.value!r})",
            )

    @property
    def is_flow(self) -> bool:
        """Flow matching (float ``t = σ·N``) rather than the DDPM family (int ``t``)."""
        return self.name in _FLOW_SCHEDULERS

    def noise_process(self) -> dict[str, Any]:
        """What a model trained under this config has learned to predict: the family (flow
        matching or DDPM), the prediction target and the forward process (timesteps, β
        schedule). Two configs that agree here train the same function of ``(x_t, t)``; the
        other fields only choose which timesteps training draws (``timestep_sampling``,
        ``logit_*``, ``shift``) or how a sampler steps (``timestep_spacing``, ``eta``,
        ``solver_order``, ``clip_sample``, ...), so a model trained under one is a start for
        training, or a model to sample, under the other."""
        assert self.prediction_type is not None  # (set in __post_init__)
        process: dict[str, Any] = {
            "family": "flow" if self.is_flow else "ddpm",
            "prediction_type": self.prediction_type.value,
            "num_train_timesteps": self.num_train_timesteps,
        }
        if not self.is_flow:
            process |= {
                "beta_schedule": self.beta_schedule.value,
                "beta_start": self.beta_start,
                "beta_end": self.beta_end,
                "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            }
        return process


_DDPM_ONLY = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "clip_sample",
    "clip_sample_range",
    "eta",
    "solver_order",
    "dpm_algorithm",
)
_FLOW_ONLY = ("shift",)


class Diffusion:
    """Training targets and sampling for one :class:`SchedulerConfig` (module docstring).

    Example::

        diffusion = Diffusion(SchedulerConfig(name="ddpm", prediction_type="v_prediction"))
        loss = diffusion.loss(model, x0, {"context": ctx, "mask": m},
                              null_cond={"context": null_ctx, "mask": null_m}, drop_prob=0.1)
        images = diffusion.sample(model, (4, 4, 32, 32), steps=25, scheduler="dpm_solver",
                                  cond=cond, null_cond=null_cond, guidance_scale=4.0,
                                  generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        if not isinstance(self.config, SchedulerConfig):
            raise ValueError(
                f"Diffusion: config must be a SchedulerConfig, got {type(self.config).__name__}"
            )
        # ᾱ_t, (N,) float32: diffusers' own table, so training matches its samplers exactly.
        self.alphas_cumprod: Tensor | None = None
        if not self.config.is_flow:
            self.alphas_cumprod = self.make_scheduler(SchedulerName.DDPM).alphas_cumprod.clone()

    def __repr__(self) -> str:
        return f"Diffusion({self.config!r})"

    # ------------------------------------------------------------------ schedulers

    def _scheduler_name(self, name: SchedulerName | str | None = None) -> SchedulerName:
        """``name`` (default: the config's) checked against the config's family."""
        if name is None:
            return self.config.name
        family = _FLOW_SCHEDULERS if self.config.is_flow else _DDPM_SCHEDULERS
        if name not in _values(family):
            raise ValueError(
                f"scheduler={name!r} is invalid: a model trained with "
                f"prediction_type={self.config.prediction_type.value!r} samples with one of "
                f"{_values(family)}"
            )
        return SchedulerName(name)

    def make_scheduler(self, name: SchedulerName | str | None = None) -> Any:
        """A fresh diffusers scheduler for this config (``name`` overrides its scheduler)."""
        from diffusers.schedulers import (
            DDIMScheduler,
            DDPMScheduler,
            DPMSolverMultistepScheduler,
            FlowMatchEulerDiscreteScheduler,
        )

        cfg, name = self.config, self._scheduler_name(name)
        if name is SchedulerName.FLOW_MATCH_EULER:
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift
            )
        common: dict[str, Any] = {
            "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule.value,
            "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end,
            "prediction_type": cfg.prediction_type.value,
            "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
        }
        if cfg.timestep_spacing is not None:
            common["timestep_spacing"] = cfg.timestep_spacing.value
        clip = {"clip_sample": cfg.clip_sample, "clip_sample_range": cfg.clip_sample_range}
        if name is SchedulerName.DDPM:
            return DDPMScheduler(**common, **clip, variance_type="fixed_small")
        if name is SchedulerName.DDIM:
            return DDIMScheduler(**common, **clip, set_alpha_to_one=True)
        return DPMSolverMultistepScheduler(
            **common,
            solver_order=cfg.solver_order,
            algorithm_type=cfg.dpm_algorithm.value,
            final_sigmas_type="zero",  # the last step lands on x0
        )

    # ------------------------------------------------------------------ training

    def sample_timesteps(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Training timesteps, (B,): int64 in ``[0, N)`` (DDPM family) or float32
        ``σ·N`` with σ = shift(u) (flow matching), u drawn by ``timestep_sampling``."""
        if not is_int(batch) or batch < 1:
            raise ValueError(f"sample_timesteps: batch={batch!r} is invalid: expected an int >= 1")
        cfg, n = self.config, self.config.num_train_timesteps
        if cfg.timestep_sampling is TimestepSampling.UNIFORM and not cfg.is_flow:
            t = torch.randint(0, n, (batch,), generator=generator, device=_gen_device(generator))
            return t.to(device)
        if cfg.timestep_sampling is TimestepSampling.UNIFORM:
            u = _rand((batch,), generator)
        else:
            u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * _randn((batch,), generator))
        if not cfg.is_flow:
            return (u * n).long().clamp_(max=n - 1).to(device)
        sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)
        return (sigma * n).to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: ``√ᾱ_t·x0 + √(1 − ᾱ_t)·ε`` or ``(1 − σ)·x0 + σ·ε``.

        Args:
            x0: clean samples, (B, ...).
            noise: ε, the shape of ``x0``.
            t: timesteps, (B,), as :meth:`sample_timesteps` gives them.
        """
        signal, sigma = self._coefficients(x0, noise, t, "add_noise")
        return signal * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model should predict for ``add_noise(x0, noise, t)``, (B, ...)."""
        signal, sigma = self._coefficients(x0, noise, t, "target")
        kind = self.config.prediction_type
        if kind is PredictionType.EPSILON:
            return noise
        if kind is PredictionType.SAMPLE:
            return x0
        if kind is PredictionType.V_PREDICTION:
            return signal * noise - sigma * x0
        return noise - x0

    def loss(
        self,
        model: Model,
        x0: Tensor,
        cond: Cond | None = None,
        *,
        null_cond: Cond | None = None,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean squared error of ``model`` against :meth:`target`, a scalar (float32).

        Draws the timesteps, then the noise, then (``drop_prob > 0``) which rows get
        ``null_cond`` (:func:`drop_condition`), all from ``generator``.
        """
        _check_sample_tensor(x0, "x0", "loss")
        t = self.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        noise = _randn(x0.shape, generator).to(device=x0.device, dtype=x0.dtype)
        cond = dict(cond or {})
        if drop_prob:
            cond = drop_condition(cond, null_cond, drop_prob, generator=generator)
        x_t = self.add_noise(x0, noise, t)
        pred = _call(model, x_t, t, cond)
        return F.mse_loss(pred.float(), self.target(x0, noise, t).float())

    def _coefficients(
        self, x0: Tensor, noise: Tensor, t: Tensor, where: str
    ) -> tuple[Tensor, Tensor]:
        """(signal, noise) scales at ``t``, (B, 1, ...), in the dtype of ``x0``."""
        _check_sample_tensor(x0, "x0", where)
        if not isinstance(noise, Tensor) or noise.shape != x0.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"{where}: noise {got} must have the shape of x0 {tuple(x0.shape)}")
        n = self.config.num_train_timesteps
        if not isinstance(t, Tensor) or t.shape != x0.shape[:1]:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: t {got} must have shape (B,) = ({x0.shape[0]},)")
        if self.config.is_flow:
            if t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{where}: t has dtype {t.dtype}: expected σ·N as a float tensor")
            sigma = t.float() / n
            signal = 1 - sigma
        else:
            if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
                raise ValueError(
                    f"{where}: t has dtype {t.dtype}: expected integer timesteps in [0, {n})"
                )
            abar = self.alphas_cumprod.to(t.device)[t]
            signal, sigma = abar.sqrt(), (1 - abar).sqrt()
        view = (-1,) + (1,) * (x0.ndim - 1)
        return signal.view(view).to(x0), sigma.view(view).to(x0)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        shape: tuple[int, ...] | torch.Size,
        *,
        steps: int,
        guidance_scale: float = 1.0,
        cond: Cond | None = None,
        null_cond: Cond | None = None,
        generator: torch.Generator | None = None,
        scheduler: SchedulerName | str | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Generate samples by running a fresh diffusers scheduler for ``steps`` steps.

        The model is called as ``model(x, t, **cond)``; put it in eval mode first. With
        ``guidance_scale > 1`` each step runs ``cond`` and ``null_cond`` in one forward (the
        batch doubled) and uses ``uncond + s·(cond − uncond)``; at 1 only ``cond`` runs.

        Args:
            model: ``model(x (B, ...), t (B,), **cond) -> (B, ...)``.
            shape: ``(B, ...)`` of the samples.
            steps: inference steps, 1..N.
            guidance_scale: s >= 1.
            cond: the condition: tensors with the batch first (B, or 1 to share), or None.
            null_cond: the null condition (same keys and trailing shapes); needed if s > 1.
            generator: the source of every random number (initial and per-step noise).
            scheduler: sample with another scheduler of the config's family.
            noise: the initial noise, ``shape``; default: drawn from ``generator``.
            device: where to sample; default: ``noise``'s, else the model's, else CPU.
            dtype: the dtype of the model's input ``x``; default: the model's, else float32.
                The sample itself is kept and returned in float32.
            progress: show a tqdm bar.

        Returns:
            The samples, ``shape``, float32.
        """
        cfg = self.config
        name = self._scheduler_name(scheduler)
        if not is_int(steps) or not 1 <= steps <= cfg.num_train_timesteps:
            raise ValueError(
                f"sample: steps={steps!r} is invalid: expected an int in "
                f"[1, num_train_timesteps={cfg.num_train_timesteps}]"
            )
        if not is_number(guidance_scale) or not 1 <= guidance_scale < math.inf:
            raise ValueError(
                f"sample: guidance_scale={guidance_scale!r} is invalid: expected a finite number "
                ">= 1 (1 = no guidance)"
            )
        shape = _check_shape(shape)
        batch = shape[0]
        guided = guidance_scale > 1
        device = torch.device(device) if device is not None else _default_device(model, noise)
        dtype = dtype if dtype is not None else _default_dtype(model)
        if noise is not None and (not isinstance(noise, Tensor) or noise.shape != shape):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"sample: noise {got} must have the sample shape {shape}")
        if generator is not None and generator.device.type not in ("cpu", device.type):
            raise ValueError(
                f"sample: a generator on {generator.device} cannot make noise on {device}: "
                f"use a CPU generator or one on {device.type}"
            )
        cond = dict(cond or {})
        if guided and not cond:
            raise ValueError(
                f"sample: guidance_scale={guidance_scale} needs a cond to guide towards; "
                "an unconditional model samples with guidance_scale=1"
            )
        if guided and null_cond is None:
            raise ValueError(
                f"sample: guidance_scale={guidance_scale} needs null_cond, the condition the "
                "model learned through condition dropout"
            )
        if null_cond is not None:
            pairs = _pair_conditions(cond, null_cond, batch, "sample")
        else:
            pairs = _pair_conditions(cond, cond, batch, "sample")
        if guided:  # cond rows first, null rows after: (2B, ...)
            model_cond = {k: _cat_or_none(c, u, device) for k, c, u in pairs}
        else:
            model_cond = {k: None if c is None else c.to(device).contiguous() for k, c, _ in pairs}

        sched = self.make_scheduler(name)
        sched.set_timesteps(steps, device=device)
        if noise is None:
            noise = _randn(shape, generator)
        # init_noise_sigma: 1 for these schedulers (the flow one does not define it)
        x = noise.to(device=device, dtype=torch.float32) * getattr(sched, "init_noise_sigma", 1.0)
        step_kwargs: dict[str, Any] = {"generator": generator}
        if name is SchedulerName.DDIM:
            step_kwargs["eta"] = cfg.eta
        scale_input = getattr(sched, "scale_model_input", None)  # the flow one has none
        for t in tqdm(sched.timesteps, disable=not progress, desc=f"sampling ({name.value})"):
            x_in = (x if scale_input is None else scale_input(x, t)).to(dtype)
            if guided:
                pred = _call(model, torch.cat([x_in, x_in]), t.expand(2 * batch), model_cond)
                pred_cond, pred_null = pred.float().chunk(2)
                pred = classifier_free_guidance(pred_cond, pred_null, guidance_scale)
            else:
                pred = _call(model, x_in, t.expand(batch), model_cond).float()
            if cfg.is_flow and cfg.prediction_type is PredictionType.SAMPLE:
                # x0 -> the velocity the Euler step takes; every sampled σ is > 0 (the
                # schedule's terminal 0 is only stepped to)
                pred = (x - pred) / (t.float() / cfg.num_train_timesteps)
            x = sched.step(pred, t, x, **step_kwargs).prev_sample
        return x


def classifier_free_guidance(pred_cond: Tensor, pred_null: Tensor, scale: float) -> Tensor:
    """``pred_null + scale·(pred_cond − pred_null)`` (Ho & Salimans, 2022)."""
    return pred_null + scale * (pred_cond - pred_null)


def drop_condition(
    cond: Cond,
    null_cond: Cond | None,
    p: float,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | None]:
    """Condition dropout: each row of the batch independently gets ``null_cond`` with
    probability ``p`` (every key of the row together: a caption and its mask go as one).

    Args:
        cond: tensors with the batch first, (B, ...), or None.
        null_cond: the same keys; tensors with batch 1 (shared) or B and the trailing shape
            of ``cond``'s, or None where ``cond`` has None.
        p: the dropout probability, in [0, 1].
        generator: draws the rows to drop.

    Returns:
        A new dict, ``cond`` with the dropped rows replaced.
    """
    if not is_number(p) or not 0 <= p <= 1:
        raise ValueError(f"drop_condition: p={p!r} is invalid: expected a probability in [0, 1]")
    if null_cond is None:
        raise ValueError("drop_condition: a dropout probability needs null_cond")
    batch = _cond_batch(cond, "drop_condition")
    pairs = _pair_conditions(cond, null_cond, batch, "drop_condition")
    if p == 0 or batch is None:
        return dict(cond)
    drop = _rand((batch,), generator) < p  # (B,)
    out: dict[str, Tensor | None] = {}
    for key, c, u in pairs:
        if c is None:
            out[key] = None
            continue
        rows = drop.to(c.device).view((batch,) + (1,) * (c.ndim - 1))
        out[key] = torch.where(rows, u.to(device=c.device, dtype=c.dtype).expand_as(c), c)
    return out


# ---------------------------------------------------------------------- helpers


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) float32 on the generator's device (CPU without one), so the numbers
    depend on the seed only, not on where they are used."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator))


def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None) -> Tensor:
    """Standard normal float32 on the generator's device (see :func:`_rand`)."""
    return torch.randn(tuple(shape), generator=generator, device=_gen_device(generator))


def _check_sample_tensor(x: Tensor, name: str, where: str) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{where}: {name} {got} is invalid: expected a floating tensor (B, ...) with at "
            "least one axis after the batch"
        )


def _check_shape(shape: Any) -> tuple[int, ...]:
    ok = (
        isinstance(shape, tuple | list | torch.Size)
        and len(shape) >= 2
        and all(is_int(s) and s >= 1 for s in shape)
    )
    if not ok:
        raise ValueError(
            f"sample: shape={shape!r} is invalid: expected (B, ...) of positive ints with at "
            "least one axis after the batch, e.g. (B, C, h, w)"
        )
    return tuple(shape)


def _default_device(model: Model, noise: Tensor | None) -> torch.device:
    if isinstance(noise, Tensor):
        return noise.device
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _default_dtype(model: Model) -> torch.dtype:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _call(model: Model, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None]) -> Tensor:
    pred = model(x, t, **cond)
    if not isinstance(pred, Tensor) or pred.shape != x.shape:
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(
            f"the model returned {got} for x {tuple(x.shape)}: expected a tensor of the input's "
            "shape (a model that also predicts a variance must return only the mean part)"
        )
    return pred


def _cond_batch(cond: Cond, where: str) -> int | None:
    """The batch size of ``cond``'s tensors (None if it has none); all must agree."""
    if not isinstance(cond, Mapping):
        raise ValueError(f"{where}: cond must be a dict of tensors, got {type(cond).__name__}")
    sizes = {k: v.shape[0] for k, v in cond.items() if isinstance(v, Tensor) and v.ndim}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: cond tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()), None)


def _pair_conditions(
    cond: Cond, null_cond: Cond, batch: int | None, where: str
) -> list[tuple[str, Tensor | None, Tensor | None]]:
    """``(key, cond (B, ...), null (B, ...))`` per key, each expanded to ``batch`` rows,
    after checking keys, types and shapes (ValueError naming the key otherwise)."""
    for name, c in (("cond", cond), ("null_cond", null_cond)):
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}: {name} must be a dict of tensors, got {type(c).__name__}")
    if set(cond) != set(null_cond):
        raise ValueError(
            f"{where}: cond and null_cond must have the same keys, got {sorted(cond)} and "
            f"{sorted(null_cond)}"
        )
    pairs = []
    for key in cond:
        c, u = cond[key], null_cond[key]
        if c is None or u is None:
            if c is not u:
                raise ValueError(f"{where}: {key!r} is None in one of cond / null_cond only")
            pairs.append((key, None, None))
            continue
        for name, v in (("cond", c), ("null_cond", u)):
            ok = isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] in (1, batch)
            if not ok:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"{where}: {name}[{key!r}] {got} is invalid: expected a tensor with the "
                    f"batch first, of size {batch} or 1"
                )
        if c.shape[1:] != u.shape[1:]:
            raise ValueError(
                f"{where}: cond[{key!r}] {tuple(c.shape)} and null_cond[{key!r}] "
                f"{tuple(u.shape)} differ after the batch axis"
            )
        rows = (batch, *c.shape[1:])
        pairs.append((key, c.expand(rows), u.expand(rows)))
    return pairs


def _cat_or_none(c: Tensor | None, u: Tensor | None, device: torch.device) -> Tensor | None:
    if c is None:
        return None
    return torch.cat([c.to(device), u.to(device=device, dtype=c.dtype)])  # (2B, ...)
