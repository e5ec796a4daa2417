"""Document-aware S²-Attn: packed rows where every document is computed exactly as if it were alone in its row.

Kernel level against a dense float64 reference masked from the definition (forward and gradients, GQA, odd head
counts, random document lengths); model level on tiny Llama and Qwen2: a packed row equals its documents alone.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DataCollatorWithFlattening

import longlora.method.s2attn as s2
from longlora.method.s2attn import document_boundaries, s2_segments, shifted_sparse_attention
from tests.test_s2attn import make_qkv
from tests.test_s2attn_models import tiny, tokens, twin

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def document_groups(start: int, end: int, group_size: int, shifted: bool) -> list[tuple[int, int]]:
    """The ranges that attend among themselves inside one document [start, end), straight from the definition: the
    document alone, right-padded to a multiple of G, groups [kG, (k+1)G) or [0, G/2), [G/2, 3G/2), …, cut at its end."""
    length = end - start
    padded = -(-length // group_size) * group_size
    half = group_size // 2
    bounds = [0, *range(half, padded, group_size), padded] if shifted else list(range(0, padded + 1, group_size))
    pieces = [(start + a, min(start + b, end)) for a, b in zip(bounds, bounds[1:], strict=False)]
    return [(a, b) for a, b in pieces if b > a]


def rows_of(lengths_per_row: list[list[int]]) -> tuple[int, torch.Tensor]:
    """Row length n (the longest row) and the document boundaries over the flattened rows; a shorter row ends in a
    trailing 'document' (its padding)."""
    n = max(sum(lengths) for lengths in lengths_per_row)
    starts = []
    for row, lengths in enumerate(lengths_per_row):
        offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        starts += [row * n + o for o in offsets[:-1]]
        if offsets[-1] < n:
            starts.append(row * n + offsets[-1])
    return n, torch.tensor([*starts, len(lengths_per_row) * n])


def reference(q, k, v, group_size, documents, scale=None):
    """Dense float64 attention with one explicit boolean mask per head half over the flattened rows."""
    b, heads, n, d = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    bounds = documents.tolist()
    masks = []
    for shifted in (False, True):
        allowed = torch.zeros(b * n, b * n, dtype=torch.bool)
        for start, end in zip(bounds, bounds[1:], strict=False):
            for a, z in document_groups(start, end, group_size, shifted):
                allowed[a:z, a:z] = torch.ones(z - a, z - a, dtype=torch.bool).tril()
        masks.append(allowed)
    flat = [x.transpose(1, 2).reshape(b * n, heads, x.shape[-1]).transpose(0, 1) for x in (q, k, v)]
    mask = torch.stack([masks[head >= heads // 2] for head in range(heads)])
    scores = (flat[0] @ flat[1].transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ flat[2]
    return out.transpose(0, 1).reshape(b, n, heads, -1).transpose(1, 2)


def random_lengths(n_docs: int, group_size: int, seed: int) -> list[int]:
    """Lengths that hit every case: shorter than G/2, exactly G/2 and G, a few groups long, and random ones."""
    gen = torch.Generator().manual_seed(seed)
    fixed = [1, max(1, group_size // 2 - 1), group_size // 2, group_size, group_size + 1, 3 * group_size + 3]
    extra = torch.randint(1, 3 * group_size, (n_docs,), generator=gen).tolist()
    lengths = fixed + extra
    return [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]


@pytest.mark.parametrize("group_size", [2, 4, 8, 16])
@pytest.mark.parametrize("shifted", [False, True])
def test_segments_follow_the_definition(group_size, shifted):
    for seed in range(5):
        lengths = random_lengths(6, group_size, seed)
        documents = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        bounds = documents.tolist()
        expected = [piece for a, z in zip(bounds, bounds[1:], strict=False)
                    for piece in document_groups(a, z, group_size, shifted)]
        cu = s2_segments(documents, group_size, shifted)
        assert cu.tolist() == [a for a, _ in expected] + [bounds[-1]]
        assert all(a < z for a, z in zip(cu.tolist(), cu.tolist()[1:], strict=False))


CASES = [  # heads, kv heads, group size, documents per row (the rows' lengths differ: the shorter ones end padded)
    (4, 4, 8, [[3, 8, 4, 21], [16, 1, 19]]),
    (8, 2, 8, [[1, 3, 4, 8, 9, 27]]),  # GQA; shorter than G/2, G/2, G, a few groups
    (8, 1, 4, [[5, 2, 11], [18]]),  # multi-query
    (6, 3, 8, [[12, 7, 17], [30, 6]]),  # a kv head straddles the halves
    (9, 3, 8, [[2, 16, 15, 3], [4, 4, 4, 4, 20]]),  # odd heads, GQA
    (15, 5, 4, [[7, 1, 9], [6, 6, 5]]),
    (3, 1, 8, [[9, 13, 10]]),
    (1, 1, 8, [[5, 20, 7]]),  # a single (shifted) head
]


@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize(("heads", "heads_kv", "group_size", "docs"), CASES)
def test_forward_and_gradients_match_reference(heads, heads_kv, group_size, docs, layout):
    n, documents = rows_of(docs)
    q, k, v = make_qkv(len(docs), heads, heads_kv, n, layout=layout, seed=heads)
    out = shifted_sparse_attention(q, k, v, group_size, documents=documents)
    expected = reference(q, k, v, group_size, documents)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, torch.autograd.grad(expected, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 2), (9, 3), (15, 5)])
def test_random_documents_match_reference(seed, heads, heads_kv):
    lengths = random_lengths(4, 8, seed)
    n, documents = rows_of([lengths[: len(lengths) // 2], lengths[len(lengths) // 2:]])
    q, k, v = make_qkv(2, heads, heads_kv, n, seed=seed)
    out = shifted_sparse_attention(q, k, v, 8, documents=documents)
    expected = reference(q, k, v, 8, documents)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                         torch.autograd.grad(expected, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 4), (9, 3)])
def test_random_documents_equal_each_document_alone(seed, heads, heads_kv):
    """The output on a document's tokens equals shifted_sparse_attention on that document alone, right-padded to a
    multiple of G, on its real tokens."""
    group_size = 8
    lengths = random_lengths(8, group_size, seed)
    n, documents = rows_of([lengths])
    q, k, v = (x.detach() for x in make_qkv(1, heads, heads_kv, n, seed=seed))
    out = shifted_sparse_attention(q, k, v, group_size, documents=documents, scale=0.3)
    bounds = documents.tolist()
    for start, end in zip(bounds, bounds[1:], strict=False):
        padded = -(-(end - start) // group_size) * group_size
        alone = [F.pad(x[:, :, start:end], (0, 0, 0, padded - (end - start))) for x in (q, k, v)]
        expected = shifted_sparse_attention(*alone, group_size, scale=0.3)[:, :, : end - start]
        torch.testing.assert_close(out[:, :, start:end], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 4), (9, 3)])
def test_no_token_sees_a_later_token_or_another_document(heads, heads_kv):
    gen = torch.Generator().manual_seed(0)
    n, documents = rows_of([[5, 12, 3, 20], [9, 31]])
    q, k, v = (x.detach() for x in make_qkv(2, heads, heads_kv, n, seed=1))
    out = shifted_sparse_attention(q, k, v, 8, documents=documents)
    bounds = documents.tolist()
    for t in [n - 1, 7, 17, 25, 30]:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 3 * torch.randn(k2[:, :, t].shape, generator=gen, dtype=k.dtype)
        v2[:, :, t] += 3 * torch.randn(v2[:, :, t].shape, generator=gen, dtype=v.dtype)
        out2 = shifted_sparse_attention(q, k2, v2, 8, documents=documents)
        assert torch.equal(out2[:, :, :t], out[:, :, :t]), f"an output before position {t} depends on it"
        for row in range(2):
            flat = row * n + t
            end = next(b for b in bounds if b > flat) - row * n
            # Nothing after t's document depends on it; t itself does (the probe is live).
            assert torch.equal(out2[row, :, end:], out[row, :, end:]), f"a later document sees position {t}"
            assert (out2[row, :, t] - out[row, :, t]).abs().amax(-1).min() > 1e-6


def test_boundaries_from_position_ids_and_cu_seqlens():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert document_boundaries(2, 8, position_ids=position_ids).tolist() == [0, 3, 5, 8, 16]
    # Rows of one document each (or position_ids broadcast from one row): nothing to be aware of.
    assert document_boundaries(2, 8, position_ids=torch.arange(8)[None]) is None
    assert document_boundaries(2, 8) is None
    # A flattened batch (DataCollatorWithFlattening), padded after its last document: the padding is its own range.
    assert document_boundaries(1, 8, cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32)).tolist() == [0, 3, 5, 8]
    assert document_boundaries(1, 5, cu_seqlens=torch.tensor([0, 3, 5])).tolist() == [0, 3, 5]


def test_flash_attn_varlen_path_gets_the_segment_boundaries(monkeypatch):
    """flash-attn is not installable here: a stand-in with its signature checks the one call per head half."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert q.dim() == 3 and q.stride(-1) == 1  # (total, heads, d)
        calls.append((cu_q.tolist(), max_q, q.shape[1], k.shape[1]))
        bounds = cu_q.tolist()
        assert max_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for a, z in zip(bounds, bounds[1:], strict=False):
            seg = [x[a:z].transpose(0, 1) for x in (q, k, v)]
            out[a:z] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=softmax_scale,
                                                      enable_gqa=True).transpose(0, 1)
        return out

    monkeypatch.setattr(s2, "_use_flash_attn", lambda q: True)
    monkeypatch.setattr(s2, "_flash_attn", {"flash_attn_varlen_func": fake_varlen}.get)
    n, documents = rows_of([[5, 12, 3, 20], [9, 31]])
    q, k, v = make_qkv(2, 8, 2, n, seed=2)
    out = shifted_sparse_attention(q, k, v, 8, scale=0.3, documents=documents)
    torch.testing.assert_close(out, reference(q, k, v, 8, documents, scale=0.3), rtol=1e-10, atol=1e-10)
    assert [c[0] for c in calls] == [s2_segments(documents, 8, shifted).tolist() for shifted in (False, True)]
    assert [(c[2], c[3]) for c in calls] == [(4, 1), (4, 1)]


