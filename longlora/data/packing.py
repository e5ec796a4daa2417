"""Turning tokenized documents into fixed-length training blocks and flat evaluation streams, and reading them back.

The token stream is the documents joined as `[BOS] tokens EOS` (BOS per the caller's policy). `BlockPacker` cuts
it into blocks of `block_len` while documents arrive in batches, carrying the unfinished block over, and records
for every block the offsets at which a document starts inside it (what document-aware attention needs). Nothing is
lost but the final remainder, which is dropped or padded and counted. Everything is numpy; no per-token Python.

On-disk formats (memory-mappable, no pickles), both with a `meta.json` that names the format, dtype and shape:

- blocks (`prepare_pretrain`): `tokens.bin` — n_blocks × block_len ids, row-major; `doc_starts.bin` — int32
  offsets (within their block) of every document start, block after block; `doc_index.npy` — int64, n_blocks + 1:
  block i's starts are `doc_starts[doc_index[i]:doc_index[i + 1]]`. Read with `PackedBlocks`.
- stream (`prepare_eval`): `tokens.bin` — all documents back to back; `doc_offsets.npy` — int64, n_docs + 1:
  document i is `tokens[doc_offsets[i]:doc_offsets[i + 1]]`. Read with `TokenStream`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longlora.choices import Remainder
from longlora.io import write_json

BLOCKS_FORMAT = "longlora-blocks-v1"
STREAM_FORMAT = "longlora-stream-v1"

def join_encoded(
    lengths: np.ndarray, flat: np.ndarray, eos_id: int, bos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Join documents given as (lengths, flat ids) into `[bos] tokens eos …`; also return each document's start."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(flat):
        raise ValueError(f"lengths add up to {int(lengths.sum())} tokens but {len(flat)} were given")
    extra = 1 if bos_id is None else 2
    ends = np.cumsum(lengths + extra)
    starts = ends - (lengths + extra)
    total = int(ends[-1]) if len(ends) else 0
    stream = np.empty(total, dtype=flat.dtype)
    is_text = np.ones(total, dtype=bool)
    stream[ends - 1] = eos_id
    is_text[ends - 1] = False
    if bos_id is not None:
        stream[starts] = bos_id
        is_text[starts] = False
    stream[is_text] = flat
    return stream, starts


def _encoded(documents: Iterable[Sequence[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    docs = [np.asarray(ids, dtype=dtype) for ids in documents]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    return lengths, flat


def join_documents(
    documents: Iterable[Sequence[int]], eos_id: int, bos_id: int | None = None, dtype: type = np.int32
) -> np.ndarray:
    """One token stream: each document as `[bos] tokens eos` (bos only when `bos_id` is given)."""
    return join_encoded(*_encoded(documents, dtype), eos_id=eos_id, bos_id=bos_id)[0]


def cut_blocks(stream: np.ndarray, block_len: int) -> np.ndarray:
    """`(n_blocks, block_len)` view of the stream; the remainder shorter than a block is dropped."""
    if block_len <= 0:
        raise ValueError(f"block_len must be positive, got {block_len}")
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len)


@dataclass(frozen=True)
class Packed:
    """Blocks completed by one `BlockPacker` call, with where documents start inside them."""

    blocks: np.ndarray
    """(n, block_len) token ids."""
    doc_starts: np.ndarray
    """int32 offsets within their block of every document start, block after block."""
    starts_per_block: np.ndarray
    """int64 (n,): how many of `doc_starts` belong to each block."""

    def starts_of(self, i: int) -> np.ndarray:
        """Offsets at which documents start in block i."""
        ptr = np.concatenate([[0], np.cumsum(self.starts_per_block)])
        return self.doc_starts[ptr[i]: ptr[i + 1]]


class BlockPacker:
    """Streams batches of tokenized documents into fixed blocks, carrying the unfinished block between batches."""

    def __init__(self, block_len: int, eos_id: int, bos_id: int | None = None, dtype: type = np.int32):
        if block_len <= 0:
            raise ValueError(f"block_len must be positive, got {block_len}")
        self.block_len = block_len
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.dtype = np.dtype(dtype)
        self._carry = np.zeros(0, dtype=self.dtype)
        self._carry_starts = np.zeros(0, dtype=np.int64)
        self.documents = 0
        """Documents added."""
        self.tokens = 0
        """Tokens in the joined stream (text, EOS and BOS tokens)."""
        self.blocks = 0
        """Blocks emitted (a padded last block included)."""
        self.dropped_tokens = 0
        """Remainder dropped by `finish("drop")`."""
        self.padded_tokens = 0
        """Pad tokens added by `finish("pad")`."""

    def add(self, lengths: np.ndarray, flat: np.ndarray) -> Packed:
        """Add documents given as (lengths, flat ids); return the blocks they complete."""
        stream, starts = join_encoded(lengths, flat.astype(self.dtype, copy=False), self.eos_id, self.bos_id)
        self.documents += len(starts)
        self.tokens += len(stream)
        if len(self._carry):
            starts = np.concatenate([self._carry_starts, starts + len(self._carry)])
            stream = np.concatenate([self._carry, stream])
        n_blocks = len(stream) // self.block_len
        cut = n_blocks * self.block_len
        inside = int(np.searchsorted(starts, cut))
        emitted = starts[:inside]
        self._carry = stream[cut:].copy()
        self._carry_starts = starts[inside:] - cut
        self.blocks += n_blocks
        return Packed(
            blocks=stream[:cut].reshape(n_blocks, self.block_len),
            doc_starts=(emitted % self.block_len).astype(np.int32),
            starts_per_block=np.bincount(emitted // self.block_len, minlength=n_blocks).astype(np.int64),
        )

    def add_documents(self, documents: Iterable[Sequence[int]]) -> Packed:
        """`add` for token-id lists."""
        return self.add(*_encoded(documents, self.dtype))

    @property
    def pending_tokens(self) -> int:
        """Tokens waiting for the next block."""
        return len(self._carry)

    def finish(self, remainder: Remainder, pad_id: int | None = None) -> Packed:
        """Deal with the last, partial block: drop it, or pad it to a full block with `pad_id`."""
        left = len(self._carry)
        empty = Packed(np.zeros((0, self.block_len), self.dtype), np.zeros(0, np.int32), np.zeros(0, np.int64))
        if left == 0:
            return empty
        if remainder == "drop":
            self.dropped_tokens += left
            self._carry = self._carry[:0]
            self._carry_starts = self._carry_starts[:0]
            return empty
        if remainder != "pad":
            raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
        if pad_id is None:
            raise ValueError("remainder 'pad' needs a pad_id")
        block = np.full((1, self.block_len), pad_id, dtype=self.dtype)
        block[0, :left] = self._carry
        self.padded_tokens += self.block_len - left
        self.blocks += 1
        packed = Packed(block, self._carry_starts.astype(np.int32), np.array([len(self._carry_starts)], np.int64))
        self._carry = self._carry[:0]
        self._carry_starts = self._carry_starts[:0]
        return packed


class PackedBlocksWriter:
    """Writes `Packed` batches into a folder in the blocks format; `close(meta)` completes it."""

    def __init__(self, folder: str | Path, block_len: int, dtype: np.dtype | type):
        self.folder = Path(folder)
        self.block_len = block_len
        self.dtype = np.dtype(dtype)
        self._tokens = open(self.folder / "tokens.bin", "wb")  # noqa: SIM115 - closed in close()
        self._starts = open(self.folder / "doc_starts.bin", "wb")  # noqa: SIM115
        self._counts: list[np.ndarray] = []
        self.blocks = 0

    def write(self, packed: Packed) -> None:
        if packed.blocks.shape[1:] != (self.block_len,):
            raise ValueError(f"blocks of shape {packed.blocks.shape} do not have length {self.block_len}")
        packed.blocks.astype(self.dtype, copy=False).tofile(self._tokens)
        packed.doc_starts.astype(np.int32, copy=False).tofile(self._starts)
        self._counts.append(packed.starts_per_block)
        self.blocks += len(packed.blocks)

    def written(self) -> np.ndarray:
        """The blocks written so far, (n, block_len), read back memory-mapped."""
        self._tokens.flush()
        return _memmap(self.folder / "tokens.bin", self.dtype, (self.blocks, self.block_len))

    def close(self, meta: dict | None = None) -> dict:
        self._tokens.close()
        self._starts.close()
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        np.save(self.folder / "doc_index.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        full_meta = {"format": BLOCKS_FORMAT, "dtype": self.dtype.name, "block_length": self.block_len,
                     "blocks": self.blocks, **(meta or {})}
        write_json(self.folder / "meta.json", full_meta)
        return full_meta

    def abort(self) -> None:
        self._tokens.close()
        self._starts.close()


def _read_meta(folder: Path, expected: str) -> dict:
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{folder}: no meta.json (not a finished output of the data stages)")
    meta = json.loads(meta_file.read_text("utf-8"))
    if meta.get("format") != expected:
        raise ValueError(f"{folder}: format {meta.get('format')!r}, expected {expected!r}")
    return meta


def _memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class PackedBlocks:
    """Memory-mapped blocks written by `prepare_pretrain`: `blocks[i]` → ids, `blocks.doc_starts(i)` → offsets."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder, BLOCKS_FORMAT)
        n, length = self.meta["blocks"], self.meta["block_length"]
        self.block_length = length
        self.tokens = _memmap(self.folder / "tokens.bin", np.dtype(self.meta["dtype"]), (n, length))
        self.index = np.load(self.folder / "doc_index.npy")
        self.starts = _memmap(self.folder / "doc_starts.bin", np.int32, (int(self.index[-1]),))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i]

    def doc_starts(self, i: int) -> np.ndarray:
        """Offsets in block i where a document begins (0 is included only if one begins exactly there)."""
        return np.asarray(self.starts[self.index[i]: self.index[i + 1]])

    def segments(self, i: int) -> np.ndarray:
        """Segment boundaries of block i for document-aware attention: 0, every document start, block_length."""
        return np.unique(np.concatenate([[0], self.doc_starts(i), [self.block_length]]))


