"""The data stages end to end on tiny inputs: the artifacts they write, their invariants, and every bad input."""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from longlora.data.packing import PackedBlocks, TokenStream
from longlora.data.sft import IGNORE_INDEX, Instruction, render_prompt
from longlora.embedded.corpus import stdlib_documents
from longlora.embedded.longqa import DEPTH_BANDS, KINDS, generate_longqa, instruction_document, source_units
from longlora.errors import InputError
from longlora.evaluation.longbench2 import read_records
from longlora.io import TIMINGS_FILE, run_log
from stages import _cli, prepare_corpus, prepare_eval, prepare_pretrain, prepare_sft
from stages.params import ParamsError, parse_params
from tests.conftest import tiny_params_dict

SHARED_TEXT = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def texts():
    """A dozen real documents of very different lengths."""
    return [d.text for d in stdlib_documents("extend", max_documents=12)]


def _params(tokenizer_dir, **sections):
    """The tiny params on the tiny tokenizer; prepare_pretrain packs the input alone unless told otherwise."""
    sections["prepare_pretrain"] = {"synthetic_share": 0.0, **sections.get("prepare_pretrain", {})}
    return parse_params(tiny_params_dict(model={"name_or_path": str(tokenizer_dir)}, **sections))


def _write_jsonl(path: Path, lines: list[bytes | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    path.write_bytes(raw)
    return path


def _joined(tokenizer, texts, bos=True):
    """The EOS-joined token stream and document starts, computed independently of the stage."""
    stream, starts = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        starts.append(len(stream))
        stream += ([tokenizer.bos_token_id] if bos else []) + ids + [tokenizer.eos_token_id]
    return np.array(stream), np.array(starts)


def _assert_nothing_finished(root: Path, out: str):
    assert not (root / out).exists(), f"a failed run left {out}"
    parent = (root / out).parent
    leftovers = [p.name for p in parent.glob(f".{Path(out).name}*")] if parent.exists() else []
    assert not leftovers, f"temporary outputs left behind: {leftovers}"


# --- prepare_pretrain ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("remainder", "bos", "block_length"), [("drop", "document", None), ("pad", "none", 64)])
def test_pretrain_blocks_are_the_eos_joined_stream_with_document_boundaries(
        in_tmp, tiny_tokenizer, tiny_tokenizer_dir, texts, remainder, bos, block_length):
    _write_jsonl(in_tmp / "in/pretrain.jsonl", [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)])
    params = _params(tiny_tokenizer_dir, prepare_pretrain={
        "input": "in/pretrain.jsonl", "remainder": remainder, "bos": bos, "block_length": block_length,
        "batch_chars": 5000})  # many batches: blocks and boundaries must carry across them
    metrics = prepare_pretrain.run(params)

    length = block_length or params.model.target_context
    stream, starts = _joined(tiny_tokenizer, texts, bos=bos == "document")
    blocks = PackedBlocks(in_tmp / "data/pretrain")
    n = len(blocks)
    assert blocks.tokens.dtype == np.uint16 and blocks.block_length == length
    flat = np.asarray(blocks.tokens).ravel()
    if remainder == "drop":
        assert n == len(stream) // length
        assert np.array_equal(flat, stream[: n * length])
        assert metrics["dropped_tokens"] == len(stream) - n * length and metrics["padded_tokens"] == 0
    else:
        assert n == -(-len(stream) // length)
        assert np.array_equal(flat[: len(stream)], stream)
        assert (flat[len(stream):] == tiny_tokenizer.pad_token_id).all()
        assert metrics["padded_tokens"] == n * length - len(stream) and metrics["dropped_tokens"] == 0
    recorded = [(i, int(s)) for i in range(n) for s in blocks.doc_starts(i)]
    assert recorded == [(int(s) // length, int(s) % length) for s in starts if s < n * length]

    saved = json.loads((in_tmp / "data/metrics/prepare_pretrain.json").read_text())
    assert saved == metrics
    assert metrics["documents"] == len(texts) and metrics["tokens"] == len(stream) and metrics["blocks"] == n
    assert metrics["skipped_records"] == 0
    assert json.loads((run_log("prepare_pretrain") / TIMINGS_FILE).read_text())["tokens_per_second"] > 0
    # The effective value, also when block_length is left to default to model.target_context.
    ran_with = json.loads((in_tmp / "data/logs/prepare_pretrain/params.json").read_text())
    assert ran_with == {"stage": "prepare_pretrain",
                        "params": {**params.prepare_pretrain.model_dump(mode="json"), "block_length": length}}
    assert "params" not in metrics
    assert blocks.meta["eos_id"] == tiny_tokenizer.eos_token_id and blocks.meta["documents"] == len(texts)


def test_pretrain_reads_every_format_and_process_count_to_the_same_blocks(in_tmp, tiny_tokenizer_dir, texts):
    records = [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)]
    _write_jsonl(in_tmp / "plain.jsonl", records)
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in records[:4])
    (in_tmp / "folder").mkdir()
    (in_tmp / "folder/a.jsonl.gz").write_bytes(gzip.compress(lines))
    (in_tmp / "folder/b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"".join(json.dumps(r).encode() + b"\n" for r in records[4:8])))
    pq.write_table(pa.Table.from_pylist(records[8:]), in_tmp / "folder/c.parquet")

    outputs = {}
    for name, extra in {"jsonl": {"input": "plain.jsonl"}, "folder": {"input": "folder"},
                        "two processes": {"input": "plain.jsonl", "num_proc": 2, "batch_chars": 20000}}.items():
        out = f"out/{name}"
        metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={
            **extra, "out_dir": out, "metrics_file": f"{out}.json"}))
        outputs[name] = ((in_tmp / out / "tokens.bin").read_bytes(), (in_tmp / out / "doc_starts.bin").read_bytes())
        assert metrics["documents"] == len(texts)
    assert outputs["jsonl"] == outputs["folder"] == outputs["two processes"]


def test_pretrain_max_documents(in_tmp, tiny_tokenizer_dir, texts):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": t} for t in texts])
    metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir,
                                           prepare_pretrain={"input": "in.jsonl", "max_documents": 3}))
    assert metrics["documents"] == 3