def test_invalid_documents_raise():
    q, k, v = make_qkv(2, 4, 4, 16)
    with pytest.raises(ValueError, match="batch × seq = 32"):
        shifted_sparse_attention(q, k, v, 8, documents=torch.tensor([0, 5, 16]))
    with pytest.raises(ValueError, match="not an even integer"):
        shifted_sparse_attention(q, k, v, 7, documents=torch.tensor([0, 5, 32]))


# --- model level -----------------------------------------------------------------------------------------------------

MODELS = [("llama", 4, 2), ("llama", 9, 3), ("qwen2", 4, 2), ("qwen2", 9, 3)]
LENGTHS = [5, 16, 3, 21, 1, 10]  # shorter than G/2, G, several groups, a single token


def _alone(model, doc: torch.Tensor, group_size: int = 8):
    """A document alone in its own row, right-padded to a multiple of G."""
    padded = -(-len(doc) // group_size) * group_size
    ids = torch.zeros(1, padded, dtype=torch.long)
    mask = torch.zeros(1, padded, dtype=torch.long)
    ids[0, : len(doc)], mask[0, : len(doc)] = doc, 1
    return model(ids, attention_mask=mask)


@pytest.mark.parametrize(("arch", "heads", "kv_heads"), MODELS)
def test_packed_row_equals_documents_alone(arch, heads, kv_heads):
    """float64: logits of a packed row (position_ids restarting per document) equal each document run alone, and the
    gradients of the summed losses agree."""
    model = tiny(arch, heads=heads, kv_heads=kv_heads).double().train()
    docs = [tokens(1, length, seed=i)[0] for i, length in enumerate(LENGTHS)]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[0, torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])] = -100  # no target across documents
    # The loss' sum over tokens (the mean's denominators differ between the packed row and the documents).
    packed = model(ids, position_ids=position_ids, use_cache=False)
    loss = F.cross_entropy(packed.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    start, total = 0, 0
    for doc in docs:
        out = _alone(model, doc)
        torch.testing.assert_close(packed.logits[0, start: start + len(doc)], out.logits[0, : len(doc)],
                                   rtol=1e-9, atol=1e-9)
        # transformers' own loss runs in float32: summed here in float64, like the packed row's.
        total = total + F.cross_entropy(out.logits[0, : len(doc) - 1], doc[1:], reduction="sum")
        start += len(doc)
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)
    # Not vacuous: without the document boundaries the same row gives other logits.
    plain = model(F.pad(ids, (0, 8 - ids.shape[1] % 8)), use_cache=False).logits[0, : ids.shape[1]]
    assert (plain - packed.logits[0]).abs().max() > 1e-3


