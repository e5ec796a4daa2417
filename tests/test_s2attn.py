"""Kernel-level tests of S²-Attn against a dense, explicitly masked float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import longlora.method.s2attn as s2
from longlora.method.s2attn import grouped_causal_attention, shifted_sparse_attention

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def segments(n: int, group_size: int, shifted: bool) -> list[tuple[int, int]]:
    """The token ranges that attend among themselves, straight from the definition."""
    if not shifted:
        return [(start, start + group_size) for start in range(0, n, group_size)]
    half = group_size // 2
    inner = [(start, start + group_size) for start in range(half, n - half, group_size)]
    return [(0, half), *inner, (n - half, n)]


def reference_mask(n: int, group_size: int, shifted: bool) -> torch.Tensor:
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for start, end in segments(n, group_size, shifted):
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    return allowed


def reference(q, k, v, group_size, scale=None, shift=True):
    """Dense attention with one explicit boolean mask per head half (shift=False: every head unshifted); k/v heads
    repeated for GQA."""
    b, heads, n, d = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    mask = torch.stack([reference_mask(n, group_size, shifted=shift and head >= heads // 2) for head in range(heads)])
    scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def make_qkv(b, heads, heads_kv, n, d=8, layout="hf", dtype=torch.float64, seed=0):
    """layout "hf": the strided (b, n, h, d)-transposed tensors transformers passes; "contiguous": (b, h, n, d)."""
    gen = torch.Generator().manual_seed(seed)

    def one(h):
        if layout == "hf":
            return torch.randn(b, n, h, d, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, n, d, generator=gen, dtype=dtype).requires_grad_()

    return one(heads), one(heads_kv), one(heads_kv)


SHAPES = [  # batch, heads, kv heads, seq, group
    (1, 2, 2, 16, 4),
    (1, 4, 4, 16, 16),  # group == seq
    (2, 4, 4, 32, 8),
    (1, 8, 8, 64, 16),
    (3, 8, 8, 64, 64),
    (2, 8, 4, 64, 32),  # GQA, kv heads split between the halves
    (2, 8, 2, 32, 8),
    (2, 8, 1, 32, 8),  # multi-query: both halves share the kv head
    (2, 6, 3, 32, 8),  # a kv head straddles the halves: repeat fallback
    (2, 12, 3, 16, 4),  # repeat fallback with n_rep 4
    (1, 2, 2, 8, 2),  # smallest group
    # Odd head counts: heads [0, h//2) unshifted, [h//2, h) shifted (one more), as the reference splits them.
    (2, 9, 3, 32, 8),  # grouped-query with an odd count never aligns with the halves: kv expanded per query head
    (2, 15, 5, 32, 8),
    (2, 3, 1, 32, 8),  # multi-query: 1 unshifted and 2 shifted heads share the kv head
    (2, 9, 9, 32, 8),
    (2, 5, 5, 16, 16),  # group == seq
    (1, 1, 1, 16, 4),  # a single head: no unshifted half
]


def _assert_same_gradients(out, expected, inputs) -> None:
    """The gradients of `out` and of the reference `expected` with respect to q, k, v agree (float64, tight)."""
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize(("b", "heads", "heads_kv", "n", "group_size"), SHAPES)
def test_forward_and_gradients_match_reference(b, heads, heads_kv, n, group_size, layout):
    q, k, v = make_qkv(b, heads, heads_kv, n, layout=layout)
    out = shifted_sparse_attention(q, k, v, group_size)
    expected = reference(q, k, v, group_size)
    assert out.shape == (b, heads, n, q.shape[-1])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    _assert_same_gradients(out, expected, (q, k, v))


@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize(("b", "heads", "heads_kv", "n", "group_size"), SHAPES[::2])
def test_without_shift_every_head_attends_within_plain_groups(b, heads, heads_kv, n, group_size, layout):
    q, k, v = make_qkv(b, heads, heads_kv, n, layout=layout, seed=3)
    out = grouped_causal_attention(q, k, v, group_size)
    expected = reference(q, k, v, group_size, shift=False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    _assert_same_gradients(out, expected, (q, k, v))
    if heads > 1 and n > group_size:  # not vacuous: the shifted half differs
        assert (out - shifted_sparse_attention(q, k, v, group_size)).abs().max() > 1e-3


def test_custom_scale():
    q, k, v = make_qkv(2, 4, 2, 32, seed=1)
    out = shifted_sparse_attention(q, k, v, 8, scale=0.37)
    torch.testing.assert_close(out, reference(q, k, v, 8, scale=0.37), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, reference(q, k, v, 8))


def test_value_head_dim_may_differ():
    q, k, _ = make_qkv(2, 4, 2, 32, seed=6)
    v = torch.randn(2, 2, 32, 12, dtype=torch.float64)
    out = shifted_sparse_attention(q, k, v, 8)
    assert out.shape == (2, 4, 32, 12)
    torch.testing.assert_close(out, reference(q, k, v, 8), rtol=1e-10, atol=1e-10)


def test_float32_matches_reference():
    q, k, v = make_qkv(2, 8, 2, 64, d=16, dtype=torch.float32, seed=2)
    expected = reference(*(x.detach().double() for x in (q, k, v)), 16).float()
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, 16), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("seed", "heads", "heads_kv"), [(0, 8, 4), (1, 8, 4), (2, 9, 3), (3, 15, 5)])
def test_no_token_sees_a_later_token(seed, heads, heads_kv):
    """Perturbing key/value at position t (the last one, then random ones) changes no output before t."""
    gen = torch.Generator().manual_seed(seed)
    n, group_size = 32, 8
    q, k, v = (x.detach() for x in make_qkv(2, heads, heads_kv, n, seed=seed))
    out = shifted_sparse_attention(q, k, v, group_size)
    positions = [n - 1, *torch.randint(1, n - 1, (3,), generator=gen).tolist()]
    for t in positions:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 3 * torch.randn(k2[:, :, t].shape, generator=gen, dtype=k.dtype)
        v2[:, :, t] += 3 * torch.randn(v2[:, :, t].shape, generator=gen, dtype=v.dtype)
        out2 = shifted_sparse_attention(q, k2, v2, group_size)
        assert torch.equal(out2[:, :, :t], out[:, :, :t]), f"an output before position {t} depends on it"
        # The probe is live: every head's token t attends to itself.
        assert (out2[:, :, t] - out[:, :, t]).abs().amax(-1).min() > 1e-6


def test_group_equal_to_seq_is_dense_causal_for_unshifted_half():
    q, k, v = make_qkv(2, 8, 4, 32, seed=3)
    out = shifted_sparse_attention(q, k, v, 32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out[:, :4], dense[:, :4], rtol=1e-10, atol=1e-10)
    # The shifted half is two independent causal segments [0, 16) and [16, 32).
    halves = [
        F.scaled_dot_product_attention(q[:, 4:, seq], k[:, 2:, seq], v[:, 2:, seq], is_causal=True, enable_gqa=True)
        for seq in (slice(0, 16), slice(16, 32))
    ]
    torch.testing.assert_close(out[:, 4:], torch.cat(halves, dim=2), rtol=1e-10, atol=1e-10)


def test_output_is_bshd_memory_and_grouping_is_a_view():
    """transformers' layout goes through without copies and comes back so that transpose(1, 2) is contiguous."""
    q, k, v = make_qkv(2, 8, 4, 32)
    grouped = s2._group(q[:, :4], 8)
    assert grouped.shape == (8, 4, 8, 8)
    assert grouped.data_ptr() == q.data_ptr()
    out = shifted_sparse_attention(q, k, v, 8)
    assert out.transpose(1, 2).is_contiguous()


