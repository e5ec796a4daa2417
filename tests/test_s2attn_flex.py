"""S²-Attn kernels without a flash-attn build (issue #23): the FlexAttention mask and block mask, torch's varlen path,
and the `s2attn.kernel` choice.

On the CPU FlexAttention runs eagerly (it refuses gradients on the CPU through its public function; the gradient
checks call its autograd operator directly) at small sizes, against the SDPA kernels that test_s2attn.py checks
against dense masked attention. The compiled and CUDA kernels are checked by the `gpu` tests.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import longlora.method.s2attn as s2
from longlora.method import s2flex
from longlora.method.s2attn import (
    _document_sparse_attention,
    _row_documents,
    configure_s2attn,
    grouped_causal_attention,
    resolve_s2attn_kernel,
    shifted_sparse_attention,
)
from stages.params import ParamsError, parse_params
from tests.conftest import tiny_params_dict

pytestmark = [
    pytest.mark.usefixtures("single_torch_thread"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

KERNELS = ("auto", "flash_attn", "flex", "varlen", "sdpa")


# --------------------------------------------------------------------------------------------------------------------
# References, straight from the definition
# --------------------------------------------------------------------------------------------------------------------


def cumulative(rows: list[list[int]]) -> torch.Tensor:
    """Document boundaries over the flattened rows from each row's document lengths."""
    bounds, total = [0], 0
    for lengths in rows:
        for length in lengths:
            total += length
            bounds.append(total)
    return torch.tensor(bounds)


def reference_mask(rows: list[list[int]], heads: int, group_size: int, shift: bool = True) -> torch.Tensor:
    """(b, h, n, n) booleans by plain loops: same document, causal, same group counted from the document's start,
    the group offset by G/2 for heads >= h//2."""
    n = sum(rows[0])
    mask = torch.zeros(len(rows), heads, n, n, dtype=torch.bool)
    for b, lengths in enumerate(rows):
        document, start = [], []
        for i, length in enumerate(lengths):
            document += [i] * length
            start += [sum(lengths[:i])] * length
        for h in range(heads):
            offset = group_size // 2 if shift and h >= heads // 2 else 0
            for q in range(n):
                for kv in range(q + 1):
                    if document[q] != document[kv]:
                        continue
                    group_q = (q - start[q] + offset) // group_size
                    group_kv = (kv - start[kv] + offset) // group_size
                    mask[b, h, q, kv] = group_q == group_kv
    return mask


def make_qkv(b, heads, heads_kv, n, d=8, dtype=torch.float64, seed=0):
    """The strided (b, n, h, d)-transposed tensors transformers passes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
                 for h in (heads, heads_kv, heads_kv))


def flex_with_grad(q, k, v, block_mask):
    """FlexAttention with gradients on the CPU: its autograd operator, called past the public function's CPU check
    (eager, the scores materialised: small sizes only)."""
    hop = pytest.importorskip("torch._higher_order_ops.flex_attention")
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    n_rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(n_rep, dim=1) for x in (k, v))
    options = _apply_kernel_options(q, k, v, False, None)
    out, _, _ = hop.flex_attention(q, k, v, _identity, block_mask.as_tuple(), q.shape[-1] ** -0.5, options)
    return out


CASES = {  # name: (rows of document lengths or None for plain rows, heads, kv heads, n, group)
    "plain 4/2": (None, 4, 2, 64, 16),
    "plain 1/1": (None, 1, 1, 64, 16),
    "documents 9/3": ([[10, 30, 24], [5, 59]], 9, 3, 64, 16),
    "documents 4/2": ([[40, 24], [64]], 4, 2, 64, 16),
    "documents 1/1": ([[17, 47], [33, 31]], 1, 1, 64, 16),
    "row not a multiple of G 4/2": ([[56], [56]], 4, 2, 56, 16),
    "row not a multiple of G 9/3": ([[50], [50]], 9, 3, 50, 12),
}


def case_documents(rows, b, n):
    return _row_documents(b, n, torch.device("cpu")) if rows is None else cumulative(rows)


# --------------------------------------------------------------------------------------------------------------------
# The FlexAttention mask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_flex_mask_mod_is_the_s2_pattern(name):
    rows, heads, _, n, group = CASES[name]
    rows = rows or [[n], [n]]
    segments = s2flex.s2_segment_ids(cumulative(rows), len(rows), n, group)
    mask_mod = s2flex.s2_mask_mod(segments, heads // 2)
    b, h, q, kv = (torch.arange(size).view(*[-1 if i == axis else 1 for i in range(4)])
                   for axis, size in enumerate((len(rows), heads, n, n)))
    torch.testing.assert_close(mask_mod(b, h, q, kv), reference_mask(rows, heads, group))
    # The no-shift ablation: every head in the plain groups.
    torch.testing.assert_close(s2flex.s2_mask_mod(segments, heads)(b, h, q, kv),
                               reference_mask(rows, heads, group, shift=False))


def _dense(count, indices, blocks):
    """A BlockMask's (count, indices) pair as dense (…, q blocks, kv blocks) booleans."""
    dense = torch.zeros(*count.shape, blocks, dtype=torch.bool)
    taken = torch.arange(indices.shape[-1]) < count.unsqueeze(-1)
    return dense.scatter(-1, indices.long(), taken)


