"""The pipelines' model cache: settings hashes and all-or-nothing entries."""

from __future__ import annotations

import pytest

from vats_apps.pipelines.cache import settings_hash, staged_entry


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
