"""Weight files checked before and after loading, so that damage is named instead of surfacing as a traceback from
deep inside safetensors or torch, or as NaN results.

Before: every weight file of a local folder is read as far as its layout (a safetensors header and the size it
implies, a torch zip's central directory), which takes milliseconds and catches truncated, empty and overwritten
headers. After: every loaded tensor must be finite; damaged bytes inside the data, or a run that diverged, show there.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from longlora.errors import InputError, NonFiniteError, non_finite_tensors

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
CHECKSUMMED_BYTES = 256 * 2**20
"""torch archives up to this size are read whole to verify their checksums; larger ones only by their layout."""


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (truncated, padded, damaged header), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than a safetensors header (empty or truncated)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header claims {length} bytes but only {size - 8} follow (truncated or damaged)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header (damaged)"
    if 8 + length + end != size:
        return f"{size} bytes where its header describes {8 + length + end} (truncated or damaged)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why `path` is not a readable torch.save zip archive (truncated, damaged), or None. Old pickle-only files (no
    zip) are left to torch."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None if path.stat().st_size else "empty"
    try:
        with zipfile.ZipFile(path) as archive:
            # The checksums too where that is cheap (optimizer states of adapters, RNG states): damaged bytes inside.
            bad = archive.testzip() if path.stat().st_size <= CHECKSUMMED_BYTES else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return f"not a whole torch archive ({err}; truncated or damaged)"
    return None if bad is None else f"its member {bad} fails its checksum (damaged)"


def damaged_file(folder: str | Path, recursive: bool = False) -> tuple[Path, str] | None:
    """The first weight file in `folder` (and its subfolders if `recursive`) that cannot be read whole, and why;
    None if all look whole."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in TORCH_SUFFIXES:
            problem = torch_file_problem(path)
        else:
            continue
        if problem is not None:
            return path, problem
    return None


def check_weight_files(source: str | Path, param: str) -> None:
    """InputError naming the damaged file of `source`, a local model or adapter folder (a hub id: nothing to check)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    found = damaged_file(folder)
    if found is not None:
        path, problem = found
        raise InputError(f"{param}: {str(path)!r}: {problem}; rebuild it (rerun the stage that wrote it, e.g. "
                         "`dvc repro -f <stage>`) or restore it (`dvc checkout`)")


def check_finite(model, source: str | Path, param: str) -> None:
    """NonFiniteError when a loaded weight holds a NaN or an infinity (a diverged run, or damaged bytes)."""
    bad = non_finite_tensors(model, trainable_only=False)
    if bad:
        raise NonFiniteError(f"{param} {str(source)!r}: {len(bad)} weight tensors hold NaN or infinite values "
                             f"({bad[0]}{', …' if len(bad) > 1 else ''}): the run that wrote them diverged or the file "
                             "is damaged; rebuild it")