@pytest.mark.parametrize(("bad_line", "reason", "message"), [
    (b'{"text": "a broken line', "malformed_json", r"in\.jsonl:3:10: malformed JSON: Unterminated string"),
    (b'{"meta": {"source": "x"}}', "missing_text", r"in\.jsonl:3: no 'text' field"),
    (b'{"text": ""}', "empty_text", r"in\.jsonl:3: 'text' is empty"),
    (b'{"text": "caf\xe9 latin-1"}', "not_utf8", r"in\.jsonl:3: not valid UTF-8 \(byte 0xe9"),
])
def test_pretrain_bad_line_stops_with_file_line_or_is_skipped(
        in_tmp, tiny_tokenizer_dir, texts, bad_line, reason, message):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": texts[0]}, {"text": texts[1]}, bad_line, {"text": texts[2]}])
    with pytest.raises(InputError, match=message):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")
    assert not (in_tmp / "data/metrics/prepare_pretrain.json").exists()

    metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir,
                                           prepare_pretrain={"input": "in.jsonl", "on_error": "skip"}))
    assert metrics["documents"] == 3 and metrics["skipped_records"] == 1
    assert metrics["skipped_by_reason"] == {reason: 1}
    assert json.loads((in_tmp / "data/metrics/prepare_pretrain.json").read_text())["skipped_records"] == 1


def test_pretrain_failure_keeps_the_previous_finished_output(in_tmp, tiny_tokenizer_dir, texts):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": t} for t in texts])
    prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl"}))
    before = (in_tmp / "data/pretrain/tokens.bin").read_bytes()
    _write_jsonl(in_tmp / "in.jsonl", [{"text": texts[0]}, b"{oops"])
    with pytest.raises(InputError, match=r"in\.jsonl:2:2: malformed JSON"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl"}))
    assert (in_tmp / "data/pretrain/tokens.bin").read_bytes() == before
    assert [p.name for p in (in_tmp / "data").iterdir() if p.name.startswith(".")] == []


def test_pretrain_empty_input_folder(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "empty").mkdir()
    with pytest.raises(InputError, match="empty: the folder contains no input files"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "empty"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")


def test_pretrain_too_little_text_for_one_block(in_tmp, tiny_tokenizer_dir):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": "x = 1"}])
    with pytest.raises(InputError, match=r"tokens do not fill one block of 128; .*remainder: pad"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")
    metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir,
                                           prepare_pretrain={"input": "in.jsonl", "remainder": "pad"}))
    assert metrics["blocks"] == 1 and metrics["padded_tokens"] > 100


_RESTATED = (re.compile(r"[Tt]he ([a-z ]+) is (\S+?)\.[\s\S]*the \1 is \2\."),  # a haystack's fact, or a prose fact
             re.compile(r"\n(\w+) = (\S+)\n[\s\S]*(?:\1 = |\1 == |print\(\1\)  # )\2"))  # an assignment recalled


@pytest.mark.parametrize("min_length", [None, 32])
def test_pretrain_synthetic_share_appends_long_range_sequences_in_the_base_mix(
        in_tmp, tiny_tokenizer, tiny_tokenizer_dir, texts, min_length):
    """The input's blocks first, unchanged; then as many synthetic blocks of the same length as make up
    synthetic_share of all, each one document (or, with synthetic_min_length, several whose lengths are multiples of
    it), facts restated far from where they were stated; the same bytes twice."""
    _write_jsonl(in_tmp / "in.jsonl", [{"text": t} for t in texts])
    plain = prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl"}))
    code = np.array(PackedBlocks(in_tmp / "data/pretrain").tokens)
    synthetic_params = {"input": "in.jsonl", "synthetic_share": 0.6, "synthetic_min_length": min_length}
    metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain=synthetic_params))
    blocks = PackedBlocks(in_tmp / "data/pretrain")
    n_code = plain["blocks"]
    assert metrics["synthetic_blocks"] == round(n_code * 0.6 / 0.4) == len(blocks) - n_code
    assert metrics["blocks"] == len(blocks) and blocks.meta["synthetic_blocks"] == metrics["synthetic_blocks"]
    assert np.array_equal(np.asarray(blocks.tokens[:n_code]), code)
    starts = [blocks.doc_starts(i).tolist() for i in range(n_code, len(blocks))]
    if min_length is None:
        assert starts == [[0]] * len(starts)
    else:
        assert all(s[0] == 0 and all(start % 32 == 0 for start in s) for s in starts)
        assert {len(s) for s in starts} > {1}, "several sequences to a block"
    pieces = [np.asarray(blocks[i])[a:b] for i, s in zip(range(n_code, len(blocks)), starts, strict=True)
              for a, b in zip(s, [*s[1:], 128], strict=True)]
    # The pieces long enough to hold a fact, other statements and the fact again (the tiny tokenizer is wordy).
    pieces = [piece for piece in pieces if len(piece) >= 96]
    synthetic = [tiny_tokenizer.decode(piece.tolist()) for piece in pieces]
    assert synthetic
    assert not any(np.array_equal(blocks[i], row) for i in range(n_code, len(blocks)) for row in code)

    def repeats_its_end(piece) -> bool:  # a copy: its last 6 tokens stood earlier in it
        tail = piece[-6:].tolist()
        return any(piece[k:k + 6].tolist() == tail for k in range(len(piece) - 6))

    restated = sum(any(form.search(text) for form in _RESTATED) or repeats_its_end(piece)
                   for text, piece in zip(synthetic, pieces, strict=True))
    assert restated >= len(synthetic) // 4, f"only {restated} of {len(synthetic)} synthetic blocks restate a fact"
    first = (in_tmp / "data/pretrain/tokens.bin").read_bytes()
    prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain=synthetic_params))
    assert (in_tmp / "data/pretrain/tokens.bin").read_bytes() == first


