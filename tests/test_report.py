"""The one-page report (``vats pipeline=report``) and the ``result.json`` every pipeline run
leaves for it.

A fake ``runs/`` tree holds result files shaped like the real pipelines' results and small
real media files (PNG, two-frame GIF, WAV). The page is parsed for its table rows and
galleries; then it is opened in headless Chromium (Debian's, driven by playwright), where
every image, GIF and audio player must load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from vats_apps.cli import config_dir, run_pipeline
from vats_apps.pipelines.report import PIPELINES, Row, figures
from vats_apps.pipelines.results import json_safe, read_result, write_result
from vats_audio import save as save_audio

CHROMIUM = Path("/usr/bin/chromium")
# The flags this machine's closed network needs (no background connections to refuse).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RATE = 16_000


# ----------------------------------------------------------------------------- the fake runs


def _png(path: Path, color: tuple[int, int, int], size: int = 24) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return str(path)


def _gif(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (24, 24), c) for c in ((0, 0, 255), (255, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return str(path)


def _wav(path: Path, seconds: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = torch.arange(int(RATE * seconds)) / RATE
    save_audio(path, 0.3 * torch.sin(2 * math.pi * 220 * t), RATE)
    return str(path)


def _results(root: Path) -> dict[str, Any]:
    """Each pipeline's result as its ``run`` returns it (the fields the report reads, and
    some it does not), with the generated files written under ``root/runs``."""
    runs = root / "runs"
    # text_to_image names its files relative to the working directory the run had
    # ("runs/text_to_image/..."), as `make demo` does; the report finds them beside runs/.
    image_dir = runs / "text_to_image" / "a_red_circle-seed0"
    for i, color in enumerate(((255, 0, 0), (200, 30, 30))):
        _png(image_dir / f"image_{i}.png", color)
        _png(image_dir / f"image_{i}_x8.png", color, size=192)
    rel = Path("runs/text_to_image/a_red_circle-seed0")
    image_records = [
        {"prompt": 'a red <circle> & "friends"', "enriched": "a large red circle at the top",
         "used": "a large red circle at the top", "fallback": None,
         "classifier": {"shape": "circle", "color": "red"}, "file": str(rel / "image_0.png")},
        {"prompt": 'a red <circle> & "friends"', "enriched": "a red square", "used": "a red circle",
         "fallback": "it changed the shape", "classifier": None, "file": str(rel / "image_1.png")},
    ]  # fmt: skip
    clips = runs / "text_to_video" / "a_blue_circle_moving_left-seed0"
    video_records = [
        {"prompt": "a blue circle moving left", "enriched": f"a small blue circle moving left {i}",
         "used": f"a small blue circle moving left {i}", "fallback": None,
         "classifiers": {"shape": "circle", "color": "blue", "direction": "left",
                         "consistent": i == 0},
         "gif": _gif(clips / f"clip_{i}.gif"),
         "frames": [_png(clips / f"clip_{i}_frame_{t}.png", (0, 0, 255)) for t in range(2)]}
        for i in range(2)
    ]  # fmt: skip
    video_records.append(  # a file that is gone by the time the report runs
        {"prompt": "a blue circle moving left", "enriched": "x", "used": "x", "fallback": None,
         "classifiers": None, "gif": str(clips / "deleted.gif"), "frames": []}
    )  # fmt: skip
    readers = {"direction": 0.98, "shape_color": 0.97, "frames": 0.96, "consistency": 0.95}
    sounds = runs / "text_to_audio" / "a_long_low_sine_tone-seed0"
    sound_records = [
        {"prompt": "a long low sine tone", "enriched": f"a long low sine tone {i}",
         "used": f"a long low sine tone {i}", "fallback": None, "seconds": 0.5 + i / 4,
         "silent_at": 0.49 + i / 4, "classifier": {"pitch": "low", "timbre": "sine"},
         "file": _wav(sounds / f"{i:02d}.wav", 0.5 + i / 4)}
        for i in range(2)
    ]  # fmt: skip
    generator_scores = {
        "enrichment": {
            "goal": 0.99, "tries": 8,
            "phrasings_seen": {"accuracy": 1.0, "first_try": 0.9, "chance": 0.01, "prompts": 32,
                               "failures": []},
            "phrasings_held_out": {"accuracy": 0.75, "first_try": 0.6, "chance": 0.01,
                                   "prompts": 32, "failures": []},
        },
        "diversity": {"captions": 2.1, "images": 1.9, "uniform": 2.4, "seeds": 4, "open": 10},
        "seconds": 12.0,
    }  # fmt: skip
    return {
        "text_generation": {
            "val_ce": 2.912, "val_ppl": 18.4, "unigram_ce": 5.104, "unigram_ppl": 164.7,
            "train_seconds": 95.2, "train_steps": 1200, "samples": ["Return the <path> & stop"],
            "cache": "/cache/text", "trained_now": False,
        },
        "train_vision": {
            "image": {"task": "image", "accuracy": 0.972, "chance": 1 / 24, "classes": 24,
                      "steps": 1000, "seconds": 110.0, "threads": 2, "parameters": 800_000,
                      "goal": 0.95, "attributes": {"size": 0.91}, "cached": True},
            "video": {"task": "video", "accuracy": 0.85, "chance": 0.25, "classes": 4,
                      "steps": 300, "seconds": 90.0, "threads": 2, "parameters": 900_000,
                      "goal": 0.9, "cached": True},
            "video_no_temporal": {"task": "video_no_temporal", "accuracy": 0.26, "chance": 0.25,
                                  "classes": 4, "steps": 300, "seconds": 80.0, "threads": 2,
                                  "parameters": 850_000, "cached": True},
        },
        "train_audio": {
            "task": "audio", "accuracy": 0.961, "pitch_accuracy": 0.98, "timbre_accuracy": 0.97,
            "vocoder_accuracy": 0.92, "vocoder_clips": 16, "goal": 0.95, "vocoder_goal": 0.9,
            "chance": 1 / 16, "classes": 16, "steps": 800, "seconds": 70.0, "threads": 2,
            "parameters": 700_000, "cached": True, "classified": [], "examples": [],
        },
        "train_multimodal": {
            "scores": {
                "image/shape": {"kind": "image", "qtype": "shape", "accuracy": 0.94,
                                "chance": 0.25, "samples": 64, "goal": 0.9, "examples": []},
                "image/describe": {
                    "kind": "image", "qtype": "describe", "accuracy": 0.83, "chance": 0.2,
                    "samples": 64, "goal": 0.8, "attributes": {"shape": 0.9},
                    "examples": [{"question": "<image>\nDescribe it.\n",
                                  "answer": "a red circle", "generated": "a red circle"}],
                },
            },
            "seconds": {"align": 100.0, "instruct": 200.0}, "train_seconds": 300.0,
            "threads": 2, "parts": {"image": {"accuracy": 0.97}}, "cached": True,
        },
        "text_to_image": {
            "stages": {"vae": {"seconds": 60.0}, "enrich": {"seconds": 40.0},
                       "dit": {"seconds": 300.0, "losses": [1.0, 0.5]}},
            "keys": {"vae": "k1"}, "cached": {"vae": True}, "parts": {"text": "k0"},
            "scores": {
                "adherence": {"accuracy": 0.9, "chance": 1 / 24, "images": 16, "prompts": 8,
                              "enriched": 1.0, "goal": 0.85, "examples": []},
                "attributes": {"size": {"accuracy": 0.8, "chance": 0.5, "images": 16}},
                "plain": {"accuracy": 0.5, "chance": 1 / 24},
                "vae_round_trip": 0.97,
                "real_images": {"size": 0.99},
                **generator_scores,
            },
            "generated": {
                "folder": str(rel), "images": [r["file"] for r in image_records],
                "enlarged": [str(rel / "image_0_x8.png"), str(rel / "image_1_x8.png")],
                "grid": str(rel / "grid.png"), "records": image_records,
            },
        },
        "text_to_video": {
            "stages": {"vae": {"seconds": 60.0}, "enrich": {"seconds": 45.0},
                       "dit": {"seconds": 500.0}},
            "scores": {
                "direction": {"accuracy": 0.84, "chance": 0.25, "clips": 16, "prompts": 8,
                              "goal": 0.8},
                "adherence": {"accuracy": 0.7, "frames": 0.68, "chance": 1 / 24, "enriched": 1.0,
                              "goal": 0.8, "examples": []},
                "consistency": {"share": 0.95, "goal": 0.9},
                "attributes": {"size": {"accuracy": 0.6, "chance": 0.5, "clips": 10}},
                "plain": {"direction": 0.5, "shape_color": 0.4, "frames": 0.4, "consistency": 0.9},
                "words": {"moved": {"color": 0.5, "direction": 0.006}, "level": 0.9,
                          "samples": 32},
                "real_clips": readers,
                "round_trip": readers,
                **generator_scores,
            },
            "generated": {"folder": str(clips), "gifs": [r["gif"] for r in video_records],
                          "frames": [r["frames"] for r in video_records],
                          "records": video_records},
        },
        "text_to_audio": {
            "stages": {"enrich": {"seconds": 30.0}, "dit": {"seconds": 250.0}},
            "scores": {
                "adherence": {"accuracy": 0.82, "pitch": 0.9, "timbre": 0.88, "chance": 1 / 16,
                              "sounds": 16, "prompts": 8, "goal": 0.8},
                "length": {"within": 0.97, "tolerance": 0.1, "goal": 0.95,
                           "mean_abs_error_s": 0.04},
                "real_lengths": 1.0,
                **generator_scores,
            },
            "generated": {"folder": str(sounds), "files": [r["file"] for r in sound_records],
                          "records": sound_records},
        },
    }  # fmt: skip


def _write_runs(root: Path, only: tuple[str, ...] | None = None) -> Path:
    runs = root / "runs"
    for name, result in _results(root).items():
        if only is None or name in only:
            write_result(runs / name, name, result)
    return runs


def _report_cfg(runs: Path, out: Path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=["pipeline=report", f"pipeline.runs_dir={runs}", f"pipeline.out_dir={out}"],
        )


# ----------------------------------------------------------------------------- parsing the page


class Page(HTMLParser):
    """The parts of the report a test reads: table rows (pipeline and cell texts), media
    elements, gallery captions."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, list[str]]] = []  # (pipeline, class, cells)
        self.media: list[tuple[str, str]] = []  # (tag, src)
        self.galleries: dict[str, list[str]] = {}  # pipeline -> caption texts
        self._row: tuple[str, str, list[str]] | None = None
        self._cell: list[str] | None = None
        self._gallery: str | None = None
        self._dd: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-pipeline"):
            self._row = (a["data-pipeline"] or "", a.get("class") or "", [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in ("img", "audio"):
            self.media.append((tag, a.get("src") or ""))
        elif tag in ("div", "p") and a.get("data-gallery"):
            self._gallery = a["data-gallery"]
            self.galleries.setdefault(self._gallery or "", [])
        elif tag in ("dd", "p") and self._gallery is not None:
            self._dd = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row[2].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag in ("dd", "p") and self._dd is not None and self._gallery is not None:
            self.galleries[self._gallery].append("".join(self._dd).strip())
            self._dd = None
        elif tag == "div":
            self._gallery = None

    def handle_data(self, data: str) -> None:
        for sink in (self._cell, self._dd):
            if sink is not None:
                sink.append(data)


def _parse(index: Path) -> Page:
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def _row(page: Page, pipeline: str, figure: str) -> list[str]:
    """The cells (score, chance, goal, verdict, notes) of ``pipeline``'s ``figure`` row."""
    for name, _, cells in page.rows:
        if name == pipeline and cells[1] == figure:
            return cells[2:]
    raise AssertionError(f"no row {figure!r} of {pipeline}: {[r for r in page.rows]}")


# ----------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("report")
    runs = _write_runs(root)
    out = root / "runs" / "report"
    cwd, elsewhere = Path.cwd(), root / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # not the runs' parent: relative files are found beside runs_dir
    try:
        result = run_pipeline(_report_cfg(runs, out))
    finally:
        os.chdir(cwd)
    return runs, out, result


def test_the_table_holds_every_pipelines_headline_figures(report):
    _, out, result = report
    page = _parse(out / "index.html")
    assert result["index"] == str(out / "index.html")
    assert result["pipelines"] == dict.fromkeys(PIPELINES, "run")
    assert {name for name, _, _ in page.rows} == set(PIPELINES)
    assert not [r for r in page.rows if "not-run" in r[1]]
    # score, chance / baseline, goal, verdict, notes
    ce = _row(page, "text_generation", "validation cross-entropy")
    assert ce[:4] == ["2.912 nats", "5.104 nats (unigram)", "< 5.104 nats", "met"]
    assert "perplexity 18.4 vs 164.7" in ce[4]
    assert _row(page, "train_vision", "ViT-2D shape × colour, held out")[:4] == [
        "97.2 %", "4.2 %", "≥ 95.0 %", "met"
    ]  # fmt: skip
    assert _row(page, "train_vision", "ViT-3D direction of motion, held out")[3] == "not met"
    ablation = _row(page, "train_vision", "ViT-3D without temporal attention (ablation)")
    assert ablation[2:4] == ["—", "—"] and "expected near chance" in ablation[4]
    assert _row(page, "train_audio", "pitch × timbre, held out")[:4] == [
        "96.1 %", "6.2 %", "≥ 95.0 %", "met"
    ]  # fmt: skip
    assert _row(page, "train_audio", "... after the Griffin-Lim round trip")[0] == "92.0 %"
    assert _row(page, "train_multimodal", "image/shape")[:4] == [
        "94.0 %",
        "25.0 %",
        "≥ 90.0 %",
        "met",
    ]
    assert "caption attributes" in _row(page, "train_multimodal", "image/describe")[4]
    assert _row(page, "train_multimodal", "training time")[:4] == ["300 s", "—", "< 360 s", "met"]
    # the generators: adherence, their own measures, enrichment, diversity, time
    assert _row(page, "text_to_image", "shape × colour adherence")[:4] == [
        "90.0 %", "4.2 %", "≥ 85.0 %", "met"
    ]  # fmt: skip
    assert _row(page, "text_to_image", "size")[0] == "80.0 %"
    assert _row(page, "text_to_image", "without enrichment")[0] == "50.0 %"
    keep = _row(page, "text_to_image", "enrichment keeps the prompt")
    assert keep[:4] == ["100.0 %", "1.0 % (random caption)", "≥ 99.0 %", "met"]
    diversity = _row(page, "text_to_image", "diversity: distinct values of an open attribute")
    assert diversity[:2] == ["2.10", "2.40 (uniform draws)"]
    assert _row(page, "text_to_image", "training time")[:4] == ["400 s", "—", "< 600 s", "met"]
    assert _row(page, "text_to_audio", "pitch × timbre adherence")[:4] == [
        "82.0 %", "6.2 %", "≥ 80.0 %", "met"
    ]  # fmt: skip
    assert "pitch 90.0 %" in _row(page, "text_to_audio", "pitch × timbre adherence")[4]
    length = _row(page, "text_to_audio", "length within tolerance")
    assert length[:4] == ["97.0 %", "—", "≥ 95.0 %", "met"] and "0.04 s" in length[4]
    assert _row(page, "text_to_video", "direction adherence")[:4] == [
        "84.0 %", "25.0 %", "≥ 80.0 %", "met"
    ]  # fmt: skip
    assert _row(page, "text_to_video", "shape × colour adherence")[3] == "not met"
    assert "frames 68.0 %" in _row(page, "text_to_video", "shape × colour adherence")[4]
    assert _row(page, "text_to_video", "temporal consistency")[:4] == [
        "95.0 %", "—", "≥ 90.0 %", "met"
    ]  # fmt: skip
    assert _row(page, "text_to_video", "without enrichment: direction adherence")[0] == "50.0 %"
    assert _row(page, "text_to_video", "readers on real held-out clips: direction")[0] == "98.0 %"
    assert _row(page, "text_to_video", "size")[4] == "10 read"
    word = _row(page, "text_to_video", "caption word read: direction")
    assert word[0] == "0.6 %" and "32 held-out samples, t = 0.9 N" in word[4]
    assert _row(page, "text_to_video", "caption word read: color")[0] == "50.0 %"
    # its goal bounds its own stages' sum (its VAE is text_to_image's, counted there)
    assert _row(page, "text_to_video", "training time, less the shared vae")[:4] == [
        "545 s", "—", "< 600 s", "met"
    ]  # fmt: skip
    assert _row(page, "text_to_audio", "training time")[0] == "280 s"


def test_the_galleries_show_each_file_with_its_prompt_and_enrichment(report):
    _, out, _ = report
    page = _parse(out / "index.html")
    images = [src for tag, src in page.media if tag == "img"]
    audio = [src for tag, src in page.media if tag == "audio"]
    assert len(images) == 4 and len(audio) == 2  # 2 PNG, 2 GIF; the deleted GIF has none
    for src in images + audio:  # copied beside the page, linked relatively
        assert not src.startswith(("/", "file:")) and (out / src).is_file(), src
    assert sum(src.endswith(".gif") for src in images) == 2
    # the enlarged copies are the ones shown
    assert Image.open(out / images[0]).size == (192, 192)
    t2i = page.galleries["text_to_image"]
    assert 'a red <circle> & "friends"' in t2i  # escaped in the file, read back as text
    assert "a large red circle at the top" in t2i
    assert "a red square" in t2i and "a red circle" in t2i and "it changed the shape" in t2i
    assert "read back: circle red" in t2i
    t2v = page.galleries["text_to_video"]
    assert "a small blue circle moving left 1" in t2v
    assert "read back: circle blue left not consistent" in t2v
    assert any("file missing" in t and "deleted.gif" in t for t in page.galleries["text_to_video"])
    t2a = page.galleries["text_to_audio"]
    assert "a long low sine tone 0" in t2a and any("length 0.75 s" in t for t in t2a)
    raw = (out / "index.html").read_text(encoding="utf-8")
    assert "<circle>" not in raw and "&lt;circle&gt;" in raw
    assert "<script" not in raw
    # the text samples and the multimodal answers are shown too
    assert "Return the &lt;path&gt; &amp; stop" in raw
    assert "Describe it." in raw


def test_the_report_folder_can_be_moved(report, tmp_path: Path):
    _, out, _ = report
    moved = shutil.copytree(out, tmp_path / "elsewhere")
    page = _parse(moved / "index.html")
    assert all((moved / src).is_file() for _, src in page.media)


def test_run_pipeline_writes_the_result_atomically_beside_the_report(report):
    _, out, result = report
    record = read_result(out / "result.json", "report")
    assert record["result"] == result
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_missing_runs_are_listed_as_not_run(tmp_path: Path):
    runs = _write_runs(tmp_path, only=("text_generation", "text_to_audio"))
    out = tmp_path / "report"
    result = run_pipeline(_report_cfg(runs, out))
    page = _parse(out / "index.html")
    not_run = {name for name, cls, _ in page.rows if "not-run" in cls}
    assert not_run == set(PIPELINES) - {"text_generation", "text_to_audio"}
    assert result["pipelines"]["train_vision"] == "not run"
    for name, cls, cells in page.rows:
        if "not-run" in cls:
            assert "not run" in cells[1] and f"vats pipeline={name}" in cells[1]
    assert {tag for tag, _ in page.media} == {"audio"}


def test_no_runs_dir_at_all_lists_every_pipeline_as_not_run(tmp_path: Path):
    run_pipeline(_report_cfg(tmp_path / "nothing", tmp_path / "report"))
    page = _parse(tmp_path / "report" / "index.html")
    assert {name for name, cls, _ in page.rows if "not-run" in cls} == set(PIPELINES)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": 1, "pipeline": "train_audio", "result": {"accura', "not a valid result"),
        ("[1, 2]", "not a vats result file"),
        ('{"format": 1, "pipeline": "chat", "result": {}}', "holds the result of pipeline 'chat'"),
    ],
)
def test_a_bad_result_file_is_refused_naming_it_and_nothing_is_written(
    tmp_path: Path, content: str, message: str
):
    runs = _write_runs(tmp_path, only=("text_generation",))
    bad = runs / "train_audio" / "result.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=message) as err:
        run_pipeline(_report_cfg(runs, out))
    assert str(bad) in str(err.value)
    assert not out.exists()


