"""``vats pipeline=report``: every pipeline's figures and generations on one HTML page.

Reads the ``result.json`` each pipeline run leaves in its ``out_dir``
(:mod:`vats_apps.pipelines.results`, written by :func:`vats_apps.cli.run_pipeline`) under
``pipeline.runs_dir`` (``runs/<pipeline>/result.json``), and writes
``<pipeline.out_dir>/index.html``: one static page, CSS inline, no script, with

* one table of every pipeline's headline figures: the score, chance (or the baseline the
  pipeline compares with), the goal the issues set and whether it is met; a pipeline with
  no result file is listed as not run;
* the text model's samples and the multimodal LM's example answers;
* a gallery per generator (text to image, video, audio): each image, GIF and WAV player
  with its prompt, the enrichment the LM wrote and the text the encoder read.

The media files are copied under ``<out_dir>/media/`` and linked by relative paths, so the
folder can be moved or zipped whole. Every result file is read and checked before anything
is written: a file that is not a result (cut short, another pipeline's) is an error naming
it, and the report on disk is left as it was. A media file a result names but that is gone
is shown as missing, not an error. Only ``index.html`` and ``media/`` in ``out_dir`` are
replaced; ``media/`` is built beside them first.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from omegaconf import DictConfig

from vats_apps.generation.scoring import TIME_GOAL
from vats_apps.pipelines.results import RESULT_NAME, read_result
from vats_apps.pipelines.train_multimodal import TIME_GOAL as MULTIMODAL_TIME_GOAL
from vats_core.checkpoint import atomic_write_text

__all__ = ["PIPELINES", "Row", "figures", "run", "write_report"]

# The pipelines the report reads, in the order of the demo, with their headings.
PIPELINES = {
    "text_generation": "Text (MoE LM)",
    "train_vision": "Vision proofs",
    "train_audio": "Audio proof",
    "train_multimodal": "Multimodal answers",
    "text_to_image": "Text to image",
    "text_to_video": "Text to video",
    "text_to_audio": "Text to audio",
}
GENERATORS = ("text_to_image", "text_to_video", "text_to_audio")
IMAGE_SUFFIXES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image"}
MEDIA_SUFFIXES = {**IMAGE_SUFFIXES, ".gif": "gif", ".wav": "audio", ".flac": "audio"}
MEDIA_SUFFIXES |= {".ogg": "audio", ".mp3": "audio"}


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass
class Row:
    """One headline figure of a pipeline, as the table shows it."""

    figure: str
    value: float | None  # None: not measured (shown as n/a)
    unit: str = "pct"  # pct | seconds | nats | count
    chance: float | None = None  # chance, or the baseline the pipeline compares with
    chance_label: str = ""  # what the chance column is when it is not chance ("unigram")
    goal: float | None = None
    lower: bool = False  # the goal is an upper bound (times, losses)
    note: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the goal is met; None where there is no goal."""
        if self.goal is None:
            return None
        if self.value is None:
            return False
        return self.value < self.goal if self.lower else self.value >= self.goal


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def fmt(value: float | None, unit: str) -> str:
    """A figure in its unit: ``97.2 %``, ``112 s``, ``2.431 nats``, ``2.50``."""
    if value is None:
        return "n/a"
    if unit == "pct":
        return f"{value:.1%}".replace("%", " %")
    if unit == "seconds":
        return f"{value:.0f} s"
    if unit == "nats":
        return f"{value:.3f} nats"
    return f"{value:.2f}"


def _pct(value: Any) -> str:
    return fmt(_num(value), "pct")


def _text_generation(r: dict[str, Any]) -> list[Row]:
    ce, unigram = _num(r.get("val_ce")), _num(r.get("unigram_ce"))
    note = []
    if _num(r.get("val_ppl")) is not None and _num(r.get("unigram_ppl")) is not None:
        note.append(f"perplexity {r['val_ppl']:.1f} vs {r['unigram_ppl']:.1f} (unigram)")
    if _num(r.get("train_seconds")) is not None:
        note.append(f"{r.get('train_steps', '?')} steps in {r['train_seconds']:.0f} s")
    return [
        Row("validation cross-entropy", ce, "nats", unigram, "unigram", unigram, True,
            "; ".join(note))
    ]  # fmt: skip


