"""The embedded shapes world: determinism, splits, label correctness, balance, bad configs.

Shapes: B batch, T frames, C channels, S image side.
"""

from __future__ import annotations

import math

import pytest
import torch

from vats_apps.data import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeImages,
    ShapesConfig,
    ShapesWorld,
    ShapeVideos,
    raster,
)

ALL_SHAPES = ShapesConfig(shapes=SHAPES, colors=tuple(COLORS), image_size=48)


def _digests(pixels: torch.Tensor) -> set[bytes]:
    return {p.numpy().tobytes() for p in pixels}


# ---- determinism and splits -------------------------------------------------------------------


def test_same_index_same_sample_in_any_batch():
    a = ShapeImages(1000, config=ALL_SHAPES).make_batch(range(40))
    b = ShapeImages(1000, config=ALL_SHAPES).make_batch([7, 3, 39])
    assert torch.equal(a.pixels[[7, 3, 39]], b.pixels)
    assert a.captions[7] == b.captions[0]
    v1 = ShapeVideos(100, split="test").make_batch(range(10))
    v2 = ShapeVideos(100, split="test").make_batch([9])
    assert torch.equal(v1.pixels[9], v2.pixels[0])
    assert torch.equal(v1.center[9], v2.center[0])


def test_splits_seeds_and_kinds_differ():
    n = 200
    cfg = ShapesConfig()
    train = ShapeImages(n, split="train", config=cfg).make_batch(range(n))
    val = ShapeImages(n, split="val", config=cfg).make_batch(range(n))
    test = ShapeImages(n, split="test", config=cfg).make_batch(range(n))
    other = ShapeImages(n, config=cfg.replace(seed=1)).make_batch(range(n))
    sets = [_digests(b.pixels) for b in (train, val, test, other)]
    assert all(len(s) == n for s in sets)  # no duplicates within a split either
    assert len(set().union(*sets)) == 4 * n
    video = ShapeVideos(n, config=cfg).make_batch(range(n))
    assert not _digests(video.pixels[:, 0]) & sets[0]


def test_hash_matches_a_python_reference():
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    assert raster.mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    u = raster.uniforms(torch.arange(500), torch.arange(500) * 7, torch.arange(4))
    assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.03


# ---- tensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [24, 32, 64, 224])
def test_image_and_video_tensors(size):
    cfg = ShapesConfig(image_size=size, frames=3)
    img = ShapesWorld(cfg).images(range(4))
    vid = ShapesWorld(cfg).videos(range(2), split="val")
    assert img.pixels.shape == (4, 3, size, size) and img.mask.shape == (4, 1, size, size)
    assert vid.pixels.shape == (2, 3, 3, size, size) and vid.mask.shape == (2, 3, 1, size, size)
    for t in (img.pixels, vid.pixels, img.mask):
        assert t.dtype == torch.float32 and float(t.min()) >= 0 and float(t.max()) <= 1
    assert img.target.dtype == torch.int64 and img.direction is None
    assert vid.center.shape == (2, 3, 2) and vid.velocity.shape == (2, 2)
    assert float(img.mask.amax((1, 2, 3)).min()) == 1.0  # every sample shows its shape


def test_dataset_items_collate():
    ds = ShapeVideos(16, config=ShapesConfig(frames=4))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (8, 4, 3, 32, 32)
    assert batch["target"].tolist() == ds.make_batch(range(8)).target.tolist()
    assert len(batch["caption"]) == 8
    assert ds.num_classes == 4 and ds.class_names == ["left", "right", "up", "down"]
    with pytest.raises(IndexError):
        ds[16]
    with pytest.raises(IndexError):
        ds.make_batch([0, 16])


# ---- labels are right -------------------------------------------------------------------------


def test_captions_name_the_labels():
    b = ShapesWorld(ALL_SHAPES).images(range(100))
    for i in range(len(b)):
        names, cap = b.names(i), b.captions[i]
        for key in ("size", "color", "shape", "position"):
            assert names[key] in cap, (cap, names)
        assert BACKGROUNDS[names["background"]] in cap
    cfg = ShapesConfig(directions=tuple(DIRECTIONS))
    v = ShapesWorld(cfg).videos(range(40))
    for i in range(len(v)):
        names, cap = v.names(i), v.captions[i]
        assert cap.startswith(f"a {names['size']} {names['color']} {names['shape']} moving ")
        words = names["direction"].split("-")
        assert all(w in cap for w in words), (cap, names)
        assert ("quickly" in cap) == (names["speed"] == "fast")


