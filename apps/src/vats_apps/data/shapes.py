"""The embedded shapes world: seeded procedural images and videos of coloured shapes.

Every sample is a pure function of ``(config, split, kind, index)``: the random draws
come from a counter-based hash of those numbers (:mod:`vats_apps.data.raster`), so a
sample is identical whether it is generated alone, in any batch, in any process or
after a resume, and the ``train`` / ``val`` / ``test`` splits hash to disjoint streams.
Rendering is anti-aliased signed-distance rasterization in torch, batched, at any
image size (>= :data:`MIN_IMAGE_SIZE`).

Classification targets are class balanced: indices are grouped in blocks of K (the
number of classes) and each block holds every class once, in a seeded order. Image
targets are ``shape x color`` (K = shapes * colors, ``target = shape_slot * colors +
color_slot`` over the config's lists); video targets are the direction of motion.

Labels are integer ids into the global name tables (:data:`SHAPES`, :data:`COLORS`,
:data:`SIZES`, :data:`POSITIONS`, :data:`BACKGROUNDS`, :data:`DIRECTIONS`,
:data:`SPEEDS`), so an id means the same thing under every config.

Example::

    from vats_apps.data import ShapeImages, ShapesConfig, ShapeVideos

    train = ShapeImages(10_000, split="train", config=ShapesConfig(image_size=32))
    batch = train.make_batch(range(256))  # fast, vectorized
    batch.pixels.shape                    # (256, 3, 32, 32), float32 in [0, 1]
    batch.target                          # (256,) shape x color class ids
    batch.captions[0]                     # 'a small green square in the center on a noisy background'
    train[0]["pixels"]                    # one example as a dict (DataLoader friendly)

    clips = ShapeVideos(2_000, split="val", config=ShapesConfig(frames=8))
    clips.make_batch([0, 1]).pixels.shape  # (2, 8, 3, 32, 32); .target is the direction
    clips.make_batch([0]).captions         # ['a small cyan circle moving right quickly on a ...']

    # an endless stream for vats_core's trainer: batch_fn(step, micro) -> dict of tensors
    world = ShapesWorld(ShapesConfig())
    batch_fn = lambda step, micro: world.images(range(step * 64, step * 64 + 64)).tensors()

With ``rotation_deg`` >= 45 a square can look like a diamond (keep them apart or the
rotation small when both are classes). Videos move in straight lines whose centre never
leaves the frame (the whole shape stays inside when the path fits), or bounce off the
borders with ``bounce=True`` (the whole shape always inside; ``direction`` is then the
initial one).

Shapes: B batch, T frames, C = 3 channels, S image side (H = W = S), K classes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vats_apps.data import raster
from vats_core.config import Config, check, config_error

# ---- name tables: label id = position in the table ----------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "diamond")

COLORS: dict[str, tuple[float, float, float]] = {  # saturated, far from the muted backgrounds
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.15, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}

SIZES: dict[str, tuple[float, float]] = {  # shape size r as a fraction of the image side
    "small": (0.10, 0.13),
    "medium": (0.155, 0.185),
    "large": (0.21, 0.24),
}

POSITIONS: tuple[str, ...] = (  # 3 x 3 grid cell of the (start) centre, row major
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

BACKGROUNDS: dict[str, str] = {  # name -> caption adjective
    "plain": "plain",
    "noise": "noisy",
    "stripes": "striped",
    "checker": "checkered",
}

DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy), x right, y down the image
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}

SPEEDS: dict[str, tuple[float, float]] = {  # image sides per frame (before speed_scale)
    "slow": (0.025, 0.035),
    "fast": (0.05, 0.065),
}

_SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}
_DIRECTION_WORDS = {
    "up-left": "up and to the left",
    "up-right": "up and to the right",
    "down-left": "down and to the left",
    "down-right": "down and to the right",
}

_TABLES: dict[str, tuple[str, ...]] = {  # label -> its global name table
    "shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": POSITIONS,
    "background": tuple(BACKGROUNDS), "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS),
}  # fmt: skip

MIN_IMAGE_SIZE = 24  # the smallest shape then spans about 5 pixels
MAX_SEED = 2**32 - 1
_TEXTURE_AMPLITUDE = 0.09  # background pattern contrast, small so shape colours stay clear
_NOISE_GRID = 5  # G: control points per side of the smooth-noise background


class Split(enum.StrEnum):
    """Dataset split; each hashes to its own sample stream."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Kind(enum.IntEnum):
    """What is generated; images and videos draw from separate streams."""

    IMAGE = 0
    VIDEO = 1