def test_synthetic_min_length_must_divide_the_block():
    with pytest.raises(ParamsError, match=r"prepare_pretrain\.synthetic_min_length: 48 does not divide "
                                          r"prepare_pretrain\.block_length 128"):
        parse_params(tiny_params_dict(prepare_pretrain={"synthetic_min_length": 48}))


def test_pretrain_synthetic_share_needs_enough_text(in_tmp, tiny_tokenizer, tiny_tokenizer_dir, texts):
    lines = texts[0].splitlines(keepends=True)
    cut = next(n for n in range(len(lines)) if len(tiny_tokenizer("".join(lines[:n]))["input_ids"]) > 160)
    _write_jsonl(in_tmp / "in.jsonl", [{"text": "".join(lines[:cut])}])  # one block of 128, not two
    with pytest.raises(InputError, match=r"prepare_pretrain\.synthetic_share: synthetic sequences of 128 tokens need"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={
            "input": "in.jsonl", "synthetic_share": 0.5, "synthetic_min_length": None}))
    _assert_nothing_finished(in_tmp, "data/pretrain")


def test_pretrain_all_records_skipped(in_tmp, tiny_tokenizer_dir):
    _write_jsonl(in_tmp / "in.jsonl", [b"not json", {"text": " "}])
    with pytest.raises(InputError, match="no documents to tokenize"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": "in.jsonl", "on_error": "skip"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")


