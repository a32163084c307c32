"""The text-to-image model of apps: its condition and null condition, representation
alignment, the shape-weighted losses, and the classifier's reading of images; the stages'
diffusion loss with a timestep per frame (text_to_video's train.dit.frame_noise) and with
the frame-difference term (train.dit.frame_diff_weight)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vats_apps.data import ShapesConfig, ShapesWorld
from vats_apps.generation.clips import TextToVideo
from vats_apps.generation.model import TextToImage, TokenAlignment, read_images, read_positions
from vats_apps.pipelines import stages
from vats_apps.pipelines.stages import diffusion_loss
from vats_apps.pipelines.text_to_image import vae_loss
from vats_diffusion import (
    VAE,
    Diffusion,
    DiT,
    SchedulerConfig,
    VideoDiT,
    dit_preset,
    vae_preset,
    video_dit_preset,
)
from vats_text.encoder import TextEncoder
from vats_text.presets import encoder_preset


def _model() -> TextToImage:
    torch.manual_seed(0)
    encoder = TextEncoder(encoder_preset("tiny", vocab_size=64, max_seq_len=16))
    dit = DiT(dit_preset("tiny", num_classes=0, learned_sigma=False, text_dim=64))
    return TextToImage(encoder, dit).eval()


def test_null_condition_is_what_text_dropout_trains():
    model = _model()
    ids = torch.randint(7, 64, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cond = model.condition(ids, mask)
    null = TextToImage.null_condition(cond)
    assert null["text_states"].shape == (1, 5, 64) and not null["text_mask"].any()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        dropped = model.dit(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in null.items()})
        unconditional = model.dit(x, t)  # no text at all
    torch.testing.assert_close(dropped, unconditional)


@torch.no_grad()
def test_alignment_reads_the_chosen_block_and_scores_cosine():
    model = _model()
    align = TokenAlignment(model.dit, block=1, teacher_dim=6)
    seen = {}
    model.dit.blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    model.dit(x, t)
    teacher = align.proj(seen["x"]).detach()  # (B, N = 16, 6)
    model.dit(x, t)
    assert align.loss(teacher).item() == pytest.approx(0.0, abs=1e-6)  # aligned: cosine 1
    model.dit(x, t)
    assert align.loss(-teacher).item() == pytest.approx(2.0, abs=1e-5)  # opposite: cosine -1
    with pytest.raises(ValueError, match="grids and widths must match"):
        model.dit(x, t)
        align.loss(torch.zeros(2, 9, 6))
    align.remove()
    model.dit(x, t)
    with pytest.raises(RuntimeError, match="run the DiT first"):
        align.loss(teacher)  # the hook is gone: nothing was captured


def test_weighted_losses_with_unit_weights_are_the_packages_losses():
    model = _model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0 = torch.randn(4, 4, 8, 8)
    cond = model.condition(torch.randint(7, 64, (4, 3)), torch.ones(4, 3, dtype=torch.bool))
    ones = torch.ones(4, 1, 8, 8)
    torch.manual_seed(1)
    ours = diffusion_loss(diffusion, model.dit, x0, cond, ones, ones.mean())
    torch.manual_seed(1)
    theirs = diffusion.loss(model.dit, x0, cond)
    torch.testing.assert_close(ours, theirs)
    # A weight on one position is that position's error counting more, normalised.
    torch.manual_seed(1)
    w = torch.ones(4, 1, 8, 8)
    w[:, :, 2, 3] = 5.0
    weighted = diffusion_loss(diffusion, model.dit, x0, cond, w, w.mean())
    assert weighted != ours

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny"))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(2)
    ours, parts = vae_loss(vae, x, torch.zeros(2, 1, 8, 8), kl_weight=1e-3, shape_weight=4.0)
    torch.manual_seed(2)
    theirs, their_parts = vae.loss(x, kl_weight=1e-3)
    torch.testing.assert_close(ours, theirs)  # no shape: the plain LDM loss
    torch.testing.assert_close(parts["recon"], their_parts["recon"])


def test_the_stages_diffusion_loss_draws_as_the_package_s_loss_in_training():
    """On one process the stages' loss draws the timesteps, the noise and the condition
    dropout (given to the DiT as ``text_keep``) as Diffusion.loss and the DiT draw them:
    the same loss, bit for bit, so one-process training is what it was."""
    torch.manual_seed(0)
    encoder = TextEncoder(encoder_preset("tiny", vocab_size=64, max_seq_len=16))
    dit = DiT(dit_preset("tiny", num_classes=0, learned_sigma=False, text_dim=64, text_dropout=0.5))
    model = TextToImage(encoder, dit).train()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0 = torch.randn(8, 4, 8, 8)
    cond = model.condition(torch.randint(7, 64, (8, 3)), torch.ones(8, 3, dtype=torch.bool))
    torch.manual_seed(3)
    ours = diffusion_loss(diffusion, model.dit, x0, cond)
    after = torch.rand(1)
    torch.manual_seed(3)
    theirs = diffusion.loss(model.dit, x0, cond)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(torch.rand(1), after)  # and the RNG goes on as it did


# ---- Diffusion Forcing: a timestep per frame (train.dit.frame_noise of text_to_video)


def _video_model(**dit_fields: object) -> TextToVideo:
    """The text encoder and a tiny VideoDiT (text dropout on), every weight moved off its
    init (a fresh DiT predicts zero, whatever its input), in training mode."""
    torch.manual_seed(0)
    encoder = TextEncoder(encoder_preset("tiny", vocab_size=64, max_seq_len=16))
    fields = dict(learned_sigma=False, text_dim=64, text_dropout=0.5, **dit_fields)
    model = TextToVideo(encoder, VideoDiT(video_dit_preset("tiny", **fields)))
    with torch.no_grad():
        for q in model.dit.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    return model.train()


def _clips(model: TextToVideo, b: int = 6, t: int = 4) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(b, 4, t, 8, 8, generator=g)
    ids = torch.randint(7, 64, (b, 3), generator=g)
    return x0, model.condition(ids, torch.ones(b, 3, dtype=torch.bool))


def _stage_config(tmp_path, **dit: object):
    """A pipeline config holding one ``train.dit`` stage section, for ``StagedPipeline.fit``."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "pipeline": {"seed": 0, "out_dir": str(tmp_path), "progress": False},
            "train": {"dit": dit},
        }
    )