VISION_FIGURES = {
    "image": "ViT-2D shape × colour, held out",
    "video": "ViT-3D direction of motion, held out",
    "video_no_temporal": "ViT-3D without temporal attention (ablation)",
}


def _train_vision(r: dict[str, Any]) -> list[Row]:
    rows = []
    for task, report in r.items():
        if not isinstance(report, dict):
            continue
        note = [f"{report['classes']} classes"] if "classes" in report else []
        if task == "video_no_temporal":
            note.append("expected near chance")
        attributes = report.get("attributes") or {}
        note += [f"{k} {_pct(v)}" for k, v in attributes.items()]
        if _num(report.get("seconds")) is not None:
            note.append(f"{report.get('steps', '?')} steps in {report['seconds']:.0f} s")
        rows.append(
            Row(VISION_FIGURES.get(task, f"{task}, held out"), _num(report.get("accuracy")),
                chance=_num(report.get("chance")), goal=_num(report.get("goal")),
                note="; ".join(note))
        )  # fmt: skip
    return rows


def _train_audio(r: dict[str, Any]) -> list[Row]:
    chance = _num(r.get("chance"))
    note = f"pitch {_pct(r.get('pitch_accuracy'))}, timbre {_pct(r.get('timbre_accuracy'))}"
    rows = [
        Row("pitch × timbre, held out", _num(r.get("accuracy")), chance=chance,
            goal=_num(r.get("goal")), note=note)
    ]  # fmt: skip
    if r.get("vocoder_clips") or _num(r.get("vocoder_accuracy")) is not None:
        rows.append(
            Row("... after the Griffin-Lim round trip", _num(r.get("vocoder_accuracy")),
                chance=chance, goal=_num(r.get("vocoder_goal")),
                note=f"{r.get('vocoder_clips', '?')} clips: LogMel → vocoder → LogMel")
        )  # fmt: skip
    return rows


def _train_multimodal(r: dict[str, Any]) -> list[Row]:
    rows = []
    for name, entry in (r.get("scores") or {}).items():
        if not isinstance(entry, dict):
            continue
        describe = entry.get("qtype") == "describe"
        note = ["caption attributes" if describe else "exact match"]
        if "samples" in entry:
            note.append(f"{entry['samples']} held-out samples")
        note += [f"{a} {_pct(v)}" for a, v in (entry.get("attributes") or {}).items()]
        rows.append(
            Row(name, _num(entry.get("accuracy")), chance=_num(entry.get("chance")),
                goal=_num(entry.get("goal")), note="; ".join(note))
        )  # fmt: skip
    seconds = _num(r.get("train_seconds"))
    if seconds is not None:
        stages = r.get("seconds") or {}
        note = ", ".join(f"{k} {fmt(_num(v), 'seconds')}" for k, v in stages.items())
        rows.append(
            Row("training time", seconds, "seconds", goal=MULTIMODAL_TIME_GOAL, lower=True,
                note=note)
        )  # fmt: skip
    return rows


# What a generator's score entries measure: the key of the figure, in order of preference.
MEASURES = ("accuracy", "within", "agreement", "consistency", "rate", "share", "score")
# Labels of the generators' score entries the table knows; others get their key as label.
GENERATOR_FIGURES = {
    "text_to_image": {"adherence": "shape × colour adherence"},
    "text_to_audio": {"adherence": "pitch × timbre adherence", "length": "length within tolerance"},
    "text_to_video": {
        "direction": "direction adherence",
        "adherence": "shape × colour adherence",
        "shape_color": "shape × colour adherence",
        "consistency": "temporal consistency",
    },
}
# Reader scores on real held-out samples (and on their VAE round trips): how far the
# classifiers that score the generations can be trusted.
READER_CHECKS = {"real_clips": "real held-out clips", "round_trip": "VAE round trips of them"}
# The training-time goal (TIME_GOAL) bounds the sum of a pipeline's stages, less the ones
# another pipeline trains and counts (text to video's VAE is text_to_image's).
SHARED_STAGES = {"text_to_video": ("vae",)}
_HANDLED = {"attributes", "enrichment", "diversity", "plain", "real_images", "seconds", "words"}
_HANDLED |= set(READER_CHECKS)
_NOT_NOTES = {*MEASURES, "chance", "goal", "examples", "failures", "kind", "qtype"}


