"""Streaming readers for the data stages: records from local files, folders of them, or a Hugging Face dataset.

Local formats (by suffix): `.jsonl` / `.jsonl.gz` / `.jsonl.zst` (one JSON object per line), `.json` (a JSON
array of objects, as LongAlpaca-12k ships; a single object is refused, not taken as one record, and an empty file
holds no records, like an empty `.jsonl`), `.parquet` (read in record batches) and `.txt` (the whole file is one
document, as PG19 ships, given under the requested text field). A folder is read recursively in sorted order,
hidden files skipped. Everything streams (line by line, batch by batch), so memory stays bounded whatever the input
size; only a `.json` array and a `.txt` document are read whole, because they are one JSON value and one document.

Each record comes with where it came from (`path:line`, `path: row N`, `path: item N`), so a bad one is reported
precisely. `on_error="raise"` stops at the first bad record; `"skip"` skips it and counts it by reason in
`ReadStats.skipped`. A damaged file (a truncated or corrupt `.gz`/`.zst` stream, a file that ends in the middle of a
record, a `.json` that is not one array) is never a skippable record: it stops the stage, naming the file.
`ReadStats.records` counts every record met, skipped ones included. A path that does not exist locally and looks
like `owner/name` is streamed from the hub with `datasets.load_dataset(..., streaming=True)`; without network that
becomes one clear `InputError`.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, get_args

from longlora.choices import OnError
from longlora.errors import InputError
from longlora.sources import JSONL_SUFFIXES, SUFFIXES, is_hub_name

log = logging.getLogger(__name__)

_PARQUET_BATCH_ROWS = 1024
_LOGGED_SKIPS = 5  # per reason: enough to see the pattern without flooding the log


class Record(NamedTuple):
    data: dict
    """The record's JSON object (for a .txt file: {text_field: <file contents>})."""
    where: str
    """Where it came from, for messages: `path:line`, `path: row N`, `path: item N`, `name[split] #N`."""


@dataclass
class ReadStats:
    """What a reader saw: files opened, records met (skipped ones included), records skipped by reason."""

    files: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        """The reading part of a stage's metrics."""
        return {"files": self.files, "records": self.records, "skipped_records": sum(self.skipped.values()),
                "skipped_by_reason": dict(sorted(self.skipped.items()))}

    def why_nothing(self) -> str:
        """What happened when no record came through, for the error of a stage left with nothing to write."""
        skipped = sum(self.skipped.values())
        if self.records == 0:
            files = f"{self.files} file{'' if self.files == 1 else 's'}"
            return f"the input holds no records ({files} read, all empty)"
        if skipped >= self.records:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            return (f"all {self.records} records were skipped as bad ({reasons}; on_error: skip; the log shows "
                    "the first of each kind)")
        return f"{self.records - skipped} of {self.records} records were usable, {skipped} skipped as bad"


class Problems:
    """Applies the on_error policy: raise an InputError, or count the problem and go on."""

    def __init__(self, on_error: OnError, stats: ReadStats):
        if on_error not in get_args(OnError):
            raise ValueError(f"on_error must be {' or '.join(map(repr, get_args(OnError)))}, got {on_error!r}")
        self.on_error = on_error
        self.stats = stats

    def __call__(self, reason: str, message: str, counted: bool = True) -> None:
        """A bad record: raise, or skip and count it. `counted=False` for one the reader could not even parse
        (not yet counted in `stats.records`), so that every record met is counted once."""
        if self.on_error == "raise":
            raise InputError(message)
        if not counted:
            self.stats.records += 1
        self.stats.skipped[reason] += 1
        if self.stats.skipped[reason] <= _LOGGED_SKIPS:
            log.warning("skipped: %s", message)


