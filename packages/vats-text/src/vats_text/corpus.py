"""The embedded default corpus: docstrings of the running interpreter's standard library.

Every machine that runs vats has a Python standard library, and its docstrings are a
few megabytes of real, edited English about programming. This module extracts them
with :mod:`ast` (the modules are parsed, never imported, so nothing runs), which makes
a corpus that needs no download:

- Source files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, except
  third-party packages (``site-packages``, ``dist-packages``), test suites (any
  directory named ``test``, ``tests`` or ``idle_test``, and ``test_*.py`` files) and
  files that fail to read or parse.
- Documents: the docstrings of modules, classes and functions (async included),
  plus the help topics of ``pydoc_data/topics.py`` (the language-reference text that
  ``help("if")`` prints, kept there as a dict of string literals: about a quarter of
  the corpus), each cleaned with :func:`inspect.cleandoc` and stripped; documents
  without a word of at least two ASCII letters (empty ones, stubs such as
  ``"a + b"``) are dropped.
- Order: files sorted by their path relative to the root, then docstrings in source
  order; a document seen before (in this order) is dropped, so the result has no
  duplicates.
- Split: a document belongs to ``"validation"`` when a stable hash of its text falls
  in the lowest :data:`VALIDATION_PERCENT` percent, else to ``"train"``. Because the
  hash depends only on the document, adding or removing other documents never moves
  a document between splits.

The corpus depends on the interpreter: a different Python version has different
docstrings. For one interpreter it is the same on every run and every machine.

Example:
    >>> from vats_text.corpus import load_corpus
    >>> train = load_corpus("train")
    >>> validation = load_corpus("validation")
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SPLITS",
    "VALIDATION_PERCENT",
    "corpus_stats",
    "iter_docstrings",
    "load_corpus",
    "split_of",
    "stdlib_root",
]

#: The names :func:`load_corpus` accepts.
SPLITS = ("train", "validation")

#: Share of documents, in percent, that go to the validation split.
VALIDATION_PERCENT = 5

# Directory names whose contents are never part of the corpus: third-party code and
# test suites (their docstrings are mostly "Test that ..." and fixtures).
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

# A document must hold at least one word of two letters: this drops empty docstrings
# and stubs such as "a + b" or "¶".
_WORD = re.compile(r"[A-Za-z]{2}")

_DocNode = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def stdlib_root() -> Path:
    """Returns the directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    """Lists the ``*.py`` files under ``root`` that may hold corpus text, sorted by
    their path relative to ``root`` (as a POSIX string, so the order is the same on
    every platform)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped trees.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [path for _, path in found]


def _file_docstrings(path: Path) -> list[str]:
    """Returns the cleaned docstrings of one file that hold a word, in source order,
    or an empty list if the file cannot be read or parsed."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old modules trip SyntaxWarning/DeprecationWarning (invalid escapes);
            # they parse fine and the warnings are noise here.
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return []
    if path.name == "topics.py" and path.parent.name == "pydoc_data":
        strings = _help_topics(tree)
    else:
        strings = _docstrings(tree)
    # cleandoc keeps a last line of blanks (a closing quote indented on its own line).
    docs = [inspect.cleandoc(raw).strip() for raw in strings]
    return [doc for doc in docs if _WORD.search(doc)]


def _docstrings(tree: ast.Module) -> list[str]:
    """Returns the raw docstrings of a module, its classes and functions, in source order."""
    nodes = [node for node in ast.walk(tree) if isinstance(node, _DocNode)]
    # ast.walk is breadth-first; sorting by position restores source order (the
    # module has no position and comes first).
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", -1)))
    docs = [ast.get_docstring(node, clean=False) for node in nodes]
    return [doc for doc in docs if doc is not None]


def _help_topics(tree: ast.Module) -> list[str]:
    """Returns the string values of the module-level ``topics = {...}`` dict literal
    of ``pydoc_data/topics.py``, in source order."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return [
                v.value
                for v in node.value.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            ]
    return []


def iter_docstrings(
    root: str | os.PathLike[str] | None = None, *, max_files: int | None = None
) -> Iterator[str]:
    """Yields the deduplicated docstrings of a source tree, in the corpus order.

    Args:
        root: Directory to scan; defaults to :func:`stdlib_root`.
        max_files: If given, only the first ``max_files`` source files (in sorted
            order) are read: a small, fast corpus for tests.

    Yields:
        Each distinct docstring once, in file order then source order.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
        ValueError: If ``max_files`` is negative.
    """
    root_path = stdlib_root() if root is None else Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"corpus source directory not found: {root_path}")
    if max_files is not None and max_files < 0:
        raise ValueError(f"max_files must be >= 0 or None, got {max_files}")
    files = _source_files(root_path)
    if max_files is not None:
        files = files[:max_files]
    seen: set[str] = set()
    for path in files:
        for doc in _file_docstrings(path):
            if doc not in seen:
                seen.add(doc)
                yield doc


def split_of(document: str) -> str:
    """Returns the split (``"train"`` or ``"validation"``) a document belongs to.

    The choice depends only on the document's text (a BLAKE2b hash, not Python's
    per-process salted ``hash``), so it is the same in every process and does not
    change when other documents are added or removed.
    """
    digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


@functools.lru_cache(maxsize=4)
def _cached_documents(max_files: int | None) -> tuple[str, ...]:
    # Parsing the standard library is the slow part: done once for both splits.
    return tuple(iter_docstrings(max_files=max_files))


@functools.lru_cache(maxsize=8)
def _cached_split(split: str, max_files: int | None) -> tuple[str, ...]:
    return tuple(doc for doc in _cached_documents(max_files) if split_of(doc) == split)


def load_corpus(split: str = "train", *, max_files: int | None = None) -> list[str]:
    """Loads one split of the standard-library docstring corpus.

    The first call per ``(split, max_files)`` parses the standard library (a few
    seconds for the whole of it); later calls in the same process return a copy of
    the cached result.

    Args:
        split: ``"train"`` (about 95% of documents) or ``"validation"`` (about 5%).
        max_files: If given, read only the first ``max_files`` source files: a
            small corpus for tests. ``None`` reads them all.

    Returns:
        The documents of the split, one docstring per item, in corpus order.

    Raises:
        ValueError: If ``split`` is not one of :data:`SPLITS` or ``max_files`` is
            negative.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_files is not None and (not isinstance(max_files, int) or max_files < 0):
        raise ValueError(f"max_files must be a non-negative int or None, got {max_files!r}")
    return list(_cached_split(split, max_files))


def corpus_stats(*, max_files: int | None = None) -> dict[str, dict[str, int]]:
    """Counts documents and characters per split.

    Args:
        max_files: As in :func:`load_corpus`.

    Returns:
        ``{split: {"docs": n_documents, "chars": n_characters}}`` for each split.
    """
    stats = {}
    for split in SPLITS:
        docs = load_corpus(split, max_files=max_files)
        stats[split] = {"docs": len(docs), "chars": sum(len(d) for d in docs)}
    return stats