def _entry_note(entry: dict[str, Any], measure: str) -> str:
    """The other scalars of a score entry: counts as they are, shares in per cent, ``*_s``
    in seconds."""
    parts = []
    for key, value in entry.items():
        if key in _NOT_NOTES or key == measure or _num(value) is None:
            continue
        if isinstance(value, int):
            parts.append(f"{key} {value}")
        elif key.endswith("_s") or key.endswith("seconds"):
            parts.append(f"{key.removesuffix('_s').replace('_', ' ')} {value:.2f} s")
        else:
            parts.append(f"{key.replace('_', ' ')} {_pct(value)}")
    return ", ".join(parts)


def _measured_rows(scores: dict[str, Any], labels: dict[str, str]) -> list[Row]:
    """A row for each score entry with a figure (``MEASURES``): adherence, length, ..."""
    rows = []
    for key, entry in scores.items():
        if key in _HANDLED or not isinstance(entry, dict):
            continue
        measure = next((m for m in MEASURES if _num(entry.get(m)) is not None), None)
        if measure is not None:
            rows.append(
                Row(labels.get(key, key.replace("_", " ")), _num(entry[measure]),
                    chance=_num(entry.get("chance")), goal=_num(entry.get("goal")),
                    note=_entry_note(entry, measure))
            )  # fmt: skip
    return rows


def _attribute_rows(scores: dict[str, Any]) -> list[Row]:
    """The other attributes the classifiers read, each against chance."""
    real = scores.get("real_images") if isinstance(scores.get("real_images"), dict) else {}
    rows = []
    for label, entry in (scores.get("attributes") or {}).items():
        if isinstance(entry, dict):
            count = next((entry[k] for k in ("images", "clips", "sounds") if k in entry), "?")
            note = f"{count} read"
            if label in real:
                note += f"; read right on {_pct(real[label])} of real held-out images"
            rows.append(
                Row(label, _num(entry.get("accuracy")), chance=_num(entry.get("chance")), note=note)
            )
    return rows


def _plain_rows(plain: Any, labels: dict[str, str]) -> list[Row]:
    """Adherence of the prompts sent to the text encoder without enrichment."""
    if not isinstance(plain, dict):
        return []
    note = "the same prompts straight to the text encoder"
    if "accuracy" in plain:
        return [
            Row("without enrichment", _num(plain["accuracy"]), chance=_num(plain.get("chance")),
                note=note)
        ]  # fmt: skip
    return [  # one figure per reader (text to video: direction, shape x colour)
        Row(f"without enrichment: {labels.get(k, k.replace('_', ' '))}", _num(v), note=note)
        for k, v in plain.items()
        if k in ("direction", "shape_color")
    ]


def _reader_rows(scores: dict[str, Any]) -> list[Row]:
    """How far the readers of the generations can be trusted: on real held-out samples,
    on VAE round trips of them, the length reading on real sounds."""
    rows = []
    for key, label in READER_CHECKS.items():
        check = scores.get(key)
        if isinstance(check, dict) and _num(check.get("direction")) is not None:
            others = ", ".join(
                f"{k.replace('_', ' ')} {_pct(v)}" for k, v in check.items() if k != "direction"
            )
            rows.append(
                Row(f"readers on {label}: direction", _num(check["direction"]), note=others)
            )
    if _num(scores.get("vae_round_trip")) is not None:
        rows.append(
            Row("classifier on VAE round trips", _num(scores["vae_round_trip"]),
                note="the ceiling the decoder leaves the classifier")
        )  # fmt: skip
    if _num(scores.get("real_lengths")) is not None:
        rows.append(
            Row("length read on real sounds", _num(scores["real_lengths"]),
                note="how far the length reading can be trusted")
        )  # fmt: skip
    return rows


def _time_rows(name: str, stages: Any) -> list[Row]:
    """The stages' training time against ``TIME_GOAL``: their sum, less the shared ones."""
    if not isinstance(stages, dict):
        return []
    times = {k: _num(v.get("seconds")) for k, v in stages.items() if isinstance(v, dict)}
    known = [v for v in times.values() if v is not None]
    if not known or len(known) < len(times):
        return []
    note = ", ".join(f"{k} {fmt(v, 'seconds')}" for k, v in times.items())
    note += " (as recorded when each stage trained)"
    shared = SHARED_STAGES.get(name, ())
    if shared:
        own = sum(v for k, v in times.items() if k not in shared and v is not None)
        label = f"training time, less the shared {', '.join(shared)}"
        return [Row(label, own, "seconds", goal=TIME_GOAL, lower=True, note=note)]
    return [Row("training time", sum(known), "seconds", goal=TIME_GOAL, lower=True, note=note)]


