"""The embedded corpus: Python's standard library source, or any folder or list of text files.

Files are read in sorted order and split into train and validation *by file*, with a hash of the
file's relative path, so the split never depends on the machine, the file order or the Python
process. The files of one group (a package: the first folder below the root; the loose modules at
the root form one group) are then joined, in sorted order, into one long document per split, so
that contexts of 64k tokens and more exist (the stdlib's ``test``, ``asyncio``, ``email``... run
to hundreds of thousands of bytes). Each file starts with a ``# file: <relative path>`` line.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer

# Parts of the stdlib folder that are not the standard library or differ between machines.
_STDLIB_SKIP = ("site-packages", "dist-packages", "lib-dynload", "__pycache__")
_ROOT_GROUP = "."


@dataclass(frozen=True)
class Document:
    """One long text: all files of one group of one split, joined."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    validation: list[Document]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the standard library, sorted; installed packages are left out."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if any(part in _STDLIB_SKIP or part.startswith("config-") for part in rel[:-1]):
            continue
        if rel[-1].startswith("_sysconfigdata"):   # build-machine specific
            continue
        files.append(path)
    return sorted(files)


def is_validation(relative_path: str, validation_fraction: float) -> bool:
    """Deterministic split by file: the first 8 bytes of sha1(path) as a fraction of 2**64."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:   # binary file
        return None
    return data.decode("utf-8", errors="replace")


def _group_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else _ROOT_GROUP


def load_corpus(source: str | Path | Sequence[str | Path] = "stdlib",
                validation_fraction: float = 0.05) -> Corpus:
    """Read a corpus: ``"stdlib"``, a folder (all files below it) or a list of files.

    Returns documents in sorted order of group name; a group with no file in a split has no
    document there. Binary files (containing NUL bytes) are skipped.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if isinstance(source, (str, Path)) and str(source) == "stdlib":
        root, files = stdlib_root(), stdlib_files()
    elif isinstance(source, (str, Path)) and Path(source).is_dir():
        root = Path(source)
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        if isinstance(source, (str, Path)):
            if not Path(source).is_file():
                raise ValueError(f"corpus must be 'stdlib', a folder or text files, got "
                                 f"{str(source)!r}")
            source = [source]
        files = sorted(Path(p).resolve() for p in source)
        if not files:
            raise ValueError("corpus: the list of files is empty")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"corpus: not files: {missing[:5]}")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
    groups: dict[tuple[str, bool], list[str]] = {}
    for path in files:
        text = _read_text(path)
        if text is None:
            continue
        relative = path.relative_to(root)
        key = (_group_of(relative), is_validation(relative.as_posix(), validation_fraction))
        groups.setdefault(key, []).append(f"# file: {relative.as_posix()}\n{text}")
    if not groups:
        raise ValueError(f"corpus {source!r}: no text files found")
    train, validation = [], []
    for (group, in_validation), texts in sorted(groups.items()):
        (validation if in_validation else train).append(Document(group, "\n".join(texts)))
    return Corpus(train, validation)


def encode_documents(documents: Sequence[Document], tokenizer: Tokenizer) -> np.ndarray:
    """One int32 token stream: ``<eos> doc_1 <eos> doc_2 ...`` (the separator opens each doc)."""
    parts = []
    for doc in documents:
        parts.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
        parts.append(tokenizer.encode(doc.text))
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(parts)


def document_windows(documents: Sequence[Document], tokenizer: Tokenizer, length: int,
                     count: int) -> np.ndarray:
    """Up to ``count`` windows ``[n, length]`` int32, each starting at a document start or at a
    multiple of ``length`` inside one (never crossing documents), spread evenly over all windows
    of all documents. Position ``i`` of a window has exactly ``i`` tokens of context before it.
    """
    windows = []
    for doc in documents:
        ids = np.concatenate([np.asarray([tokenizer.eos_token_id], dtype=np.int32),
                              tokenizer.encode(doc.text)])
        for start in range(0, len(ids) - length + 1, length):
            windows.append(ids[start:start + length])
    if not windows:
        raise ValueError(f"no validation document has {length} tokens; use a shorter context")
    pick = np.unique(np.linspace(0, len(windows) - 1, num=min(count, len(windows))).round())
    return np.stack([windows[int(i)] for i in pick])
