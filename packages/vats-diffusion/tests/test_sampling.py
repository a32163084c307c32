"""vats_diffusion.sampling: every scheduler and prediction type brings the exact-optimum
denoiser of a one-point data set to that point (images, clips and mel sequences);
add_noise / target equal diffusers' add_noise / get_velocity / scale_noise and the closed
forms; the exact optimum has zero training loss; a sample equals diffusers' own loop step
for step; no scheduler state leaks between calls; seeded samples repeat bit for bit;
classifier-free guidance is exact and batched; condition dropout; config and input errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from vats_core.testing import check_config, check_raises
from vats_diffusion.ema import EMA
from vats_diffusion.sampling import (
    Diffusion,
    PredictionType,
    SchedulerConfig,
    classifier_free_guidance,
    drop_condition,
)

IMAGE, CLIP, MEL = (2, 3, 4, 5), (2, 2, 3, 4, 4), (2, 4, 7)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _optimum(diffusion: Diffusion, c: torch.Tensor):
    """The exact minimiser of the training loss when the data is the one point ``c``:
    the model knows x0 = c, so it reads the noise off x_t with the schedule's own ᾱ_t / σ."""
    cfg, n = diffusion.config, diffusion.config.num_train_timesteps
    c64 = c.double()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        view = (-1,) + (1,) * (x.ndim - 1)
        if cfg.prediction_type is PredictionType.SAMPLE:
            return c64.expand_as(x64).to(x.dtype)
        if cfg.is_flow:  # x_t = (1 − σ)c + σε: the velocity ε − c
            sigma = (t.double() / n).view(view)
            return ((x64 - c64) / sigma).to(x.dtype)
        # The schedule lives on the CPU, the timesteps on the model's device.
        abar = diffusion.alphas_cumprod.double()[t.cpu()].to(x.device).view(view)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (x64 - a * c64) / s
        out = {
            PredictionType.EPSILON: eps,
            PredictionType.V_PREDICTION: a * eps - s * c64,
            PredictionType.SAMPLE: c64.expand_as(x64),
        }[cfg.prediction_type]
        return out.to(x.dtype)

    return model