def test_mean_color_inside_the_mask_is_the_labelled_color():
    b = ShapesWorld(ALL_SHAPES).images(range(240))
    table = torch.tensor(list(COLORS.values()))  # (colors, C)
    inside = (b.mask == 1).float()  # (B, 1, S, S)
    assert float(inside.sum((1, 2, 3)).min()) >= 4
    mean = (b.pixels * inside).sum((2, 3)) / inside.sum((2, 3))  # (B, C)
    nearest = torch.cdist(mean, table).argmin(1)
    assert torch.equal(nearest, b.color)
    assert set(b.color.tolist()) == set(range(len(COLORS)))


def test_size_and_position_labels_match_the_geometry():
    cfg = ShapesConfig(image_size=60)
    b = ShapesWorld(cfg).images(range(300))
    frac = b.radius / cfg.image_size
    ranges = torch.tensor(list(SIZES.values()))[b.size]  # (B, 2)
    assert bool(((frac >= ranges[:, 0]) & (frac <= ranges[:, 1])).all())
    grid = torch.arange(cfg.image_size) + 0.5
    m = b.mask[:, 0]  # (B, S, S), centroid of symmetric shapes = the labelled centre
    cx = (m.sum(1) * grid).sum(1) / m.sum((1, 2))
    cy = (m.sum(2) * grid).sum(1) / m.sum((1, 2))
    keep = b.shape != SHAPES.index("triangle")  # its bounding-box centre is not its centroid
    assert torch.allclose(cx[keep], b.center[keep, 0], atol=0.05)
    assert torch.allclose(cy[keep], b.center[keep, 1], atol=0.05)
    cell = (b.center / cfg.image_size * 3).floor().long()
    assert torch.equal(cell[:, 1] * 3 + cell[:, 0], b.position)
    assert {POSITIONS[p] for p in b.position.tolist()} == set(POSITIONS)


def test_shapes_have_their_analytic_areas():
    s, r = 200, 50.0
    n = len(SHAPES)
    mask = raster.coverage(
        list(SHAPES), torch.arange(n), torch.full((n, 2), s / 2), torch.full((n,), r),
        torch.zeros(n), s,
    )  # fmt: skip
    area = mask.sum((1, 2, 3))
    k1 = 0.95 * r  # triangle half side, cross half length
    expected = {
        "circle": math.pi * r * r,
        "square": (1.6 * r) ** 2,
        "triangle": math.sqrt(3) / 4 * (2 * k1) ** 2,
        "cross": 2 * (2 * k1) * (0.64 * r) - (0.64 * r) ** 2,
        "diamond": 2 * (0.7 * r) * r,
    }
    for name, want in expected.items():
        assert abs(float(area[SHAPES.index(name)]) / want - 1) < 0.01, name
    star = float(area[SHAPES.index("star")])
    assert 0.2 * math.pi * r * r < star < 0.6 * math.pi * r * r
    top = mask[SHAPES.index("triangle"), 0].sum(1)  # per row: the triangle points up
    rows = top.nonzero()[:, 0]
    assert top[rows[0] + 2] < top[rows[-1] - 2]


def test_centroid_moves_in_the_labelled_direction():
    cfg = ShapesConfig(directions=tuple(DIRECTIONS), frames=6, image_size=40)
    v = ShapesWorld(cfg).videos(range(160), split="val")
    # find the shape from the pixels alone: the pixels close to its colour
    near = ((v.pixels - v.rgb[:, None, :, None, None]).abs().amax(2) < 0.06).float()  # (B, T, S, S)
    grid = torch.arange(cfg.image_size) + 0.5
    area = near.sum((2, 3))
    assert float(area.min()) > 0
    cx = (near.sum(2) * grid).sum(2) / area  # (B, T)
    cy = (near.sum(3) * grid).sum(2) / area
    moved = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], 1)  # (B, 2)
    unit = torch.tensor(list(DIRECTIONS.values()))[v.direction]  # (B, 2)
    along = (moved * unit).sum(1)
    across = moved[:, 0] * unit[:, 1] - moved[:, 1] * unit[:, 0]
    assert float(along.min()) > 2.0  # at least 0.025 sides/frame * 5 frames * 40 px
    assert float(across.abs().max()) < 1.0
    assert set(v.direction.tolist()) == set(range(len(DIRECTIONS)))


