"""Tests of vats_text.corpus: the embedded standard-library docstring corpus."""

from __future__ import annotations

import re

import pytest

from vats_text.corpus import (
    SPLITS,
    corpus_stats,
    iter_docstrings,
    load_corpus,
    split_of,
    stdlib_root,
)


@pytest.fixture(scope="module")
def train() -> list[str]:
    return load_corpus("train")


@pytest.fixture(scope="module")
def validation() -> list[str]:
    return load_corpus("validation")


def test_size_is_non_trivial(train: list[str], validation: list[str]) -> None:
    n_chars = sum(map(len, train)) + sum(map(len, validation))
    assert len(train) > 2000 and n_chars > 1_000_000
    # The hash split sends about 5% of documents to validation.
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.09
    stats = corpus_stats()
    assert stats["train"] == {"docs": len(train), "chars": sum(map(len, train))}


def test_splits_are_disjoint_and_without_duplicates(
    train: list[str], validation: list[str]
) -> None:
    assert len(set(train)) == len(train)
    assert len(set(validation)) == len(validation)
    assert not set(train) & set(validation)
    assert all(split_of(d) == "train" for d in train)
    assert all(split_of(d) == "validation" for d in validation)


def test_documents_are_clean_english(train: list[str]) -> None:
    assert all(d.strip() and d == d.strip() for d in train)
    text = "\n".join(train)
    words = re.findall(r"[a-z]+", text.lower())
    for word in ("the", "return", "function", "string", "file"):
        assert words.count(word) > 100, word
    assert any(d.startswith("Return ") for d in train)


def test_deterministic_and_cached(train: list[str]) -> None:
    again = load_corpus("train")
    assert again == train
    again.append("mutated")  # a copy: the cache is not affected
    assert load_corpus("train") == train
    assert list(iter_docstrings(max_files=30)) == list(iter_docstrings(max_files=30))


def test_max_files_gives_a_prefix() -> None:
    small = list(iter_docstrings(max_files=25))
    full = list(iter_docstrings(max_files=50))
    assert 0 < len(small) < len(full) and full[: len(small)] == small
    split = load_corpus("train", max_files=25) + load_corpus("validation", max_files=25)
    assert sorted(split) == sorted(small)


def test_split_is_stable_per_document() -> None:
    doc = "Return the number of items in the container."
    assert split_of(doc) == split_of(str(doc))
    assert split_of(doc) in SPLITS


def test_extraction_rules(tmp_path) -> None:
    def write(rel: str, source: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")

    write(
        "b.py",
        '"""Module b."""\n\n'
        "class C:\n"
        '    """Class C.\n\n    Indented body.\n    """\n\n'
        "    async def m(self):\n"
        '        """Method m."""\n\n'
        'def f():\n    """Function f."""\n\n'
        'def g():\n    """Module b."""\n',  # a duplicate of the module docstring
    )
    write("a.py", '"""Module a."""\n\ndef h():\n    pass\n')
    write("broken.py", 'def oops(:\n    """Never seen."""\n')
    write("pkg/test/x.py", '"""Test dir."""\n')
    write("pkg/tests/x.py", '"""Tests dir."""\n')
    write("idlelib/idle_test/x.py", '"""Idle test."""\n')
    write("site-packages/lib.py", '"""Third party."""\n')
    write("test_thing.py", '"""Test module."""\n')
    write("pkg/__init__.py", '""""""\n')  # an empty docstring is dropped
    write("notes.txt", "Not Python.")
    docs = list(iter_docstrings(tmp_path))
    assert docs == [
        "Module a.",
        "Module b.",
        "Class C.\n\nIndented body.",
        "Method m.",
        "Function f.",
    ]


def test_help_topics_are_included(train: list[str], validation: list[str]) -> None:
    if not (stdlib_root() / "pydoc_data" / "topics.py").is_file():
        pytest.skip("this interpreter ships no pydoc_data/topics.py")
    assert any("statement" in d and "*****" in d for d in train + validation)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_corpus("test")
    with pytest.raises(ValueError, match="max_files"):
        load_corpus("train", max_files=-1)
    with pytest.raises(FileNotFoundError, match="missing"):
        list(iter_docstrings(tmp_path / "missing"))