class _BigVocabulary:
    """The tiny tokenizer pretending to have 70 000 tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __len__(self):
        return 70_000

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("stage", [prepare_pretrain, prepare_eval])
def test_vocabulary_too_large_for_the_chosen_dtype(in_tmp, tiny_tokenizer, tiny_tokenizer_dir, texts, monkeypatch,
                                                    stage):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": t} for t in texts[:2]])
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a, **k: _BigVocabulary(tiny_tokenizer))
    section = "prepare_pretrain" if stage is prepare_pretrain else "prepare_eval"
    with pytest.raises(InputError, match=rf"{section}\.dtype: uint16 cannot hold the ids of a 70000-token"):
        stage.run(_params(tiny_tokenizer_dir, **{section: {"input": "in.jsonl", "dtype": "uint16"}}))
    _assert_nothing_finished(in_tmp, "data/pretrain" if stage is prepare_pretrain else "data/eval")
    stage.run(_params(tiny_tokenizer_dir, **{section: {"input": "in.jsonl", "dtype": "auto"}}))
    out = in_tmp / ("data/pretrain" if stage is prepare_pretrain else "data/eval")
    assert json.loads((out / "meta.json").read_text())["dtype"] == "uint32"


def test_block_length_the_model_cannot_take(tiny_tokenizer_dir):
    with pytest.raises(ParamsError, match="prepare_pretrain.block_length 256 exceeds model.target_context 128"):
        _params(tiny_tokenizer_dir, prepare_pretrain={"block_length": 256})
    with pytest.raises(ParamsError, match="block_length vs s2attn: .*96 is not divisible by .*group size 64"):
        _params(tiny_tokenizer_dir, prepare_pretrain={"block_length": 96}, s2attn={"group_size": 64})
    with pytest.raises(ParamsError, match="prepare_sft.max_length 4096 exceeds model.target_context 128"):
        _params(tiny_tokenizer_dir, prepare_sft={"max_length": 4096})


def test_cli_reports_bad_input_in_one_line(in_tmp, tiny_tokenizer_dir, texts, capsys):
    _write_jsonl(in_tmp / "in.jsonl", [{"text": texts[0]}, {"text": texts[1]}, b'{"text": 1'])
    raw = tiny_params_dict(model={"name_or_path": str(tiny_tokenizer_dir)}, prepare_pretrain={"input": "in.jsonl"})
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert _cli.main("prepare_pretrain", prepare_pretrain.run, ["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "stages.prepare_pretrain: error: in.jsonl:3:11: malformed JSON" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_hub_name_without_network_is_a_clear_error(in_tmp, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="togethercomputer/RedPajama-Data-1T-Sample: not a local file or folder, "
                                         "and hub access is off"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={
            "input": "togethercomputer/RedPajama-Data-1T-Sample"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")


@pytest.mark.skipif(not SHARED_TEXT.exists(), reason="shared sample text not on this machine")
def test_pretrain_plain_text_file(in_tmp, tiny_tokenizer, tiny_tokenizer_dir):
    metrics = prepare_pretrain.run(_params(tiny_tokenizer_dir, prepare_pretrain={"input": str(SHARED_TEXT.resolve())}))
    assert metrics["documents"] == 1 and metrics["blocks"] == metrics["tokens"] // 128


# --- prepare_sft --------------------------------------------------------------------------------------------------

LONGALPACA = [
    {"instruction": "Below is a paper. " + "word " * 8 + "\nWhat is it about?", "output": "Words.", "file": "a.pdf"},
    {"instruction": "Summarise:", "input": "A short input text.", "output": "A summary."},
    {"instruction": "Q? " + "long " * 400, "output": "Too long to keep."},
    {"instruction": "Name a colour.", "output": "Blue."},
]


def _expected_prompt_ids(tokenizer, record, system_prompt):
    example = Instruction(record["instruction"], record["output"], record.get("input", ""))
    return tokenizer(render_prompt(example, "llama2", system_prompt=system_prompt))["input_ids"]


def test_sft_labels_are_masked_exactly_on_the_prompt(in_tmp, tiny_tokenizer, tiny_tokenizer_dir):
    (in_tmp / "longalpaca.json").write_text(json.dumps(LONGALPACA), encoding="utf-8")
    params = _params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json", "truncation": "drop",
                                                      "system_prompt": "Be brief."})
    metrics = prepare_sft.run(params)
    assert metrics["examples"] == 3 and metrics["dropped_prompt_too_long"] == 1
    ran_with = json.loads((in_tmp / "data/logs/prepare_sft/params.json").read_text())["params"]
    assert ran_with["max_length"] == params.model.target_context  # the default, resolved
    assert json.loads((in_tmp / "data/metrics/prepare_sft.json").read_text()) == metrics

    dataset = datasets.load_from_disk(str(in_tmp / "data/sft"))
    assert dataset.column_names == ["input_ids", "labels", "length"] and len(dataset) == 3
    kept = [r for r in LONGALPACA if "Too long" not in r["output"]]
    for row, record in zip(dataset, kept, strict=True):
        prompt = _expected_prompt_ids(tiny_tokenizer, record, params.prepare_sft.system_prompt)
        answer = tiny_tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + answer and row["length"] == len(prompt) + len(answer)
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer
        assert prompt[0] == tiny_tokenizer.bos_token_id
    assert metrics["label_tokens"] == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in dataset)


def test_sft_truncate_middle_keeps_over_long_examples_with_answer_labels(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "longalpaca.json").write_text(json.dumps(LONGALPACA), encoding="utf-8")
    metrics = prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json",
                                                                       "truncation": "truncate_middle",
                                                                       "system_prompt": "Be brief."}))
    assert metrics["examples"] == 4 and metrics["prompt_truncated"] == 1 and metrics["dropped_prompt_too_long"] == 0
    dataset = datasets.load_from_disk(str(in_tmp / "data/sft"))
    for row in dataset:
        assert len(row["input_ids"]) <= 128
        assert any(x != IGNORE_INDEX for x in row["labels"]), "an example with every label masked"


def test_sft_length_grouped_batches(in_tmp, tiny_tokenizer_dir):
    sizes = np.random.default_rng(0).permutation(np.arange(1, 40))
    records = [{"instruction": "Repeat: " + "la " * int(n), "output": "la " * int(n % 5 + 1)} for n in sizes]
    (in_tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    common = {"input": "in.jsonl", "group_batch_size": 4}
    plain = prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={**common, "out_dir": "plain"}))
    grouped = prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={**common, "group_by_length": True},
                                      sft={"replay_share": 0}))
    assert grouped["padding_fraction"] < plain["padding_fraction"] == plain["padding_fraction_ungrouped"]
    a = datasets.load_from_disk(str(in_tmp / "plain"))
    b = datasets.load_from_disk(str(in_tmp / "data/sft"))
    assert sorted(map(tuple, a["input_ids"])) == sorted(map(tuple, b["input_ids"]))
    assert b["length"][:4] == sorted(b["length"][:4], reverse=True) and max(b["length"][:4]) == max(a["length"])


def test_sft_bad_record_stops_with_its_item_or_is_skipped(in_tmp, tiny_tokenizer_dir):
    records = [LONGALPACA[3], {"instruction": "no answer here"}, LONGALPACA[1]]
    (in_tmp / "longalpaca.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(InputError, match=r"longalpaca\.json: item 2: no 'output' field"):
        prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json"}))
    _assert_nothing_finished(in_tmp, "data/sft")
    metrics = prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json", "on_error": "skip"}))
    assert metrics["examples"] == 2 and metrics["skipped_by_reason"] == {"bad_record": 1}


def test_sft_every_example_dropped_is_an_error(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "longalpaca.json").write_text(json.dumps([LONGALPACA[2]]), encoding="utf-8")
    with pytest.raises(InputError, match="no example left: 1 dropped: prompt alone ≥ max_length 128 tokens; "
                                         "use truncation: truncate_middle"):
        prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json", "truncation": "drop"}))
    _assert_nothing_finished(in_tmp, "data/sft")


@pytest.mark.parametrize(("name", "content", "on_error", "message"), [
    ("empty_list.json", "[]", "raise", r"no example left: the input holds no records \(1 file read, all empty\)$"),
    ("empty.json", "", "raise", r"no example left: the input holds no records \(1 file read, all empty\)$"),
    ("empty.jsonl", "\n", "raise", r"no example left: the input holds no records \(1 file read, all empty\)$"),
    ("all_bad.jsonl", '{"instruction": "no answer"}\n[1]\n{oops\n', "skip",
     r"no example left: all 3 records were skipped as bad \(1 bad_record, 1 malformed_json, 1 not_an_object;"),
])
def test_sft_nothing_read_says_what_happened(in_tmp, tiny_tokenizer_dir, name, content, on_error, message):
    (in_tmp / name).write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": name, "on_error": on_error}))
    assert "truncate" not in str(err.value) and "max_length" not in str(err.value)
    _assert_nothing_finished(in_tmp, "data/sft")


def test_sft_chat_template_needs_one(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "longalpaca.json").write_text(json.dumps(LONGALPACA[:1]), encoding="utf-8")
    with pytest.raises(InputError, match="prepare_sft.template: chat_template, but the tokenizer has no chat template"):
        prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "longalpaca.json",
                                                                 "template": "chat_template"}))


# --- prepare_eval -------------------------------------------------------------------------------------------------

def test_eval_stream_holds_every_document_with_offsets(in_tmp, tiny_tokenizer, tiny_tokenizer_dir, texts):
    folder = in_tmp / "docs"
    folder.mkdir()
    for i, text in enumerate(texts[:6]):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    metrics = prepare_eval.run(_params(tiny_tokenizer_dir,
                                       prepare_eval={"input": "docs", "lengths": [100, 1000, 5000]}))

    stream = TokenStream(in_tmp / "data/eval")
    ids = tiny_tokenizer(texts[:6], add_special_tokens=False)["input_ids"]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert len(stream) == 6 and stream.tokens.dtype == np.uint16
    assert [stream.document(i).tolist() for i in range(6)] == [[bos, *d, eos] for d in ids]
    lengths = [len(d) + 2 for d in ids]
    assert metrics["documents_reaching"] == {str(n): sum(x >= n for x in lengths) for n in (100, 1000, 5000)}
    assert metrics["tokens"] == sum(lengths) == len(stream.tokens)
    assert stream.meta["documents_reaching"] == metrics["documents_reaching"]
    assert json.loads((in_tmp / "data/metrics/prepare_eval.json").read_text()) == metrics


def test_eval_default_lengths_and_uint32(in_tmp, tiny_tokenizer_dir, texts):
    _write_jsonl(in_tmp / "docs.jsonl", [{"text": t} for t in texts[:3]] + [b"{bad"])
    metrics = prepare_eval.run(_params(tiny_tokenizer_dir, prepare_eval={"input": "docs.jsonl", "dtype": "uint32",
                                                                         "on_error": "skip"}))
    assert list(metrics["documents_reaching"]) == ["32", "64", "128"]  # target_context 128 / 4, / 2, × 1
    ran_with = json.loads((in_tmp / "data/logs/prepare_eval/params.json").read_text())["params"]
    assert ran_with["lengths"] == [32, 64, 128] and ran_with["dtype"] == "uint32"
    assert metrics["dtype"] == "uint32" and metrics["skipped_by_reason"] == {"malformed_json": 1}
    assert (in_tmp / "data/eval/tokens.bin").stat().st_size == 4 * metrics["tokens"]


def test_eval_bad_inputs(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "docs").mkdir()
    with pytest.raises(InputError, match="docs: the folder contains no input files"):
        prepare_eval.run(_params(tiny_tokenizer_dir, prepare_eval={"input": "docs"}))
    (in_tmp / "docs/a.txt").write_bytes(b"fine\n\xff\xfe")
    with pytest.raises(InputError, match=r"a\.txt:2: not valid UTF-8"):
        prepare_eval.run(_params(tiny_tokenizer_dir, prepare_eval={"input": "docs"}))
    _assert_nothing_finished(in_tmp, "data/eval")


# --- prepare_corpus and the LongQA generator ----------------------------------------------------------------------

def _sections(document: str) -> dict[str, str]:
    parts = re.split(r"^# ==== file: (.+) ====\n", document, flags=re.M)
    assert parts[0] == ""
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _verify_with_ast(example: dict) -> None:
    """Recompute the answer from the document with `ast` (the generator checks itself with regexes)."""
    kind, name = example["meta"]["kind"], example["meta"]["name"]
    modules = {file: ast.parse(body) for file, body in _sections(instruction_document(example["instruction"])).items()}
    if kind == "constant_value":
        values = [ast.get_source_segment(body, node.value)
                  for file, body in _sections(instruction_document(example["instruction"])).items()
                  for node in ast.parse(body).body
                  if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets)]
        assert values == [example["output"]]
        return
    defining = {file: [n.name for n in module.body
                       if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
                for file, module in modules.items()}
    files = [file for file, names in defining.items() if name in names]
    assert len(files) == 1 and defining[files[0]].count(name) == 1
    if kind == "defining_file":
        assert example["output"] == files[0]
    else:
        functions = [n.name for n in modules[files[0]].body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        assert functions[functions.index(name) + 1] == example["output"]
        assert len(functions) >= 2


def test_longqa_questions_are_verifiable_and_spread_over_the_context(tiny_tokenizer):
    files = [(d.name, d.text) for d in stdlib_documents("extend", max_documents=60)]

    def count(batch):
        return [len(x) for x in tiny_tokenizer(batch)["input_ids"]]

    examples, stats = generate_longqa(files, count, n_examples=60, min_tokens=400, max_tokens=900, seed=3)
    again, _ = generate_longqa(files, count, n_examples=60, min_tokens=400, max_tokens=900, seed=3)
    assert examples == again, "not deterministic"
    assert len(examples) == 60
    assert all(stats.kinds[k] > 0 for k in KINDS), stats.kinds
    assert min(stats.depth_bands) >= 60 // DEPTH_BANDS - 2, stats.depth_bands  # early, middle and late alike
    asked = [(e["meta"]["kind"], e["meta"]["name"], e["file"]) for e in examples]
    assert len(set(asked)) == len(asked)
    late_evidence = 0
    for example in examples:
        _verify_with_ast(example)
        assert set(example) == {"instruction", "output", "file", "meta"}
        assert 400 <= count([example["instruction"]])[0] <= 900
        document = instruction_document(example["instruction"])
        lines = document.splitlines()
        name, kind = example["meta"]["name"], example["meta"]["kind"]
        definition = re.compile(rf"(class|(async )?def) {name}\b|{name}\s*[:=]")
        line = next(i for i, text in enumerate(lines) if definition.match(text))
        late_evidence += line >= 0.8 * len(lines)
        units = [u for f, body in _sections(document).items() for u in source_units(body)]
        same_kind = {"constant_value": "constant", "next_function": "function"}.get(kind)
        if same_kind:  # distractors: other definitions of the same kind
            assert sum(u.kind == same_kind for u in units) >= 2
        else:
            assert len(_sections(document)) >= 2
        if kind != "constant_value":  # the question does not give the answer away
            assert example["output"] not in example["instruction"].rsplit("Question:", 1)[1]
    assert late_evidence <= 0.4 * len(examples), "the last lines answer too many questions"


def test_stdlib_documents_skip_test_suites_and_site_packages(tmp_path):
    for name in ("a.py", "pkg/b.py", "pkg/test.py", "pkg/tests/c.py", "site-packages/x/d.py", "idle_test/e.py",
                 "pkg/notes.txt", "pkg/empty.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("" if name.endswith("empty.py") else f"# {name}\n")
    documents = list(stdlib_documents(root=tmp_path))
    assert [d.name for d in documents] == ["a.py", "pkg/b.py", "pkg/test.py"]  # sorted; a *file* named test stays
    assert documents[1].text == "# pkg/b.py\n"


@pytest.mark.parametrize("text", [
    "A = 1\nB = 'é' ; C = (2,\n     3)\nD = b'x'\n",
    "A = 1\r\nB = (2,\r\n 3)\r\n\x0cC = 'a\x0cb'\r\n",  # CRLF; a form feed does not end a line for ast
    "A = 1\rB = (2,\r3)\rC = 'ü'\r",  # old Mac line ends: a multi-line literal without a \n in it
    "X = 'no newline at the end'",
])
def test_constant_values_are_the_literals_source_as_ast_reads_it(text):
    """source_units reads each constant's literal from the module's lines split once; it must be exactly what
    ast.get_source_segment gives (the reference) for every line-ending convention."""
    tree = ast.parse(text)
    expected = {n.targets[0].id: ast.get_source_segment(text, n.value) for n in tree.body if isinstance(n, ast.Assign)}
    expected = {name: source for name, source in expected.items() if "\n" not in source}
    found = {u.name: u.value for u in source_units(text) if u.kind == "constant"}
    assert found == expected and found


def test_prepare_corpus_writes_the_embedded_inputs(in_tmp, tiny_tokenizer, tiny_tokenizer_dir):
    params = _params(tiny_tokenizer_dir)
    metrics = prepare_corpus.run(params)
    corpus = in_tmp / "data/corpus"
    assert json.loads((in_tmp / "data/metrics/prepare_corpus.json").read_text()) == metrics

    records = [json.loads(line) for line in (corpus / "pretrain.jsonl").read_text("utf-8").splitlines()]
    extend = list(stdlib_documents("extend", max_documents=params.embedded_corpus.max_documents))
    assert [r["text"] for r in records] == [d.text for d in extend]
    assert all(r["meta"]["split"] == "extend" and r["meta"]["source"] == "python-stdlib" for r in records)

    docs = sorted((corpus / "eval").glob("doc_*.txt"))
    assert len(docs) == metrics["eval_documents"] == params.prepare_corpus.eval_documents
    heldout = {d.name for d in stdlib_documents("heldout", max_documents=params.embedded_corpus.max_documents)}
    for doc in docs:
        text = doc.read_text("utf-8")
        assert len(tiny_tokenizer(text)["input_ids"]) >= 2 * params.model.target_context
        assert set(_sections(text)) <= heldout  # only files the base model never saw

    for name, count in (("longqa.json", 16), ("longqa_heldout.json", 8)):
        examples = json.loads((corpus / name).read_text("utf-8"))
        assert len(examples) == count == metrics[name.removesuffix(".json") + "_examples"]
        for example in examples:
            choices = example["meta"].get("choices")  # a four-choice question answers with the choice's letter
            _verify_with_ast({**example, "output": choices[ord(example["output"][-3]) - ord("A")]} if choices
                             else example)
        asked = [e for e in examples if "choices" in e["meta"]]
        assert len(asked) == (metrics["longqa_choice_questions"] if name == "longqa.json" else 0)
    assert 0 < metrics["longqa_choice_questions"] <= round(16 * params.prepare_corpus.longqa_choice_share)
    # The LongBench-format sets (tests/test_longbench.py checks their answers): held-out code only.
    assert metrics["longbench_examples"] == dict.fromkeys(
        ("multifieldqa_en", "passage_count", "passage_retrieval_en", "lcc"), 2)
    for dataset, count in metrics["longbench_examples"].items():
        records = [json.loads(line) for line in (corpus / "longbench" / f"{dataset}.jsonl").read_text().splitlines()]
        assert len(records) == count and all(r["dataset"] == dataset and r["answers"] for r in records)
    # The LongBench v2 set (tests/test_longbench2.py checks its construction): LongBench v2 records, held-out code.
    questions = read_records(corpus / "longbench2.jsonl")
    assert len(questions) == metrics["longbench2_examples"] >= 1
    assert sum(metrics["longbench2_by_group"][d] for d in ("easy", "hard")) == len(questions)
    heldout_questions = {e["instruction"].rsplit("Question: ", 1)[1].split(" Answer with")[0]
                         for e in json.loads((corpus / "longqa_heldout.json").read_text("utf-8"))}
    assert {q["question"] for q in questions} <= heldout_questions
    assert not list((in_tmp / "data").glob(".*"))

    sft = prepare_sft.run(params)  # the default chain: prepare_sft reads what prepare_corpus wrote
    assert sft["examples"] == 16 and sft["skipped_records"] == 0


def test_prepare_corpus_question_that_does_not_fit(in_tmp, tiny_tokenizer_dir):
    with pytest.raises(InputError, match=r"prepare_corpus\.longqa_max_tokens: max_tokens 100 leaves no room"):
        prepare_corpus.run(_params(tiny_tokenizer_dir, prepare_corpus={"longqa_min_tokens": 50,
                                                                       "longqa_max_tokens": 100}))
    _assert_nothing_finished(in_tmp, "data/corpus")


# --- inputs the probe of issue #6 found -------------------------------------------------------------------------

def test_pretrain_truncated_zst_stops_even_with_skip(in_tmp, tiny_tokenizer_dir, texts):
    records = [{"text": f"{i}: " + texts[i % len(texts)][:1500], "meta": {"i": i}} for i in range(400)]
    data = zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    (in_tmp / "rp.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=r"rp\.jsonl\.zst: cannot read: the file is truncated"):
        prepare_pretrain.run(_params(tiny_tokenizer_dir,
                                     prepare_pretrain={"input": "rp.jsonl.zst", "on_error": "skip"}))
    _assert_nothing_finished(in_tmp, "data/pretrain")
    assert not (in_tmp / "data/metrics/prepare_pretrain.json").exists()


@pytest.mark.parametrize(("stage", "section"), [(prepare_pretrain, "prepare_pretrain"), (prepare_eval, "prepare_eval")])
def test_nothing_read_says_what_happened(in_tmp, tiny_tokenizer_dir, stage, section):
    (in_tmp / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jsonl: no documents.*: the input holds no records \(1 file read"):
        stage.run(_params(tiny_tokenizer_dir, **{section: {"input": "empty.jsonl"}}))
    _write_jsonl(in_tmp / "bad.jsonl", [b"{x", {"text": None}])
    with pytest.raises(InputError, match=r"all 2 records were skipped as bad \(1 malformed_json, 1 null_text;"):
        stage.run(_params(tiny_tokenizer_dir, **{section: {"input": "bad.jsonl", "on_error": "skip"}}))


class _NoHub:
    """AutoTokenizer.from_pretrained that fails the test if it is ever reached (it would try the hub)."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        cls.calls.append(name)
        raise AssertionError(f"AutoTokenizer.from_pretrained({name!r}) was called")


