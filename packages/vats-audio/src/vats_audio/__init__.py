"""vats-audio: audio I/O, Whisper-compatible log-mel features, an audio encoder on vats-core,
Whisper import and a Griffin-Lim vocoder."""

from vats_audio.features import LogMel, LogMelConfig, LogMelNormalization
from vats_audio.io import WavEncoding, load, save

__version__ = "0.1.0"

__all__: list[str] = [
    "LogMel",
    "LogMelConfig",
    "LogMelNormalization",
    "WavEncoding",
    "load",
    "save",
]
