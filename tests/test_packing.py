"""Packing invariants: blocks concatenate to the EOS-joined stream, boundaries are exact, formats round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from longlora.data.packing import (
    BlockPacker,
    PackedBlocks,
    PackedBlocksWriter,
    TokenStream,
    TokenStreamWriter,
    cut_blocks,
    join_documents,
    join_encoded,
)
from longlora.data.tokenizing import BatchEncoder, encode_batches, prefetch, token_dtype
from longlora.errors import InputError

EOS, BOS, PAD = 2, 1, 3


def _random_docs(rng, n, max_len=300):
    # Lengths include 0 (an empty document still contributes its EOS) and documents longer than a block.
    return [rng.integers(4, 400, size=int(rng.integers(0, max_len))).tolist() for _ in range(n)]


def _reference_stream(docs, bos):
    """The EOS-joined stream and each document's start, written the obvious (slow) way."""
    stream, starts = [], []
    for doc in docs:
        starts.append(len(stream))
        stream += ([BOS] if bos else []) + list(doc) + [EOS]
    return np.array(stream), np.array(starts)


def test_join_documents_layout():
    assert join_documents([[5, 6], [], [7]], eos_id=EOS).tolist() == [5, 6, EOS, EOS, 7, EOS]
    assert join_documents([[5, 6], [7]], eos_id=EOS, bos_id=BOS).tolist() == [BOS, 5, 6, EOS, BOS, 7, EOS]
    assert join_documents([], eos_id=EOS).tolist() == []
    stream, starts = join_encoded(np.array([2, 0, 1]), np.array([5, 6, 7]), EOS, BOS)
    assert stream.tolist() == [BOS, 5, 6, EOS, BOS, EOS, BOS, 7, EOS] and starts.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="add up to 3 tokens but 2"):
        join_encoded(np.array([2, 1]), np.array([5, 6]), EOS)


def test_cut_blocks_drops_the_remainder():
    assert cut_blocks(np.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="positive"):
        cut_blocks(np.arange(10), 0)