CASES = [
    # (config overrides, sampler override, sample shape)
    ({"name": "ddpm", "prediction_type": "epsilon"}, None, IMAGE),
    ({"name": "ddpm", "prediction_type": "v_prediction"}, None, CLIP),
    ({"name": "ddpm", "prediction_type": "sample"}, None, MEL),
    ({"name": "ddim", "prediction_type": "epsilon"}, None, MEL),
    ({"name": "ddim", "prediction_type": "v_prediction", "eta": 1.0}, None, IMAGE),
    ({"name": "ddim", "prediction_type": "sample"}, None, CLIP),
    ({"name": "dpm_solver", "prediction_type": "epsilon"}, None, CLIP),
    ({"name": "dpm_solver", "prediction_type": "v_prediction", "solver_order": 3}, None, MEL),
    ({"name": "dpm_solver", "prediction_type": "sample"}, None, IMAGE),
    ({"name": "dpm_solver", "dpm_algorithm": "sde-dpmsolver++"}, None, IMAGE),
    ({"name": "flow_match_euler"}, None, IMAGE),
    ({"name": "flow_match_euler", "shift": 3.0}, None, CLIP),
    ({"name": "flow_match_euler", "shift": 0.5}, None, MEL),
    ({"name": "flow_match_euler", "prediction_type": "sample", "shift": 3.0}, None, MEL),
    # trained with DDPM, sampled with the others; cosine and scaled-linear betas
    ({"name": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddim", IMAGE),
    ({"name": "ddpm", "prediction_type": "v_prediction"}, "dpm_solver", MEL),
    ({"name": "ddim", "beta_schedule": "scaled_linear", "beta_end": 0.012}, "ddpm", CLIP),
    # zero terminal SNR: v-prediction, trailing spacing
    (
        {
            "name": "ddim",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
        },
        "dpm_solver",
        IMAGE,
    ),
]


@pytest.mark.parametrize(("overrides", "sampler", "shape"), CASES)
def test_exact_optimum_reaches_the_data_point(overrides, sampler, shape) -> None:
    diffusion = Diffusion(SchedulerConfig(**overrides))
    c = torch.randn(shape[1:], generator=_gen(1)).clamp(-2, 2)
    model = _optimum(diffusion, c)
    x = diffusion.sample(model, shape, steps=8, scheduler=sampler, generator=_gen(0))
    assert x.shape == shape and x.dtype == torch.float32
    torch.testing.assert_close(x, c.expand(shape), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("prediction", "name"),
    [
        ("epsilon", "ddpm"),
        ("v_prediction", "ddpm"),
        ("sample", "ddpm"),
        ("flow", "flow_match_euler"),
        ("sample", "flow_match_euler"),
    ],
)
def test_exact_optimum_has_zero_training_loss(prediction: str, name: str) -> None:
    """loss / add_noise / target agree with the sampler's conventions: the model that
    samples the data point exactly is also the minimiser (loss 0) of the training loss."""
    diffusion = Diffusion(SchedulerConfig(name=name, prediction_type=prediction, shift=1.0))
    c = torch.randn(3, 4, 4, generator=_gen(1))
    x0 = c.expand(64, 3, 4, 4)
    loss = diffusion.loss(_optimum(diffusion, c), x0, generator=_gen(0))
    assert loss.ndim == 0 and loss.item() < 1e-10
    wrong = diffusion.loss(_optimum(diffusion, c + 0.1), x0, generator=_gen(0))
    assert wrong.item() > 1e-4


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_and_targets_match_diffusers(beta_schedule: str) -> None:
    peer = DDPMScheduler(beta_schedule=beta_schedule, beta_end=0.012)
    x0, noise = torch.randn(2, 6, 4, 3, 5), torch.randn(2, 6, 4, 3, 5)  # the clip layout
    t = torch.tensor([0, 999])
    for kind in ("epsilon", "v_prediction", "sample"):
        d = Diffusion(
            SchedulerConfig(beta_schedule=beta_schedule, beta_end=0.012, prediction_type=kind)
        )
        torch.testing.assert_close(d.alphas_cumprod, peer.alphas_cumprod, rtol=0, atol=0)
        xt = d.add_noise(x0, noise, t)
        torch.testing.assert_close(xt, peer.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
        abar = peer.alphas_cumprod[t].view(2, 1, 1, 1, 1)
        closed = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        torch.testing.assert_close(xt, closed, rtol=1e-6, atol=1e-6)
        expected = {
            "epsilon": noise,
            "v_prediction": peer.get_velocity(x0, noise, t),
            "sample": x0,
        }[kind]
        torch.testing.assert_close(d.target(x0, noise, t), expected, rtol=1e-6, atol=1e-6)


def test_flow_add_noise_and_target_match_diffusers() -> None:
    peer = FlowMatchEulerDiscreteScheduler(shift=3.0)
    d = Diffusion(SchedulerConfig(name="flow_match_euler", shift=3.0))
    x0, noise = torch.randn(3, 4, 10), torch.randn(3, 4, 10)  # mel layout
    t = peer.timesteps[torch.tensor([0, 500, 999])]  # σ·N from its shifted table
    xt = d.add_noise(x0, noise, t)
    torch.testing.assert_close(xt, peer.scale_noise(x0, t, noise), rtol=1e-6, atol=1e-6)
    sigma = (t / 1000).view(3, 1, 1)
    torch.testing.assert_close(xt, (1 - sigma) * x0 + sigma * noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.target(x0, noise, t), noise - x0, rtol=0, atol=0)


def _diffusers_loop(scheduler, model, noise, steps, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        pred = model(x, t.expand(x.shape[0]))
        x = scheduler.step(pred, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def _smooth_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic model that is not an optimum: the samplers' paths differ with it."""
    return torch.tanh(x) * 0.7 + (t.float().view(-1, *[1] * (x.ndim - 1)) / 1000) * 0.2


@pytest.mark.parametrize(
    ("config", "peer"),
    [
        (
            SchedulerConfig(name="dpm_solver", prediction_type="v_prediction"),
            lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction"),
        ),
        (
            SchedulerConfig(name="ddpm", timestep_spacing="trailing"),
            lambda: DDPMScheduler(clip_sample=False, timestep_spacing="trailing"),
        ),
        (
            SchedulerConfig(name="ddim", eta=0.5, prediction_type="sample"),
            lambda: DDIMScheduler(clip_sample=False, prediction_type="sample"),
        ),
        (
            SchedulerConfig(name="flow_match_euler", shift=3.0),
            lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        ),
    ],
)
def test_sample_equals_the_diffusers_loop(config: SchedulerConfig, peer) -> None:
    diffusion, shape = Diffusion(config), (2, 3, 4, 4)
    got = diffusion.sample(_smooth_model, shape, steps=7, generator=_gen(3))
    g = _gen(3)
    noise = torch.randn(shape, generator=g)
    kwargs = {"eta": config.eta} if config.name == "ddim" else {}
    want = _diffusers_loop(peer(), _smooth_model, noise, 7, generator=g, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flow_sample_prediction_samples_as_its_velocity_model() -> None:
    """An x0-predicting flow model samples what the velocity model it implies samples,
    guided or not: x0 = x_t − σ·v, so the sampler's (x_t − x0)/σ gives v back."""

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _smooth_model(x, t) * (1 + c.view(-1, *[1] * (x.ndim - 1)))

    def x0_model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = (t.float() / 1000).view(-1, *[1] * (x.ndim - 1))
        return x - sigma * velocity(x, t, c)

    cond, null = {"c": torch.ones(2, 1)}, {"c": torch.zeros(1, 1)}
    flow = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0 = Diffusion(SchedulerConfig(name="flow_match_euler", prediction_type="sample"))
    for scale in (1.0, 3.0):
        kw = dict(steps=7, cond=cond, null_cond=null, guidance_scale=scale)
        got = x0.sample(x0_model, (2, 3, 4, 4), generator=_gen(3), **kw)
        want = flow.sample(velocity, (2, 3, 4, 4), generator=_gen(3), **kw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # read as a velocity, the same model samples something else
        other = flow.sample(x0_model, (2, 3, 4, 4), generator=_gen(3), **kw)
        assert (other - want).abs().max() > 0.1


def test_scheduler_state_never_leaks_between_calls() -> None:
    """diffusers#6631: DPM-Solver keeps a history of model outputs and a step index; every
    call starts from a fresh scheduler, so calls in any order give the same samples."""
    config = SchedulerConfig(name="dpm_solver", solver_order=3)
    diffusion = Diffusion(config)
    noise = torch.randn(2, 3, 4, 4, generator=_gen(0))
    first = diffusion.sample(_smooth_model, noise.shape, steps=6, noise=noise)
    again = diffusion.sample(_smooth_model, noise.shape, steps=6, noise=noise)
    other = diffusion.sample(_smooth_model, noise.shape, steps=11, noise=noise)
    after = diffusion.sample(_smooth_model, noise.shape, steps=6, noise=noise)
    fresh = Diffusion(config).sample(_smooth_model, noise.shape, steps=6, noise=noise)
    for x in (again, after, fresh):
        torch.testing.assert_close(x, first, rtol=0, atol=0)
    assert not torch.equal(other, first)


@pytest.mark.parametrize(
    "config",
    [
        SchedulerConfig(name="ddpm"),
        SchedulerConfig(name="ddim", eta=1.0),
        SchedulerConfig(name="dpm_solver", dpm_algorithm="sde-dpmsolver++"),
        SchedulerConfig(name="flow_match_euler"),
    ],
    ids=["ddpm", "ddim-eta1", "sde-dpm", "flow"],
)
def test_a_seed_repeats_bit_for_bit(config: SchedulerConfig) -> None:
    diffusion = Diffusion(config)
    run = lambda seed: diffusion.sample(_smooth_model, MEL, steps=5, generator=_gen(seed))  # noqa: E731
    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert not torch.equal(run(7), run(8))


def test_stochastic_steps_use_the_generator() -> None:
    """Same initial noise, different generators: DDPM's per-step noise differs, DDIM with
    eta = 0 does not (it adds none)."""
    noise = torch.randn(IMAGE, generator=_gen(0))
    for name, stochastic in (("ddpm", True), ("ddim", False)):
        d = Diffusion(SchedulerConfig(name=name))
        a = d.sample(_smooth_model, IMAGE, steps=4, noise=noise, generator=_gen(1))
        b = d.sample(_smooth_model, IMAGE, steps=4, noise=noise, generator=_gen(2))
        assert torch.equal(a, b) is not stochastic


class _Recorder:
    """``model(x, t, y, mask)``: the prediction is ``y`` where ``mask`` is set, 0 elsewhere;
    records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, y, mask=None):
        self.batches.append(x.shape[0])
        out = y.expand_as(x)
        return out if mask is None else out * mask.view(-1, *[1] * (x.ndim - 1))


def test_guidance_is_exact_and_batched() -> None:
    """One flow-matching Euler step from σ = 1 to 0 returns noise − v, so the sample shows
    the guided prediction: v = null + s·(cond − null), in one forward of 2B rows."""
    d = Diffusion(SchedulerConfig(name="flow_match_euler"))
    shape, scale = (3, 2, 5), 4.0
    y = torch.randn(shape, generator=_gen(1))
    null = torch.randn((1, *shape[1:]), generator=_gen(2))  # a shared null, batch 1
    mask = torch.ones(3)
    model = _Recorder()
    x = d.sample(
        model,
        shape,
        steps=1,
        guidance_scale=scale,
        cond={"y": y, "mask": mask},
        null_cond={"y": null, "mask": torch.ones(1)},
        generator=_gen(0),
    )
    noise = torch.randn(shape, generator=_gen(0))
    torch.testing.assert_close(x, noise - (null + scale * (y - null)), rtol=1e-6, atol=1e-6)
    assert model.batches == [6]
    torch.testing.assert_close(
        classifier_free_guidance(y, null, scale), null + scale * (y - null), rtol=0, atol=0
    )


def test_guidance_one_is_the_conditional_prediction_alone() -> None:
    d = Diffusion(SchedulerConfig(name="dpm_solver"))
    y = torch.randn(MEL, generator=_gen(1))
    model = _Recorder()
    with_null = d.sample(
        model,
        MEL,
        steps=4,
        guidance_scale=1.0,
        cond={"y": y},
        null_cond={"y": torch.zeros(MEL)},
        generator=_gen(0),
    )
    assert model.batches == [MEL[0]] * 4  # no unconditional pass
    alone = d.sample(lambda x, t: y, MEL, steps=4, generator=_gen(0))
    torch.testing.assert_close(with_null, alone, rtol=0, atol=0)


def test_guidance_and_condition_errors() -> None:
    d = Diffusion(SchedulerConfig(name="ddim"))
    y = torch.randn(IMAGE)
    run = lambda **kw: d.sample(_Recorder(), IMAGE, steps=2, **kw)  # noqa: E731
    check_raises(lambda: run(guidance_scale=0.5, cond={"y": y}), ValueError, "guidance_scale=0.5")
    check_raises(lambda: run(guidance_scale=3.0, cond={"y": y}), ValueError, "needs null_cond")
    check_raises(
        lambda: d.sample(_smooth_model, IMAGE, steps=2, guidance_scale=2.0),
        ValueError,
        "needs a cond",
    )
    check_raises(
        lambda: run(guidance_scale=2.0, cond={"y": y}, null_cond={"z": y}),
        ValueError,
        r"same keys, got \['y'\] and \['z'\]",
    )
    check_raises(
        lambda: run(guidance_scale=2.0, cond={"y": y}, null_cond={"y": torch.zeros(1, 3, 4, 6)}),
        ValueError,
        "differ after the batch axis",
    )
    check_raises(
        lambda: run(cond={"y": torch.zeros(5, 3, 4, 5)}), ValueError, r"batch first, of size 2 or 1"
    )


def test_none_condition_entries_pass_through() -> None:
    d = Diffusion(SchedulerConfig(name="flow_match_euler"))
    seen = []

    def model(x, t, y, extra):
        seen.append(extra)
        return y.expand_as(x)

    d.sample(
        model,
        IMAGE,
        steps=2,
        guidance_scale=2.0,
        cond={"y": torch.ones(1, *IMAGE[1:]), "extra": None},
        null_cond={"y": torch.zeros(1, *IMAGE[1:]), "extra": None},
    )
    assert seen == [None, None]


def test_drop_condition() -> None:
    batch = 4000
    cond = {"ctx": torch.ones(batch, 3, 2), "mask": torch.ones(batch, 3, dtype=torch.bool)}
    null = {"ctx": torch.zeros(1, 3, 2), "mask": torch.zeros(1, 3, dtype=torch.bool)}
    out = drop_condition(cond, null, 0.25, generator=_gen(0))
    dropped = out["ctx"][:, 0, 0] == 0
    # a row goes as a whole: context and mask together
    assert torch.equal(~out["mask"].any(1), dropped) and torch.equal(out["mask"].all(1), ~dropped)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # ~4.5 standard deviations
    assert out["mask"].dtype == torch.bool
    again = drop_condition(cond, null, 0.25, generator=_gen(0))
    assert torch.equal(again["ctx"], out["ctx"])
    assert drop_condition(cond, null, 0.0)["ctx"] is cond["ctx"]
    assert not drop_condition(cond, null, 1.0)["mask"].any()
    check_raises(lambda: drop_condition(cond, null, 1.5), ValueError, r"p=1\.5")
    check_raises(lambda: drop_condition(cond, None, 0.1), ValueError, "needs null_cond")
    check_raises(lambda: drop_condition(cond, {"ctx": null["ctx"]}, 0.1), ValueError, "same keys")


def test_loss_with_condition_dropout_learns_the_null() -> None:
    """With drop_prob = 1 every row sees the null condition."""
    d = Diffusion(SchedulerConfig(name="flow_match_euler"))
    seen = []

    def model(x, t, label):
        seen.append(label.clone())
        return torch.zeros_like(x)

    x0 = torch.randn(8, 2, 3)
    loss = d.loss(
        model,
        x0,
        {"label": torch.arange(8)},
        null_cond={"label": torch.full((1,), 10)},
        drop_prob=1.0,
        generator=_gen(0),
    )
    assert torch.equal(seen[0], torch.full((8,), 10)) and loss.item() > 0


def test_sample_timesteps() -> None:
    ddpm = Diffusion(SchedulerConfig(num_train_timesteps=50))
    t = ddpm.sample_timesteps(4000, generator=_gen(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 49
    assert torch.equal(t, ddpm.sample_timesteps(4000, generator=_gen(0)))
    # flow: σ = shift(u) with u uniform, so the median σ is shift / (1 + shift)
    flow = Diffusion(SchedulerConfig(name="flow_match_euler", shift=3.0))
    t = flow.sample_timesteps(20000, generator=_gen(0))
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1000
    assert abs(t.median().item() / 1000 - 0.75) < 0.01
    logit = Diffusion(SchedulerConfig(name="flow_match_euler", timestep_sampling="logit_normal"))
    sigma = logit.sample_timesteps(20000, generator=_gen(0)) / 1000
    assert abs(sigma.median().item() - 0.5) < 0.01
    assert abs(torch.logit(sigma).std().item() - 1.0) < 0.03
    check_raises(lambda: ddpm.sample_timesteps(0), ValueError, "batch=0")


def test_config_contract_and_defaults() -> None:
    for config in (
        SchedulerConfig(),
        SchedulerConfig(name="flow_match_euler", shift=3.0, timestep_sampling="logit_normal"),
        SchedulerConfig(name="ddim", timestep_spacing="trailing", eta=0.3),
    ):
        check_config(config)
    assert SchedulerConfig().prediction_type is PredictionType.EPSILON
    assert SchedulerConfig(name="flow_match_euler").prediction_type is PredictionType.FLOW


def test_the_noise_process_is_what_the_model_learns_not_how_timesteps_are_drawn() -> None:
    flow = SchedulerConfig(name="flow_match_euler")
    same = (
        SchedulerConfig(name="flow_match_euler", shift=3.0, timestep_sampling="logit_normal"),
        SchedulerConfig(name="flow_match_euler", logit_mean=1.0, timestep_sampling="logit_normal"),
    )
    assert all(c.noise_process() == flow.noise_process() for c in same)
    other = (
        SchedulerConfig(name="flow_match_euler", prediction_type="sample"),
        SchedulerConfig(name="flow_match_euler", num_train_timesteps=500),
        SchedulerConfig(name="ddpm", prediction_type="sample"),
    )
    assert all(c.noise_process() != flow.noise_process() for c in other)
    ddpm = SchedulerConfig()  # the DDPM family shares a process across its samplers
    assert SchedulerConfig(name="ddim", eta=0.5).noise_process() == ddpm.noise_process()
    assert SchedulerConfig(name="dpm_solver").noise_process() == ddpm.noise_process()
    assert SchedulerConfig(beta_schedule="scaled_linear").noise_process() != ddpm.noise_process()
    assert SchedulerConfig(beta_end=0.03).noise_process() != ddpm.noise_process()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "euler"}, r"name='euler' is invalid: expected one of \['ddpm', 'ddim', "),
        ({"prediction_type": "x0"}, r"prediction_type='x0' is invalid: expected one of"),
        (
            {"name": "flow_match_euler", "prediction_type": "epsilon"},
            r"prediction_type='epsilon' is invalid: expected one of \['flow', 'sample'\]",
        ),
        (
            {"name": "ddim", "prediction_type": "flow"},
            r"expected one of \['epsilon', 'v_prediction', 'sample'\] for name='ddim'",
        ),
        ({"rescale_betas_zero_snr": True}, "use v_prediction or sample"),
        ({"shift": 3.0}, "does not apply to the DDPM family"),
        ({"name": "flow_match_euler", "eta": 0.5}, "does not apply to flow matching"),
        ({"solver_order": 4}, "solver_order=4 is invalid: expected 1, 2 or 3"),
        ({"beta_start": 0.03}, r"beta_end=0\.02 is invalid"),
        ({"eta": 1.5}, r"eta=1\.5 is invalid"),
        ({"num_train_timesteps": 1}, "num_train_timesteps=1 is invalid"),
        (
            {"timestep_spacing": "even"},
            r"expected one of \['linspace', 'leading', 'trailing'\] or None",
        ),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    check_raises(lambda: SchedulerConfig(**kwargs), ValueError, match)


def test_input_errors() -> None:
    ddpm = Diffusion(SchedulerConfig())
    flow = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x = torch.randn(IMAGE)
    run = lambda **kw: ddpm.sample(_smooth_model, IMAGE, **({"steps": 2} | kw))  # noqa: E731
    check_raises(lambda: run(steps=0), ValueError, "steps=0")
    check_raises(lambda: run(steps=1001), ValueError, "num_train_timesteps=1000")
    check_raises(
        lambda: run(scheduler="flow_match_euler"),
        ValueError,
        r"samples with one of \['ddpm', 'ddim', 'dpm_solver'\]",
    )
    check_raises(
        lambda: flow.sample(_smooth_model, IMAGE, steps=2, scheduler="ddim"),
        ValueError,
        r"one of \['flow_match_euler'\]",
    )
    check_raises(lambda: ddpm.sample(_smooth_model, (4,), steps=2), ValueError, r"shape=\(4,\)")
    check_raises(lambda: run(noise=torch.randn(2, 3, 4, 4)), ValueError, "must have the sample")
    check_raises(
        lambda: ddpm.sample(lambda x, t: x[:, :1], IMAGE, steps=2),
        ValueError,
        r"the model returned \(2, 1, 4, 5\) for x \(2, 3, 4, 5\)",
    )
    t = torch.tensor([3, 4])
    check_raises(lambda: ddpm.add_noise(x, x, t.float()), ValueError, "integer timesteps")
    check_raises(lambda: ddpm.add_noise(x, x[:1], t), ValueError, "noise")
    check_raises(lambda: ddpm.target(x, x, t[:1]), ValueError, r"shape \(B,\) = \(2,\)")
    check_raises(lambda: flow.add_noise(x[0, 0, 0], x[0, 0, 0], t[:1]), ValueError, "(B, ...)")
    check_raises(lambda: Diffusion({"name": "ddpm"}), ValueError, "SchedulerConfig")


def test_model_dtype_and_default_device() -> None:
    """A bf16 module gets bf16 inputs; the sample stays float32, on the module's device."""
    seen = []

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.bfloat16))

        def forward(self, x, t):
            seen.append(x.dtype)
            return x * self.scale

    x = Diffusion(SchedulerConfig(name="ddim")).sample(
        Tiny(), MEL, steps=3, generator=_gen(0), progress=True
    )
    assert seen == [torch.bfloat16] * 3 and x.dtype == torch.float32 and x.isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sample_with_a_cpu_generator_matches_cpu() -> None:
    d = Diffusion(SchedulerConfig(name="ddpm", prediction_type="v_prediction"))
    c = torch.randn(IMAGE[1:], generator=_gen(1))
    cpu = d.sample(_optimum(d, c), IMAGE, steps=6, generator=_gen(0))
    gpu = d.sample(_optimum(d, c.cuda()), IMAGE, steps=6, generator=_gen(0), device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


def test_a_tiny_conditional_model_trains_and_samples_with_guidance() -> None:
    """End to end, ~2 s: a 2-class flow-matching MLP trained with loss + condition dropout +
    EMA lands each guided sample at its class's point, and the learned null condition
    alone gives a mixture of both."""
    centers = torch.tensor([[1.5, -1.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 1.0]])  # 3.3 apart

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(3, 16)  # label 2: the null condition
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4 + 16 + 1, 64),
                torch.nn.SiLU(),
                torch.nn.Linear(64, 64),
                torch.nn.SiLU(),
                torch.nn.Linear(64, 4),
            )

        def forward(self, x, t, label):
            return self.net(torch.cat([x, self.emb(label), (t / 1000)[:, None]], -1))

    d = Diffusion(SchedulerConfig(name="flow_match_euler"))
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ema, g, null = EMA(net, 0.9, warmup=True), _gen(0), {"label": torch.tensor([2])}
    for _ in range(250):
        labels = torch.randint(0, 2, (128,), generator=g)
        loss = d.loss(
            net, centers[labels], {"label": labels}, null_cond=null, drop_prob=0.2, generator=g
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
    labels = torch.tensor([0, 1] * 32)
    with ema.applied_to(net):
        for scale in (1.0, 3.0):
            x = d.sample(
                net,
                (64, 4),
                steps=10,
                cond={"label": labels},
                null_cond=null,
                guidance_scale=scale,
                generator=_gen(1),
            )
            assert torch.equal(torch.cdist(x, centers).argmin(1), labels)
            assert (x - centers[labels]).norm(dim=-1).mean() < 0.25
        x = d.sample(net, (64, 4), steps=10, cond=null, generator=_gen(1))
    dist = torch.cdist(x, centers)
    assert 0.15 < dist.argmin(1).float().mean() < 0.85 and dist.min(1).values.mean() < 0.6
