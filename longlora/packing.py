"""Turning tokenized documents into fixed-length training blocks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def join_documents(
    documents: Iterable[Sequence[int]], eos_id: int, bos_id: int | None = None, dtype: type = np.int32
) -> np.ndarray:
    """One token stream: each document as `[bos] tokens eos` (bos only when `bos_id` is given)."""
    parts = []
    for ids in documents:
        if bos_id is not None:
            parts.append(np.array([bos_id], dtype=dtype))
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(np.array([eos_id], dtype=dtype))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def cut_blocks(stream: np.ndarray, block_len: int) -> np.ndarray:
    """`(n_blocks, block_len)` view of the stream; the remainder shorter than a block is dropped."""
    if block_len <= 0:
        raise ValueError(f"block_len must be positive, got {block_len}")
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len)
