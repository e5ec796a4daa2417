"""Readers: every local format streams the same records; every bad input names file:line and the reason."""

from __future__ import annotations

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from longlora.data import readers as data
from longlora.data.readers import ReadStats, batched_texts, iter_records, iter_texts
from longlora.errors import InputError
from longlora.sources import is_hub_name

RECORDS = [{"text": f"document {i}\nwith ünïcode ✓ and \"quotes\"", "meta": {"i": i}} for i in range(5)]


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _write(path, records=RECORDS):
    name = path.name
    if name.endswith(".jsonl"):
        path.write_bytes(_jsonl_bytes(records))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(_jsonl_bytes(records)))
    elif name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(records)))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records), encoding="utf-8")
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    return path


def _texts(source, **kwargs):
    return [r.data["text"] for r in iter_texts(source, **kwargs)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet"])
def test_every_format_yields_the_same_records(tmp_path, suffix):
    path = _write(tmp_path / f"part{suffix}")
    stats = ReadStats()
    assert _texts(path, stats=stats) == [r["text"] for r in RECORDS]
    assert stats.files == 1 and stats.records == 5 and not stats.skipped
    assert next(iter(iter_records(path))).data["meta"] == {"i": 0}


def test_where_names_file_and_line(tmp_path):
    path = _write(tmp_path / "a.jsonl")
    assert [r.where for r in iter_records(path)][:2] == [f"{path}:1", f"{path}:2"]
    path = _write(tmp_path / "a.parquet")
    assert [r.where for r in iter_records(path)][-1] == f"{path}: row 5"
    path = _write(tmp_path / "a.json")
    assert [r.where for r in iter_records(path)][0] == f"{path}: item 1"


def test_folder_is_read_recursively_in_sorted_order_skipping_hidden_and_foreign_files(tmp_path):
    _write(tmp_path / "b.jsonl.zst", RECORDS[2:])
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "c.parquet", [{"text": "last"}])
    _write(tmp_path / "a.jsonl.gz", RECORDS[:2])
    (tmp_path / "doc.txt").write_text("a plain text document\n", encoding="utf-8")
    _write(tmp_path / ".hidden.jsonl", [{"text": "never"}])
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    stats = ReadStats()
    texts = _texts(tmp_path, stats=stats)
    assert texts == [r["text"] for r in RECORDS] + ["a plain text document\n", "last"]
    assert stats.files == 4


def test_reading_streams(tmp_path):
    """The first records come out before a bad line much further on is even read."""
    path = tmp_path / "big.jsonl.zst"
    lines = _jsonl_bytes([{"text": "x" * 100}] * 20000) + b"{broken\n"
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    records = iter_texts(path)
    assert next(records).data["text"] == "x" * 100
    with pytest.raises(InputError, match=r"big\.jsonl\.zst:20001:2: malformed JSON"):
        for _ in records:
            pass


def test_batched_texts_groups_by_characters():
    records = [data.Record({"text": "x" * n}, "") for n in (5, 5, 20, 1, 1)]
    assert [len(b) for b in batched_texts(records, "text", max_chars=10)] == [2, 1, 2]


# --- bad input: one test per case, raise and skip --------------------------------------------------------------

def _bad_jsonl(tmp_path, bad_line: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS[:2]) + bad_line + b"\n" + _jsonl_bytes(RECORDS[2:3]))
    return path


@pytest.mark.parametrize(("bad", "reason", "message"), [
    (b'{"text": "unterminated', "malformed_json", r"data\.jsonl:3:10: malformed JSON: Unterminated string starting$"),
    (b'{"text": "fine", }', "malformed_json", r"data\.jsonl:3:18: malformed JSON: Expecting property name"),
    (b'["a", "list"]', "not_an_object", r"data\.jsonl:3: expected a JSON object, got list"),
    (b'{"text": "caf\xe9"}', "not_utf8", r"data\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"meta": {}}', "missing_text", r"data\.jsonl:3: no 'text' field"),
    (b'{"text": ""}', "empty_text", r"data\.jsonl:3: 'text' is empty"),
    (b'{"text": "  \\n "}', "empty_text", r"data\.jsonl:3: 'text' is empty"),
    (b'{"text": 42}', "text_not_string", r"data\.jsonl:3: 'text' is a int, not a string"),
])
def test_bad_record_raises_with_file_line_or_is_skipped_and_counted(tmp_path, bad, reason, message):
    path = _bad_jsonl(tmp_path, bad)
    with pytest.raises(InputError, match=message):
        _texts(path)
    stats = ReadStats()
    assert _texts(path, on_error="skip", stats=stats) == [r["text"] for r in RECORDS[:3]]
    assert stats.skipped == {reason: 1}
    assert stats.as_dict()["skipped_records"] == 1


def test_blank_lines_are_not_records(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS[:1]) + b"\n   \n" + _jsonl_bytes(RECORDS[1:2]))
    assert len(_texts(path)) == 2