def _generator(name: str) -> Callable[[dict[str, Any]], list[Row]]:
    """The figures of a generator's result: its held-out scores, then the training time."""
    labels = GENERATOR_FIGURES.get(name, {})

    def rows_of(r: dict[str, Any]) -> list[Row]:
        scores = r.get("scores")
        if not isinstance(scores, dict):
            rows = [Row("held-out scores", None, note="not scored (pipeline.evaluate=false)")]
            return rows + _time_rows(name, r.get("stages"))
        return [
            *_measured_rows(scores, labels),
            *_attribute_rows(scores),
            *_plain_rows(scores.get("plain"), labels),
            *_reader_rows(scores),
            *_enrichment_rows(scores.get("enrichment")),
            *_diversity_rows(scores.get("diversity")),
            *_word_rows(scores.get("words")),
            *_time_rows(name, r.get("stages")),
        ]

    return rows_of


def _enrichment_rows(e: Any) -> list[Row]:
    if not isinstance(e, dict):
        return []
    rows = []
    seen, other = e.get("phrasings_seen"), e.get("phrasings_held_out")
    if isinstance(seen, dict):
        rows.append(
            Row("enrichment keeps the prompt", _num(seen.get("accuracy")),
                chance=_num(seen.get("chance")), chance_label="random caption",
                goal=_num(e.get("goal")),
                note=f"{seen.get('prompts', '?')} held-out scenes, up to {e.get('tries', '?')} "
                     f"samples; {_pct(seen.get('first_try'))} at the first")
        )  # fmt: skip
    if isinstance(other, dict):
        rows.append(
            Row("... in held-out phrasings", _num(other.get("accuracy")),
                chance=_num(other.get("chance")), chance_label="random caption",
                note="words the LM never saw")
        )  # fmt: skip
    return rows


def _diversity_rows(d: Any) -> list[Row]:
    if not isinstance(d, dict) or _num(d.get("captions")) is None:
        return []
    note = f"over {d.get('seeds', '?')} seeds, {d.get('open', '?')} open attributes"
    if _num(d.get("images")) is not None:
        note += f"; {d['images']:.2f} in the images"
    return [
        Row("diversity: distinct values of an open attribute", _num(d["captions"]), "count",
            chance=_num(d.get("uniform")), chance_label="uniform draws", note=note)
    ]  # fmt: skip


def _word_rows(w: Any) -> list[Row]:
    """How far the DiT's prediction moves when one caption word changes (near 0: the word
    is not read)."""
    if not isinstance(w, dict) or not isinstance(w.get("moved"), dict):
        return []
    note = (
        f"the DiT's prediction moved when this word alone changed ({w.get('samples', '?')} "
        f"held-out samples, t = {w.get('level', '?')} N); near 0: not read"
    )
    return [
        Row(f"caption word read: {name}", _num(value), note=note)
        for name, value in w["moved"].items()
    ]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "text_generation": _text_generation,
    "train_vision": _train_vision,
    "train_audio": _train_audio,
    "train_multimodal": _train_multimodal,
    **{name: _generator(name) for name in GENERATORS},
}


def figures(pipeline: str, result: Any) -> list[Row]:
    """The headline figures of ``pipeline``'s ``result`` (what its ``run`` returned)."""
    if not isinstance(result, dict):
        return [Row("result", None, note="the result holds no figures")]
    return EXTRACTORS[pipeline](result)


# ----------------------------------------------------------------------------- galleries


@dataclasses.dataclass
class Item:
    """One generated file in a gallery."""

    kind: str  # image | gif | audio
    href: str | None  # relative to index.html once copied; None when it cannot be shown
    source: str  # the path the result names
    captions: list[tuple[str, str]]  # (label, text) under the media
    problem: str = ""  # why there is no href


@dataclasses.dataclass
class Gallery:
    pipeline: str
    prompt: str | None
    folder: str | None
    items: list[Item]