@pytest.mark.parametrize("name", ["data/base_mdoel", "./base_model", "ABSOLUTE", "~/models/llama-2-7b",
                                  "models/llama/7b"])
def test_a_local_looking_model_path_that_does_not_exist_fails_at_once(in_tmp, monkeypatch, name):
    import transformers

    monkeypatch.setattr(transformers, "AutoTokenizer", _NoHub)
    monkeypatch.setenv("HOME", str(in_tmp))
    (in_tmp / "data").mkdir()
    name = str(in_tmp / "missing/model") if name == "ABSOLUTE" else name
    _write_jsonl(in_tmp / "in.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match=r"model\.name_or_path '.*': no such folder \(a local path, so the hub was "
                                         r"not asked\)"):
        prepare_pretrain.run(parse_params(tiny_params_dict(model={"name_or_path": name},
                                                           prepare_pretrain={"input": "in.jsonl"})))
    assert _NoHub.calls == []


def test_a_model_folder_without_a_tokenizer_says_so(in_tmp):
    (in_tmp / "model").mkdir()
    (in_tmp / "model/config.json").write_text('{"model_type": "llama"}')
    _write_jsonl(in_tmp / "in.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match=r"model\.name_or_path 'model': the folder has no tokenizer \(none of "
                                         r"tokenizer\.json"):
        prepare_pretrain.run(parse_params(tiny_params_dict(model={"name_or_path": "model"},
                                                           prepare_pretrain={"input": "in.jsonl"})))
    (in_tmp / "model/config.json").unlink()
    (in_tmp / "model/NOT_BUILT.txt").write_text("No embedded base model was built")
    with pytest.raises(InputError, match="holds only NOT_BUILT.txt: build_base_model did not build a model there"):
        prepare_eval.run(parse_params(tiny_params_dict(model={"name_or_path": "model"},
                                                       prepare_eval={"input": "in.jsonl"})))
    (in_tmp / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"model\.name_or_path 'weights\.bin': is a file"):
        prepare_eval.run(parse_params(tiny_params_dict(model={"name_or_path": "weights.bin"},
                                                       prepare_eval={"input": "in.jsonl"})))


def test_sft_json_holding_one_object_is_refused(in_tmp, tiny_tokenizer_dir):
    (in_tmp / "one.json").write_text(json.dumps(LONGALPACA[0]), encoding="utf-8")
    with pytest.raises(InputError, match=r"one\.json: a JSON object, not an array of records"):
        prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "one.json", "on_error": "skip"}))
    (in_tmp / "one.json").write_text(json.dumps([LONGALPACA[0]]), encoding="utf-8")
    assert prepare_sft.run(_params(tiny_tokenizer_dir, prepare_sft={"input": "one.json"}))["examples"] == 1


