"""The embedded sounds world: labels that match the audio (pitch, timbre, duration, hiss),
determinism, splits, balance and bad configs.

Shapes: B batch, S samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from vats_apps.data import (
    DURATIONS,
    PITCHES,
    SOUND_BACKGROUNDS,
    TIMBRES,
    SoundClips,
    SoundsConfig,
    SoundsWorld,
)

EVERY = SoundsConfig(pitches=tuple(PITCHES), timbres=TIMBRES)  # every class of the tables


def _spectrum(x: torch.Tensor, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude spectrum of a Hann-windowed clip, and its bin frequencies in Hz."""
    x = x.double()
    mag = torch.fft.rfft(x * torch.hann_window(len(x), dtype=torch.float64)).abs()
    return mag, torch.fft.rfftfreq(len(x), d=1.0 / sr, dtype=torch.float64)


def _level(mag: torch.Tensor, hz: torch.Tensor, f: float) -> float:
    """Amplitude of the partial at ``f``: the root of the energy within 3 % of ``f`` (a
    peak between two bins keeps its energy, not its height)."""
    near = (hz > 0.97 * f) & (hz < 1.03 * f)
    return float(mag[near].square().sum().sqrt())


@pytest.fixture(scope="module")
def batch():
    return SoundsWorld(EVERY).clips(range(3 * EVERY.num_classes), "val")


# ---- labels match the audio -------------------------------------------------------------------


def test_measured_pitch_is_the_labelled_class(batch):
    names = list(PITCHES)
    for i in range(len(batch)):
        x = batch.waveform[i, : int(batch.lengths[i])]
        mag, hz = _spectrum(x, batch.sample_rate)
        peak = float(hz[mag.argmax()])
        # the nearest pitch class on a log axis (classes are an octave apart)
        nearest = min(names, key=lambda p: abs(math.log2(peak / PITCHES[p])))
        assert nearest == batch.names(i)["pitch"], (batch.captions[i], peak)
        if batch.names(i)["timbre"] != "breathy":  # a tone: its fundamental, to a bin
            assert abs(peak - float(batch.frequency[i])) < 2.0, (batch.captions[i], peak)
        cents = 1200 * math.log2(float(batch.frequency[i]) / PITCHES[nearest])
        assert abs(cents) <= EVERY.detune_cents + 1e-9


def test_harmonics_are_the_labelled_timbre(batch):
    # Second and third harmonic relative to the fundamental, from each timbre's recipe:
    # sine none, square odd 1/k, sawtooth every 1/k, triangle odd 1/k^2, breathy no peaks.
    seen = set()
    for i in range(len(batch)):
        name, f = batch.names(i), float(batch.frequency[i])
        if name["pitch"] == "very high" or name["background"] == "hiss":
            continue  # (harmonics cut by the band limit; the hiss floor blurs the ratios)
        x = batch.waveform[i, : int(batch.lengths[i])]
        mag, hz = _spectrum(x, batch.sample_rate)
        h1, h2, h3 = (_level(mag, hz, k * f) for k in (1, 2, 3))
        r2, r3 = h2 / h1, h3 / h1
        timbre = name["timbre"]
        seen.add(timbre)
        if timbre == "sine":
            assert r2 < 0.01 and r3 < 0.01, (batch.captions[i], r2, r3)
        elif timbre == "square":
            assert r2 < 0.01 and r3 == pytest.approx(1 / 3, rel=0.1), (r2, r3)
        elif timbre == "sawtooth":
            assert r2 == pytest.approx(1 / 2, rel=0.1) and r3 == pytest.approx(1 / 3, rel=0.1)
        elif timbre == "triangle":
            assert r2 < 0.01 and r3 == pytest.approx(1 / 9, rel=0.15), (r2, r3)
        elif timbre == "plucked":
            # the upper harmonics die four times faster: bright at the start, mellow at the end
            n = len(x) // 4
            m0, hz0 = _spectrum(x[:n], batch.sample_rate)
            m1, hz1 = _spectrum(x[-n:], batch.sample_rate)
            early = _level(m0, hz0, 3 * f) / _level(m0, hz0, f)
            late = _level(m1, hz1, 3 * f) / _level(m1, hz1, f)
            assert late < 0.5 * early, (batch.captions[i], early, late)
        elif timbre == "breathy":  # noise: no harmonic peak at 2f
            assert r2 < 0.05, (batch.captions[i], r2)
    assert seen == set(TIMBRES)