def _locate(file: str, runs_dir: Path, pipeline: str) -> Path | None:
    """The file a result names: beside ``runs_dir`` (a relative path is relative to the
    working directory of the run, which held ``runs/``), as written, or under the
    pipeline's folder of ``runs_dir`` (a tree moved since)."""
    path = Path(file)
    candidates = [path] if path.is_absolute() else [runs_dir.parent / path, path, runs_dir / path]
    if pipeline in path.parts:
        candidates.append(runs_dir / Path(*path.parts[path.parts.index(pipeline) :]))
    return next((p for p in candidates if p.is_file()), None)


_RECORD_SKIP = {"prompt", "enriched", "used", "fallback", "file", "gif", "frames", "files"}
_RECORD_LABELS = {"classifier": "read back", "classifiers": "read back", "seconds": "length"}
_RECORD_LABELS["silent_at"] = "silent at"


def _word(key: str, value: Any) -> str:
    """A read-back value as a word: flags by their name (``consistent`` / ``not consistent``)."""
    if isinstance(value, bool):
        return key if value else f"not {key}"
    return str(value)


def _details(record: dict[str, Any]) -> str:
    """A record's other fields in a line: what the classifier read, lengths, ..."""
    out = []
    for key, value in record.items():
        if key in _RECORD_SKIP or value is None:
            continue
        label = _RECORD_LABELS.get(key, key.replace("_", " "))
        if isinstance(value, dict):
            out.append(f"{label}: " + " ".join(_word(k, v) for k, v in value.items()))
        elif isinstance(value, float):
            unit = " s" if key in ("seconds", "silent_at") or key.endswith("_s") else ""
            out.append(f"{label} {value:.2f}{unit}")
        elif isinstance(value, str | int):
            out.append(f"{label} {value}")
    return "; ".join(out)


def _record_file(pipeline: str, record: dict[str, Any], i: int, generated: dict[str, Any]) -> Any:
    if pipeline == "text_to_image":  # the enlarged copy is the one to look at
        enlarged = generated.get("enlarged")
        if isinstance(enlarged, list) and i < len(enlarged) and isinstance(enlarged[i], str):
            return enlarged[i]
    return record.get("gif") or record.get("file")


def galleries(results: dict[str, dict[str, Any]], runs_dir: Path) -> list[Gallery]:
    """The generated files of each generator that ran, with where each lies now."""
    out = []
    for pipeline in GENERATORS:
        generated = _get(results.get(pipeline), "result", "generated")
        if pipeline not in results:
            continue
        if not isinstance(generated, dict):
            out.append(Gallery(pipeline, None, None, []))
            continue
        items, prompt = [], None
        for i, record in enumerate(generated.get("records") or []):
            if not isinstance(record, dict):
                continue
            prompt = prompt or record.get("prompt")
            captions = [("prompt", str(record.get("prompt", "")))]
            written, used = record.get("enriched"), record.get("used")
            if written:
                captions.append(("enriched", str(written)))
            if used is not None and used != written:
                captions.append(("used", str(used)))
            if record.get("fallback"):
                captions.append(("not used", str(record["fallback"])))
            details = _details(record)
            if details:
                captions.append(("", details))
            file = _record_file(pipeline, record, i, generated)
            if not isinstance(file, str):
                continue
            kind = MEDIA_SUFFIXES.get(Path(file).suffix.lower())
            found = _locate(file, runs_dir, pipeline)
            if kind is None:
                items.append(Item("other", None, file, captions, "not a media file"))
            elif found is None:
                items.append(Item(kind, None, file, captions, "file missing"))
            else:  # the href is made relative when the file is copied
                items.append(Item(kind, str(found), file, captions))
        out.append(Gallery(pipeline, prompt, generated.get("folder"), items))
    return out


# ----------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem;
  padding: 0 1rem; color: #1d2125; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d6dbe0; }
.meta { color: #5b6570; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e4e8ec;
  vertical-align: top; }
