"""Embedded, procedurally generated datasets (see :mod:`vats_apps.data.shapes`)."""

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

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "MIN_IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "ShapeBatch",
    "ShapeImages",
    "ShapeVideos",
    "ShapesConfig",
    "ShapesWorld",
    "Split",
]