def _dit_inputs(model: TextToVideo) -> list[tuple[tuple, dict]]:
    """Records the ``(args, kwargs)`` of every call of ``model.dit``."""
    seen: list[tuple[tuple, dict]] = []
    model.dit.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    return seen


def test_frame_noise_zero_is_the_one_timestep_per_clip_loss_bit_for_bit():
    """frame_noise=0 (or the argument left out) is the loss as it was, bit for bit: the same
    draws in the same order (Diffusion.loss's), the RNG going on as it did."""
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    losses, after = [], []
    for call in (
        lambda: diffusion.loss(model.dit, x0, cond),
        lambda: diffusion_loss(diffusion, model.dit, x0, cond),
        lambda: diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=0.0),
        lambda: diffusion_loss(diffusion, model.dit, x0, cond, frame_diff_weight=0.0),
    ):
        torch.manual_seed(3)
        losses.append(call())
        after.append(torch.rand(1))
    for loss, rng in zip(losses[1:], after[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=0)
        assert torch.equal(rng, after[0])


@pytest.mark.parametrize("scheduler", ["flow_match_euler", "ddpm"])
def test_frame_noise_noises_each_frame_at_its_own_timestep(scheduler):
    """frame_noise=1: after the clip's draws (timesteps, noise, text dropout) every clip
    draws one timestep per frame; each frame is noised at its own, the target is each
    frame's, and the DiT gets the (B, T) timestep."""
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name=scheduler))
    x0, cond = _clips(model)
    seen = _dit_inputs(model)
    torch.manual_seed(3)
    loss = diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=1.0)
    torch.manual_seed(3)  # the draws, in their order
    diffusion.sample_timesteps(6)
    noise = torch.randn(x0.shape)
    keep = torch.rand(6) >= 0.5
    assert (torch.rand(6) < 1.0).all()
    t = diffusion.sample_timesteps(6 * 4).view(6, 4)
    (x_t, given_t), kwargs = seen[0]
    assert torch.equal(given_t, t) and torch.equal(kwargs["text_keep"], keep)
    assert (t != t[:, :1]).any(1).all()  # every clip's frames at several levels
    target = torch.empty_like(x0)
    for f in range(4):
        torch.testing.assert_close(
            x_t[:, :, f], diffusion.add_noise(x0[:, :, f], noise[:, :, f], t[:, f]), rtol=0, atol=0
        )
        target[:, :, f] = diffusion.target(x0[:, :, f], noise[:, :, f], t[:, f])
    with torch.no_grad():
        pred = model.dit(x_t, t, **cond, text_keep=keep)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))