class TokenStreamWriter:
    """Writes whole documents (already joined as `[bos] tokens eos`) into a folder in the stream format."""

    def __init__(self, folder: str | Path, dtype: np.dtype | type):
        self.folder = Path(folder)
        self.dtype = np.dtype(dtype)
        self._tokens = open(self.folder / "tokens.bin", "wb")  # noqa: SIM115 - closed in close()
        self._lengths: list[np.ndarray] = []

    def write(self, stream: np.ndarray, doc_lengths: np.ndarray) -> None:
        stream.astype(self.dtype, copy=False).tofile(self._tokens)
        self._lengths.append(np.asarray(doc_lengths, dtype=np.int64))

    def close(self, meta: dict | None = None) -> dict:
        self._tokens.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(self.folder / "doc_offsets.npy", offsets)
        full_meta = {"format": STREAM_FORMAT, "dtype": self.dtype.name, "documents": len(lengths),
                     "tokens": int(offsets[-1]), **(meta or {})}
        write_json(self.folder / "meta.json", full_meta)
        return full_meta

    def abort(self) -> None:
        self._tokens.close()


class TokenStream:
    """Memory-mapped stream written by `prepare_eval`: `stream.tokens` (flat), `stream.document(i)`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder, STREAM_FORMAT)
        self.offsets = np.load(self.folder / "doc_offsets.npy")
        self.tokens = _memmap(self.folder / "tokens.bin", np.dtype(self.meta["dtype"]), (int(self.offsets[-1]),))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
