"""Stage `prepare_eval`: long documents → one flat token stream with document offsets, for perplexity evaluation.

    .venv/bin/python -m stages.prepare_eval     # or: dvc repro prepare_eval

Input (the default params: the held-out documents of data/corpus/eval/): a folder of text files, one document each (PG19
/ proof-pile style), or .jsonl/.parquet records with a text field, or a hub dataset name (needs the network). Each
document becomes `[BOS] tokens EOS`, back to back, like the `.bin` token files LongLoRA's evaluation reads — uint16 when
the vocabulary fits, else uint32 — with the offsets of every document, so evaluation can stay within documents or slide
across them.
Output: data/eval/ (tokens.bin, doc_offsets.npy, meta.json — read it with `longlora.data.packing.TokenStream`) and
data/metrics/prepare_eval.json, which counts the documents that reach each evaluation length (`lengths`, default
model.target_context / 4, / 2, × 1). prepare_corpus joins held-out files until each document reaches the longest
default length.
"""

from __future__ import annotations

import itertools

import numpy as np

from longlora.data.packing import TokenStreamWriter, join_encoded
from longlora.data.readers import ReadStats, batched_texts, iter_texts
from longlora.data.tokenizing import BatchEncoder, encode_batches, load_tokenizer, special_ids, token_dtype
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli
from stages.params import Params


def run(params: Params) -> dict:
    """Tokenize the documents into one stream, record offsets and length coverage; return metrics."""
    with params.output("prepare_eval") as out:  # checked and locked before any work
        return _run(params, out)


def _run(params: Params, out: StageOutput) -> dict:
    p = params.prepare_eval
    tokenizer = load_tokenizer(params.model.name_or_path, params.model.trust_remote_code)
    eos_id, bos_id, _ = special_ids(tokenizer, p.bos, "prepare_eval.bos")
    dtype = token_dtype(len(tokenizer), p.dtype, "prepare_eval.dtype")
    encoder = BatchEncoder(tokenizer, dtype)
    read = ReadStats()
    records = iter_texts(p.input, text_field=p.text_field, on_error=p.on_error, stats=read,
                         hub_split=p.hub_split, hub_config=p.hub_config)
    batches = batched_texts(itertools.islice(records, p.max_documents), p.text_field, p.batch_chars)
    doc_lengths: list[np.ndarray] = []

    with out.publish() as tmp:
        writer = TokenStreamWriter(tmp, dtype)
        try:
            for lengths, flat in encode_batches(batches, encoder):
                stream, _ = join_encoded(lengths, flat, eos_id, bos_id)
                joined = lengths + (1 if bos_id is None else 2)
                writer.write(stream, joined)
                doc_lengths.append(joined)
        except BaseException:
            writer.abort()
            raise
        if not doc_lengths:
            writer.abort()
            raise InputError(f"prepare_eval.input {p.input}: no documents: {read.why_nothing()}")
        lengths = np.concatenate(doc_lengths)
        reaching = {str(n): int((lengths >= n).sum()) for n in p.lengths}
        writer.close({"tokenizer": params.model.name_or_path, "vocab_size": len(tokenizer), "eos_id": eos_id,
                      "bos_id": bos_id, "evaluation_lengths": list(p.lengths), "documents_reaching": reaching})

    metrics = {
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "dtype": dtype.name,
        "shortest": int(lengths.min()),
        "median_length": int(np.median(lengths)),
        "longest": int(lengths.max()),
        "documents_reaching": reaching,
        **read.as_dict(),
    }
    return out.write_metrics(metrics)


if __name__ == "__main__":
    _cli.exit_process(_cli.main("prepare_eval", run))
