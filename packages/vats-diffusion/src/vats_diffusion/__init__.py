"""vats-diffusion: a VAE with a CNN decoder, diffusion transformers with masked text
conditioning, samplers over diffusers' noise schedulers, classifier-free guidance, EMA.

Models import no diffusers code; :mod:`vats_diffusion.sampling` builds diffusers'
schedulers lazily, and :func:`vats_diffusion.interop.from_diffusers` reads diffusers
models passed to it.
"""

from vats_diffusion.audio_dit import (
    AUDIO_DIT_PRESETS,
    AudioDiT,
    AudioDiTConfig,
    AudioPosEmbed,
    audio_dit_preset,
    frames_for_seconds,
)
from vats_diffusion.dit import DIT_PRESETS, DiT, DiTConfig, DiTPosEmbed, dit_preset
from vats_diffusion.dit_layers import AdaLNMode
from vats_diffusion.ema import EMA
from vats_diffusion.sampling import (
    BetaSchedule,
    Diffusion,
    DpmAlgorithm,
    PredictionType,
    SchedulerConfig,
    SchedulerName,
    TimestepSampling,
    TimestepSpacing,
    classifier_free_guidance,
    drop_condition,
)
from vats_diffusion.vae import VAE, VAE_PRESETS, DiagonalGaussian, VAEConfig, vae_preset
from vats_diffusion.video_dit import (
    VIDEO_DIT_PRESETS,
    VideoDiT,
    VideoDiTConfig,
    VideoPosEmbed,
    inflate_dit,
    video_dit_preset,
)

__version__ = "0.1.0"

__all__: list[str] = [
    "AUDIO_DIT_PRESETS",
    "DIT_PRESETS",
    "EMA",
    "VAE",
    "VAE_PRESETS",
    "VIDEO_DIT_PRESETS",
    "AdaLNMode",
    "AudioDiT",
    "AudioDiTConfig",
    "AudioPosEmbed",
    "BetaSchedule",
    "DiT",
    "DiTConfig",
    "DiTPosEmbed",
    "DiagonalGaussian",
    "Diffusion",
    "DpmAlgorithm",
    "PredictionType",
    "SchedulerConfig",
    "SchedulerName",
    "TimestepSampling",
    "TimestepSpacing",
    "VAEConfig",
    "VideoDiT",
    "VideoDiTConfig",
    "VideoPosEmbed",
    "audio_dit_preset",
    "classifier_free_guidance",
    "dit_preset",
    "drop_condition",
    "frames_for_seconds",
    "inflate_dit",
    "vae_preset",
    "video_dit_preset",
]
