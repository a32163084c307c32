"""vats-audio: audio I/O, Whisper-compatible log-mel features, an audio encoder on vats-core,
Whisper import and a Griffin-Lim vocoder."""

from vats_audio.encoder import AudioEncoder, AudioEncoderConfig
from vats_audio.features import LogMel, LogMelConfig, LogMelNormalization
from vats_audio.io import WavEncoding, load, save
from vats_audio.presets import audio_preset
from vats_audio.vocoder import GriffinLimVocoder, Vocoder

__version__ = "0.1.0"

__all__: list[str] = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "GriffinLimVocoder",
    "LogMel",
    "LogMelConfig",
    "LogMelNormalization",
    "Vocoder",
    "WavEncoding",
    "audio_preset",
    "load",
    "save",
]