def test_bouncing_keeps_the_shape_inside_and_reverses():
    cfg = ShapesConfig(frames=40, bounce=True, directions=tuple(DIRECTIONS), image_size=32)
    v = ShapesWorld(cfg).videos(range(32))
    m = v.mask[:, :, 0]  # (B, T, S, S)
    border = torch.cat([m[..., 0, :], m[..., -1, :], m[..., :, 0], m[..., :, -1]], -1)
    assert float(border.max()) < 0.5  # nothing touches the border beyond anti-aliasing
    reach = raster.BOUND * v.radius[:, None, None]  # (B, 1, 1) the shape's bounding radius
    assert bool(((v.center >= reach) & (v.center <= cfg.image_size - reach)).all())
    step = v.center[:, 1:] - v.center[:, :-1]  # (B, T-1, 2)
    assert bool((step * v.velocity[:, None] < 0).any(1).any(1).all())  # every clip bounces


def test_straight_motion_keeps_the_centre_in_the_frame():
    cfg = ShapesConfig(frames=16, image_size=32)
    v = ShapesWorld(cfg).videos(range(64))
    assert float(v.center.min()) >= 0 and float(v.center.max()) <= 32
    assert float(v.mask.amax((2, 3, 4)).min()) > 0.99  # the shape shows on every frame


# ---- balance ----------------------------------------------------------------------------------


def test_slots_index_the_config_lists():
    # A classifier's class i of a label is the config list's i-th value, whatever the
    # order of the lists: slots map the batch's global ids onto those positions.
    config = ShapesConfig(colors=("cyan", "red", "blue"), sizes=("large", "small"))
    world = ShapesWorld(config)
    batch = world.videos(range(64))
    for name in ("shape", "color", "size", "position", "background", "direction", "speed"):
        values = config.label_values(name)
        slots = world.slots(batch, name)
        assert slots.shape == (64,) and int(slots.min()) >= 0
        names = [batch.names(i)[name] for i in range(64)]
        assert [values[int(k)] for k in slots] == names
    assert config.label_values("position") == POSITIONS
    with pytest.raises(ValueError, match="motion"):
        world.slots(world.images(range(2)), "speed")
    with pytest.raises(ValueError, match="label"):
        config.label_values("mood")


def test_classes_are_balanced():
    cfg = ShapesConfig()
    k = cfg.num_image_classes
    b = ShapeImages(10 * k, config=cfg).make_batch(range(10 * k))
    assert torch.bincount(b.target, minlength=k).tolist() == [10] * k
    names = cfg.image_class_names()
    for i in range(k):
        assert names[b.target[i]] == f"{b.names(i)['color']} {b.names(i)['shape']}"
    counts = torch.bincount(b.size, minlength=3).float() / (10 * k)
    assert float((counts - 1 / 3).abs().max()) < 0.08
    v = ShapeVideos(400, split="val", config=cfg).make_batch(range(400))
    assert torch.bincount(v.target).tolist() == [100] * 4
    assert torch.equal(v.direction, v.target)  # default directions are the table's first four
    assert set(v.speed.tolist()) == {0, 1} and set(v.background.tolist()) == {0, 1, 2, 3}


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image_size": 16}, "image_size"),
        ({"frames": 0}, "frames"),
        ({"frames": 40}, "frames"),  # too long to stay in frame without bouncing
        ({"shapes": ("circle", "hexagon")}, "shapes"),
        ({"colors": ()}, "colors"),
        ({"colors": ("red", "red")}, "colors"),
        ({"directions": ("sideways",)}, "directions"),
        ({"seed": -1}, "seed"),
        ({"speed_scale": 0.0}, "speed_scale"),
        ({"rotation_deg": 360.0}, "rotation_deg"),
    ],
)
def test_bad_config_is_a_clear_error(changes, field):
    with pytest.raises(ValueError, match=rf"ShapesConfig\.{field}=") as err:
        ShapesConfig(**changes)
    assert "expected" in str(err.value)


def test_bad_split_n_and_indices():
    with pytest.raises(ValueError, match=r"split='dev'.*'train', 'val', 'test'"):
        ShapeImages(10, split="dev")
    with pytest.raises(ValueError, match=r"n=0"):
        ShapeVideos(0)
    with pytest.raises(ValueError, match="indices"):
        ShapesWorld().images([-1])


def test_config_round_trip_and_long_clips():
    cfg = ShapesConfig(shapes=("star", "diamond"), frames=40, bounce=True, rotation_deg=30.0)
    assert ShapesConfig.from_dict(cfg.to_dict()) == cfg
    assert ShapesConfig.from_dict(cfg.to_dict()).shapes == ("star", "diamond")
    assert ShapesConfig(frames=40, speed_scale=0.3).frames == 40
