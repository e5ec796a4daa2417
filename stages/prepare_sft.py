"""Stage `prepare_sft`: LongAlpaca-format instructions → tokenized SFT examples, labels masked on the prompt.

    .venv/bin/python -m stages.prepare_sft     # or: dvc repro prepare_sft

The default params read data/corpus/longqa.json, long-code questions sized to fit model.target_context. Each
record {"instruction", "output", optional "input"} becomes the paper code's Llama-2 prompt
(`[INST]{instruction}[/INST]`, or the system-prompt variant when `input` is present) or the tokenizer's own chat
template (`template` param), followed by `output` + EOS. Labels are −100 on the prompt; examples longer than
`max_length` (default model.target_context) are dropped when the prompt alone leaves no room for an answer token,
or cut in the middle of the prompt (`truncation: truncate_middle`) — never kept with every label masked.
Output: data/sft/ (a Hugging Face dataset, `datasets.load_from_disk`: input_ids, labels, length; in length-grouped
batches when `group_by_length`, which order.json beside it records for the sft stage; chat_template.jinja: the
prompt format as a chat template, which the sft stage saves with the fine-tuned model) and
data/metrics/prepare_sft.json (kept, dropped, truncated, tokens, padding).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from longlora.data.readers import Problems, ReadStats, iter_records
from longlora.data.sft import (
    CHAT_TEMPLATE_FILE,
    chat_template_of,
    fit_example,
    length_grouped_order,
    padding_fraction,
    parse_instruction,
    prompt_has_special_tokens,
    render_prompt,
    write_order,
)
from longlora.data.tokenizing import load_tokenizer, rust_parallelism
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli
from stages.params import Params

log = logging.getLogger(__name__)

BATCH_RECORDS = 256
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32())])


def run(params: Params) -> dict:
    """Render prompts, tokenize, mask, fit to max_length, write the dataset; return metrics."""
    with params.output("prepare_sft") as out:  # checked and locked before any work
        return _run(params, out)


def _run(params: Params, out: StageOutput) -> dict:
    p = params.prepare_sft
    tokenizer = load_tokenizer(params.model.name_or_path, params.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise InputError("model.name_or_path: the tokenizer has no EOS token, which ends every answer")
    if p.template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise InputError("prepare_sft.template: chat_template, but the tokenizer has no chat template; use llama2")
    read = ReadStats()
    problems = Problems(p.on_error, read)
    records = iter_records(p.input, on_error=p.on_error, stats=read, hub_split=p.hub_split, hub_config=p.hub_config)
    records = itertools.islice(records, p.max_examples)
    counts = dict.fromkeys(("kept", "dropped", "answer_truncated", "prompt_truncated"), 0)
    lengths: list[int] = []
    label_tokens = 0

    with out.publish() as tmp, out.scratch() as scratch:
        raw = scratch / "examples.arrow"
        with pa.OSFile(str(raw), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as arrow:
            while batch := list(itertools.islice(records, BATCH_RECORDS)):
                ids, labels = [], []
                for fitted in _fit_batch(batch, tokenizer, p, problems):
                    if fitted.input_ids is None:
                        counts["dropped"] += 1
                        continue
                    counts["kept"] += 1
                    if fitted.status != "kept":
                        counts[fitted.status] += 1
                    ids.append(fitted.input_ids.astype(np.int32))
                    labels.append(fitted.labels.astype(np.int32))
                    label_tokens += int((fitted.labels != -100).sum())
                if ids:
                    lengths.extend(len(x) for x in ids)
                    arrow.write_batch(pa.record_batch(
                        [_list_array(ids), _list_array(labels), pa.array([len(x) for x in ids], pa.int32())],
                        schema=SCHEMA))
        examples = counts["kept"]
        if examples == 0:
            raise InputError(f"prepare_sft.input {p.input}: no example left: {_why_none(read, counts, p.max_length)}")
        order = length_grouped_order(lengths, p.group_batch_size, p.seed) if p.group_by_length else None
        _save_dataset(raw, tmp, order)
        write_order(tmp, p.group_batch_size if p.group_by_length else None)
        (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template_of(p.template, tokenizer), encoding="utf-8")

    written = np.asarray(lengths)[order] if order is not None else np.asarray(lengths)
    metrics = {
        "examples": examples,
        "dropped_prompt_too_long": counts["dropped"],
        "answer_truncated": counts["answer_truncated"],
        "prompt_truncated": counts["prompt_truncated"],
        "tokens": int(sum(lengths)),
        "label_tokens": label_tokens,
        "longest": int(max(lengths)),
        "mean_length": round(float(np.mean(lengths)), 1),
        "padding_fraction": round(padding_fraction(written, p.group_batch_size), 4),
        "padding_fraction_ungrouped": round(padding_fraction(lengths, p.group_batch_size), 4),
        **read.as_dict(),
    }
    return out.write_metrics(metrics)


def _why_none(read: ReadStats, counts: dict, max_length: int) -> str:
    """What left nothing to write: no records, every record bad, or every prompt too long (only then is
    truncate_middle the answer)."""
    if not counts["dropped"]:
        return read.why_nothing()
    skipped = sum(read.skipped.values())
    also = f"; {skipped} more skipped as bad" if skipped else ""
    return (f"{counts['dropped']} dropped: prompt alone ≥ max_length {max_length} tokens{also}; use truncation: "
            "truncate_middle or a longer prepare_sft.max_length")


def _fit_batch(batch, tokenizer, p, problems: Problems):
    valid = []
    for record in batch:
        try:
            example = parse_instruction(record.data)
            prompt = render_prompt(example, p.template, tokenizer, p.system_prompt)
        except ValueError as err:
            problems("bad_record", f"{record.where}: {err}")
            continue
        valid.append((prompt, example.output))
    if not valid:
        return
    prompts, answers = zip(*valid, strict=True)
    with rust_parallelism():
        # Separately, so that the prompt's tokens are exactly those the model gets at inference.
        prompt_ids = tokenizer(list(prompts), add_special_tokens=not prompt_has_special_tokens(p.template))
        answer_ids = tokenizer(list(answers), add_special_tokens=False)
    eos = tokenizer.eos_token_id
    for prompt, answer in zip(prompt_ids["input_ids"], answer_ids["input_ids"], strict=True):
        yield fit_example(prompt, [*answer, eos], p.max_length, p.truncation)


def _list_array(rows: list[np.ndarray]) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows)))


def _save_dataset(raw: Path, out: Path, order: np.ndarray | None) -> None:
    import datasets
    from datasets.table import MemoryMappedTable

    # datasets fingerprints a dataset read from a file by its path and mtime, and save_to_disk writes that
    # fingerprint into state.json: one derived from the examples and their order keeps the folder byte-identical
    # from run to run (DVC sees an unchanged output).
    content = hashlib.sha256()
    with open(raw, "rb") as examples:
        for chunk in iter(lambda: examples.read(1 << 20), b""):
            content.update(chunk)
    if order is not None:
        content.update(np.asarray(order, np.int64).tobytes())
    fingerprint = content.hexdigest()[:16]
    dataset = datasets.Dataset(MemoryMappedTable.from_file(str(raw)), fingerprint=fingerprint)
    if order is not None:
        dataset = dataset.select(order.tolist(), new_fingerprint=fingerprint)
    # `out` is the fresh folder StageOutput.publish hands out: save straight into it.
    dataset.save_to_disk(str(out))


if __name__ == "__main__":
    _cli.exit_process(_cli.main("prepare_sft", run))
