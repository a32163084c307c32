"""vats-text: tokenizer, MoE language model, generation, text encoder, HF import.

``generate`` and ``stream`` live outside the model (gpt-fast style): the model only
knows ``forward(..., caches=...)`` and ``setup_caches``.
"""

from vats_text.encoder import TextEncoder, TextEncoderConfig, TextEncoderOutput
from vats_text.generation import generate, stream
from vats_text.model import LMOutput, MoELanguageModel, MoELMConfig
from vats_text.presets import encoder_preset, lm_preset
from vats_text.tokenizer import Tokenizer

__all__ = [
    "LMOutput",
    "MoELMConfig",
    "MoELanguageModel",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "Tokenizer",
    "encoder_preset",
    "generate",
    "lm_preset",
    "stream",
]