def test_dropout_is_applied():
    q, k, v = (x.detach() for x in make_qkv(1, 4, 4, 32, seed=4))
    plain = shifted_sparse_attention(q, k, v, 8)
    torch.manual_seed(0)
    dropped = shifted_sparse_attention(q, k, v, 8, dropout_p=0.5)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, plain)


@pytest.mark.parametrize(("heads", "heads_kv", "kv_heads_per_call"),
                         [(8, 2, {1}), (9, 3, {4, 5}), (3, 1, {1}), (9, 9, {4, 5})])
def test_flash_attn_path_uses_bshd_views(monkeypatch, heads, heads_kv, kv_heads_per_call):
    """flash-attn is not installable here: a stand-in with its signature checks what the path hands over."""
    calls = []

    def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and q.dim() == 4 and q.stride(-1) == 1
        assert q.shape[2] % k.shape[2] == 0  # (B, S, H, D), kv heads may be fewer
        calls.append((tuple(q.shape), tuple(k.shape), dropout_p, softmax_scale))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()  # flash-attn returns (B, S, H, D) contiguous

    monkeypatch.setattr(s2, "_use_flash_attn", lambda q: True)
    monkeypatch.setattr(s2, "_flash_attn", {"flash_attn_func": fake_flash_attn_func}.get)
    q, k, v = make_qkv(2, heads, heads_kv, 32, seed=5)
    out = shifted_sparse_attention(q, k, v, 8, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, 8, scale=0.3), rtol=1e-10, atol=1e-10)
    # 2 batches × 4 groups of the unshifted heads [0, h//2): (B, S=G, H=h//2, D)
    assert (8, 8, heads // 2, 8) in [c[0] for c in calls]
    # Each call gets the kv heads its query heads use: shared (multi-query), a slice per half, or one per query head
    # when a kv head straddles the halves, as every grouped-query model with an odd number of heads has.
    assert {c[1][2] for c in calls} == kv_heads_per_call
    assert all(c[3] == 0.3 for c in calls)


@pytest.mark.parametrize(
    ("shape_q", "shape_kv", "group_size", "numbers"),
    [
        ((1, 4, 24, 8), (1, 4, 24, 8), 16, ["24", "16"]),  # seq not divisible
        ((1, 4, 30, 8), (1, 4, 30, 8), 5, ["5"]),  # odd group
        ((1, 9, 16, 8), (1, 2, 16, 8), 4, ["2", "9"]),  # kv heads do not divide an odd head count
        ((1, 8, 16, 8), (1, 3, 16, 8), 4, ["3", "8"]),  # kv heads do not divide heads
        ((1, 4, 16, 8), (1, 4, 12, 8), 4, ["16"]),  # key length differs (KV cache)
    ],
)
def test_invalid_shapes_raise_with_the_numbers(shape_q, shape_kv, group_size, numbers):
    q, k = torch.randn(shape_q), torch.randn(shape_kv)
    with pytest.raises(ValueError) as excinfo:
        shifted_sparse_attention(q, k, k, group_size)
    for number in numbers:
        assert number in str(excinfo.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "heads_kv"), [(8, 2), (9, 3)])
def test_cuda_kernels_match_reference(dtype, heads, heads_kv):
    """On CUDA the groups go through flash-attn when installed, else SDPA's fused kernels: same semantics."""
    q, k, v = make_qkv(2, heads, heads_kv, 256, d=64, dtype=torch.float64)
    expected = reference(q, k, v, 64)
    got = shifted_sparse_attention(*(x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v)), 64)
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-2, rtol=2e-2)