def test_lengths_durations_and_padding(batch):
    sr = batch.sample_rate
    assert batch.waveform.shape == (len(batch), int(batch.lengths.max()))
    assert batch.waveform.dtype == torch.float32
    assert float(batch.waveform.abs().max()) <= 1.0
    for i in range(len(batch)):
        lo, hi = DURATIONS[batch.names(i)["duration"]]
        length = int(batch.lengths[i])
        assert lo * sr - 1 <= length <= hi * sr + 1
        assert float(batch.seconds[i]) == pytest.approx(length / sr)
        assert not batch.waveform[i, length:].any()  # zeros past the clip's end
        assert batch.waveform[i, :length].abs().max() > 0.25  # loud enough to hear
    assert {batch.names(i)["duration"] for i in range(len(batch))} == set(DURATIONS)


def test_hiss_is_there_only_when_labelled(batch):
    # Above 7.4 kHz a tone has nothing (its harmonics stop at 0.45 of the rate, 7.2 kHz) and
    # white hiss has its share: the band's level relative to the spectrum's peak.
    for i in range(len(batch)):
        mag, hz = _spectrum(batch.waveform[i, : int(batch.lengths[i])], batch.sample_rate)
        top = float(mag[hz > 7400].square().mean().sqrt() / mag.max())
        if batch.names(i)["background"] == "hiss":
            assert top > 1e-4, (batch.captions[i], top)
        else:
            assert top < 1e-5, (batch.captions[i], top)


def test_captions_name_the_labels(batch):
    for i in range(len(batch)):
        n = batch.names(i)
        words = f"a {n['duration']} {n['pitch']} {n['timbre']} tone"
        assert batch.captions[i] == words + SOUND_BACKGROUNDS[n["background"]]
        k = len(EVERY.timbres)
        assert EVERY.class_names()[int(batch.target[i])] == f"{n['pitch']} {n['timbre']}"
        assert int(batch.target[i]) // k == EVERY.pitches.index(n["pitch"])


# ---- determinism, splits, balance -------------------------------------------------------------


def test_same_index_same_clip_in_any_batch_and_process_independent_of_batch():
    world = SoundsWorld()
    a = world.clips(range(20), "train")
    b = SoundsWorld().clips([13, 2], "train")
    for j, i in enumerate([13, 2]):
        n = int(a.lengths[i])
        assert int(b.lengths[j]) == n
        assert torch.equal(a.waveform[i, :n], b.waveform[j, :n])
        assert a.captions[i] == b.captions[j]


def test_splits_and_seeds_differ():
    n = 64
    digests = []
    for split, seed in (("train", 0), ("val", 0), ("test", 0), ("train", 1)):
        world = SoundsWorld(SoundsConfig(seed=seed))
        clips = world.clips(range(n), split)
        digests.append({clips.waveform[i].numpy().tobytes() for i in range(n)})
    assert all(len(d) == n for d in digests)
    assert len(set().union(*digests)) == 4 * n


def test_classes_are_balanced_in_blocks():
    cfg = SoundsConfig()
    k = cfg.num_classes
    targets = SoundsWorld(cfg).clips(range(5 * k), "train").target
    for block in targets.view(5, k):
        assert sorted(block.tolist()) == list(range(k))
    assert not torch.equal(targets[:k], targets[k : 2 * k])  # a new order in each block


def test_dataset_items():
    clips = SoundClips(10, split="test")
    item = clips[3]
    assert item["waveform"].shape == (int(item["lengths"]),)
    assert isinstance(item["caption"], str) and item["caption"].endswith(("tone", "hiss"))
    assert len(clips) == 10 and clips.num_classes == 16 and len(clips.class_names) == 16
    with pytest.raises(IndexError):
        clips[10]
    with pytest.raises(IndexError):
        clips.make_batch([0, 10])


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"pitches": ("low", "loud")}, "pitches"),
        ({"pitches": ("low", "low")}, "pitches"),
        ({"timbres": ()}, "timbres"),
        ({"durations": ("medium",)}, "durations"),
        ({"backgrounds": ("rain",)}, "backgrounds"),
        ({"detune_cents": 150.0}, "detune_cents"),
        ({"hiss_level": -0.1}, "hiss_level"),
        ({"sample_rate": 8000}, "sample_rate"),  # the very high pitch's harmonics would alias
        ({"sample_rate": 16000.0}, "sample_rate"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_is_a_clear_error(changes, field):
    with pytest.raises(ValueError, match=field):
        SoundsConfig(**changes)


def test_low_rates_serve_low_pitches():
    cfg = SoundsConfig(sample_rate=8000, pitches=("very low", "low", "middle"))
    clips = SoundsWorld(cfg).clips(range(4), "train")
    assert int(clips.lengths.max()) <= 3 * 8000


def test_bad_split_n_and_indices():
    with pytest.raises(ValueError, match="split"):
        SoundsWorld().clips([0], "holdout")
    with pytest.raises(ValueError, match="indices"):
        SoundsWorld().clips([-1], "train")
    with pytest.raises(ValueError, match="n"):
        SoundClips(0)