th { background: #f3f5f7; } td.num, td.verdict { text-align: right; white-space: nowrap; }
tr.first td { border-top: 2px solid #c3cad1; }
.met { color: #17703a; font-weight: 600; } .not-met { color: #b3261e; font-weight: 600; }
.not-run td { color: #7a848e; font-style: italic; }
.note { color: #4d5760; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; width: 15rem; border: 1px solid #e4e8ec; border-radius: 6px;
  padding: .6rem; background: #fafbfc; }
figure img { width: 100%; image-rendering: pixelated; background: #fff; }
figure audio { width: 100%; }
figcaption { font-size: 13px; margin-top: .4rem; }
figcaption dt { font-weight: 600; color: #5b6570; }
figcaption dd { margin: 0 0 .3rem 0; overflow-wrap: anywhere; }
.missing { color: #b3261e; font-size: 13px; }
pre { background: #f3f5f7; padding: .6rem; white-space: pre-wrap; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(results: dict[str, dict[str, Any]], runs_dir: Path) -> tuple[str, int, int]:
    """The figures table, and how many goals it holds and how many are met."""
    lines = [
        '<table class="figures"><thead><tr><th>pipeline</th><th>figure</th><th>score</th>'
        "<th>chance / baseline</th><th>goal</th><th>verdict</th><th>notes</th></tr></thead>"
        "<tbody>"
    ]
    goals = met = 0
    for pipeline, title in PIPELINES.items():
        if pipeline not in results:
            where = runs_dir / pipeline / RESULT_NAME
            lines.append(
                f'<tr class="not-run first" data-pipeline="{_e(pipeline)}"><th>{_e(title)}</th>'
                f'<td colspan="6">not run (no {_e(where)}): <code>vats pipeline={_e(pipeline)}'
                "</code></td></tr>"
            )
            continue
        rows = figures(pipeline, results[pipeline]["result"])
        for i, row in enumerate(rows):
            chance = fmt(row.chance, row.unit) if row.chance is not None else "—"
            if row.chance is not None and row.chance_label:
                chance = f"{chance} ({row.chance_label})"
            goal = "—"
            if row.goal is not None:
                goal = f"{'<' if row.lower else '≥'} {fmt(row.goal, row.unit)}"
            verdict = "—"
            if row.met is not None:
                goals, met = goals + 1, met + int(row.met)
                verdict = (
                    '<span class="met">met</span>'
                    if row.met
                    else '<span class="not-met">not met</span>'
                )
            head = f"<th>{_e(title)}</th>" if i == 0 else "<td></td>"
            lines.append(
                f'<tr class="figure{" first" if i == 0 else ""}" data-pipeline="{_e(pipeline)}">'
                f'{head}<td>{_e(row.figure)}</td><td class="num">{_e(fmt(row.value, row.unit))}'
                f'</td><td class="num">{_e(chance)}</td><td class="num">{_e(goal)}</td>'
                f'<td class="verdict">{verdict}</td><td class="note">{_e(row.note)}</td></tr>'
            )
    lines.append("</tbody></table>")
    return "\n".join(lines), goals, met


def _samples(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    samples = _get(results.get("text_generation"), "result", "samples")
    if isinstance(samples, list) and samples:
        parts.append('<h2 id="text-samples">Text samples</h2>')
        parts += [f"<pre>{_e(s)}</pre>" for s in samples if isinstance(s, str)]
    scores = _get(results.get("train_multimodal"), "result", "scores")
    if isinstance(scores, dict):
        answers = []
        for name, entry in scores.items():
            for ex in (entry.get("examples") or [])[:1] if isinstance(entry, dict) else []:
                if isinstance(ex, dict):
                    answers.append(
                        f"<li><b>{_e(name)}</b>: {_e(str(ex.get('question', '')).strip())} → "
                        f"<q>{_e(ex.get('generated', ''))}</q> (truth: "
                        f"<q>{_e(ex.get('answer', ''))}</q>)</li>"
                    )
        if answers:
            parts.append('<h2 id="multimodal-answers">Multimodal answers (held out)</h2>')
            parts.append("<ul>" + "".join(answers) + "</ul>")
    return "\n".join(parts)


def _gallery(g: Gallery) -> str:
    title = PIPELINES[g.pipeline]
    head = f'<h2 id="gallery-{_e(g.pipeline)}">{_e(title)}'
    head += f": <q>{_e(g.prompt)}</q></h2>" if g.prompt else "</h2>"
    if not g.items:
        what = "nothing generated (prompt=null)" if g.folder is None else "no files"
        return f'{head}\n<p class="note" data-gallery="{_e(g.pipeline)}">{what}</p>'
    cards = []
    for item in g.items:
        if item.href is None:
            media = f'<p class="missing">{_e(item.problem)}: {_e(item.source)}</p>'
        elif item.kind == "audio":
            media = f'<audio controls preload="metadata" src="{_e(item.href)}"></audio>'
        else:
            alt = next((t for label, t in item.captions if label == "prompt"), "")
            media = f'<img src="{_e(item.href)}" alt="{_e(alt)}">'
        caption = "".join(
            (f"<dt>{_e(label)}</dt>" if label else "") + f"<dd>{_e(text)}</dd>"
            for label, text in item.captions
        )
        cards.append(
            f'<figure class="{_e(item.kind)}">{media}<figcaption><dl>{caption}</dl>'
            "</figcaption></figure>"
        )
    folder = f'<p class="note">from {_e(g.folder)}</p>' if g.folder else ""
    return f'{head}\n{folder}\n<div class="gallery" data-gallery="{_e(g.pipeline)}">\n' + (
        "\n".join(cards) + "\n</div>"
    )


def render(results: dict[str, dict[str, Any]], gallery_list: list[Gallery], runs_dir: Path) -> str:
    """The page (media hrefs already relative to it)."""
    table, goals, met = _table(results, runs_dir)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    ran = "".join(
        f"<li>{_e(PIPELINES[p])}: {_e(runs_dir / p / RESULT_NAME)}, finished "
        f"{_e(results[p].get('finished', '?'))}</li>"
        for p in PIPELINES
        if p in results
    )
    body = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vats report</title><style>{CSS}</style></head><body>",
        "<h1>vats report</h1>",
        f'<p class="meta">Written {_e(now)} from {_e(runs_dir)}: {met} of {goals} goals met; '
        f"{len(results)} of {len(PIPELINES)} pipelines run.</p>",
        '<h2 id="figures">Figures</h2>',
        table,
        _samples(results),
        *(_gallery(g) for g in gallery_list),
        '<h2 id="runs">Results read</h2>',
        f'<ul class="note">{ran or "<li>none</li>"}</ul>',
        "</body></html>",
    ]
    return "\n".join(part for part in body if part) + "\n"


# ----------------------------------------------------------------------------- run


def read_results(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Every pipeline's result record found under ``runs_dir`` (missing ones left out).

    Raises:
        ValueError: a result file that cannot be read as its pipeline's (naming the file).
    """
    found = {}
    for pipeline in PIPELINES:
        path = runs_dir / pipeline / RESULT_NAME
        if path.is_file():
            found[pipeline] = read_result(path, pipeline)
    return found


def _copy_media(gallery_list: list[Gallery], media: Path) -> None:
    """Copy each found file to ``media/<pipeline>/`` and point its href there."""
    for g in gallery_list:
        for i, item in enumerate(g.items):
            if item.href is None:
                continue
            source = Path(item.href)
            target = media / g.pipeline / f"{i:02d}-{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            item.href = "/".join(quote(part) for part in ("media", g.pipeline, target.name))


def write_report(runs_dir: Path, out_dir: Path) -> Path:
    """Read the results under ``runs_dir`` and write ``out_dir/index.html`` with its media.

    Returns:
        The page's path.
    """
    results = read_results(runs_dir)  # a bad file fails here, before anything is written
    gallery_list = galleries(results, runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".media-", dir=out_dir))
    try:
        _copy_media(gallery_list, staging)
        page = render(results, gallery_list, runs_dir)
        media = out_dir / "media"
        if media.exists():
            shutil.rmtree(media)
        staging.replace(media)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return index


def run(cfg: DictConfig) -> dict[str, Any]:
    """Gather ``pipeline.runs_dir``'s results into ``pipeline.out_dir/index.html``."""
    runs_dir = Path(str(cfg.pipeline.runs_dir))
    out_dir = Path(str(cfg.pipeline.out_dir))
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ValueError(f"pipeline.runs_dir={runs_dir} is not a directory")
    if not runs_dir.is_dir():
        print(f"report: {runs_dir} does not exist: every pipeline is listed as not run")
    index = write_report(runs_dir, out_dir)
    status = {p: "run" if (runs_dir / p / RESULT_NAME).is_file() else "not run" for p in PIPELINES}
    for pipeline, state in status.items():
        print(f"  {pipeline:17s} {state}")
    print(f"report: {index}")
    return {"index": str(index), "pipelines": status}