@pytest.mark.parametrize("frame_noise", [0.0, 1.0])
def test_frame_diff_weight_adds_the_error_of_the_frame_to_frame_differences(frame_noise):
    """The loss is the plain one plus w times the squared error of the prediction's
    frame-to-frame differences against the target's, on the same draws (the RNG goes on as
    without it); a one-frame clip adds nothing."""
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    torch.manual_seed(3)
    plain = diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=frame_noise)
    after = torch.rand(1)
    seen = _dit_inputs(model)
    torch.manual_seed(3)
    loss = diffusion_loss(
        diffusion, model.dit, x0, cond, frame_noise=frame_noise, frame_diff_weight=2.5
    )
    assert torch.equal(torch.rand(1), after)
    (x_t, t), kwargs = seen[0]
    with torch.no_grad():
        pred = model.dit(x_t, t, **cond, text_keep=kwargs["text_keep"])
    torch.manual_seed(3)  # the draws: the clips' timesteps, then the noise
    diffusion.sample_timesteps(6)
    noise = torch.randn(x0.shape)
    per_frame = t if t.ndim == 2 else t[:, None].expand(-1, 4)
    target = torch.stack(
        [diffusion.target(x0[:, :, f], noise[:, :, f], per_frame[:, f]) for f in range(4)], 2
    )
    torch.testing.assert_close(F.mse_loss(pred, target), plain, rtol=1e-5, atol=1e-6)
    extra = F.mse_loss(pred[:, :, 1:] - pred[:, :, :-1], target[:, :, 1:] - target[:, :, :-1])
    assert extra > 1e-3
    torch.testing.assert_close(loss, plain + 2.5 * extra, rtol=1e-5, atol=1e-6)
    # one frame: no differences, the plain loss
    torch.manual_seed(3)
    one_plain = diffusion_loss(diffusion, model.dit, x0[:, :, :1], cond)
    torch.manual_seed(3)
    one = diffusion_loss(diffusion, model.dit, x0[:, :, :1], cond, frame_diff_weight=2.5)
    torch.testing.assert_close(one, one_plain, rtol=0, atol=0)


def test_frame_diff_weight_refuses_what_it_cannot_weigh():
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    for bad in (-0.5, "big", math.nan, math.inf):
        with pytest.raises(ValueError, match=r"frame_diff_weight=.* expected a finite number"):
            diffusion_loss(diffusion, model.dit, x0, cond, frame_diff_weight=bad)
    with pytest.raises(ValueError, match=r"frame_diff_weight=1.0 needs clips x0"):
        diffusion_loss(diffusion, model.dit, x0[:, :, 0], cond, frame_diff_weight=1.0)
    weight = torch.ones(6, 1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"frame_diff_weight=1.0 is for the unweighted loss"):
        diffusion_loss(diffusion, model.dit, x0, cond, weight, weight.mean(), frame_diff_weight=1.0)