# random stream ids (fixed, so adding a stream later does not change existing samples)
_S_SHAPE, _S_COLOR, _S_SIZE, _S_RADIUS, _S_X, _S_Y, _S_ROT, _S_BG, _S_GRAY = range(9)
_S_TINT = (9, 10, 11)
_S_TEX = (12, 13, 14)
_S_JITTER = (15, 16, 17)
_S_DIR, _S_SPEED, _S_SPEED_JIT = 18, 19, 20
_N_STREAMS = 21
_S_NOISE = 64  # first of G * G streams


def _check_names(cfg: Config, name: str, values: Sequence[str], table: Sequence[str]) -> None:
    ok = len(values) > 0 and len(set(values)) == len(values) and all(v in table for v in values)
    check(ok, cfg, name, values, f"a non-empty list of distinct names from {list(table)}")


@dataclass(frozen=True, kw_only=True)
class ShapesConfig(Config):
    """What the shapes world draws from. Lists select (and order) entries of the name tables."""

    image_size: int = 32  # S: square images, any size >= MIN_IMAGE_SIZE
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")  # from SHAPES
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")  # COLORS
    sizes: tuple[str, ...] = ("small", "medium", "large")  # from SIZES
    backgrounds: tuple[str, ...] = ("plain", "noise", "stripes", "checker")  # BACKGROUNDS
    rotation_deg: float = 0.0  # shapes rotate uniformly in [-rotation_deg, rotation_deg]
    color_jitter: float = 0.04  # per-channel uniform jitter of the shape colour
    frames: int = 8  # T for videos
    directions: tuple[str, ...] = ("left", "right", "up", "down")  # from DIRECTIONS
    speeds: tuple[str, ...] = ("slow", "fast")  # from SPEEDS
    speed_scale: float = 1.0  # multiplies the SPEEDS ranges (lower it for long clips)
    bounce: bool = False  # bounce off the borders; otherwise the centre never leaves the frame
    seed: int = 0  # the world's seed; splits and sample indices hash on top of it

    def __post_init__(self) -> None:
        check(
            isinstance(self.image_size, int) and self.image_size >= MIN_IMAGE_SIZE,
            self, "image_size", self.image_size,
            f"an int >= {MIN_IMAGE_SIZE} (smaller images cannot draw the small shapes)",
        )  # fmt: skip
        _check_names(self, "shapes", self.shapes, SHAPES)
        _check_names(self, "colors", self.colors, tuple(COLORS))
        _check_names(self, "sizes", self.sizes, tuple(SIZES))
        _check_names(self, "backgrounds", self.backgrounds, tuple(BACKGROUNDS))
        _check_names(self, "directions", self.directions, tuple(DIRECTIONS))
        _check_names(self, "speeds", self.speeds, tuple(SPEEDS))
        check(0 <= self.rotation_deg <= 180, self, "rotation_deg", self.rotation_deg, "[0, 180]")
        check(0 <= self.color_jitter <= 0.1, self, "color_jitter", self.color_jitter, "[0, 0.1]")
        check(
            isinstance(self.frames, int) and self.frames >= 1, self, "frames", self.frames, ">= 1"
        )
        check(self.speed_scale > 0, self, "speed_scale", self.speed_scale, "> 0")
        check(
            isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
            self, "seed", self.seed, f"an int in [0, {MAX_SEED}]",
        )  # fmt: skip
        if not self.bounce:
            top = max(SPEEDS[s][1] for s in self.speeds) * self.speed_scale
            longest = int(1.0 / top) + 1
            check(
                top * (self.frames - 1) <= 1.0,
                self, "frames", self.frames,
                f"<= {longest} so a shape at speed {top:.3f} (sides per frame) stays in the "
                "frame without bouncing; or set bounce=True, or lower speed_scale",
            )  # fmt: skip

    @property
    def num_image_classes(self) -> int:
        """K for images: shapes x colors."""
        return len(self.shapes) * len(self.colors)

    @property
    def num_video_classes(self) -> int:
        """K for videos: directions."""
        return len(self.directions)

    def label_values(self, name: str) -> tuple[str, ...]:
        """The values label ``name`` takes in this world, in slot order (see
        :meth:`ShapesWorld.slots`): the config's list, or :data:`POSITIONS`."""
        values = {
            "shape": self.shapes, "color": self.colors, "size": self.sizes,
            "position": POSITIONS, "background": self.backgrounds,
            "direction": self.directions, "speed": self.speeds,
        }  # fmt: skip
        if name not in values:
            raise config_error(type(self).__name__, "label", name, f"one of {list(values)}")
        return values[name]

    def image_class_names(self) -> list[str]:
        """Name of each image target, e.g. ``'red circle'``."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def video_class_names(self) -> list[str]:
        """Name of each video target (a direction)."""
        return list(self.directions)


@dataclass(frozen=True)
class ShapeBatch:
    """A batch of generated samples with every label.

    Label tensors are (B,) int64 ids into the global name tables; ``target`` is the
    class-balanced classification target (see the module docstring). Video-only fields
    are None for images.
    """

    pixels: Tensor  # (B, C, S, S) or (B, T, C, S, S) float32 in [0, 1]
    mask: Tensor  # (B, 1, S, S) or (B, T, 1, S, S) the shape's anti-aliased coverage in [0, 1]
    target: Tensor  # (B,) classification target in [0, K)
    shape: Tensor  # (B,) id into SHAPES
    color: Tensor  # (B,) id into COLORS
    size: Tensor  # (B,) id into SIZES
    position: Tensor  # (B,) id into POSITIONS (of the first frame for videos)
    background: Tensor  # (B,) id into BACKGROUNDS
    center: Tensor  # (B, 2) or (B, T, 2) centre (x, y) in pixels, y down
    radius: Tensor  # (B,) shape size r in pixels (the shape fits in a circle of 1.15 r)
    rotation: Tensor  # (B,) degrees counter-clockwise
    rgb: Tensor  # (B, C) the shape's rendered colour (table colour plus jitter)
    captions: list[str] = field(default_factory=list)  # an English caption per sample
    direction: Tensor | None = None  # (B,) id into DIRECTIONS (the initial one if bouncing)
    speed: Tensor | None = None  # (B,) id into SPEEDS
    velocity: Tensor | None = None  # (B, 2) initial pixels per frame (dx, dy)

    _LABELS = ("shape", "color", "size", "position", "background", "direction", "speed")

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor field (for ``vats_core.training.TensorBatches`` or a model)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def labels(self, i: int) -> dict[str, int]:
        """Integer label ids of sample ``i``."""
        out = {"target": int(self.target[i])}
        for name in self._LABELS:
            value = getattr(self, name)
            if value is not None:
                out[name] = int(value[i])
        return out

    def names(self, i: int) -> dict[str, str]:
        """Label names of sample ``i`` (e.g. ``{"shape": "circle", ...}``)."""
        labels = self.labels(i)
        return {k: _TABLES[k][labels[k]] for k in self._LABELS if k in labels}

    def example(self, i: int) -> dict[str, Tensor | str]:
        """Sample ``i`` as a dict of tensors plus its caption (what ``Dataset[i]`` returns)."""
        out: dict[str, Tensor | str] = {k: v[i] for k, v in self.tensors().items()}
        out["caption"] = self.captions[i]
        return out


class ShapesWorld:
    """Generates batches of shape images and videos for one :class:`ShapesConfig`.

    Args:
        config: what to draw; ``config.seed`` selects the world.
    """

    def __init__(self, config: ShapesConfig | None = None) -> None:
        self.config = config if config is not None else ShapesConfig()
        c = self.config
        self._shape_ids = torch.tensor([SHAPES.index(s) for s in c.shapes])
        self._color_ids = torch.tensor([list(COLORS).index(s) for s in c.colors])
        self._size_ids = torch.tensor([list(SIZES).index(s) for s in c.sizes])
        self._bg_ids = torch.tensor([list(BACKGROUNDS).index(s) for s in c.backgrounds])
        self._dir_ids = torch.tensor([list(DIRECTIONS).index(s) for s in c.directions])
        self._speed_ids = torch.tensor([list(SPEEDS).index(s) for s in c.speeds])
        self._rgb = torch.tensor(list(COLORS.values()))  # (all colours, C)
        self._size_range = torch.tensor(list(SIZES.values()))  # (all sizes, 2)
        self._dir_vec = torch.tensor(list(DIRECTIONS.values()))  # (all directions, 2)
        self._speed_range = torch.tensor(list(SPEEDS.values()))  # (all speeds, 2)

    # ---- public -------------------------------------------------------------------------------

    def images(self, indices: Sequence[int] | Tensor, split: Split | str = "train") -> ShapeBatch:
        """Render images ``indices`` of ``split``; pixels (B, C, S, S)."""
        return self._generate(indices, split, Kind.IMAGE)

    def videos(self, indices: Sequence[int] | Tensor, split: Split | str = "train") -> ShapeBatch:
        """Render clips ``indices`` of ``split``; pixels (B, T, C, S, S)."""
        return self._generate(indices, split, Kind.VIDEO)

    def slots(self, batch: ShapeBatch, name: str) -> Tensor:
        """(B,) slot of label ``name`` in :meth:`ShapesConfig.label_values` (the class index a
        classifier of this world predicts), from the batch's global ids."""
        values = self.config.label_values(name)
        ids = getattr(batch, name)
        if ids is None:
            raise ValueError(f"the batch has no {name!r} labels (images have no motion)")
        table = _TABLES[name]
        lookup = torch.full((len(table),), -1, dtype=torch.int64)
        lookup[[table.index(v) for v in values]] = torch.arange(len(values))
        return lookup[ids]

    # ---- sampling -----------------------------------------------------------------------------

    def _generate(
        self, indices: Sequence[int] | Tensor, split: Split | str, kind: Kind
    ) -> ShapeBatch:
        split = _parse_split(split)
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (B,)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > MAX_SEED):
            raise ValueError(f"sample indices must lie in [0, {MAX_SEED}], got {indices!r}")
        c = self.config
        s = c.image_size
        head = [c.seed, list(Split).index(split), int(kind)]
        key_a = raster.hash_chain([*head, idx], lane=1)
        key_b = raster.hash_chain([*head, idx], lane=2)
        u = raster.uniforms(key_a, key_b, torch.arange(_N_STREAMS))  # (B, streams)
        target = raster.balanced_targets(
            head, idx, c.num_image_classes if kind == Kind.IMAGE else c.num_video_classes
        )

        # 1. categorical labels: the balanced target fixes shape x color or the direction
        if kind == Kind.IMAGE:
            shape_slot, color_slot = target // len(c.colors), target % len(c.colors)
        else:
            shape_slot, color_slot = (
                _pick(u[:, _S_SHAPE], len(c.shapes)),
                _pick(u[:, _S_COLOR], len(c.colors)),
            )
        shape, color = self._shape_ids[shape_slot], self._color_ids[color_slot]
        size = self._size_ids[_pick(u[:, _S_SIZE], len(c.sizes))]
        background = self._bg_ids[_pick(u[:, _S_BG], len(c.backgrounds))]

        # 2. geometry in pixels
        lo, hi = self._size_range[size].unbind(-1)
        radius = (lo + (hi - lo) * u[:, _S_RADIUS]) * s  # (B,)
        rotation = (2 * u[:, _S_ROT] - 1) * c.rotation_deg
        margin = raster.BOUND * radius + 0.5  # keeps the whole shape inside the frame
        start = margin[:, None] + (s - 2 * margin[:, None]) * u[:, [_S_X, _S_Y]]  # (B, 2)
        direction = speed = velocity = None
        center = start
        if kind == Kind.VIDEO:
            direction = self._dir_ids[target]
            speed = self._speed_ids[_pick(u[:, _S_SPEED], len(c.speeds))]
            lo, hi = self._speed_range[speed].unbind(-1)
            per_frame = (lo + (hi - lo) * u[:, _S_SPEED_JIT]) * c.speed_scale * s  # (B,)
            velocity = self._dir_vec[direction] * per_frame[:, None]  # (B, 2)
            center = self._trajectory(start, velocity, margin)  # (B, T, 2)
            start = center[:, 0]
        cell = (start / s * 3).floor().clamp(0, 2).long()  # (B, 2) grid column, row
        position = cell[:, 1] * 3 + cell[:, 0]

        # 3. colours: saturated shape on a muted (low-saturation, mid-grey) background
        rgb = (self._rgb[color] + (2 * u[:, list(_S_JITTER)] - 1) * c.color_jitter).clamp(0, 1)
        gray = 0.3 + 0.25 * u[:, _S_GRAY : _S_GRAY + 1]
        base = gray + (u[:, list(_S_TINT)] - 0.5) * 0.12  # (B, C)
        noise_streams = torch.arange(_S_NOISE, _S_NOISE + _NOISE_GRID**2)
        noise = raster.uniforms(key_a, key_b, noise_streams)  # (B, G*G)
        noise = noise.view(-1, 1, _NOISE_GRID, _NOISE_GRID)
        # background ids double as texture kinds (0 plain, 1 noise, 2 stripes, 3 checker)
        pattern = raster.texture(background, u[:, list(_S_TEX)], noise, s)  # (B, 1, S, S)
        bg = (base[:, :, None, None] + _TEXTURE_AMPLITUDE * pattern).clamp(0, 1)  # (B, C, S, S)

        # 4. rasterize and composite (video frames flattened into the batch)
        b = idx.shape[0]
        t = 1 if kind == Kind.IMAGE else c.frames
        flat_center = center.reshape(b * t, 2)
        mask = raster.coverage(
            list(SHAPES),
            shape.repeat_interleave(t),
            flat_center,
            radius.repeat_interleave(t),
            rotation.repeat_interleave(t),
            s,
        )  # (B*T, 1, S, S)
        if kind == Kind.VIDEO:
            mask = mask.view(b, t, 1, s, s)
            pixels = (
                bg[:, None] * (1 - mask) + rgb[:, None, :, None, None] * mask
            )  # (B, T, C, S, S)
        else:
            pixels = bg * (1 - mask) + rgb[:, :, None, None] * mask  # (B, C, S, S)

        batch = ShapeBatch(
            pixels=pixels, mask=mask, target=target, shape=shape, color=color, size=size,
            position=position, background=background, center=center, radius=radius,
            rotation=rotation, rgb=rgb, direction=direction, speed=speed, velocity=velocity,
        )  # fmt: skip
        return dataclasses.replace(
            batch, captions=[_caption(batch.names(i), c.bounce) for i in range(b)]
        )

    def _trajectory(self, start: Tensor, velocity: Tensor, margin: Tensor) -> Tensor:
        """(B, T, 2) centres: straight lines inside the frame, or bouncing off the borders."""
        c, s = self.config, float(self.config.image_size)
        steps = torch.arange(c.frames, dtype=torch.float32)[None, :, None]  # (1, T, 1)
        lo = margin[:, None]  # (B, 1): the fully-inside range of the centre is [lo, s - lo]
        width = s - 2 * lo
        if c.bounce:
            # unfold the reflections: a triangle wave of period 2 * width
            path = (start - lo)[:, None] + velocity[:, None] * steps  # (B, T, 2), unfolded
            w = width[:, None]
            return lo[:, None] + w - (torch.remainder(path, 2 * w) - w).abs()
        # straight: the centre sweeps `travel`; keep the path fully inside when it fits,
        # else centre it (then the shape may cross the border but its centre never does)
        travel = velocity * (c.frames - 1)  # (B, 2)
        lo_ = torch.minimum(lo.expand_as(travel), (s - travel.abs()) / 2)
        hi_ = s - lo_
        first = lo_ - travel.clamp(max=0)
        last = hi_ - travel.clamp(min=0)
        frac = (start - lo) / width.clamp(min=1e-6)  # reuse the image-position draw, in [0, 1]
        begin = first + (last - first).clamp(min=0) * frac
        return begin[:, None] + velocity[:, None] * steps