def iter_records(
    source: str | Path,
    *,
    on_error: OnError = "raise",
    stats: ReadStats | None = None,
    columns: list[str] | None = None,
    hub_split: str = "train",
    hub_config: str | None = None,
    text_field: str = "text",
) -> Iterator[Record]:
    """Yield every record (a JSON object) of a file, a folder of files, or a hub dataset, in order.

    `columns` limits what parquet files read (the rest of the formats are parsed whole anyway); a .txt file's
    contents are given under `text_field`.
    """
    stats = stats if stats is not None else ReadStats()
    problems = Problems(on_error, stats)
    if is_hub_name(source):
        yield from _hub_records(str(source), hub_split, hub_config, stats)
        return
    for path in _input_files(Path(source)):
        stats.files += 1
        for record in _file_records(path, problems, columns, text_field):
            stats.records += 1
            yield record


def iter_texts(
    source: str | Path,
    *,
    text_field: str = "text",
    on_error: OnError = "raise",
    stats: ReadStats | None = None,
    hub_split: str = "train",
    hub_config: str | None = None,
) -> Iterator[Record]:
    """Records whose `text_field` is a non-empty string (RedPajama: {"text": ..., "meta": {...}}).

    A missing, null, non-string or blank text is a bad record (raised or skipped per `on_error`).
    """
    stats = stats if stats is not None else ReadStats()
    problems = Problems(on_error, stats)
    for record in iter_records(source, on_error=on_error, stats=stats, columns=[text_field],
                               hub_split=hub_split, hub_config=hub_config, text_field=text_field):
        text = record.data.get(text_field)
        if text_field not in record.data:
            problems("missing_text", f"{record.where}: no {text_field!r} field (has {sorted(record.data)[:8]})")
        elif text is None:
            problems("null_text", f"{record.where}: {text_field!r} is null")
        elif not isinstance(text, str):
            problems("text_not_string", f"{record.where}: {text_field!r} is a {type(text).__name__}, not a string")
        elif not text.strip():
            problems("empty_text", f"{record.where}: {text_field!r} is empty")
        else:
            yield record


