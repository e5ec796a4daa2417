"""The embedded corpus: real text every machine has without the network — the interpreter's own standard library.

Files are split by a hash of their relative path, so the split is stable across runs and machines that share a
Python version, and a file never moves between the base model's pre-training data and the held-out evaluation.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["base", "extend", "heldout"]

# Test suites are mostly fixtures and generated data; site-packages is whatever the user installed.
_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str
    """Path relative to the standard library root, with forward slashes."""
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str, base_fraction: float, heldout_fraction: float) -> Split:
    """Assign a document to a split by a hash of its name (stable, order-independent)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < base_fraction:
        return "base"
    if u < base_fraction + heldout_fraction:
        return "heldout"
    return "extend"


def stdlib_documents(
    split: Split | None = None,
    base_fraction: float = 0.6,
    heldout_fraction: float = 0.15,
    root: Path | None = None,
    max_documents: int | None = None,
) -> Iterator[Document]:
    """Yield the standard library's `.py` files in sorted order: one split's (or all), at most `max_documents`."""
    root = root or stdlib_root()
    paths = sorted(_python_files(root))
    if not paths:
        raise FileNotFoundError(f"no Python sources found under {root}")
    yielded = 0
    for path in paths:
        if max_documents is not None and yielded >= max_documents:
            return
        name = path.relative_to(root).as_posix()
        if split is not None and split_of(name, base_fraction, heldout_fraction) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yielded += 1
            yield Document(name, text)


def _python_files(root: Path) -> Iterator[Path]:
    """The `.py` files under `root` outside the excluded folders, which are never entered: site-packages can hold
    fifty times the standard library's files, and a glob over all of them would walk every one on every call."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _EXCLUDED_PARTS]
        yield from (Path(folder, name) for name in files if name.endswith(".py"))