def test_a_report_run_again_replaces_the_old_media(report, tmp_path: Path):
    runs = _write_runs(tmp_path)
    out = tmp_path / "report"
    run_pipeline(_report_cfg(runs, out))
    stale = out / "media" / "old.png"
    stale.write_bytes(b"x")
    shutil.rmtree(runs / "text_to_video")
    run_pipeline(_report_cfg(runs, out))
    assert not stale.exists() and not (out / "media" / "text_to_video").exists()


# ----------------------------------------------------------------------------- result.json


class _Opaque:
    pass


def test_results_are_made_json_safe():
    big = torch.zeros(5000)
    value = {
        "scalar": torch.tensor(0.5),
        "small": torch.tensor([[1, 2], [3, 4]]),
        "big": big,
        "path": Path("runs/x.png"),
        "nan": float("nan"),
        "inf": torch.tensor(float("inf")),
        "tuple": (1, _Opaque(), "a"),
        "model": torch.nn.Linear(2, 2),
        "row": Row("x", 0.5),
        3: "int key",
    }
    safe = json_safe(value)
    json.dumps(safe, allow_nan=False)
    assert safe["scalar"] == 0.5 and safe["small"] == [[1, 2], [3, 4]]
    assert "big" not in safe and "model" not in safe
    assert safe["path"] == "runs/x.png" and safe["nan"] is None and safe["inf"] is None
    assert safe["tuple"] == [1, None, "a"]  # positions kept
    assert safe["row"]["figure"] == "x" and safe["3"] == "int key"


