"""Loaders of the local lm-evaluation-harness tasks in this folder (their YAMLs' `custom_dataset`): lm-eval calls
them with its metadata (`--metadata`, or the TaskManager's), which names the file."""

from __future__ import annotations

import json
from pathlib import Path


def longbench2(longbench2_path: str | None = None, **_):
    """LongBench v2 records (a JSON list, as its data.json, or JSON lines) as lm-eval's `test` split."""
    import datasets

    if not longbench2_path:
        raise ValueError("longlora_longbench2: lm-eval's metadata names no longbench2_path (the LongBench v2 file)")
    path = Path(longbench2_path)
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = None
    if not isinstance(records, list):  # JSON lines (one line alone also parses, as an object)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