def test_activation_checkpointing_recomputes_the_same_documents(monkeypatch):
    """LongLoRA trains with activation checkpointing: the forward recomputed in backward must see the same documents
    (their boundaries are cached per position_ids tensor), so the gradients of a packed batch do not change."""
    model = tiny("llama", heads=9, kv_heads=3).train()
    lengths = [[5, 16, 11], [21, 11]]
    ids = tokens(2, 32, seed=3)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    model(ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    seen = []
    original = s2.shifted_sparse_attention
    monkeypatch.setattr(s2, "shifted_sparse_attention",
                        lambda *a, **kw: seen.append(kw.get("documents")) or original(*a, **kw))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
    # Two layers, each run in the forward and again in the backward, every time with the packed documents.
    assert len(seen) == 4 and all(d is not None and d.tolist() == [0, 5, 21, 32, 53, 64] for d in seen)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_batch_with_padding_and_the_cache_flag(use_cache):
    """Rows of packed documents, the shorter one right-padded (2D attention_mask): transformers then builds no
    packed mask of its own, S² still reads the documents from position_ids."""
    model = tiny("llama", heads=9, kv_heads=3).train()
    rows = [[7, 20, 5], [12, 3]]
    n = 32
    ids = torch.zeros(2, n, dtype=torch.long)
    position_ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    docs = []
    for row, lengths in enumerate(rows):
        start = 0
        for i, length in enumerate(lengths):
            doc = tokens(1, length, seed=10 * row + i)[0]
            ids[row, start: start + length], position_ids[row, start: start + length] = doc, torch.arange(length)
            docs.append((row, start, doc))
            start += length
        mask[row, :start] = 1
        position_ids[row, start:] = torch.arange(n - start)
    logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=use_cache).logits
    for row, start, doc in docs:
        torch.testing.assert_close(logits[row, start: start + len(doc)], _alone(model, doc).logits[0, : len(doc)],
                                   rtol=0, atol=1e-5)


