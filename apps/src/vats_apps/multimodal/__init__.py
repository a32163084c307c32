"""The multimodal language model (image, video and audio encoders feeding the MoE LM
through projectors), its inputs, and the questions it is trained to answer."""

from vats_apps.multimodal.model import (
    KINDS,
    Media,
    MultimodalConfig,
    MultimodalLM,
    Projector,
    ProjectorConfig,
)

__all__ = [
    "KINDS",
    "Media",
    "MultimodalConfig",
    "MultimodalLM",
    "Projector",
    "ProjectorConfig",
]
