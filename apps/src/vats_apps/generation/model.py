"""The text-to-image model of apps and how it samples: a vats-text encoder feeding a
vats-diffusion DiT through cross-attention, the VAE decoding its latents, and the vision
classifier that reads the images back.

Composition lives here, not in the packages: vats_diffusion knows no text encoder and
vats_text no diffusion model (DESIGN.md).

Shapes: B batch, T text tokens, D encoder width, C latent channels, h / w latent side,
S image side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vats_apps.data import POSITIONS, ShapesConfig, ShapesWorld
from vats_apps.generation import enrich as en
from vats_diffusion import VAE, Diffusion, DiT
from vats_text.encoder import TextEncoder
from vats_text.model import MoELanguageModel
from vats_text.tokenizer import Tokenizer

__all__ = [
    "Sampling",
    "TextConditioned",
    "TextToImage",
    "TokenAlignment",
    "another_value",
    "denoising_loss",
    "encode_texts",
    "enrich_all",
    "guided_sample",
    "read_images",
    "read_positions",
    "sample_images",
    "word_sensitivity",
]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How images are generated (the pipeline's ``generation`` and ``enrichment`` fields)."""

    scheduler: str  # diffusers sampler of the training scheduler's family
    steps: int  # denoising steps
    guidance_scale: float  # classifier-free guidance, >= 1 (1 = none)
    temperature: float  # the enrichment LM's sampling (0 = greedy)
    min_p: float | None
    max_new_tokens: int
    tries: int = 1  # enrichments sampled per prompt until one keeps its attributes


class TextConditioned(nn.Module):
    """A text encoder and a diffusion transformer that reads its states (``text_states``,
    ``text_mask``), trained together (one optimizer, one EMA)."""

    def __init__(self, encoder: TextEncoder, dit: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.dit = dit

    def condition(self, input_ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The DiT's text condition: ``{"text_states": (B, T, D), "text_mask": (B, T)}``."""
        states = self.encoder(input_ids, mask).last_hidden_state
        return {"text_states": states, "text_mask": mask}

    @staticmethod
    def null_condition(cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The null condition, one row of ``cond``'s shapes with no real token: what the
        DiT's ``text_dropout`` trains, and the unconditional side of guidance."""
        states, mask = cond["text_states"], cond["text_mask"]
        return {
            "text_states": torch.zeros_like(states[:1]),
            "text_mask": torch.zeros_like(mask[:1]),
        }


class TextToImage(TextConditioned):
    """The text encoder and the image DiT."""

    dit: DiT


class TokenAlignment(nn.Module):
    """Representation alignment (REPA: Yu et al., 2024, "Representation Alignment for
    Generation", arXiv:2410.06940): an MLP maps the DiT's tokens after block ``block`` (of
    the noisy latent) to a frozen image encoder's patch features of the clean image, and
    :meth:`loss` is one minus their mean cosine similarity. Added to the diffusion loss, it
    hands the DiT the encoder's knowledge of what the image holds (here the vision proof's
    ViT-2D, trained to tell the world's shapes apart), which its own loss teaches slowly.

    The DiT's tokens are read by a forward hook on that block; call :meth:`remove` when
    training ends. The grids must match: the DiT's patch grid and the encoder's, both
    row-major.

    Args:
        dit: the DiT being trained.
        block: 1-based index of the block whose output is aligned.
        teacher_dim: width of the encoder's patch features.
        hidden: width of the MLP.
    """

    def __init__(self, dit: DiT, block: int, teacher_dim: int, hidden: int = 256) -> None:
        super().__init__()
        if not 1 <= block <= len(dit.blocks):
            raise ValueError(f"block={block} is invalid: expected 1..{len(dit.blocks)}")
        d = dit.config.dim
        self.proj = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, teacher_dim))
        self._tokens: Tensor | None = None
        self._hook = dit.blocks[block - 1].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: object, output: Tensor) -> None:
        self._tokens = output  # (B, N, D)

    def loss(self, teacher: Tensor) -> Tensor:
        """``1 - cos(proj(tokens), teacher)`` averaged over tokens, for the DiT's last
        forward; ``teacher`` is ``(B, N, teacher_dim)``."""
        tokens, self._tokens = self._tokens, None  # each forward is scored once
        if tokens is None:
            raise RuntimeError("TokenAlignment.loss: run the DiT first")
        h = self.proj(tokens)  # (B, N, teacher_dim)
        if h.shape != teacher.shape:
            raise ValueError(
                f"TokenAlignment: the DiT gives {tuple(h.shape)} aligned tokens, the encoder "
                f"{tuple(teacher.shape)} features: their grids and widths must match"
            )
        return 1 - F.cosine_similarity(h.float(), teacher.float(), dim=-1).mean()

    def remove(self) -> None:
        """Detach the hook from the DiT."""
        self._hook.remove()