def test_flattened_batches_from_transformers_collator():
    """DataCollatorWithFlattening (one row, position_ids and cu_seq_lens_q), as transformers' padding-free path
    produces it: every example computed as if alone."""
    model = tiny("qwen2").train()
    examples = [tokens(1, length, seed=i)[0].tolist() for i, length in enumerate([9, 17, 4])]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": e, "labels": e} for e in examples])
    assert "cu_seq_lens_q" in batch
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    start = 0
    for e in examples:
        torch.testing.assert_close(logits[0, start: start + len(e)], _alone(model, torch.tensor(e)).logits[0, : len(e)],
                                   rtol=0, atol=1e-5)
        start += len(e)


def test_packed_rows_build_no_square_mask_and_eval_keeps_documents_apart(monkeypatch):
    """The mask builder returns no N×N mask for packed sequences in training; in eval (dense) the documents stay
    apart exactly as with transformers' sdpa backend."""
    model = tiny("llama").train()
    ids = tokens(1, 32)
    position_ids = torch.cat([torch.arange(12), torch.arange(20)])[None]
    built = []
    original = s2.s2attn_mask
    transformers.masking_utils.AttentionMaskInterface.register(
        s2.S2ATTN, lambda *a, **kw: built.append(result := original(*a, **kw)) or result)
    try:
        model(ids, position_ids=position_ids, use_cache=False)
    finally:
        s2.register_s2attn()
    assert built == [None]
    model.eval()
    dense = twin(model, "llama")
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(logits, dense(ids, position_ids=position_ids, use_cache=False).logits,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[0, 12:], model(ids[:, 12:]).logits[0], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 2), (9, 3)])
def test_cuda_kernels_match_reference(dtype, heads, heads_kv):
    """On CUDA: flash-attn's varlen kernel when installed, else SDPA on bucketed segments; same semantics."""
    n, documents = rows_of([[100, 37, 64, 300, 11], [256, 256]])
    q, k, v = make_qkv(2, heads, heads_kv, n, d=64, dtype=torch.float64)
    expected = reference(q, k, v, 64, documents)
    got = shifted_sparse_attention(*(x.detach().to("cuda", dtype) for x in (q, k, v)), 64, documents=documents)
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-2, rtol=2e-2)


def test_rows_the_fixed_group_does_not_divide_are_computed_as_if_padded():
    """A fixed group of 8 on rows of 21 tokens (a padding-free batch of single examples): each row as if
    right-padded to 24."""
    model = tiny("llama", heads=9, kv_heads=3).train()
    ids = tokens(2, 21)
    logits = model(ids).logits
    for row in range(2):
        torch.testing.assert_close(logits[row], _alone(model, ids[row]).logits[0, :21], rtol=0, atol=1e-5)