def test_a_failed_write_leaves_the_old_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_result(tmp_path, "train_audio", {"accuracy": 0.5})

    def boom(*args: Any, **kwargs: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        write_result(tmp_path, "train_audio", {"accuracy": 0.9})
    monkeypatch.undo()
    assert read_result(path, "train_audio")["result"] == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_result_without_figures_is_one_row():
    assert [r.figure for r in figures("train_audio", [1, 2])] == ["result"]
    rows = figures("text_to_image", {"stages": {}})  # evaluate=false
    assert rows[0].note.startswith("not scored")


# ----------------------------------------------------------------------------- in a browser


def _chromium() -> Path:
    """Debian's Chromium, installed with apt-get when it is missing and this is root."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "chromium"]
        try:
            done = subprocess.run(install, env=env, capture_output=True, timeout=420)
            if done.returncode != 0:  # the package lists may be missing on a fresh machine
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                               timeout=180)  # fmt: skip
                subprocess.run(install, env=env, capture_output=True, timeout=420)
        except subprocess.TimeoutExpired:
            pass
    if not CHROMIUM.exists():
        pytest.skip(
            f"no browser: {CHROMIUM} is missing and could not be installed "
            "(`apt-get install chromium` needs root and Debian's package lists)"
        )
    return CHROMIUM


def test_every_image_gif_and_audio_player_loads_in_chromium(report):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = _chromium()
    _, out, _ = report
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto((out / "index.html").resolve().as_uri())
            page.wait_for_function(
                "[...document.images].every(i => i.complete)"
                " && [...document.querySelectorAll('audio')].every(a => a.readyState >= 1"
                " || a.error)",
                timeout=20_000,
            )
            images = page.evaluate(
                "[...document.images].map(i => ({src: i.getAttribute('src'),"
                " width: i.naturalWidth, height: i.naturalHeight}))"
            )
            players = page.evaluate(
                "[...document.querySelectorAll('audio')].map(a => ({src: a.getAttribute('src'),"
                " ready: a.readyState, duration: a.duration, error: a.error && a.error.code}))"
            )
        finally:
            browser.close()
    assert len(images) == 4 and len(players) == 2
    for image in images:
        assert image["width"] > 0 and image["height"] > 0, image
    for player, seconds in zip(players, (0.5, 0.75), strict=True):
        assert player["error"] is None and player["ready"] >= 1, player
        assert player["duration"] == pytest.approx(seconds, abs=0.01), player
