"""The embedded sounds world: seeded procedural tones with a pitch, a timbre and a length.

Each clip is one tone: a pitch class (an octave apart, :data:`PITCHES`, detuned by up to
``detune_cents``), a timbre (:data:`TIMBRES`: a waveform's harmonic recipe, or noise
filtered around the pitch), a duration class (:data:`DURATIONS`: short clips 0.5-1.25 s,
long ones 2-3 s), a random loudness and attack / release envelope, and optionally a
background hiss (:data:`BACKGROUNDS`). Clips of one batch have different lengths: the
waveform is right-padded with zeros and ``lengths`` holds each clip's samples.

Like the shapes world (:mod:`vats_apps.data.shapes`), every clip is a pure function of
``(config, split, index)``: its random draws come from the counter-based hash of
:mod:`vats_apps.data.raster` (a 64-bit key per clip; the hiss and the noise timbre come
from a ``torch.Generator`` seeded with that key), so a clip is bit-identical whether it
is generated alone, in any batch, in any process or after a resume, and the ``train`` /
``val`` / ``test`` splits hash to disjoint streams. Targets are ``pitch x timbre``
(``target = pitch_slot * len(timbres) + timbre_slot`` over the config's lists), class
balanced in blocks of K as in the shapes world.

Synthesis, per clip (float64 phase, float32 samples):

* periodic timbres read a band-limited one-period wavetable (harmonics up to 0.45 of the
  sample rate, at most :data:`MAX_HARMONICS`) at the tone's phase, with linear
  interpolation: ``sine`` (the fundamental), ``triangle`` (odd harmonics, 1/k²),
  ``square`` (odd harmonics, 1/k), ``sawtooth`` (every harmonic, 1/k);
* ``plucked`` is a sawtooth's spectrum split in two tables, the fundamental and second
  harmonic decaying slowly and the rest four times faster (a plucked string's bright
  attack that mellows);
* ``breathy`` is Gaussian noise band-passed around the pitch (a bump a fifth of an
  octave wide on a log-frequency axis): pitched, with no harmonics;
* the tone is normalised to a peak of ``gain`` in [0.3, 0.8], shaped by a linear attack
  (5-40 ms) and release (30-150 ms), and ``hiss`` adds white noise at ``hiss_level`` times
  [0.5, 1] before clipping to [-1, 1].

Captions read ``"a short high square tone"`` (plus ``" over a soft hiss"``).

Example::

    from vats_apps.data import SoundsConfig, SoundsWorld

    world = SoundsWorld(SoundsConfig())
    batch = world.clips(range(64), "train")
    batch.waveform.shape      # (64, S_max) float32 in [-1, 1], zero past each clip's end
    batch.lengths             # (64,) samples per clip (8000 .. 48000 at 16 kHz)
    batch.target              # (64,) pitch x timbre class ids
    batch.captions[0]         # 'a long very high sawtooth tone over a soft hiss'

Shapes: B batch, S samples (the longest clip of the batch), H harmonics, L table length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vats_apps.data import raster
from vats_apps.data.shapes import MAX_SEED, Split, _check_names, _parse_split
from vats_core.config import Config, check, config_error

__all__ = [
    "BACKGROUNDS",
    "DURATIONS",
    "PITCHES",
    "TIMBRES",
    "SoundBatch",
    "SoundClips",
    "SoundsConfig",
    "SoundsWorld",
]

# ---- name tables: label id = position in the table ----------------------------------------

PITCHES: dict[str, float] = {  # pitch class -> fundamental in Hz, an octave apart (A2 .. A6)
    "very low": 110.0,
    "low": 220.0,
    "middle": 440.0,
    "high": 880.0,
    "very high": 1760.0,
}

TIMBRES: tuple[str, ...] = ("sine", "square", "sawtooth", "plucked", "triangle", "breathy")

DURATIONS: dict[str, tuple[float, float]] = {  # duration class -> seconds (uniform)
    "short": (0.5, 1.25),
    "long": (2.0, 3.0),
}

BACKGROUNDS: dict[str, str] = {  # name -> what the caption adds
    "quiet": "",
    "hiss": " over a soft hiss",
}

_TABLES: dict[str, tuple[str, ...]] = {
    "pitch": tuple(PITCHES),
    "timbre": TIMBRES,
    "duration": tuple(DURATIONS),
    "background": tuple(BACKGROUNDS),
}
_HISS = tuple(BACKGROUNDS).index("hiss")
MAX_HARMONICS = 32  # H: harmonics of a wavetable (fewer where they would pass 0.45 * rate)
_NYQUIST_SHARE = 0.45  # the highest harmonic kept, as a share of the sample rate
_TABLE = 2048  # L: wavetable samples per period
_SOUND_KIND = 2  # the hash stream of sounds (the shapes world uses 0 and 1)

# random stream ids (fixed, so adding a stream later does not change existing clips)
_S_DURATION, _S_SECONDS, _S_DETUNE, _S_PHASE, _S_GAIN = range(5)
_S_ATTACK, _S_RELEASE, _S_DECAY, _S_BG, _S_HISS = range(5, 10)
_N_STREAMS = 10


@dataclass(frozen=True, kw_only=True)
class SoundsConfig(Config):
    """What the sounds world draws from. Lists select (and order) entries of the tables."""

    sample_rate: int = 16000  # Hz (Whisper's rate)
    pitches: tuple[str, ...] = ("low", "middle", "high", "very high")  # from PITCHES
    timbres: tuple[str, ...] = ("sine", "square", "sawtooth", "plucked")  # from TIMBRES
    durations: tuple[str, ...] = ("short", "long")  # from DURATIONS
    backgrounds: tuple[str, ...] = ("quiet", "hiss")  # from BACKGROUNDS
    detune_cents: float = 30.0  # each tone is detuned uniformly in [-detune_cents, +detune_cents]
    hiss_level: float = 0.05  # peak-relative level of the background hiss (before [0.5, 1])
    seed: int = 0  # the world's seed; splits and clip indices hash on top of it

    def __post_init__(self) -> None:
        check(
            isinstance(self.sample_rate, int) and self.sample_rate >= 8000,
            self, "sample_rate", self.sample_rate, "an int >= 8000",
        )  # fmt: skip
        _check_names(self, "pitches", self.pitches, tuple(PITCHES))
        _check_names(self, "timbres", self.timbres, TIMBRES)
        _check_names(self, "durations", self.durations, tuple(DURATIONS))
        _check_names(self, "backgrounds", self.backgrounds, tuple(BACKGROUNDS))
        lowest = 2 * max(PITCHES[p] for p in self.pitches) * 2 ** (100 / 1200) / _NYQUIST_SHARE
        check(
            self.sample_rate >= lowest,
            self, "sample_rate", self.sample_rate,
            f">= {math.ceil(lowest)} so the highest pitch keeps its second harmonic",
        )  # fmt: skip
        # Adjacent pitch classes are 1200 cents apart: a detune under 100 keeps them apart.
        check(0 <= self.detune_cents <= 100, self, "detune_cents", self.detune_cents, "[0, 100]")
        check(0 <= self.hiss_level <= 0.5, self, "hiss_level", self.hiss_level, "[0, 0.5]")
        check(
            isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
            self, "seed", self.seed, f"an int in [0, {MAX_SEED}]",
        )  # fmt: skip

    @property
    def num_classes(self) -> int:
        """K: pitches x timbres."""
        return len(self.pitches) * len(self.timbres)

    def class_names(self) -> list[str]:
        """Name of each target, e.g. ``'high square'``."""
        return [f"{p} {t}" for p in self.pitches for t in self.timbres]

    @property
    def max_seconds(self) -> float:
        """The longest clip this world makes."""
        return max(DURATIONS[d][1] for d in self.durations)


@dataclass(frozen=True)
class SoundBatch:
    """A batch of generated clips with every label.

    Label tensors are (B,) int64 ids into the global name tables; ``target`` is the
    class-balanced pitch x timbre class (see the module docstring).
    """

    waveform: Tensor  # (B, S) float32 in [-1, 1], zero past each clip's length
    lengths: Tensor  # (B,) int64 samples of each clip
    target: Tensor  # (B,) classification target in [0, K)
    pitch: Tensor  # (B,) id into PITCHES
    timbre: Tensor  # (B,) id into TIMBRES
    duration: Tensor  # (B,) id into DURATIONS
    background: Tensor  # (B,) id into BACKGROUNDS
    frequency: Tensor  # (B,) float64 fundamental in Hz (the pitch class detuned)
    seconds: Tensor  # (B,) float64 clip length in seconds (lengths / sample_rate)
    sample_rate: int = 16000
    captions: list[str] = field(default_factory=list)  # an English caption per clip

    _LABELS = ("pitch", "timbre", "duration", "background")

    def __len__(self) -> int:
        return self.waveform.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor field (for ``vats_core.training.TensorBatches`` or a model)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def labels(self, i: int) -> dict[str, int]:
        """Integer label ids of clip ``i``."""
        return {"target": int(self.target[i])} | {k: int(getattr(self, k)[i]) for k in self._LABELS}

    def names(self, i: int) -> dict[str, str]:
        """Label names of clip ``i`` (e.g. ``{"pitch": "high", "timbre": "square", ...}``)."""
        labels = self.labels(i)
        return {k: _TABLES[k][labels[k]] for k in self._LABELS}

    def example(self, i: int) -> dict[str, Tensor | str]:
        """Clip ``i`` as a dict: its waveform cut to its length, its labels and caption."""
        out: dict[str, Tensor | str] = {k: v[i] for k, v in self.tensors().items()}
        out["waveform"] = self.waveform[i, : int(self.lengths[i])]
        out["caption"] = self.captions[i]
        return out


class SoundsWorld:
    """Generates batches of tones for one :class:`SoundsConfig`.

    Args:
        config: what to draw; ``config.seed`` selects the world.
    """

    def __init__(self, config: SoundsConfig | None = None) -> None:
        self.config = config if config is not None else SoundsConfig()
        c = self.config
        self._pitch_ids = torch.tensor([list(PITCHES).index(p) for p in c.pitches])
        self._timbre_ids = torch.tensor([TIMBRES.index(t) for t in c.timbres])
        self._duration_ids = torch.tensor([list(DURATIONS).index(d) for d in c.durations])
        self._bg_ids = torch.tensor([list(BACKGROUNDS).index(b) for b in c.backgrounds])
        self._hz = torch.tensor(list(PITCHES.values()), dtype=torch.float64)
        self._seconds = torch.tensor(list(DURATIONS.values()), dtype=torch.float64)
        # (timbres, H) harmonic amplitudes of the periodic timbres (the breathy row is unused)
        k = torch.arange(1, MAX_HARMONICS + 1, dtype=torch.float64)
        odd = (k % 2 == 1).double()
        self._recipes = torch.stack(
            [
                (k == 1).double(),  # sine
                odd / k,  # square
                1 / k,  # sawtooth
                1 / k,  # plucked (split in two tables below)
                odd * (1 - 2 * ((k - 1) // 2 % 2)) / k**2,  # triangle: +1, -1/9, +1/25, ...
                torch.zeros_like(k),  # breathy
            ]
        )
        angle = 2 * math.pi * torch.arange(_TABLE, dtype=torch.float64) / _TABLE
        self._sines = torch.sin(k[:, None] * angle[None, :])  # (H, L)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def clips(self, indices: Sequence[int] | Tensor, split: Split | str = "train") -> SoundBatch:
        """Generate clips ``indices`` of ``split``: waveform (B, S), lengths (B,), labels."""
        split = _parse_split(split)
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (B,)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > MAX_SEED):
            raise ValueError(f"sample indices must lie in [0, {MAX_SEED}], got {indices!r}")
        c, sr = self.config, self.config.sample_rate
        head = [c.seed, list(Split).index(split), _SOUND_KIND]
        key_a = raster.hash_chain([*head, idx], lane=1)
        key_b = raster.hash_chain([*head, idx], lane=2)
        u = raster.uniforms(key_a, key_b, torch.arange(_N_STREAMS)).double()  # (B, streams)
        target = raster.balanced_targets(head, idx, c.num_classes)

        # 1. labels: the balanced target fixes pitch x timbre
        pitch = self._pitch_ids[target // len(c.timbres)]
        timbre = self._timbre_ids[target % len(c.timbres)]
        duration = self._duration_ids[_pick(u[:, _S_DURATION], len(c.durations))]
        background = self._bg_ids[_pick(u[:, _S_BG], len(c.backgrounds))]

        # 2. continuous draws
        lo, hi = self._seconds[duration].unbind(-1)
        lengths = torch.round((lo + (hi - lo) * u[:, _S_SECONDS]) * sr).long()  # (B,)
        cents = (2 * u[:, _S_DETUNE] - 1) * c.detune_cents
        frequency = self._hz[pitch] * torch.pow(2.0, cents / 1200)  # (B,)
        b, s = idx.shape[0], int(lengths.max()) if idx.numel() else 0
        n = torch.arange(s, dtype=torch.float64)  # (S,)
        t = n / sr  # seconds
        cycles = frequency[:, None] * t[None, :] + u[:, _S_PHASE : _S_PHASE + 1]  # (B, S)

        # 3. the tone: periodic timbres from wavetables, breathy per clip below
        tone = self._read(self._tables(timbre, frequency, 1, MAX_HARMONICS), cycles)
        plucked = (timbre == TIMBRES.index("plucked")).nonzero()[:, 0]  # (P,) rows
        if plucked.numel():
            tau = lengths[plucked].double() / sr * (0.4 + 0.4 * u[plucked, _S_DECAY])  # (P,) s
            low = self._read(
                self._tables(timbre[plucked], frequency[plucked], 1, 2), cycles[plucked]
            )
            decay = torch.exp(-t[None, :] / tau[:, None]).float()  # (P, S)
            tone[plucked] = low * decay + (tone[plucked] - low) * decay**4

        # 4. per clip: the noise-based parts from the clip's own generator, then the level
        waves = torch.zeros(b, s, dtype=torch.float32)
        for i in range(b):
            length = int(lengths[i])
            gen = torch.Generator().manual_seed((int(key_a[i]) << 32) | int(key_b[i]))
            x = tone[i, :length].double()
            if int(timbre[i]) == TIMBRES.index("breathy"):
                x = _band_noise(length, float(frequency[i]), sr, gen)
            x = x / x.abs().max().clamp_min(1e-12) * (0.3 + 0.5 * u[i, _S_GAIN])
            x = x * _envelope(length, sr, float(u[i, _S_ATTACK]), float(u[i, _S_RELEASE]))
            if int(background[i]) == _HISS:
                level = c.hiss_level * (0.5 + 0.5 * float(u[i, _S_HISS]))
                x = x + level * torch.randn(length, generator=gen, dtype=torch.float64)
            waves[i, :length] = x.clamp(-1, 1).float()

        batch = SoundBatch(
            waveform=waves, lengths=lengths, target=target, pitch=pitch, timbre=timbre,
            duration=duration, background=background, frequency=frequency,
            seconds=lengths.double() / sr, sample_rate=sr,
        )  # fmt: skip
        captions = [_caption(batch.names(i)) for i in range(b)]
        return dataclasses.replace(batch, captions=captions)

    # ---- synthesis ----------------------------------------------------------------------------

    def _tables(self, timbre: Tensor, frequency: Tensor, first: int, last: int) -> Tensor:
        """(B, L) one period of each clip's timbre from harmonics ``first .. last`` (1-based)
        that stay under 0.45 of the sample rate."""
        amps = self._recipes[timbre].clone()  # (B, H)
        k = torch.arange(1, MAX_HARMONICS + 1, dtype=torch.float64)
        keep = (k >= first) & (k <= last)
        keep = keep[None, :] & (
            k[None, :] * frequency[:, None] <= _NYQUIST_SHARE * self.config.sample_rate
        )
        amps = amps * keep
        table = torch.zeros(timbre.shape[0], _TABLE, dtype=torch.float64)
        for h in range(MAX_HARMONICS):  # elementwise: a clip's table never depends on the batch
            table += amps[:, h : h + 1] * self._sines[h][None, :]
        return table

    @staticmethod
    def _read(table: Tensor, cycles: Tensor) -> Tensor:
        """(B, S) float32: the periodic tables read at phase ``cycles`` (float64, in
        periods), linearly interpolated."""
        pos = torch.remainder(cycles, 1.0).mul_(_TABLE)  # (B, S) in [0, L)
        i0 = pos.long().clamp_(max=_TABLE - 1)
        frac = (pos - i0).float()
        table = table.float()
        wrapped = torch.cat([table, table[:, :1]], dim=1)  # (B, L + 1)
        a, b = wrapped.gather(1, i0), wrapped.gather(1, i0 + 1)
        return a + (b - a) * frac


def _pick(u: Tensor, n: int) -> Tensor:
    """Uniform [0, 1) -> categorical slot in [0, n)."""
    return (u * n).long().clamp(max=n - 1)


def _envelope(length: int, sr: int, u_attack: float, u_release: float) -> Tensor:
    """(length,) float64: a linear attack of 5-40 ms and release of 30-150 ms."""
    attack = max(1, round((0.005 + 0.035 * u_attack) * sr))
    release = max(1, round((0.03 + 0.12 * u_release) * sr))
    n = torch.arange(length, dtype=torch.float64)
    rise = ((n + 1) / attack).clamp(max=1.0)
    fall = ((length - n) / release).clamp(max=1.0)
    return rise * fall


def _band_noise(length: int, frequency: float, sr: int, gen: torch.Generator) -> Tensor:
    """(length,) float64 Gaussian noise band-passed around ``frequency``: a Gaussian bump
    of 0.2 octave standard deviation on the log-frequency axis."""
    noise = torch.randn(length, generator=gen, dtype=torch.float64)
    spectrum = torch.fft.rfft(noise)
    hz = torch.fft.rfftfreq(length, d=1.0 / sr, dtype=torch.float64)
    octaves = torch.log2(hz.clamp_min(1.0) / frequency)
    spectrum = spectrum * torch.exp(-0.5 * (octaves / 0.2) ** 2)
    return torch.fft.irfft(spectrum, n=length)


def _caption(names: dict[str, str]) -> str:
    return (
        f"a {names['duration']} {names['pitch']} {names['timbre']} tone"
        + BACKGROUNDS[names["background"]]
    )


# ---- torch dataset ----------------------------------------------------------------------------


class SoundClips(Dataset):
    """``n`` clips of one split; ``target`` is the balanced pitch x timbre class.

    Args:
        n: number of clips; clip i is a pure function of (config, split, i).
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share clips.
        config: the world; default :class:`SoundsConfig()`.
    """

    def __init__(
        self, n: int, *, split: Split | str = "train", config: SoundsConfig | None = None
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SEED + 1:
            raise config_error("SoundClips", "n", n, f"an int in [1, {MAX_SEED + 1}]")
        self.n = n
        self.split = _parse_split(split)
        self.world = SoundsWorld(config)
        self.config = self.world.config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        """Clip ``i``: its waveform (its own length), labels and caption."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for SoundClips of {self.n}")
        return self.make_batch([i]).example(0)

    def make_batch(self, indices: Sequence[int] | Tensor) -> SoundBatch:
        """Generate clips ``indices`` (each in [0, n)) in one call, right-padded."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"indices must lie in [0, {self.n}) for SoundClips")
        return self.world.clips(idx, self.split)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names()