def test_text_field_is_configurable(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"content": "hello"}])
    assert [r.data["content"] for r in iter_texts(path, text_field="content")] == ["hello"]
    with pytest.raises(InputError, match="no 'text' field \\(has \\['content'\\]\\)"):
        _texts(path)


def test_parquet_without_the_text_column(tmp_path):
    path = _write(tmp_path / "a.parquet", [{"content": "hello"}])
    with pytest.raises(InputError, match=r"a\.parquet: no column 'text' \(columns: content\)"):
        _texts(path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"a\.parquet: not a readable parquet file"):
        _texts(path)


def test_corrupt_compressed_files(tmp_path):
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(_jsonl_bytes(RECORDS))[:40])
    with pytest.raises(InputError, match=r"a\.jsonl\.gz: cannot read"):
        _texts(gz)
    compressed = bytearray(gzip.compress(_jsonl_bytes(RECORDS * 20)))
    compressed[30:60] = b"\xff" * 30  # corrupt deflate data, not just a short file
    gz.write_bytes(bytes(compressed))
    with pytest.raises(InputError, match=r"a\.jsonl\.gz: cannot read"):
        _texts(gz)
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    with pytest.raises(InputError, match=r"a\.jsonl\.zst: cannot (read|decompress)"):
        _texts(zst)


def test_malformed_json_array_reports_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]', "utf-8")
    with pytest.raises(InputError, match=r"data\.json:3:21: malformed JSON: Expecting ',' delimiter"):
        list(iter_records(path, on_error="skip"))  # one JSON value: cannot be skipped record by record


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a"}, 3, {"text": "b"}]', "utf-8")
    with pytest.raises(InputError, match=r"data\.json: item 2: expected a JSON object, got int"):
        _texts(path)
    assert _texts(path, on_error="skip") == ["a", "b"]