@pytest.mark.parametrize("tubelet", [1, 2])
def test_first_frame_gives_the_first_tubelet_clean_and_scores_the_rest(tubelet):
    """first_frame=1: after the clip's draws, every clip's first tubelet is its clean x0 at
    timestep 0 and the rest noised at the clip's timestep; the loss (and the differences'
    term) counts the other frames only. Its prediction of the given frames changes
    nothing."""
    model = _video_model(patch_frames=tubelet)
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    seen = _dit_inputs(model)
    torch.manual_seed(3)
    loss = diffusion_loss(diffusion, model.dit, x0, cond, first_frame=1.0, frame_diff_weight=2.0)
    torch.manual_seed(3)  # the draws, in their order
    t = diffusion.sample_timesteps(6)
    noise = torch.randn(x0.shape)
    keep = torch.rand(6) >= 0.5
    assert (torch.rand(6) < 1.0).all()
    (x_t, given_t), kwargs = seen[0]
    assert torch.equal(kwargs["text_keep"], keep)
    assert given_t.shape == (6, 4) and (given_t[:, :tubelet] == 0).all()
    assert torch.equal(given_t[:, tubelet:], t[:, None].expand(-1, 4 - tubelet))
    assert torch.equal(x_t[:, :, :tubelet], x0[:, :, :tubelet])
    noised = diffusion.add_noise(x0, noise, t)
    assert torch.equal(x_t[:, :, tubelet:], noised[:, :, tubelet:])
    with torch.no_grad():
        pred = model.dit(x_t, given_t, **cond, text_keep=keep)
    target = diffusion.target(x0, noise, t)
    p, y = pred[:, :, tubelet:], target[:, :, tubelet:]
    want = F.mse_loss(p, y) + 2.0 * F.mse_loss(p.diff(dim=2), y.diff(dim=2))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_first_frame_zero_and_its_refusals():
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    torch.manual_seed(3)
    plain = diffusion_loss(diffusion, model.dit, x0, cond)
    torch.manual_seed(3)
    zero = diffusion_loss(diffusion, model.dit, x0, cond, first_frame=0.0)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"first_frame=.* expected a number in \[0, 1\]"):
            diffusion_loss(diffusion, model.dit, x0, cond, first_frame=bad)
    with pytest.raises(ValueError, match=r"first_frame=0.5 needs clips x0"):
        diffusion_loss(diffusion, model.dit, x0[:, :, 0], cond, first_frame=0.5)
    with pytest.raises(ValueError, match=r"both set the frames' timesteps"):
        diffusion_loss(diffusion, model.dit, x0, cond, first_frame=0.5, frame_noise=0.5)


def test_clips_sampled_from_their_first_frame_keep_it():
    """sample_clips(from_first=True): the first pass's first frame is kept, and the second
    pass calls the DiT with it clean at timestep 0 (both halves of the guided batch)."""
    from vats_apps.generation.clips import sample_clips
    from vats_apps.generation.model import Sampling
    from vats_diffusion import VAE, vae_preset

    class Words:  # three token ids a text, no padding: what encode_texts asks of one
        def encode_batch(self, texts, padding_side, max_length):
            ids = torch.tensor([[7, 8, 9]] * len(texts))
            return ids, torch.ones_like(ids, dtype=torch.bool)

    model = _video_model().eval()
    vae = VAE(vae_preset("tiny", latent_channels=4)).eval()
    tokenizer = Words()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    sampling = Sampling("flow_match_euler", 3, 2.0, 1.0, None, 8)
    seen = _dit_inputs(model)
    decoded: list[torch.Tensor] = []
    decode = vae.decode_frames
    vae.decode_frames = lambda z: decoded.append(z.clone()) or decode(z)  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    texts = ["a red circle moving left"] * 2
    sample_clips(model, vae, diffusion, tokenizer, texts, 4, sampling, g, from_first=True)
    assert len(seen) == 6  # two passes of three steps
    for (_, t), _ in seen[:3]:  # the first pass: one timestep a clip
        assert t.shape == (4,)
    for (x, t), _ in seen[3:]:
        assert x.shape[0] == 4 and (t[:, 0] == 0).all() and (t[:, 1:] > 0).all()
        assert torch.equal(x[:2, :, :1], x[2:, :, :1])  # the cond and null halves
    given = seen[3][0][0][:2, :, :1]
    assert torch.equal(decoded[0][:, :, :1], given)


