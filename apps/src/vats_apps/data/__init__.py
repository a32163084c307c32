"""Embedded, procedurally generated datasets: the shapes world (:mod:`vats_apps.data.shapes`)
and the sounds world (:mod:`vats_apps.data.sounds`)."""

from vats_apps.data.shapes import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    MIN_IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    ShapeBatch,
    ShapeImages,
    ShapesConfig,
    ShapesWorld,
    ShapeVideos,
    Split,
)
from vats_apps.data.sounds import BACKGROUNDS as SOUND_BACKGROUNDS
from vats_apps.data.sounds import (
    DURATIONS,
    PITCHES,
    TIMBRES,
    SoundBatch,
    SoundClips,
    SoundsConfig,
    SoundsWorld,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "DURATIONS",
    "MIN_IMAGE_SIZE",
    "PITCHES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SOUND_BACKGROUNDS",
    "SPEEDS",
    "TIMBRES",
    "ShapeBatch",
    "ShapeImages",
    "ShapeVideos",
    "ShapesConfig",
    "ShapesWorld",
    "SoundBatch",
    "SoundClips",
    "SoundsConfig",
    "SoundsWorld",
    "Split",
]