def test_text_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes("line one\nline two\nbad \xff".encode("latin-1"))
    with pytest.raises(InputError, match=r"doc\.txt:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        _texts(tmp_path)
    stats = ReadStats()
    assert _texts(tmp_path, on_error="skip", stats=stats) == [] and stats.skipped == {"not_utf8": 1}


def test_empty_text_file_is_an_empty_document(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.txt: 'text' is empty"):
        _texts(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.md").write_text("no data here", encoding="utf-8")
    with pytest.raises(InputError, match="the folder contains no input files"):
        _texts(tmp_path)


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(InputError, match=r"data/missing\.jsonl: no such file or folder"):
        _texts("data/missing.jsonl")
    with pytest.raises(InputError, match="missing: no such file or folder \\(and it does not look like a hub"):
        _texts("missing")
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.csv: unsupported file type"):
        _texts(path)


def test_invalid_on_error():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        list(iter_records("x", on_error="ignore"))


# --- hub names: guarded, never touched by the tests -------------------------------------------------------------

def test_hub_names_are_recognised(tmp_path):
    assert is_hub_name("togethercomputer/RedPajama-Data-1T-Sample")
    assert not is_hub_name("data/corpus/pretrain.jsonl") and not is_hub_name("corpus/part.jsonl")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not is_hub_name(tmp_path / "owner" / "name")


def test_hub_name_with_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"togethercomputer/RedPajama-Data-1T-Sample: not a local file or folder, "
                                         r"and hub access is off \(HF_HUB_OFFLINE is set\)"):
        _texts("togethercomputer/RedPajama-Data-1T-Sample")


@pytest.fixture
def hub_allowed(monkeypatch):
    """Lift the suite's HF_HUB_OFFLINE so the hub path is taken (its download function is faked in each test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_network_failure_becomes_an_input_error(monkeypatch, hub_allowed):
    import datasets


    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(InputError, match=r"owner/corpus: .*streaming it from the Hugging Face hub failed "
                                         r"\(ConnectionError: Couldn't reach"):
        _texts("owner/corpus")


def test_hub_dataset_is_streamed(monkeypatch, hub_allowed):
    import datasets

    calls = []

    def fake_load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": ""}, {"text": "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    stats = ReadStats()
    texts = _texts("owner/corpus", on_error="skip", stats=stats, hub_split="validation")
    assert texts == ["one", "two"] and stats.skipped == {"empty_text": 1}
    assert calls == [("owner/corpus", None, "validation", True)]


# --- damaged files are file-level errors, whatever on_error says ------------------------------------------------

DOCS_400 = [{"text": f"document {i} " + "word " * (200 + i % 7)} for i in range(400)]  # several zstd blocks


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_truncated_compressed_file_is_an_error_naming_it(tmp_path, suffix, on_error):
    path = _write(tmp_path / f"part{suffix}", DOCS_400)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])  # a download or copy that stopped early
    read = []
    with pytest.raises(InputError, match=rf"part{re.escape(suffix)}: cannot read: the file is truncated"):
        for record in iter_texts(path, on_error=on_error):
            read.append(record)
    assert 0 < len(read) < len(DOCS_400)


def test_concatenated_zstd_frames_are_read_whole(tmp_path):
    path = tmp_path / "two_frames.jsonl.zst"
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(compress(_jsonl_bytes(DOCS_400[:250])) + compress(_jsonl_bytes(DOCS_400[250:])))
    assert _texts(path) == [d["text"] for d in DOCS_400]


def test_a_plain_file_that_ends_inside_a_record_is_an_error_even_with_skip(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS)[:-25])
    with pytest.raises(InputError, match=r"cut\.jsonl:5:\d+: the file ends in the middle of a record, truncated\?"):
        _texts(path, on_error="skip")
    path.write_bytes(_jsonl_bytes(RECORDS).rstrip(b"\n"))  # a complete last line without newline is fine
    assert len(_texts(path)) == 5


def test_null_text_is_reported_as_null_not_missing(tmp_path):
    path = _bad_jsonl(tmp_path, b'{"text": null}')
    with pytest.raises(InputError, match=r"data\.jsonl:3: 'text' is null$"):
        _texts(path)
    stats = ReadStats()
    _texts(path, on_error="skip", stats=stats)
    assert stats.skipped == {"null_text": 1}


def test_a_txt_file_is_one_document_whatever_the_text_field(tmp_path):
    (tmp_path / "book.txt").write_text("Call me Ishmael.\n", encoding="utf-8")
    records = list(iter_texts(tmp_path, text_field="content"))
    assert [r.data for r in records] == [{"content": "Call me Ishmael.\n"}]
    assert next(batched_texts(records, "content", 100)) == ["Call me Ishmael.\n"]


def test_records_count_every_record_met_skipped_ones_included(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS[:2]) + b'{broken\n["a list"]\n{"meta": {}}\n{"text": "caf\xe9"}\n'
                     + b'{"text": null}\n' + _jsonl_bytes(RECORDS[2:3]))
    stats = ReadStats()
    texts = _texts(path, on_error="skip", stats=stats)
    assert len(texts) == 3
    assert stats.skipped == {"malformed_json": 1, "not_an_object": 1, "missing_text": 1, "not_utf8": 1,
                             "null_text": 1}
    assert stats.records == len(texts) + sum(stats.skipped.values()) == 8
    assert stats.why_nothing() == "3 of 8 records were usable, 5 skipped as bad"


def test_json_input_is_one_array_of_objects_not_a_lone_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    with pytest.raises(InputError, match=r"one\.json: a JSON object, not an array of records: .* \[ \{\.\.\.\} \]"):
        list(iter_records(path, on_error="skip"))
    path.write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    assert [r.data for r in iter_records(path)] == [{"instruction": "a", "output": "b"}]
    path.write_text("  \n", encoding="utf-8")  # empty, like an empty .jsonl: no records
    stats = ReadStats()
    assert list(iter_records(path, stats=stats)) == [] and stats.files == 1 and stats.records == 0
    assert stats.why_nothing() == "the input holds no records (1 file read, all empty)"