@pytest.mark.parametrize("block_len", [1, 7, 64, 1000])
@pytest.mark.parametrize("bos", [True, False])
def test_blocks_concatenate_to_the_joined_stream_with_exact_boundaries(block_len, bos):
    rng = np.random.default_rng(block_len)
    docs = _random_docs(rng, 60)
    expected, expected_starts = _reference_stream(docs, bos)
    packer = BlockPacker(block_len, EOS, BOS if bos else None)
    outputs = []
    cuts = sorted(rng.choice(np.arange(1, len(docs)), size=6, replace=False).tolist())
    for lo, hi in zip([0, *cuts], [*cuts, len(docs)], strict=True):  # arbitrary batch boundaries
        outputs.append(packer.add_documents(docs[lo:hi]))
    outputs.append(packer.finish("drop"))

    blocks = np.concatenate([o.blocks for o in outputs])
    n = len(expected) // block_len
    assert blocks.shape == (n, block_len) and packer.blocks == n
    assert np.array_equal(blocks.ravel(), expected[: n * block_len])  # nothing lost…
    assert packer.dropped_tokens == len(expected) - n * block_len  # …but the reported remainder
    assert packer.tokens == len(expected) and packer.documents == len(docs)

    got, block = [], 0
    for out in outputs:
        for i in range(len(out.blocks)):
            got += [(block, int(s)) for s in out.starts_of(i)]
            block += 1
    kept = expected_starts[expected_starts < n * block_len]
    assert got == [(int(s) // block_len, int(s) % block_len) for s in kept]


def test_pad_remainder_fills_the_last_block_and_counts_it():
    packer = BlockPacker(8, EOS, BOS)
    first = packer.add_documents([[10, 11, 12], [13, 14, 15, 16, 17]])  # 5 + 7 = 12 tokens: one block + 4
    last = packer.finish("pad", PAD)
    assert first.blocks.tolist() == [[BOS, 10, 11, 12, EOS, BOS, 13, 14]]
    assert first.starts_of(0).tolist() == [0, 5]
    assert last.blocks.tolist() == [[15, 16, 17, EOS, PAD, PAD, PAD, PAD]]
    assert last.starts_of(0).tolist() == [] and packer.padded_tokens == 4 and packer.blocks == 2
    assert packer.finish("pad", PAD).blocks.shape == (0, 8)  # nothing left: no extra block


def test_a_document_starting_exactly_at_a_block_boundary():
    packer = BlockPacker(4, EOS)
    out = packer.add_documents([[5, 6, 7], [8, 9, 10]])  # [5 6 7 E][8 9 10 E]
    assert out.blocks.tolist() == [[5, 6, 7, EOS], [8, 9, 10, EOS]]
    assert [out.starts_of(i).tolist() for i in range(2)] == [[0], [0]]
    assert packer.pending_tokens == 0


def test_finish_rejects_unknown_policy_and_missing_pad():
    packer = BlockPacker(4, EOS)
    packer.add_documents([[5]])
    with pytest.raises(ValueError, match="needs a pad_id"):
        packer.finish("pad")
    with pytest.raises(ValueError, match="'drop' or 'pad'"):
        packer.finish("keep")


def test_blocks_format_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 40)
    packer = BlockPacker(50, EOS, BOS, np.uint16)
    writer = PackedBlocksWriter(tmp_path, 50, np.uint16)
    expected_blocks, expected_starts = [], []
    for chunk in (docs[:15], docs[15:]):
        packed = packer.add_documents(chunk)
        writer.write(packed)
        expected_blocks.append(packed.blocks)
        expected_starts += [packed.starts_of(i).tolist() for i in range(len(packed.blocks))]
    packed = packer.finish("pad", PAD)
    writer.write(packed)
    expected_blocks.append(packed.blocks)
    expected_starts += [packed.starts_of(i).tolist() for i in range(len(packed.blocks))]
    writer.close({"documents": packer.documents})

    blocks = PackedBlocks(tmp_path)
    assert len(blocks) == packer.blocks and blocks.meta["documents"] == 40 and blocks.meta["dtype"] == "uint16"
    assert np.array_equal(blocks.tokens, np.concatenate(expected_blocks))
    assert [blocks.doc_starts(i).tolist() for i in range(len(blocks))] == expected_starts
    segments = blocks.segments(0)
    assert segments[0] == 0 and segments[-1] == 50 and np.all(np.diff(segments) > 0)


def test_empty_blocks_output_reads_back(tmp_path):
    PackedBlocksWriter(tmp_path, 16, np.uint16).close()
    assert len(PackedBlocks(tmp_path)) == 0


def test_stream_format_round_trips(tmp_path):
    docs = [[5, 6], [7], [8, 9, 10]]
    writer = TokenStreamWriter(tmp_path, np.uint32)
    stream, _ = join_encoded(np.array([2, 1]), np.array([5, 6, 7], np.uint32), EOS, BOS)
    writer.write(stream, np.array([4, 3]))
    stream, _ = join_encoded(np.array([3]), np.array([8, 9, 10], np.uint32), EOS, BOS)
    writer.write(stream, np.array([5]))
    writer.close()
    read = TokenStream(tmp_path)
    assert len(read) == 3 and read.tokens.dtype == np.uint32
    assert [read.document(i).tolist() for i in range(3)] == [[BOS, *d, EOS] for d in docs]
    assert read.lengths().tolist() == [4, 3, 5]


def test_reader_refuses_unfinished_or_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        PackedBlocks(tmp_path)
    TokenStreamWriter(tmp_path, np.uint16).close()
    with pytest.raises(ValueError, match="format 'longlora-stream-v1'"):
        PackedBlocks(tmp_path)


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(400, "uint32") == np.uint32
    with pytest.raises(InputError, match=r"prepare_pretrain\.dtype: uint16 cannot hold the ids of a 70000-token"):
        token_dtype(70000, "uint16", "prepare_pretrain.dtype")
    with pytest.raises(InputError, match="not a token dtype"):
        token_dtype(400, "int8")


def test_batch_encoder_matches_the_tokenizer(tiny_tokenizer):
    texts = ["def f(x):\n    return x\n", "", "import os\n" * 20, "ünïcödé ✓ text"]
    lengths, flat = BatchEncoder(tiny_tokenizer, np.uint16)(texts)
    expected = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.dtype == np.uint16 and flat.tolist() == [t for e in expected for t in e]


def test_batch_encoder_ignores_truncation_and_padding_left_in_the_tokenizer(tiny_tokenizer):
    import copy

    # A transformers call with padding=True leaves padding switched on in the Rust tokenizer it wraps.
    used = copy.deepcopy(tiny_tokenizer)
    used.backend_tokenizer.enable_truncation(max_length=3)
    used.backend_tokenizer.enable_padding(pad_id=3, length=64)
    lengths, flat = BatchEncoder(used)(["import os\n" * 20, "x"])
    assert lengths[0] > 3 and lengths[1] < 3 and 3 not in flat.tolist()


def test_encode_batches_in_processes_equals_in_process(tiny_tokenizer):
    batches = [["def a(): pass\n" * k, "x = 1\n"] for k in range(1, 8)]
    encoder = BatchEncoder(tiny_tokenizer, np.uint16)
    here = list(encode_batches(batches, encoder, num_proc=1))
    there = list(encode_batches(batches, encoder, num_proc=2))
    assert len(here) == len(there) == 7
    for (la, fa), (lb, fb) in zip(here, there, strict=True):
        assert np.array_equal(la, lb) and np.array_equal(fa, fb)


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise InputError("data.jsonl:2: malformed JSON")

    got = []
    with pytest.raises(InputError, match="data.jsonl:2"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]
