"""The pipelines' model cache: settings hashes, keys that follow the resolved configs and
the code, all-or-nothing entries, and the held-out scores stored in their reports."""

from __future__ import annotations

import importlib.util
import json
import math
import platform
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import vats_core
from vats_apps.cli import config_dir
from vats_apps.pipelines import cache, text_generation, train_vision
from vats_apps.pipelines.cache import (
    REPORT_NAME,
    code_fingerprint,
    scores_reusable,
    settings_hash,
    source_digest,
    staged_entry,
    write_report,
)
from vats_apps.pipelines.compiling import check_compile_switches, compile_flags
from vats_text import presets
from vats_vision.presets import VIT2D_PRESETS


def test_settings_hash_ignores_key_order_and_sees_values():
    a = settings_hash({"lr": 1e-3, "steps": 10})
    assert a == settings_hash({"steps": 10, "lr": 1e-3})
    assert a != settings_hash({"lr": 1e-3, "steps": 11})
    assert len(a) == 16


def test_staged_entry_replaces_whole_or_leaves_nothing(tmp_path):
    entry = tmp_path / "pipe" / "abc"
    with staged_entry(entry) as staging:
        (staging / "old.txt").write_text("old")
    assert (entry / "old.txt").read_text() == "old"

    with pytest.raises(RuntimeError, match="interrupted"), staged_entry(entry) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in entry.parent.iterdir()) == ["abc"]  # no staging left
    assert sorted(p.name for p in entry.iterdir()) == ["old.txt"]  # old entry untouched

    with staged_entry(entry) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in entry.iterdir()) == ["new.txt"]  # replaced, not merged


# --------------------------------------------------------------------------- keys


def test_stored_scores_serve_only_under_their_settings_and_well_formed():
    settings = {"eval_size": 32}
    assert scores_reusable({"eval_size": 32}, settings, [0.0, 0.5, 1, 1.0])
    assert not scores_reusable(None, settings, [0.5])  # stored before scores were kept
    assert not scores_reusable({"eval_size": 7}, settings, [0.5])  # other settings
    for bad in (None, "0.5", True, -0.1, 1.5, math.nan, [0.5]):
        assert not scores_reusable(settings, settings, [0.5, bad]), bad


def test_write_report_replaces_the_report_whole(tmp_path):
    entry = tmp_path / "pipe" / "abc"
    with staged_entry(entry) as staging:
        (staging / REPORT_NAME).write_text(json.dumps({"seconds": 3.0}))
    write_report(entry, {"seconds": 3.0, "accuracy": 0.75, "eval": {"eval_size": 32}})
    assert json.loads((entry / REPORT_NAME).read_text())["accuracy"] == 0.75
    assert [p.name for p in entry.iterdir()] == [REPORT_NAME]  # no temporary file left


def test_source_digest_sees_every_edit_but_not_bytecode(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    base = source_digest(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert source_digest(pkg) == base  # bytecode caches come and go
    (pkg / "a.py").write_text("x = 2\n")
    assert source_digest(pkg) != base
    (pkg / "a.py").write_text("x = 1\n")
    assert source_digest(pkg) == base
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")  # same bytes, another module
    assert source_digest(pkg) != base
    (pkg / "sub" / "c.py").rename(pkg / "sub" / "b.py")
    (pkg / "new.py").write_text("")
    assert source_digest(pkg) != base


def test_code_fingerprint_holds_versions_and_sources():
    fingerprint = code_fingerprint(["vats_core", "vats_apps"])
    assert fingerprint["torch"] == torch.__version__
    assert fingerprint["python"] == platform.python_version()
    assert set(fingerprint["packages"]) == {"vats_core", "vats_apps"}
    core = fingerprint["packages"]["vats_core"]
    assert core["version"] == vats_core.__version__
    assert core["source"] == source_digest(Path(vats_core.__file__).parent)


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _text_key(*overrides: str) -> str:
    return text_generation.cache_key(
        _compose("pipeline=text_generation", "model/text=tiny", *overrides)
    )


def _image_key(*overrides: str) -> str:
    return train_vision.cache_key(_compose("pipeline=train_vision", *overrides), "image")


def test_text_key_follows_the_resolved_config_and_the_code(monkeypatch):
    key = _text_key()
    assert _text_key() == key  # the same settings and code: the same entry
    # Settings that do not shape the weights leave the key alone.
    assert _text_key("pipeline.compile=true", "generation.max_new_tokens=3") == key
    # Settings that do change it: training (compile included), data, seed, model fields.
    for override in (
        "train.compile=true",
        "train.trainer.lr=1e-3",
        "train.seq_len=32",
        "pipeline.seed=1",
        "+model.text.dim=32",
    ):
        assert _text_key(override) != key, override
    # The preset changes in code; the YAML (`preset: tiny`) stays the same.
    tiny = presets.PRESETS["tiny"]
    monkeypatch.setitem(presets.PRESETS, "tiny", lambda: tiny().replace(max_seq_len=512))
    assert _text_key() != key
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    assert _text_key() == key


def test_image_key_follows_the_resolved_configs_and_the_code(monkeypatch):
    key = _image_key()
    assert _image_key() == key
    assert _image_key("pipeline.compile=true", "train.image.eval_size=8") == key
    for override in ("train.compile=true", "train.image.batch_size=8", "model/vision2d=tiny"):
        assert _image_key(override) != key, override
    # A field of the "small" preset that shapes.yaml does not set, changed in code.
    small = {**VIT2D_PRESETS["small"], "qkv_bias": True}
    monkeypatch.setitem(VIT2D_PRESETS, "small", small)
    assert _image_key() != key


@pytest.mark.parametrize("what", ["version", "source", "torch"])
def test_keys_change_with_the_code(monkeypatch, what):
    text, image = _text_key(), _image_key()
    if what == "version":
        monkeypatch.setattr(cache, "_package_version", lambda name: "99.0")
    elif what == "source":
        digest = cache.source_digest
        monkeypatch.setattr(
            cache, "source_digest", lambda d: digest(d) + ("!" if d.name == "vats_core" else "")
        )
    else:
        monkeypatch.setattr(torch, "__version__", "99.0")
    assert _text_key() != text
    assert _image_key() != image


def test_compile_switches_need_setuptools_only_to_run(monkeypatch):
    cfg = _compose("pipeline=train_vision", "pipeline.compile=true")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "setuptools" else find_spec(name, *args),
    )
    assert compile_flags(cfg) == (True, False)  # keys can be computed without it
    train_vision.cache_key(cfg, "image")
    with pytest.raises(ValueError, match="needs setuptools"):
        check_compile_switches(cfg)
    with pytest.raises(ValueError, match=r"pipeline\.compile='on' is invalid"):
        compile_flags(_compose("pipeline=train_vision", "pipeline.compile=on"))