def test_frame_noise_keeps_some_clips_at_one_timestep_and_tubelets_at_theirs():
    """frame_noise=0.5: a clip not drawn keeps its frame_noise=0 timestep on every frame;
    with two-frame tubelets a drawn clip draws one timestep per tubelet."""
    model = _video_model(patch_frames=2)
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model, b=8)
    seen = _dit_inputs(model)
    torch.manual_seed(3)
    diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=0.0)
    torch.manual_seed(3)
    diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=0.5)
    clip_t, frame_t = seen[0][0][1], seen[1][0][1]  # (B,), (B, T)
    assert frame_t.shape == (8, 4)
    torch.testing.assert_close(frame_t[:, ::2], frame_t[:, 1::2], rtol=0, atol=0)
    kept = (frame_t == clip_t[:, None]).all(1)
    assert 0 < int(kept.sum()) < 8, kept  # both kinds in this batch
    assert (frame_t[~kept, 0] != frame_t[~kept, 2]).all()


def test_frame_noise_draws_for_the_global_batch_on_every_rank(monkeypatch):
    """Two ranks, each with its half of the batch, give the DiT the rows one process gives
    it (timesteps per frame, noised clips, text dropout): every draw is the global batch's."""
    model = _video_model()
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    x0, cond = _clips(model)
    seen = _dit_inputs(model)
    torch.manual_seed(3)
    diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=0.5)
    (whole_x, whole_t), whole_kw = seen.pop()
    monkeypatch.setattr(stages.dist, "is_available", lambda: True)
    monkeypatch.setattr(stages.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(stages.dist, "get_world_size", lambda: 2)
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
        monkeypatch.setattr(stages.dist, "get_rank", lambda r=rank: r)
        torch.manual_seed(3)
        half = {k: v[rows] for k, v in cond.items()}
        diffusion_loss(diffusion, model.dit, x0[rows], half, frame_noise=0.5)
        (x_t, t), kwargs = seen.pop()
        assert torch.equal(t, whole_t[rows]) and torch.equal(x_t, whole_x[rows])
        assert torch.equal(kwargs["text_keep"], whole_kw["text_keep"][rows])


def test_a_training_step_with_frame_noise(tmp_path):
    """The text_to_video stage's objective with frame_noise=1 trains through the trainer
    (two steps, finite losses, every DiT weight moved); a bad frame_noise, or one on images,
    is refused before any draw."""

    from vats_apps.pipelines.stages import Objective, StagedPipeline

    p = StagedPipeline("test", 1, {})
    cfg = _stage_config(
        tmp_path,
        max_steps=2,
        batch_size=4,
        trainer={"lr": 1e-3, "warmup_steps": 0, "log_every": 1},
    )
    model = _video_model()
    diffusion = Diffusion(
        SchedulerConfig(name="flow_match_euler", timestep_sampling="logit_normal")
    )
    x0, _ = _clips(model, b=4)
    ids, mask = torch.randint(7, 64, (4, 3)), torch.ones(4, 3, dtype=torch.bool)
    before = {n: q.detach().clone() for n, q in model.dit.named_parameters()}

    def loss(o, batch):
        cond = o.model.condition(batch["ids"], batch["mask"])
        return diffusion_loss(diffusion, o.model.dit, batch["x0"], cond, frame_noise=1.0)

    fitted = p.fit(
        cfg, "dit", Objective(loss, model=model), lambda s, m: {"x0": x0, "ids": ids, "mask": mask}
    )
    assert len(fitted.rows) == 2 and all(math.isfinite(r["loss"]) for r in fitted.rows)
    still = [n for n, q in model.dit.named_parameters() if torch.equal(q.detach(), before[n])]
    assert not still
    rng = torch.get_rng_state()
    cond = model.condition(ids, mask)
    for bad in (1.5, -0.1, "often", True):
        with pytest.raises(ValueError, match=r"frame_noise=.* is invalid: expected a number"):
            diffusion_loss(diffusion, model.dit, x0, cond, frame_noise=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"frame_noise=0.5 needs clips x0 \(B, C, T, h, w\)"):
        diffusion_loss(diffusion, model.dit, x0[:, :, 0], cond, frame_noise=0.5)
    assert torch.equal(torch.get_rng_state(), rng)  # refused before any draw


def test_the_classifier_reading_maps_each_head_to_names():
    world = ShapesConfig(image_size=24)
    heads = [("target", 24), ("size", 3), ("position", 9)]

    class Fixed(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            target = F.one_hot(torch.tensor([7, 0]), 24)  # 7 = shape 1 (square), colour 1
            size = F.one_hot(torch.tensor([2, 0]), 3)
            position = F.one_hot(torch.tensor([4, 8]), 9)
            return torch.cat([target, size, position], dim=-1).float()

    seen = read_images(Fixed(), heads, world, torch.zeros(2, 3, 24, 24))
    assert seen[0] == {"shape": "square", "color": "green", "size": "large", "position": "center"}
    assert seen[1] == {"shape": "circle", "color": "red", "size": "small",
                       "position": "bottom right"}  # fmt: skip


@pytest.mark.parametrize(("temperature", "tries", "calls"), [(1.0, 3, 3), (0.0, 3, 1)])
def test_refused_enrichments_are_sampled_again_up_to_the_tries(
    monkeypatch, temperature, tries, calls
):
    from vats_apps.generation import enrich as en
    from vats_apps.generation.model import Sampling, enrich_all

    good = "a small red circle in the center on a plain background"
    bad = "a small blue circle in the center on a plain background"  # changes the colour
    # Row 0 is refused twice, then kept; row 1 is kept at once; row 2 is always refused.
    script = iter([[bad, good, bad], [bad, bad], [good, bad]])
    asked: list[list[str]] = []

    def fake_enrich(model, tokenizer, prompts, **kw):
        asked.append(list(prompts))
        return next(script)

    monkeypatch.setattr(en, "enrich", fake_enrich)
    sampling = Sampling("flow_match_euler", 2, 1.0, temperature, None, 8, tries=tries)
    prompts = ["a red circle", "a small red thing", "red circle"]
    givens = [en.parse_prompt(p) for p in prompts]
    outs = enrich_all(None, None, prompts, givens, ShapesConfig(), sampling, torch.Generator())
    assert len(asked) == calls
    if calls == 1:  # greedy: one sample each, the refused rows fall back
        assert [o.accepted for o in outs] == [False, True, False]
        assert [o.tries for o in outs] == [1, 1, 1]
        return
    assert asked[1] == [prompts[0], prompts[2]] and asked[2] == [prompts[0], prompts[2]]
    assert [o.accepted for o in outs] == [True, True, False]
    assert [o.tries for o in outs] == [3, 1, 3]
    assert outs[2].used == prompts[2] and "color 'red' -> 'blue'" in outs[2].reason


def test_positions_are_read_from_the_pixels_of_real_images():
    batch = ShapesWorld(ShapesConfig(image_size=24)).images(range(512), "val")
    read = read_positions(batch.pixels * 2 - 1)
    truth = [batch.names(i)["position"] for i in range(512)]
    hits = sum(r == t for r, t in zip(read, truth, strict=True))
    assert hits / 512 > 0.9, hits  # 95 % measured; a wrong axis or grid reads ~1/9
    # A shape moved to the other corner is read there; a uniform image has no position.
    image = torch.full((1, 3, 24, 24), -0.2)
    image[:, 0, 1:6, 1:6] = 0.9  # a red block in the top left
    assert read_positions(image) == ["top left"]
    assert read_positions(image.flip(-1).flip(-2)) == ["bottom right"]
    assert read_positions(torch.zeros(2, 3, 24, 24)) == [None, None]


def test_stage_fit_trains_the_encoder_at_its_lr_scale(tmp_path):
    """``StagedPipeline.fit`` hands ``lr_scales`` to the trainer: after one AdamW step (the
    first moves every weight by about lr, whatever its gradient) the encoder's weights moved
    a tenth of the DiT's."""

    from vats_apps.pipelines.stages import Objective, StagedPipeline, encoder_lr_scale

    p = StagedPipeline("test", 1, {})
    cfg = _stage_config(
        tmp_path,
        max_steps=1,
        batch_size=2,
        encoder_lr_scale=0.1,
        trainer={"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
    )
    model = _model().train()
    with torch.no_grad():  # no zero-initialised layer: every weight gets a gradient at once
        for q in model.parameters():
            q.normal_(0.0, 0.05)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    ids, mask = torch.randint(7, 64, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])

    def loss(o, batch):
        return o.model.dit(x, t, **o.model.condition(ids, mask)).square().mean()

    def moved(prefix: str) -> float:
        steps = [
            (q.detach() - before[n]).abs().max()
            for n, q in model.named_parameters()
            if n.startswith(prefix) and q.ndim >= 2
        ]
        return float(torch.stack(steps).max())

    scales = {"model.encoder": encoder_lr_scale(p, cfg)}
    p.fit(cfg, "dit", Objective(loss, model=model), lambda step, micro: {}, lr_scales=scales)
    assert moved("dit.") == pytest.approx(1e-2, rel=0.05)
    assert moved("encoder.") == pytest.approx(1e-3, rel=0.05)
    for bad in (0, 1.5, "fast"):
        cfg.train.dit.encoder_lr_scale = bad
        with pytest.raises(ValueError, match=r"train.dit.encoder_lr_scale=.* is invalid"):
            encoder_lr_scale(p, cfg)


def test_word_sensitivity_measures_how_far_a_changed_word_moves_the_prediction():
    """Unchanged captions move nothing; other captions move the prediction by the relative
    norm of the difference, computed here again; a model given the null text for every
    caption reads no word (0); the model's mode is restored; bad arguments are refused."""
    from vats_apps.generation.model import encode_texts, word_sensitivity

    vocab = {w: i + 7 for i, w in enumerate(["a", "red", "blue", "circle", "square"])}

    class Words:  # a tokenizer of the test's few words
        def encode_batch(self, texts, padding_side, max_length):
            rows = [[vocab[w] for w in t.split()] for t in texts]
            ids = torch.tensor(rows)
            return ids, torch.ones_like(ids, dtype=torch.bool)

    model, tok = _model().train(), Words()
    with torch.no_grad():  # off the init, where a DiT predicts 0 whatever its input
        for q in model.dit.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    diffusion = Diffusion(SchedulerConfig(name="flow_match_euler"))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    caps = ["a red circle", "a blue circle", "a red square", "a blue square"]
    other = ["a blue circle", "a red circle", "a blue square", "a red square"]
    moved = word_sensitivity(
        model, diffusion, tok, latents, caps, {"same": caps, "color": other}, level=0.9
    )
    assert model.training  # restored
    assert moved["same"] == 0.0 and moved["color"] > 0.01
    model.eval()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 900.0)
    x_t = diffusion.add_noise(latents, noise, t)
    with torch.no_grad():
        a = model.dit(x_t, t, **model.condition(*encode_texts(tok, caps, 16)))
        b = model.dit(x_t, t, **model.condition(*encode_texts(tok, other, 16)))
    assert moved["color"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)

    def deaf_condition(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        null = model.null_condition(TextToImage.condition(model, ids, mask))
        return {k: v.expand(len(ids), *v.shape[1:]) for k, v in null.items()}

    model.condition = deaf_condition  # type: ignore[method-assign]
    deaf = word_sensitivity(model, diffusion, tok, latents, caps, {"color": other})
    assert deaf["color"] == 0.0
    with pytest.raises(ValueError, match=r"level=0 is invalid: expected \(0, 1\]"):
        word_sensitivity(model, diffusion, tok, latents, caps, {}, level=0)
    with pytest.raises(ValueError, match=r"3 changed captions for 'color', expected 4"):
        word_sensitivity(model, diffusion, tok, latents, caps, {"color": other[:3]})


def test_the_world_writes_captions_and_the_probe_names_another_value():
    from vats_apps.generation import enrich as en
    from vats_apps.generation.model import another_value

    world = ShapesWorld(ShapesConfig(image_size=24, frames=4))
    images, clips = world.images(range(16), "val"), world.videos(range(16), "val")
    for batch, medium in ((images, "image"), (clips, "video")):
        for i in range(16):
            assert en.caption(batch.names(i), medium) == batch.captions[i]
    names = clips.names(0)
    for attribute in ("shape", "color", "size", "direction", "speed", "background"):
        values = world.config.label_values(attribute)
        new = another_value(world.config, names, attribute)
        assert new in values and new != names[attribute]
        assert values.index(new) == (values.index(names[attribute]) + 1) % len(values)