def encode_texts(tokenizer: Tokenizer, texts: list[str], limit: int) -> tuple[Tensor, Tensor]:
    """``(input_ids (B, T), mask (B, T))``, right-padded, no special tokens; a text longer
    than ``limit`` tokens is a ValueError."""
    return tokenizer.encode_batch(texts, padding_side="right", max_length=limit)


@torch.no_grad()
def denoising_loss(
    model: TextToImage,
    vae: VAE,
    diffusion: Diffusion,
    tokenizer: Tokenizer,
    world: ShapesWorld,
    n: int,
) -> float:
    """The diffusion loss on ``n`` held-out images with their captions, at fixed timesteps
    and noise: the same numbers before and after training, so the two compare."""
    batch = world.images(range(n), "val")
    g = torch.Generator().manual_seed(0)
    latents = vae.encode_latents(batch.pixels * 2 - 1, generator=g)
    ids, mask = encode_texts(tokenizer, list(batch.captions), model.encoder.config.max_seq_len)
    was = model.training
    model.eval()
    loss = diffusion.loss(model.dit, latents, model.condition(ids, mask), generator=g)
    model.train(was)
    return float(loss)


@torch.no_grad()
def word_sensitivity(
    model: TextConditioned,
    diffusion: Diffusion,
    tokenizer: Tokenizer,
    latents: Tensor,
    captions: list[str],
    changed: Mapping[str, list[str]],
    *,
    level: float = 0.9,
    seed: int = 0,
) -> dict[str, float]:
    """How far the DiT's prediction moves when one attribute's word of the caption is
    replaced by another value's: for each ``changed[name]`` (the captions with that word
    replaced), ``‖p(changed) − p(captions)‖ / ‖p(captions)‖`` over the batch, the DiT given
    the same noisy ``latents`` (fixed noise from ``seed``) at timestep ``level · N`` (σ =
    ``level`` for flow matching), in eval mode (no text dropout). An attribute the DiT does
    not read from the text scores near 0, whatever the images show.

    Args:
        latents: ``(B, C, ...)`` clean latents of the captions' samples.
        captions: the ``B`` captions.
        changed: attribute name -> the ``B`` captions with that attribute's word changed.
    """
    if not 0 < level <= 1:
        raise ValueError(f"word_sensitivity: level={level!r} is invalid: expected (0, 1]")
    for name, texts in changed.items():
        if len(texts) != len(captions):
            raise ValueError(
                f"word_sensitivity: {len(texts)} changed captions for {name!r}, expected "
                f"{len(captions)} (one per caption)"
            )
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents)
    n = diffusion.config.num_train_timesteps
    t = torch.full((latents.shape[0],), level * n, device=latents.device)
    if not diffusion.config.is_flow:
        t = t.clamp(max=n - 1).long()
    x_t = diffusion.add_noise(latents, noise, t)
    limit = model.encoder.config.max_seq_len

    def predict(texts: list[str]) -> Tensor:
        ids, mask = encode_texts(tokenizer, texts, limit)
        return model.dit(x_t, t, **model.condition(ids, mask)).float()

    was = model.training
    model.eval()
    try:
        base = predict(captions)
        return {
            name: float((predict(texts) - base).norm() / base.norm().clamp(min=1e-12))
            for name, texts in changed.items()
        }
    finally:
        model.train(was)


def another_value(world: ShapesConfig, names: Mapping[str, str], attribute: str) -> str:
    """The value after ``names[attribute]`` in the world's list of that attribute's values
    (cyclically): the word a sensitivity probe changes it to."""
    values = world.label_values(attribute)
    return values[(values.index(names[attribute]) + 1) % len(values)]


@torch.no_grad()
def sample_images(
    model: TextToImage,
    vae: VAE,
    diffusion: Diffusion,
    tokenizer: Tokenizer,
    texts: list[str],
    sampling: Sampling,
    generator: torch.Generator,
    *,
    progress: bool = False,
) -> Tensor:
    """Images ``(B, 3, S, S)`` in [-1, 1] for ``texts``: encode them, sample latents with
    guidance (initial noise from ``generator``), decode."""
    ids, mask = encode_texts(tokenizer, texts, model.encoder.config.max_seq_len)
    h, w = model.dit.config.latent_hw
    shape = (len(texts), model.dit.config.in_channels, h, w)
    latents = guided_sample(
        model, diffusion, shape, model.condition(ids, mask), sampling, generator, progress=progress
    )
    return vae.decode_latents(latents).clamp(-1, 1)