def test_eval_text_field_does_not_apply_to_txt_files(in_tmp, tiny_tokenizer_dir, texts):
    (in_tmp / "docs").mkdir()
    (in_tmp / "docs/a.txt").write_text(texts[0], encoding="utf-8")
    metrics = prepare_eval.run(_params(tiny_tokenizer_dir, prepare_eval={"input": "docs", "text_field": "content"}))
    assert metrics["documents"] == 1 and metrics["skipped_records"] == 0


# --- bos: auto follows the model -----------------------------------------------------------------------------------

def test_a_chat_marker_bos_model_s_data_stages_run_with_the_defaults(in_tmp, smol_chat_model_dir, texts):
    """SmolLM2-like (BOS `<|im_start|>`, ChatML): `bos: auto` (params.yaml's) resolves to none when params.yaml loads,
    and both data stages run, no document opened by the chat marker."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_chat_model_dir)
    _write_jsonl(in_tmp / "in.jsonl", [{"text": t} for t in texts])
    (in_tmp / "eval").mkdir()
    for i, text in enumerate(texts[:4]):
        (in_tmp / f"eval/{i}.txt").write_text(text, encoding="utf-8")
    params = _params(smol_chat_model_dir, prepare_pretrain={"input": "in.jsonl", "remainder": "pad"},
                     prepare_eval={"input": "eval"}, eval_models={"base": {"path": None}, "base_pi": {"path": None}})
    assert params.prepare_pretrain.bos == params.prepare_eval.bos == "none"
    prepare_pretrain.run(params)
    prepare_eval.run(params)
    blocks = PackedBlocks(in_tmp / "data/pretrain")
    assert tokenizer.bos_token_id not in np.asarray(blocks.tokens)
    stream = TokenStream(in_tmp / "data/eval")
    ids = tokenizer(texts[:4], add_special_tokens=False)["input_ids"]
    assert [stream.document(i).tolist() for i in range(4)] == [[*d, tokenizer.eos_token_id] for d in ids]


def test_bos_auto_left_to_the_stage_follows_the_tokenizer(tiny_tokenizer, smol_chat_model_dir):
    """A hub model's tokenizer is known only to the stage: special_ids resolves `auto` itself, as params.yaml does."""
    from transformers import AutoTokenizer

    from longlora.data.tokenizing import special_ids

    chat = AutoTokenizer.from_pretrained(smol_chat_model_dir)
    assert special_ids(chat, "auto")[1] is None
    assert special_ids(tiny_tokenizer, "auto")[1] == tiny_tokenizer.bos_token_id
    with pytest.raises(InputError, match=r"prepare_eval.bos: document, but the tokenizer's BOS '<\|im_start\|>' opens "
                                         "every turn of its chat template"):
        special_ids(chat, "document", "prepare_eval.bos")
