"""Where a model or a data set comes from: a local path or a Hugging Face hub id, decided before anything is downloaded.

A name that looks local is never sent to the hub: a mistyped path then fails at once with "no such folder", not
after a minute of hub retries ending in "couldn't connect" or "Repo id must be in the form …".
"""

from __future__ import annotations

import re
from pathlib import Path

from longlora.errors import InputError

_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".txt")
"""The local file types a data input can be (longlora/data.py reads each)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
"""Any one of these makes a folder something AutoTokenizer can load from."""


def looks_local(name: str) -> bool:
    """A path rather than a hub id: it exists, is absolute, starts with `~` or `.`, has more than one `/`, has
    characters a hub id cannot have, or is `owner/name` where `owner` is an existing local folder."""
    if not name or Path(name).expanduser().exists():
        return True
    if name.startswith(("/", "~", ".")) or not _HUB_MODEL_ID.match(name):
        return True
    return "/" in name and Path(name).parent.exists()


def is_hub_model_id(name: str) -> bool:
    """True for names that can only mean a hub repository (`meta-llama/Llama-2-7b-hf`, `gpt2`)."""
    return not looks_local(name)


def check_model_source(name: str, param: str = "model.name_or_path", need_config: bool = False) -> None:
    """Raise a clear InputError for a local model path that cannot work; hub ids pass (the hub decides)."""
    if is_hub_model_id(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise InputError(f"{param} {name!r}: no such folder (a local path, so the hub was not asked)")
    if not path.is_dir():
        raise InputError(f"{param} {name!r}: is a file; expected a Hugging Face model folder")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        note = ""
        if (path / "NOT_BUILT.txt").exists():
            note = " (it holds only NOT_BUILT.txt: build_base_model did not build a model there)"
        raise InputError(f"{param} {name!r}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, "
                         f"…){note}; expected a Hugging Face model folder")
    if need_config and not (path / "config.json").exists():
        raise InputError(f"{param} {name!r}: the folder has no config.json; expected a Hugging Face model folder")


def is_hub_name(source: str | Path) -> bool:
    """True when a data input `source` is not a local path and is shaped like a hub dataset id (`owner/name`)."""
    text = str(source)
    return not Path(text).exists() and bool(_HUB_DATASET_ID.match(text)) and not text.lower().endswith(SUFFIXES)