@torch.no_grad()
def guided_sample(
    model: TextConditioned,
    diffusion: Diffusion,
    shape: tuple[int, ...],
    cond: dict[str, Tensor],
    sampling: Sampling,
    generator: torch.Generator,
    *,
    progress: bool = False,
    denoiser: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Samples of ``shape`` from ``model.dit`` (or ``denoiser``, called as the DiT is)
    conditioned on ``cond`` (the model's ``condition``), with ``sampling``'s sampler, steps
    and classifier-free guidance against the model's ``null_condition``; the initial noise
    from ``generator``."""
    guided = sampling.guidance_scale > 1
    return diffusion.sample(
        model.dit if denoiser is None else denoiser,
        shape,
        steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        cond=cond,
        null_cond=model.null_condition(cond) if guided else None,
        generator=generator,
        scheduler=sampling.scheduler,
        progress=progress,
    )


def enrich_all(
    lm: MoELanguageModel,
    tokenizer: Tokenizer,
    prompts: list[str],
    givens: list[dict[str, str]],
    world: en.World,
    sampling: Sampling,
    generator: torch.Generator,
    medium: str = "image",
) -> list[en.Enrichment]:
    """Each prompt of ``medium`` enriched (sampled from ``generator``) and checked against
    the attributes it names (``givens``).

    A refused enrichment is sampled again, up to ``sampling.tries`` samples in all (only the
    refused rows, batched; greedy decoding, ``temperature`` 0, gets one try since it would
    write the same words): the LM's slips (it writes "top left" for "top right" about one
    time in eight) are rarely repeated, so a few tries keep the user's attributes where one
    would fall back. When every try is refused the last one's reason is kept and the prompt
    is used as it is. ``Enrichment.tries`` says how many samples each row took.
    """
    tries = sampling.tries if sampling.temperature > 0 else 1
    outs: dict[int, en.Enrichment] = {}
    todo = list(range(len(prompts)))
    for attempt in range(1, tries + 1):
        if not todo:
            break
        written = en.enrich(
            lm,
            tokenizer,
            [prompts[i] for i in todo],
            generator=generator,
            temperature=sampling.temperature,
            min_p=sampling.min_p,
            max_new_tokens=sampling.max_new_tokens,
            medium=medium,
        )
        for i, w in zip(todo, written, strict=True):
            checked = en.check_enrichment(prompts[i], givens[i], w, world, medium)
            outs[i] = dataclasses.replace(checked, tries=attempt)
        todo = [i for i in todo if not outs[i].accepted]
    return [outs[i] for i in range(len(prompts))]


# A pixel belongs to the shape when its colour is this far (Euclidean, RGB in [0, 1]) from
# the background's, the median of the border pixels: the world's backgrounds are muted
# greys whose texture moves a pixel by at most 0.09 per channel (0.16 in RGB), and its
# shape colours are saturated or white. On 2048 real held-out 24 px images, 0.4 reads the
# position right for 95 %, 0.3 for 94 %, 0.2 for 86 % (the shape's own mask: 99.95 %).
SHAPE_DISTANCE = 0.4


def read_positions(images: Tensor) -> list[str | None]:
    """Where the shape is in each image, read from the pixels: the centroid of the pixels
    that differ from the background's colour (:data:`SHAPE_DISTANCE`), as the world's 3 x 3
    grid cell (:data:`~vats_apps.data.shapes.POSITIONS`). ``None`` where no pixel differs.

    Args:
        images: ``(B, 3, S, S)`` in [-1, 1].
    """
    x = (images.float() + 1) / 2  # (B, 3, S, S) in [0, 1]
    s = x.shape[-1]
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values  # (B, 3)
    shape = ((x - background[:, :, None, None]).norm(dim=1) > SHAPE_DISTANCE).float()
    grid = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    count = shape.sum((1, 2))  # (B,)
    cx = (shape * grid).sum((1, 2)) / count.clamp(min=1)
    cy = (shape * grid[:, None]).sum((1, 2)) / count.clamp(min=1)
    col = (cx * 3 / s).floor().clamp(0, 2).long()
    row = (cy * 3 / s).floor().clamp(0, 2).long()
    cells = (row * 3 + col).tolist()
    return [POSITIONS[c] if n > 0 else None for c, n in zip(cells, count.tolist(), strict=True)]


@torch.no_grad()
def read_images(
    classifier: nn.Module, heads: list[tuple[str, int]], world: ShapesConfig, images: Tensor
) -> list[dict[str, str]]:
    """What each image shows: shape and colour from the vision classifier's target head,
    size and background from its aux heads (``heads``: ``(label, classes)`` of each slice
    of its logits, as ``train_vision.heads`` gives them), and the position from the pixels
    (:func:`read_positions`: right on 95 % of real images, where the classifier's position
    head reads them near chance), or from the classifier where no pixel stands out."""
    logits = classifier(images).split([k for _, k in heads], dim=-1)
    out: list[dict[str, str]] = [{} for _ in range(images.shape[0])]
    for (label, _), part in zip(heads, logits, strict=True):
        for i, slot in enumerate(part.argmax(-1).tolist()):
            if label == "target":
                shape, color = divmod(slot, len(world.colors))
                out[i] |= {"shape": world.shapes[shape], "color": world.colors[color]}
            else:
                out[i][label] = world.label_values(label)[slot]
    for i, position in enumerate(read_positions(images)):
        if position is not None:
            out[i]["position"] = position
    return out