@pytest.mark.parametrize(("rows", "heads", "group", "block"), [
    ([[64], [64]], 4, 16, 8),
    ([[10, 30, 24], [5, 59]], 9, 16, 8),
    ([[10, 30, 24], [5, 59]], 9, 16, 16),  # half-groups inside a tile
    ([[20, 44], [64]], 4, 12, 8),  # G/2 = 6 not aligned with the tiles
    ([[56], [56]], 3, 16, 16),  # a ragged last tile
    ([[56], [56]], 3, 32, 16),  # a ragged last tile inside one group with the tile before it
    ([[200, 184], [384]], 4, 64, 128),  # the default tile
])
def test_flex_block_mask_matches_create_block_mask(rows, heads, group, block):
    """The block mask built from the group layout skips and marks full the same tiles as create_block_mask, which
    materialises the whole mask (fine at these sizes)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = sum(rows[0])
    segments = s2flex.s2_segment_ids(cumulative(rows), len(rows), n, group)
    ours = s2flex.s2_block_mask(segments, heads, heads // 2, block_size=block)
    theirs = create_block_mask(s2flex.s2_mask_mod(segments, heads // 2), len(rows), heads, n, n, device="cpu",
                               BLOCK_SIZE=block)
    blocks = -(-n // block)
    for count, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                           ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        torch.testing.assert_close(_dense(getattr(ours, count), getattr(ours, indices), blocks),
                                   _dense(getattr(theirs, count), getattr(theirs, indices), blocks), msg=count)
    assert ours.seq_lengths == (n, n)
    # Block-sparse: the tiles computed grow with n·G, not n² (here well under the causal half).
    if n >= 4 * group and block <= group // 2:
        computed = int(ours.kv_num_blocks.sum() + ours.full_kv_num_blocks.sum())
        assert computed < 0.5 * len(rows) * heads * blocks * (blocks + 1) / 2


@pytest.mark.parametrize("name", CASES)
def test_flex_matches_the_sdpa_kernels_forward_and_backward(name):
    rows, heads, heads_kv, n, group = CASES[name]
    q, k, v = make_qkv(2, heads, heads_kv, n)
    documents = None if rows is None else cumulative(rows)
    expected = shifted_sparse_attention(q, k, v, group, documents=documents, kernel="sdpa")
    got = s2flex.flex_shifted_sparse_attention(*(x.detach() for x in (q, k, v)), group, documents=documents)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)

    mask = s2flex._block_mask_for(case_documents(rows, 2, n), 2, n, heads, group, heads // 2, s2flex.BLOCK_SIZE)
    out = flex_with_grad(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)


def test_flex_without_the_shift_matches_grouped_attention():
    q, k, v = (x.detach() for x in make_qkv(2, 9, 3, 64))
    torch.testing.assert_close(s2flex.flex_shifted_sparse_attention(q, k, v, 16, shift=False),
                               grouped_causal_attention(q, k, v, 16, kernel="sdpa"), rtol=1e-10, atol=1e-10)


def test_flex_block_mask_is_built_once_per_documents_tensor():
    documents = cumulative([[10, 30, 24], [5, 59]])
    first = s2flex._block_mask_for(documents, 2, 64, 4, 16, 2, 128)
    assert s2flex._block_mask_for(documents, 2, 64, 4, 16, 2, 128) is first  # every layer of a forward
    documents[1] = 12  # changed in place: planned anew
    assert s2flex._block_mask_for(documents, 2, 64, 4, 16, 2, 128) is not first


# --------------------------------------------------------------------------------------------------------------------
# torch's varlen path, its kernel faked on the CPU
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_torch_varlen(monkeypatch):
    """torch's varlen_attn replaced by per-segment SDPA with its exact signature: checks the plumbing (cu_seqlens per
    head half, causal flag, GQA) that the real kernel gets on CUDA."""
    from torch.nn.attention.varlen import varlen_attn

    names = frozenset(inspect.signature(varlen_attn).parameters)
    calls = []

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
             enable_gqa=False, **unused):
        assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32 and tuple(window_size) == (-1, 0)
        assert enable_gqa == (key.shape[1] != query.shape[1])
        lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
        assert max(lengths) == max_q == max_k
        calls.append(cu_seq_q)
        out = []
        for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
            qs, ks, vs = (x[start:end].transpose(0, 1) for x in (query, key, value))
            out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                        enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setattr(s2, "_torch_varlen", lambda: (fake, names))
    return calls


@pytest.mark.parametrize("name", ["plain 4/2", "documents 9/3", "documents 1/1", "row not a multiple of G 4/2"])
def test_torch_varlen_path_matches_the_sdpa_kernels(fake_torch_varlen, name):
    rows, heads, heads_kv, n, group = CASES[name]
    q, k, v = make_qkv(2, heads, heads_kv, n)
    documents = case_documents(rows, 2, n)
    expected = shifted_sparse_attention(q, k, v, group, documents=None if rows is None else documents, kernel="sdpa")
    got = _document_sparse_attention(q, k, v, group, documents, None, 0.0, "varlen")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert len(fake_torch_varlen) == (2 if heads > 1 else 1)  # one call per head half
    grad = torch.randn_like(got)
    for mine, theirs in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)


def test_torch_varlen_path_without_the_shift(fake_torch_varlen):
    q, k, v = make_qkv(2, 4, 2, 64)
    got = _document_sparse_attention(q, k, v, 16, _row_documents(2, 64, q.device), None, 0.0, "varlen", shift=False)
    torch.testing.assert_close(got, grouped_causal_attention(q, k, v, 16, kernel="sdpa"), rtol=1e-10, atol=1e-10)
    assert len(fake_torch_varlen) == 1  # all heads in one call


# --------------------------------------------------------------------------------------------------------------------
# The kernel choice
# --------------------------------------------------------------------------------------------------------------------


def test_auto_picks_sdpa_on_the_cpu():
    q = torch.randn(1, 4, 32, 8)
    assert resolve_s2attn_kernel("auto", q) == "sdpa"
    assert resolve_s2attn_kernel("auto", q.bfloat16()) == "sdpa"
    assert resolve_s2attn_kernel("sdpa", q) == "sdpa"


@pytest.mark.parametrize(("kernel", "why"), [
    ("flex", "CUDA only.*no backward"),
    ("varlen", "CUDA only"),
    ("flash_attn", "flash-attn"),
])
def test_explicit_kernels_that_cannot_run_on_the_cpu_say_so(kernel, why, monkeypatch):
    q = torch.randn(1, 4, 32, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"s2attn\.kernel '{kernel}': .*{why}"):
        resolve_s2attn_kernel(kernel, q)
    with pytest.raises(ValueError, match=rf"s2attn\.kernel '{kernel}'"):
        shifted_sparse_attention(q, q, q, 16, kernel=kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"s2attn\.kernel '{kernel}': .*{why}"):
        configure_s2attn(_tiny_config(), kernel=kernel)


def test_configure_stores_the_kernel_and_refuses_unknown_ones():
    config = configure_s2attn(_tiny_config(), group_size=16, kernel="sdpa")
    assert config.s2attn_kernel == "sdpa"
    assert configure_s2attn(_tiny_config()).s2attn_kernel == "auto"
    with pytest.raises(ValueError, match=r"s2attn\.kernel 'triton': unknown kernel; choose one of auto, flash_attn"):
        configure_s2attn(_tiny_config(), kernel="triton")


def test_plain_config_drops_the_kernel():
    from longlora.method.extension import plain_config

    assert not hasattr(plain_config(configure_s2attn(_tiny_config(), kernel="sdpa")), "s2attn_kernel")


def _tiny_config(heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=97, hidden_size=8 * heads, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)


def test_the_model_runs_the_configured_kernel():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(configure_s2attn(_tiny_config(), group_size=16, kernel="sdpa")).train()
    ids = torch.randint(0, 97, (2, 64))
    sdpa = model(input_ids=ids, labels=ids).loss
    model.config.s2attn_kernel = "auto"
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, sdpa)
    model.config.s2attn_kernel = "flex"  # configured on a CUDA machine, run on the CPU
    with pytest.raises(ValueError, match=r"s2attn\.kernel 'flex': FlexAttention is used compiled, on CUDA only"):
        model(input_ids=ids, labels=ids)


@pytest.mark.parametrize("kernel", KERNELS)
def test_params_accept_the_five_kernels(kernel):
    assert parse_params(tiny_params_dict(s2attn={"kernel": kernel})).s2attn.kernel == kernel


def test_params_refuse_another_kernel_at_its_key():
    with pytest.raises(ParamsError, match=r"params\.yaml: s2attn\.kernel: Input should be 'auto', 'flash_attn'"):
        parse_params(tiny_params_dict(s2attn={"kernel": "triton"}))


# --------------------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------------------

def _cuda_case(rows, heads, heads_kv, n, d=64, dtype=torch.bfloat16):
    q, k, v = make_qkv(len(rows), heads, heads_kv, n, d=d, dtype=torch.float32)
    on_cuda = tuple(x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v))
    reference = tuple(x.detach().double().requires_grad_() for x in on_cuda)
    return on_cuda, reference, cumulative(rows).cuda()


def _assert_close_to_reference(out, inputs, expected, reference, atol=3e-2):
    grad = torch.randn_like(expected)
    torch.testing.assert_close(out.double(), expected.detach(), atol=atol, rtol=atol)
    mine = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    theirs = torch.autograd.grad(expected, reference, grad)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol * 4, rtol=atol)


@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 2), (9, 3), (1, 1)])
@pytest.mark.parametrize("rows", [[[1024], [1024]], [[300, 500, 224], [1000, 24]], [[1000], [1000]]])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_flex_matches_the_reference(heads, heads_kv, rows):
    """Compiled FlexAttention, forward and backward in bf16, against the float64 SDPA kernels on the same inputs;
    packed documents and a row (1000) that is not a multiple of G = 256."""
    n = sum(rows[0])
    inputs, reference, documents = _cuda_case(rows, heads, heads_kv, n)
    out = shifted_sparse_attention(*inputs, 256, documents=documents, kernel="flex")
    expected = shifted_sparse_attention(*reference, 256, documents=documents, kernel="sdpa")
    _assert_close_to_reference(out, inputs, expected, reference)


@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 2), (9, 3), (1, 1)])
@pytest.mark.parametrize("rows", [[[1024], [1024]], [[300, 500, 224], [1000, 24]]])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_varlen_matches_the_flash_path_and_the_reference(heads, heads_kv, rows):
    n = sum(rows[0])
    inputs, reference, documents = _cuda_case(rows, heads, heads_kv, n)
    packed = None if len(rows[0]) == 1 else documents
    out = shifted_sparse_attention(*inputs, 256, documents=packed, kernel="varlen")
    expected = shifted_sparse_attention(*reference, 256, documents=packed, kernel="sdpa")
    _assert_close_to_reference(out, inputs, expected, reference)
    if s2._flash_attn("flash_attn_varlen_func") is not None:
        flash = shifted_sparse_attention(*inputs, 256, documents=packed, kernel="flash_attn")
        torch.testing.assert_close(out, flash, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_order():
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    flash = s2._flash_attn("flash_attn_func") is not None
    assert resolve_s2attn_kernel("auto", q) == ("flash_attn" if flash else "varlen")
    assert resolve_s2attn_kernel("auto", q.float()) == "flex"  # varlen needs half precision
    assert resolve_s2attn_kernel("auto", q.float(), dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match=r"s2attn\.kernel 'flex': FlexAttention has no attention dropout"):
        resolve_s2attn_kernel("flex", q, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_flex_does_not_recompile_for_new_documents():
    """Every step packs other documents: a new block mask and mask_mod closure, the same compiled kernel (a recompile
    per step would soon hit the recompile limit and drop to eager FlexAttention's N² memory)."""
    layouts = ([[300, 500, 224], [1000, 24]], [[100, 924], [512, 512]], [[1024], [24, 1000]])
    inputs, _, documents = _cuda_case(layouts[0], 8, 2, 1024)
    shifted_sparse_attention(*inputs, 256, documents=documents, kernel="flex").sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in layouts[1:]:
            shifted_sparse_attention(*inputs, 256, documents=cumulative(rows).cuda(), kernel="flex").sum().backward()