def _pick(u: Tensor, n: int) -> Tensor:
    """Uniform [0, 1) -> categorical slot in [0, n)."""
    return (u * n).long().clamp(max=n - 1)


def _parse_split(split: Split | str) -> Split:
    try:
        return Split(split)
    except ValueError:
        raise config_error(
            "ShapesWorld", "split", split, f"one of {[s.value for s in Split]}"
        ) from None


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position} corner"


def _caption(names: dict[str, str], bounce: bool) -> str:
    thing = f"a {names['size']} {names['color']} {names['shape']}"
    ground = f"on a {BACKGROUNDS[names['background']]} background"
    if "direction" not in names:
        return f"{thing} {_where(names['position'])} {ground}"
    way = _DIRECTION_WORDS.get(names["direction"], names["direction"])
    motion = f"moving {way} {_SPEED_WORDS[names['speed']]}"
    if bounce:
        motion += " and bouncing off the edges"
    return f"{thing} {motion} {ground}"


# ---- torch datasets ---------------------------------------------------------------------------


class _ShapeDataset(Dataset):
    _kind: Kind

    def __init__(
        self, n: int, *, split: Split | str = "train", config: ShapesConfig | None = None
    ) -> None:
        if not isinstance(n, int) or not 1 <= n <= MAX_SEED + 1:
            raise config_error(type(self).__name__, "n", n, f"an int in [1, {MAX_SEED + 1}]")
        self.n = n
        self.split = _parse_split(split)
        self.world = ShapesWorld(config)
        self.config = self.world.config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {self.n}")
        return self.make_batch([i]).example(0)

    def make_batch(self, indices: Sequence[int] | Tensor) -> ShapeBatch:
        """Generate samples ``indices`` (each in [0, n)) in one vectorized call."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"indices must lie in [0, {self.n}) for {type(self).__name__}")
        return self.world._generate(idx, self.split, self._kind)


class ShapeImages(_ShapeDataset):
    """``n`` images of one split; ``target`` is the balanced shape x color class.

    Args:
        n: number of samples; sample i is a pure function of (config, split, i).
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share samples.
        config: the world; default :class:`ShapesConfig()`.
    """

    _kind = Kind.IMAGE

    @property
    def num_classes(self) -> int:
        return self.config.num_image_classes

    @property
    def class_names(self) -> list[str]:
        return self.config.image_class_names()


class ShapeVideos(_ShapeDataset):
    """``n`` clips of ``config.frames`` frames; ``target`` is the balanced direction of motion.

    Args:
        n: number of samples; sample i is a pure function of (config, split, i).
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share samples.
        config: the world; default :class:`ShapesConfig()`.
    """

    _kind = Kind.VIDEO

    @property
    def num_classes(self) -> int:
        return self.config.num_video_classes

    @property
    def class_names(self) -> list[str]:
        return self.config.video_class_names()
