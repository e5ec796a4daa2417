"""S²-Attn as one FlexAttention call: the whole pattern (causal, within groups, half the heads shifted by G/2, packed
documents each laid out from its own start) is one ``mask_mod``, run over a block-sparse ``BlockMask`` built directly
from the group layout, so the cost follows N·G, not N².

This is the kernel for CUDA without a flash-attn build (``s2attn.kernel: flex``, or ``auto`` when neither flash-attn
nor torch's varlen FlashAttention can run). Compiled on CUDA only: on the CPU compiled FlexAttention has no backward
(pytorch #148752) and eager FlexAttention materialises the N×N scores, so the CPU keeps the SDPA kernels of
``longlora.method.s2attn`` (the tests run the eager form at small sizes against them).

How the mask is laid out: every token gets, per head half, the id of the segment it attends within — the
``s2_segments`` of the documents (unshifted groups for heads ``[0, h//2)``, shifted for ``[h//2, h)``; without
documents, one document per row). ``mask_mod(b, h, q, kv)`` is then ``q >= kv and seg[half(h), b, q] ==
seg[half(h), b, kv]``. Segment ids grow along a row, so a (q block, kv block) tile is non-empty exactly when the kv
block is not after the q block and the kv block's last id reaches the q block's first id, and full exactly when the
kv block is strictly before and its first id equals the q block's last id. Those two comparisons on per-block ids give
the BlockMask without ever forming the N×N mask (``create_block_mask`` would: N² booleans per head).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from longlora.method.s2attn import _check_documents, _row_documents, _validate, s2_segments

__all__ = ["BLOCK_SIZE", "flex_shifted_sparse_attention", "s2_block_mask", "s2_mask_mod", "s2_segment_ids"]

BLOCK_SIZE = 128
"""FlexAttention's sparse block (tile) size: the granularity at which blocks outside every group are skipped."""


def s2_segment_ids(documents: torch.Tensor, batch: int, seq_len: int, group_size: int) -> torch.Tensor:
    """(2, batch, seq_len) int32: for the unshifted (0) and shifted (1) head half, the index of the segment each token
    attends within (``s2_segments`` of ``documents``, cumulative lengths over the batch·seq_len tokens row after row,
    every row start included). Non-decreasing along the flattened tokens."""
    total = batch * seq_len
    documents = _check_documents(documents, total)
    ids = []
    for shifted in (False, True):
        cu = s2_segments(documents, group_size, shifted)
        lengths = cu[1:] - cu[:-1]
        segment = torch.arange(len(lengths), device=cu.device, dtype=torch.int32)
        ids.append(torch.repeat_interleave(segment, lengths, output_size=total))
    return torch.stack(ids).view(2, batch, seq_len)


def s2_mask_mod(segments: torch.Tensor, half: int) -> Callable:
    """The S²-Attn ``mask_mod(b, h, q_idx, kv_idx)``: causal, and the same segment of ``segments`` (as
    ``s2_segment_ids`` gives them) in the head's half — heads ``h >= half`` use the shifted segments (half = h//2 for
    S²-Attn, h for the no-shift ablation). The segment table is padded to whole blocks (index -1), so that indices a
    kernel reads past the sequence end stay inside it."""
    pad = -segments.shape[-1] % BLOCK_SIZE
    table = torch.nn.functional.pad(segments, (0, pad), value=-1) if pad else segments

    def mask_mod(b, h, q_idx, kv_idx):
        part = (h >= half).to(torch.int64)
        return (q_idx >= kv_idx) & (table[part, b, q_idx] == table[part, b, kv_idx])

    return mask_mod


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (count, indices) form of a dense block mask (…, q blocks, kv blocks): the indices of the set
    blocks first in each row."""
    dense = dense.to(torch.int32)
    count = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count, indices


def s2_block_mask(segments: torch.Tensor, heads: int, half: int, block_size: int = BLOCK_SIZE) -> BlockMask:
    """The BlockMask of ``s2_mask_mod(segments, half)`` for ``heads`` query heads over rows of ``segments``
    ((2, batch, n) as ``s2_segment_ids`` gives them): tiles of ``block_size`` that hold no attending pair are skipped,
    tiles where every pair attends run without the mask_mod (see the module docstring). O(batch·(n/block)²) work and
    memory per head pattern, never N²."""
    _, batch, n = segments.shape
    device = segments.device
    blocks = -(-n // block_size)
    index = torch.arange(blocks, device=device)
    first = segments[:, :, index * block_size]  # (2, b, blocks)
    last = segments[:, :, torch.clamp((index + 1) * block_size, max=n) - 1]
    q, kv = index[:, None], index[None, :]
    # [part, b, q block, kv block]
    attends = (kv <= q) & (last[:, :, None, :] >= first[:, :, :, None])
    whole = ((index + 1) * block_size <= n)[:, None]  # a ragged last q block is never full
    full = (kv < q) & whole & (first[:, :, None, :] == last[:, :, :, None])
    pattern = (torch.arange(heads, device=device) >= half).long()  # head → part

    def per_head(dense):
        count, indices = _ordered(dense)  # ordered once per part, then handed to each head
        return count[pattern].transpose(0, 1).contiguous(), indices[pattern].transpose(0, 1).contiguous()

    return BlockMask.from_kv_blocks(*per_head(attends & ~full), *per_head(full), BLOCK_SIZE=block_size,
                                    mask_mod=s2_mask_mod(segments, half), seq_lengths=(n, n))


_masks: tuple[weakref.ref, int, dict] | None = None


def _block_mask_for(documents: torch.Tensor, batch: int, seq_len: int, heads: int, group_size: int, half: int,
                    block_size: int) -> BlockMask:
    """The BlockMask for these documents, built once per forward: every layer gets the same documents tensor (cached
    by identity and version, as ``longlora.method.s2attn._plans_for`` does)."""
    global _masks
    key = (batch, seq_len, heads, group_size, half, block_size, documents.device)
    if _masks is None or _masks[0]() is not documents or _masks[1] != documents._version:
        _masks = (weakref.ref(documents), documents._version, {})
    cache = _masks[2]
    if key not in cache:
        segments = s2_segment_ids(documents, batch, seq_len, group_size)
        cache[key] = s2_block_mask(segments, heads, half, block_size)
    return cache[key]


@functools.cache
def _compiled_flex() -> Callable:
    # Dynamic shapes after the first recompile (torch.compile's default): SFT batches of varying length would
    # otherwise exhaust the recompile limit and drop to the eager, N²-memory implementation.
    return torch.compile(flex_attention)


def flex_shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    *,
    scale: float | None = None,
    documents: torch.Tensor | None = None,
    shift: bool = True,
    compiled: bool | None = None,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """``longlora.method.s2attn.shifted_sparse_attention`` as one FlexAttention call: same arguments, layout and
    result (query (b, h, n, d), key/value (b, h_kv, n, d); returns (b, h, n, d)), no dropout. ``shift=False``: every
    head in the plain groups (``grouped_causal_attention``). ``compiled``: run ``torch.compile(flex_attention)``
    (default: on CUDA); eager FlexAttention forms the N×N scores — for tests at small sizes only."""
    _validate(query, key, value, group_size, whole_groups=documents is None)
    b, heads, n, _ = query.shape
    if documents is None:
        documents = _row_documents(b, n, query.device)
    half = heads // 2 if shift else heads
    block_mask = _block_mask_for(documents.to(query.device), b, n, heads, group_size, half, block_size)
    attend = _compiled_flex() if (query.is_cuda if compiled is None else compiled) else flex_attention
    return attend(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != heads)
