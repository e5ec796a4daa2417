"""Stage `prepare_pretrain`: RedPajama-format text → fixed blocks of model.target_context tokens, streamed.

    .venv/bin/python -m stages.prepare_pretrain     # or: dvc repro prepare_pretrain

The default params read the `extend`-split files of data/corpus/pretrain.jsonl and append three times as many synthetic
blocks. The input may also be a .jsonl.gz/.jsonl.zst/.parquet file, a folder of them, or a hub dataset name (the paper
used togethercomputer/RedPajama-Data-1T-Sample; needs the network). Memory stays bounded: documents are read, tokenized
(the fast tokenizer's batch encoder, all cores) and packed batch by batch.

Documents are joined as `[BOS] text EOS` (`bos` param) and cut into blocks; every block's document start offsets
are kept for document-aware attention; the final partial block is dropped or padded (`remainder`), and counted.
With `synthetic_share` (the embedded default), blocks of synthetic long-range sequences built around those tokens
follow them (longlora/embedded/synthetic.py, build_base_model's mix: docs/extension.md).
Output: data/pretrain/ (tokens.bin, doc_starts.bin, doc_index.npy, meta.json — read it with
`longlora.data.packing.PackedBlocks`) and data/metrics/prepare_pretrain.json (documents, tokens, blocks, dropped or
padded
tokens, skipped records, tokens/s). Its speed against the tokenizer's raw batch encoder: docs/performance.md
(benchmarks/pack_speed.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter

import numpy as np
from tqdm.auto import tqdm

from longlora.data.packing import BlockPacker, Packed, PackedBlocksWriter
from longlora.data.readers import ReadStats, batched_texts, iter_texts
from longlora.data.tokenizing import BatchEncoder, encode_batches, load_tokenizer, special_ids, token_dtype
from longlora.embedded.synthetic import WORDS, word_counts
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli
from stages.params import Params

log = logging.getLogger(__name__)

SYNTHETIC_CHUNK = 64
"""Synthetic blocks drawn and written at a time."""


def run(params: Params) -> dict:
    """Tokenize, join, cut into blocks, write them with their document boundaries; return metrics."""
    with params.output("prepare_pretrain") as out:  # checked and locked before any work
        return _run(params, out)


def _run(params: Params, out: StageOutput) -> dict:
    p = params.prepare_pretrain
    tokenizer = load_tokenizer(params.model.name_or_path, params.model.trust_remote_code)
    eos_id, bos_id, pad_id = special_ids(tokenizer, p.bos, "prepare_pretrain.bos")
    dtype = token_dtype(len(tokenizer), p.dtype, "prepare_pretrain.dtype")
    encoder = BatchEncoder(tokenizer, dtype)
    packer = BlockPacker(p.block_length, eos_id, bos_id, dtype)
    read = ReadStats()
    records = iter_texts(p.input, text_field=p.text_field, on_error=p.on_error, stats=read,
                         hub_split=p.hub_split, hub_config=p.hub_config)
    records = itertools.islice(records, p.max_documents)
    batches = batched_texts(records, p.text_field, p.batch_chars)
    words = Counter()
    if p.synthetic_share:  # the synthetic facts' names: the input's own words
        batches = _counting_words(batches, words)

    tokenize_started = time.perf_counter()
    with out.publish() as tmp:
        writer = PackedBlocksWriter(tmp, p.block_length, dtype)
        try:
            for lengths, flat in encode_batches(batches, encoder, p.num_proc):
                writer.write(packer.add(lengths, flat))
            writer.write(packer.finish(p.remainder, pad_id))
        except BaseException:
            writer.abort()
            raise
        if packer.documents == 0:
            writer.abort()
            raise InputError(f"prepare_pretrain.input {p.input}: no documents to tokenize: {read.why_nothing()}")
        if packer.blocks == 0:
            writer.abort()
            raise InputError(
                f"prepare_pretrain.input {p.input}: {packer.tokens} tokens do not fill one block of {p.block_length}; "
                "use more text, a shorter block_length, or remainder: pad"
            )
        try:
            synthetic_blocks = _write_synthetic(params, tokenizer, writer, words) if p.synthetic_share else 0
        except BaseException:
            writer.abort()
            raise
        seconds = time.perf_counter() - tokenize_started
        meta = {
            "tokenizer": params.model.name_or_path, "vocab_size": len(tokenizer), "eos_id": eos_id,
            "bos_id": bos_id, "pad_id": pad_id,
            "padded_tokens": packer.padded_tokens, "documents": packer.documents,
            "synthetic_blocks": synthetic_blocks,
        }
        writer.close(meta)

    metrics = {
        "documents": packer.documents,
        "tokens": packer.tokens,
        "blocks": packer.blocks + synthetic_blocks,
        "synthetic_blocks": synthetic_blocks,
        "dtype": dtype.name,
        "dropped_tokens": packer.dropped_tokens,
        "padded_tokens": packer.padded_tokens,
        **read.as_dict(),
    }
    speed = round(packer.tokens / max(seconds, 1e-9))
    log.info("%d documents → %d blocks of %d tokens (%s tokens/s)", packer.documents, packer.blocks, p.block_length,
             f"{speed:,}")
    return out.write_metrics(metrics, timings={"tokens_per_second": speed})


def _counting_words(batches, counts: Counter):
    for texts in batches:
        for text in texts:
            counts.update(word_counts(text))
        yield texts


def _write_synthetic(params: Params, tokenizer, writer: PackedBlocksWriter, words: Counter) -> int:
    """Append blocks of synthetic sequences built around the blocks written so far, in build_base_model's mix,
    until they are `synthetic_share` of all blocks; each block one sequence, or several whose lengths are multiples
    of `synthetic_min_length`, each its own document. Returns how many blocks."""
    from longlora.embedded.synthetic import SyntheticSequences, corpus_words

    p, mix = params.prepare_pretrain, params.build_base_model
    code = writer.written().reshape(-1)
    count = round(writer.blocks * p.synthetic_share / (1 - p.synthetic_share))
    unit = p.synthetic_min_length or p.block_length
    names = corpus_words(words) or WORDS
    try:
        by_length = {n * unit: SyntheticSequences(tokenizer, code, n * unit, prose_share=mix.prose_share, words=names)
                     for n in range(1, p.block_length // unit + 1)}
    except ValueError as err:
        raise InputError(f"prepare_pretrain.synthetic_share: {err}") from None
    rng = np.random.default_rng(p.seed)
    for first in tqdm(range(0, count, SYNTHETIC_CHUNK), desc=f"synthetic blocks ({SYNTHETIC_CHUNK} each)"):
        rows, starts, per_block = [], [], []
        for _ in range(min(SYNTHETIC_CHUNK, count - first)):
            lengths = _piece_lengths(p.block_length, unit, rng)
            pieces = [by_length[n].batch(1, mix.recall_share, rng, mix.haystack_share)[0][0] for n in lengths]
            rows.append(np.concatenate(pieces))
            starts.append(np.cumsum([0, *lengths[:-1]]))
            per_block.append(len(lengths))
        writer.write(Packed(np.stack(rows), np.concatenate(starts).astype(np.int32), np.array(per_block, np.int64)))
    return count


def _piece_lengths(block_length: int, unit: int, rng: np.random.Generator) -> list[int]:
    """Lengths, multiples of `unit`, that fill a block exactly: each drawn uniformly from what is left."""
    lengths, left = [], block_length
    while left:
        lengths.append(unit * int(rng.integers(1, left // unit + 1)))
        left -= lengths[-1]
    return lengths


if __name__ == "__main__":
    _cli.exit_process(_cli.main("prepare_pretrain", run))