def batched_texts(records: Iterable[Record], text_field: str, max_chars: int) -> Iterator[list[str]]:
    """Group texts into lists of about `max_chars` characters (at least one text each)."""
    batch: list[str] = []
    chars = 0
    for record in records:
        text = record.data[text_field]
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith(SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise InputError(f"{path}: the folder contains no input files ({', '.join(SUFFIXES)})")
        return files
    if not path.exists():
        hint = " (and it does not look like a hub dataset name owner/name)" if "/" not in str(path) else ""
        raise InputError(f"{path}: no such file or folder{hint}")
    if not path.name.lower().endswith(SUFFIXES):
        raise InputError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return [path]


def _file_records(path: Path, problems: Problems, columns: list[str] | None, text_field: str) -> Iterator[Record]:
    name = path.name.lower()
    try:
        if name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_records(path, problems)
        elif name.endswith(".json"):
            yield from _json_array_records(path, problems)
        elif name.endswith(".parquet"):
            yield from _parquet_records(path, columns)
        else:
            yield from _text_file_record(path, problems, text_field)
    except EOFError as err:
        raise InputError(f"{path}: cannot read: the file is truncated ({err})") from None
    except (OSError, zlib.error) as err:
        # Corrupt compressed streams surface here, in the middle of reading.
        raise InputError(f"{path}: cannot read: {err}") from None
    except _zstd_error() as err:
        raise InputError(f"{path}: cannot decompress: {err}") from None


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file frame by frame and raises EOFError when it ends inside a frame: zstandard's own
    stream_reader just stops there, so a truncated file would read as a shorter, valid-looking one."""

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                return 0
            self._out = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:
                self._frame = self._context.decompressobj()
            self._in_frame = True
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:
                self._in_frame = False
                data = self._frame.unused_data  # the next frame, when frames are concatenated
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), 1 << 20)
    return open(path, "rb")


def _decode(line: bytes, where: str, problems: Problems) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        problems("not_utf8", f"{where}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})",
                 counted=False)
        return None


def _jsonl_records(path: Path, problems: Problems) -> Iterator[Record]:
    with _open_binary(path) as handle:
        # One line behind the reader: a compressed stream that ends early raises when the line after the last one
        # is read, so a truncated final line is reported as a damaged file, never skipped as a bad record.
        previous = None
        for numbered in enumerate(handle, 1):
            if previous is not None:
                yield from _jsonl_record(path, *previous, problems, last=False)
            previous = numbered
        if previous is not None:
            yield from _jsonl_record(path, *previous, problems, last=True)


def _jsonl_record(path: Path, lineno: int, line: bytes, problems: Problems, last: bool) -> Iterator[Record]:
    if not line.strip():
        return
    where = f"{path}:{lineno}"
    text = _decode(line, where, problems)
    if text is None:
        return
    try:
        data = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        if last and not line.endswith(b"\n"):
            raise InputError(f"{where}:{err.colno}: the file ends in the middle of a record, truncated? "
                             f"(malformed JSON: {_reason(err)})") from None
        problems("malformed_json", f"{where}:{err.colno}: malformed JSON: {_reason(err)}", counted=False)
        return
    if not isinstance(data, dict):
        problems("not_an_object", f"{where}: expected a JSON object, got {type(data).__name__}", counted=False)
        return
    yield Record(data, where)


def _reason(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Unterminated string starting at" reads oddly before the location


def _not_utf8(path: Path, raw: bytes, err: UnicodeDecodeError) -> str:
    line = raw[: err.start].count(b"\n") + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"


def _json_array_records(path: Path, problems: Problems) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(_not_utf8(path, raw, err)) from None
    if not text.strip():
        return  # an empty file holds no records, as an empty .jsonl does
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # One JSON value: a syntax error cannot be skipped record by record, whatever on_error says.
        raise InputError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {_reason(err)}") from None
    if isinstance(data, dict):
        # Taking it as one record would hide a mistake (a config file in a data folder, a dict of columns).
        raise InputError(f"{path}: a JSON object, not an array of records: a .json input is one array of objects "
                         "(LongAlpaca format); write [ {...} ] for a single record, or use .jsonl")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for index, item in enumerate(data, 1):
        where = f"{path}: item {index}"
        if not isinstance(item, dict):
            problems("not_an_object", f"{where}: expected a JSON object, got {type(item).__name__}", counted=False)
            continue
        yield Record(item, where)


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: not a readable parquet file: {err}") from None
    names = parquet.schema_arrow.names
    wanted = None
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        wanted = columns
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
        for data in batch.to_pylist():
            row += 1
            yield Record(data, f"{path}: row {row}")


def _text_file_record(path: Path, problems: Problems, text_field: str) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        problems("not_utf8", _not_utf8(path, raw, err), counted=False)
        return
    yield Record({text_field: text}, str(path))


def _hub_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _hub_records(name: str, split: str, config: str | None, stats: ReadStats) -> Iterator[Record]:
    offline = _hub_offline()
    if offline:
        raise InputError(
            f"{name}: not a local file or folder, and hub access is off ({offline} is set); "
            "download the dataset and point to the local copy"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(dataset)
    except Exception as err:  # any failure here means "cannot get it from the hub"
        raise InputError(_hub_failure(name, err)) from None
    stats.files += 1
    index = 0
    while True:
        try:
            data = next(rows)
        except StopIteration:
            return
        except Exception as err:  # e.g. a connection dropped mid-stream
            raise InputError(_hub_failure(name, err, index)) from None
        index += 1
        stats.records += 1
        yield Record(dict(data), f"{name}[{split}] #{index}")


def _hub_failure(name: str, err: Exception, after: int | None = None) -> str:
    where = f" after {after} records" if after else ""
    return (
        f"{name}: not a local file or folder, and streaming it from the Hugging Face hub failed{where} "
        f"({type(err).__name__}: {str(err)[:300]}); without network, download it and point to the local copy"
    )
