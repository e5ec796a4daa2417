"""Shifted sparse attention (S²-Attn, LongLoRA §3.2) and its registration as a transformers attention backend.

Half the heads attend causally within fixed groups ``[kG, (k+1)G)``; the other half within groups shifted by G/2,
``[0, G/2), [G/2, 3G/2), …, [N−G/2, N)``. The shifted groups are cut at their boundaries rather than rolled
(``torch.roll`` makes the first half-group attend to the end of the sequence), so no token ever sees a later one.

Every group is a fused causal kernel call on a *view* of the projected tensors: no masks, no score matrices.

Document-aware S²-Attn (packed rows, padding-free batches): when a row holds several documents back to back (told by
``position_ids`` restarting, or flash-attn style cumulative lengths ``cu_seq_lens_q``), each document is computed
exactly as if it were alone in its own row: its groups are laid out from its own start and cut at its end, with the
same group size. See ``s2_segments`` and ``shifted_sparse_attention(..., documents=...)``.

Usage::

    import longlora.method.s2attn as s2
    config = LlamaConfig(...)
    s2.configure_s2attn(config, group_size_ratio=0.25)   # or on an existing model
    model = LlamaForCausalLM(config)                     # S² in train mode, dense causal attention in eval mode
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    find_packed_sequence_indices,
    packed_sequence_compatibility_function,
    packed_sequence_mask_function,
    remap_positions_for_packed_sequence,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from longlora.recipe import (
    DEFAULT_GROUP_SIZE_RATIO,
    S2ATTN_KERNELS,
    check_group_size,
    check_group_size_ratio,
    group_size_for,
)

__all__ = [
    "S2ATTN",
    "configure_s2attn",
    "document_boundaries",
    "grouped_causal_attention",
    "register_s2attn",
    "resolve_s2attn_kernel",
    "s2attn_attention_forward",
    "s2attn_group_size",
    "s2attn_mask",
    "s2_segments",
    "shifted_sparse_attention",
]

S2ATTN = "s2attn"

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # Attention runs once per layer and step: without this a single misconfiguration floods the log.
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def _flash_attn(name: str) -> Callable | None:
    """flash-attn's `name` kernel (flash_attn_func, flash_attn_varlen_func), or None where flash-attn is absent."""
    # Imported lazily: flash-attn is an optional CUDA-only extra and importing it costs seconds.
    try:
        import flash_attn
    except Exception:  # ImportError, or a broken build raising anything at import
        return None
    return getattr(flash_attn, name, None)


def _use_flash_attn(q: torch.Tensor) -> bool:
    fused = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    return fused and _flash_attn("flash_attn_func") is not None


@functools.cache
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    """torch's ``varlen_attn`` (FlashAttention kernels with cu_seqlens, CUDA only) and its keyword names, or None
    where the installed torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    import inspect

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


_HALF = (torch.float16, torch.bfloat16)
_SDPA_ADVICE = "set s2attn.kernel to auto or sdpa"


def _kernel_problem(kernel: str, query: torch.Tensor | None = None, dropout_p: float = 0.0) -> str | None:
    """Why ``kernel`` cannot run S²-Attn on ``query`` (or, without one, on this machine at all), or None."""
    cuda = query.is_cuda if query is not None else torch.cuda.is_available()
    where = f"the attention runs on {query.device.type}" if query is not None else "this machine has no CUDA device"
    if kernel == "flash_attn":
        if _flash_attn("flash_attn_func") is None:
            return ("the flash-attn package is not installed or fails to import (pip install flash-attn, built "
                    "against your CUDA; or let auto pick torch's varlen or flex kernels)")
        if not cuda:
            return f"flash-attn runs on CUDA only and {where}; {_SDPA_ADVICE}"
        if query is not None and query.dtype not in _HALF:
            return f"flash-attn needs float16 or bfloat16, the attention runs in {query.dtype}; {_SDPA_ADVICE}"
        if query is not None and query.shape[-1] > 256:
            return f"flash-attn takes head dimensions up to 256, got {query.shape[-1]}; {_SDPA_ADVICE}"
    elif kernel == "varlen":
        if _torch_varlen() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 has); {_SDPA_ADVICE}"
        if not cuda:
            return f"torch's varlen_attn runs FlashAttention kernels on CUDA only and {where}; {_SDPA_ADVICE}"
        if query is not None and query.dtype not in _HALF:
            return (f"torch's varlen_attn needs float16 or bfloat16, the attention runs in {query.dtype}; use flex "
                    "or sdpa")
        if query is not None and (query.shape[-1] > 256 or query.shape[-1] % 8):
            return f"torch's varlen_attn takes head dimensions up to 256, multiples of 8, got {query.shape[-1]}"
        if dropout_p:
            return f"torch's varlen_attn has no attention dropout (the model's is {dropout_p}); use flash_attn or sdpa"
    elif kernel == "flex":
        if not _has_flex():
            return f"torch {torch.__version__} has no FlexAttention; {_SDPA_ADVICE}"
        if not cuda:
            return (f"FlexAttention is used compiled, on CUDA only, and {where} (on the CPU compiled FlexAttention has "
                    f"no backward, pytorch #148752, and eager FlexAttention takes N² memory); {_SDPA_ADVICE}")
        if dropout_p:
            return f"FlexAttention has no attention dropout (the model's is {dropout_p}); use flash_attn or sdpa"
    elif kernel not in S2ATTN_KERNELS:
        return f"unknown kernel; choose one of {', '.join(S2ATTN_KERNELS)}"
    return None


def resolve_s2attn_kernel(kernel: str, query: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The kernel S²-Attn runs for ``kernel`` (``s2attn.kernel``: auto, flash_attn, flex, varlen or sdpa) on
    ``query``: never auto. auto takes flash-attn (CUDA, fp16/bf16, the package imports), else torch's varlen
    FlashAttention (CUDA, fp16/bf16, no dropout), else FlexAttention (CUDA, no dropout), else sdpa (the CPU, or
    dropout without flash-attn). An explicit kernel that cannot run raises ValueError naming ``s2attn.kernel`` and
    why: never a silent fallback."""
    if kernel == "auto":
        if _use_flash_attn(query):
            return "flash_attn"
        for candidate in ("varlen", "flex"):
            if _kernel_problem(candidate, query, dropout_p) is None:
                return candidate
        return "sdpa"
    problem = _kernel_problem(kernel, query, dropout_p)
    if problem:
        raise ValueError(f"s2attn.kernel {kernel!r}: {problem}")
    return kernel


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, dropout_p: float,
    flash: bool | None = None,
) -> torch.Tensor:
    """Causal attention on (B, H, S, D) tensors; k/v may have fewer heads than q (GQA). ``flash``: flash-attn's
    kernel (True) or SDPA (False); None: flash-attn where it can run."""
    if _use_flash_attn(q) if flash is None else flash:
        # flash-attn wants (B, S, H, D): the transposes are free, and it takes GQA and strided heads natively.
        out = _flash_attn("flash_attn_func")(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, softmax_scale=scale, causal=True
        )
        return out.transpose(1, 2)
    # enable_gqa broadcasts kv heads inside the kernel; on CPU (torch 2.13) it runs the same flash kernel as with
    # repeated heads, at the same speed, without the copy.
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def _group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(b, h, n, d) → (b·n/G, h, G, d); a view for the (b, n, h, d) memory layout transformers produces."""
    b, h, n, d = x.shape
    groups = n // group_size
    return x.unflatten(2, (groups, group_size)).transpose(1, 2).reshape(b * groups, h, group_size, d)


def _ungroup(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(b·n/G, h, G, d) → (b, n, h, d); a view when the kernel wrote its output as (B, S, H, D), as CPU SDPA and
    flash-attn do."""
    groups, h, g, d = x.shape
    return x.transpose(1, 2).reshape(batch, (groups // batch) * g, h, d)


class _Split(torch.autograd.Function):
    """Views of x (b, h, n, d) for ``(head slice, seq slice)`` regions.

    Autograd's own slice backward allocates a zero tensor of the full input size per slice and sums them (about ten
    full-size fills and adds per step). Here each gradient is written once into a single buffer, accumulated only
    where regions overlap (a kv head shared by both halves): fewer full-size fills, a faster backward.
    """

    @staticmethod
    def forward(ctx, x, regions, overlapping):
        ctx.regions, ctx.overlapping = regions, overlapping
        ctx.shape, ctx.bshd = x.shape, x.transpose(1, 2).is_contiguous()
        ctx.dtype, ctx.device = x.dtype, x.device
        return tuple(x[:, heads, seq] for heads, seq in regions)

    @staticmethod
    def backward(ctx, *grads):
        b, h, n, d = ctx.shape
        make = torch.zeros if ctx.overlapping else torch.empty
        if ctx.bshd:
            # Same memory layout as the input (transformers' (b, n, h, d) projections): the grouped views stay views.
            gx = make(b, n, h, d, dtype=ctx.dtype, device=ctx.device).transpose(1, 2)
        else:
            gx = make(b, h, n, d, dtype=ctx.dtype, device=ctx.device)
        for (heads, seq), g in zip(ctx.regions, grads, strict=True):
            region = gx[:, heads, seq]
            if ctx.overlapping:
                if g is not None:
                    region.add_(g)
            elif g is None:
                region.zero_()
            else:
                region.copy_(g)
        return gx, None, None


class _Merge(torch.autograd.Function):
    """Writes pieces (b, len, heads, d) into one (b, n, h, d) tensor at ``(seq slice, head slice)`` regions that
    partition it; backward hands out views of the incoming gradient instead of cat's copies."""

    @staticmethod
    def forward(ctx, shape, regions, *pieces):
        ctx.regions = regions
        out = pieces[0].new_empty(shape)
        for (seq, heads), piece in zip(regions, pieces, strict=True):
            out[:, seq, heads].copy_(piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(grad[:, seq, heads] for seq, heads in ctx.regions))


def _kv_halves(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, slice, slice]:
    """Key/value (possibly head-repeated) and the kv head slices serving query heads [0, h//2) and [h//2, h)."""
    heads_kv = key.shape[1]
    half, n_rep = heads // 2, heads // heads_kv
    if heads_kv == 1:
        # Multi-query: both halves share the single head, SDPA broadcasts it (enable_gqa).
        return key, value, slice(0, 1), slice(0, 1)
    if half % n_rep == 0:
        # The half boundary falls between kv heads: each half keeps a uniform GQA ratio on its own slice.
        return key, value, slice(0, half // n_rep), slice(half // n_rep, heads_kv)
    # A kv head straddles the boundary (e.g. 6 heads, 3 kv heads, or any grouped-query model with an odd number of
    # heads: 9 and 3, 15 and 5): no slice gives a uniform ratio, so each query head gets its own copy of its kv head.
    # Index in the (b, n, h, d) layout so the grouped views of the copy stay views.
    index = torch.arange(heads, device=key.device) // n_rep
    key = key.transpose(1, 2).index_select(2, index).transpose(1, 2)
    value = value.transpose(1, 2).index_select(2, index).transpose(1, 2)
    return key, value, slice(0, half), slice(half, heads)


def _validate(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int, whole_groups: bool = True
) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"S²-Attn expects 4D (batch, heads, seq, head_dim) tensors, got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    b, heads, n, _ = query.shape
    if key.shape[0] != b or key.shape[2] != n or key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"S²-Attn needs key/value of batch {b} and sequence length {n} like the query (no KV cache), got key "
            f"{tuple(key.shape)}, value {tuple(value.shape)}"
        )
    heads_kv = key.shape[1]
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(f"key/value heads {heads_kv} do not divide attention heads {heads}")
    check_group_size(group_size)
    if n == 0 or (whole_groups and n % group_size):
        raise ValueError(f"sequence length {n} is not divisible by S²-Attn group size {group_size}")


def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    documents: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """S²-Attn with the layout of ``F.scaled_dot_product_attention(query, key, value, is_causal=True)``.

    query (b, h, n, d), key/value (b, h_kv, n, d) with h_kv dividing h; returns (b, h, n, d). Heads ``[0, h//2)``
    attend causally within groups ``[kG, (k+1)G)``, heads ``[h//2, h)`` within ``[0, G/2), [G/2, 3G/2), …,
    [n−G/2, n)`` (with an odd h the shifted half has one head more, as in the reference's ``num_heads // 2`` split).
    Raises ValueError when n is not a multiple of ``group_size``, ``group_size`` is odd or h_kv does not divide h.

    ``documents``: the boundaries of the documents packed into the rows, as cumulative lengths over the b·n tokens
    taken row after row (``document_boundaries`` makes them; every row start is a boundary). Each document is then
    computed exactly as ``shifted_sparse_attention`` computes it alone, right-padded to a multiple of G, on its real
    tokens: groups laid out from the document's start, cut at its end (``s2_segments``). n need not be a multiple
    of G then.

    ``kernel`` (``s2attn.kernel``, see ``resolve_s2attn_kernel``): flash_attn, varlen (torch's FlashAttention with
    the segments as cu_seqlens), flex (one FlexAttention call, ``longlora.method.s2flex``), sdpa, or auto.
    """
    kernel = resolve_s2attn_kernel(kernel, query, dropout_p)
    if kernel == "flex":
        from longlora.method.s2flex import flex_shifted_sparse_attention

        return flex_shifted_sparse_attention(query, key, value, group_size, scale=scale, documents=documents)
    if documents is None and kernel == "varlen":
        _validate(query, key, value, group_size)
        documents = _row_documents(query.shape[0], query.shape[2], query.device)  # the groups as cu_seqlens
    if documents is not None:
        return _document_sparse_attention(query, key, value, group_size, documents, scale, dropout_p, kernel)
    _validate(query, key, value, group_size)
    b, heads, n, _ = query.shape
    half, shift = heads // 2, group_size // 2
    flash = kernel == "flash_attn"

    def attend(q, k, v):
        return _causal_attention(q, k, v, scale, dropout_p, flash)

    def regions(unshifted: slice, shifted: slice) -> dict[str, tuple[slice, slice]]:
        """(head slice, seq slice) of each part in (b, h, n, d): the unshifted heads whole (none when h == 1), and
        the shifted heads' edge half-groups [0, G/2) and [n − G/2, n) and their n/G − 1 full groups in between."""
        parts = {"unshifted": (unshifted, slice(None))} if half else {}
        parts |= {"head": (shifted, slice(0, shift)), "tail": (shifted, slice(n - shift, n))}
        if n > group_size:
            parts["middle"] = (shifted, slice(shift, n - shift))
        return parts

    key, value, kv_unshifted, kv_shifted = _kv_halves(key, value, heads)
    q_regions = regions(slice(0, half), slice(half, heads))
    kv_regions = regions(kv_unshifted, kv_shifted)
    overlapping = kv_unshifted == kv_shifted
    q, k, v = (
        dict(zip(parts, _Split.apply(x, list(parts.values()), overlap), strict=True))
        for x, parts, overlap in ((query, q_regions, False), (key, kv_regions, overlapping),
                                  (value, kv_regions, overlapping))
    )

    out = {}
    for part in ("unshifted", "middle"):
        if part in q:
            out[part] = _ungroup(attend(*(_group(x[part], group_size) for x in (q, k, v))), b)
    # Both edge half-groups as one batch of 2b segments of length G/2.
    edges = _ungroup(attend(*(torch.cat((x["head"], x["tail"]), dim=0) for x in (q, k, v))), 2 * b)
    out["head"], out["tail"] = edges[:b], edges[b:]

    # Output in (b, n, h, d) memory so the caller's transpose(1, 2).contiguous() is free.
    out_regions = [(seq, head_slice) for head_slice, seq in q_regions.values()]
    return _Merge.apply((b, n, heads, value.shape[-1]), out_regions, *(out[part] for part in q_regions)).transpose(1, 2)


def grouped_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str = "auto",
) -> torch.Tensor:
    """S²-Attn without the shift: every head attends causally within the groups ``[kG, (k+1)G)`` only, so no
    information crosses a group boundary (the paper's "short attention" ablation, Table 6's pattern without shift).
    Same layout, checks and ``kernel`` choice as ``shifted_sparse_attention``; returns (b, h, n, d)."""
    _validate(query, key, value, group_size)
    kernel = resolve_s2attn_kernel(kernel, query, dropout_p)
    if kernel == "flex":
        from longlora.method.s2flex import flex_shifted_sparse_attention

        return flex_shifted_sparse_attention(query, key, value, group_size, scale=scale, shift=False)
    if kernel == "varlen":
        documents = _row_documents(query.shape[0], query.shape[2], query.device)
        return _document_sparse_attention(query, key, value, group_size, documents, scale, dropout_p, kernel,
                                          shift=False)
    grouped = (_group(x, group_size) for x in (query, key, value))
    out = _causal_attention(*grouped, scale, dropout_p, kernel == "flash_attn")
    return _ungroup(out, query.shape[0]).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# Document-aware kernel
# --------------------------------------------------------------------------------------------------------------------


def document_boundaries(
    batch: int,
    seq_len: int,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Cumulative document lengths over the ``batch``·``seq_len`` tokens taken row after row: ``[0, …, b·n]``,
    int64, every row start included. None when every row holds a single document (nothing to be aware of).

    From ``cu_seqlens`` (flash-attn style, as transformers' ``DataCollatorWithFlattening`` gives them: batch 1, the
    last entry may fall short of n when the row is padded) or from ``position_ids`` (b or 1, n): a document starts
    wherever the position does not follow the previous one (transformers' ``find_packed_sequence_indices`` rule).
    """
    total = batch * seq_len
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long).flatten()
        row_starts = torch.arange(0, total, seq_len, device=cu.device)
        starts = torch.cat((cu[:-1][cu[:-1] < total], cu[-1:][cu[-1:] < total], row_starts))
    elif position_ids is not None:
        positions = position_ids.to(device=device).expand(batch, seq_len)
        restart = torch.ones(batch, seq_len, dtype=torch.bool, device=positions.device)
        restart[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        starts = restart.flatten().nonzero().flatten()
    else:
        return None
    starts = torch.unique(starts)  # sorted
    if len(starts) == batch:
        return None
    return torch.cat((starts, starts.new_tensor([total])))


def s2_segments(documents: torch.Tensor, group_size: int, shifted: bool) -> torch.Tensor:
    """The token ranges that attend among themselves (causally) in one head half, as cumulative boundaries: each
    document ``[s, e)`` of ``documents`` (cumulative lengths) cut into ``[s + kG, s + (k+1)G)`` (unshifted), or
    ``[s, s + G/2), [s + G/2, s + 3G/2), …`` (shifted), each cut at e. These are the flash-attn varlen
    ``cu_seqlens`` of the half; pure torch, no loop over documents."""
    check_group_size(group_size)
    documents = documents.long()
    starts, lengths = documents[:-1], documents[1:] - documents[:-1]
    shift = group_size // 2 if shifted else 0
    # Pieces per document: the (possibly empty) leading half-group, then whole groups, the last one cut short.
    pieces = (lengths + shift + group_size - 1) // group_size
    doc = torch.repeat_interleave(torch.arange(len(starts), device=documents.device), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    k = torch.arange(len(doc), device=documents.device) - first[doc]
    offsets = (k * group_size - shift).clamp(min=0)
    return torch.cat((starts[doc] + offsets, documents[-1:]))


def _bucket_quantum(group_size: int) -> int:
    # Segments are padded up to a multiple of G/32 (never beyond G) so that a packed block needs a handful of kernel
    # calls rather than one per distinct document length; the padding comes after the real tokens, so causal
    # attention keeps it from reaching them, at most G/32 extra rows per short segment.
    return max(1, group_size // 32)


@dataclasses.dataclass(frozen=True)
class _SegmentPlan:
    """How one head half's segments run: flash-attn's varlen arguments, or the CPU path's buckets of equal padded
    length (``sizes`` × ``counts`` segments, gathered by ``index``, read back by ``token_at``)."""

    cu_seqlens: torch.Tensor
    longest: int
    sizes: list[int]
    counts: list[int]
    index: torch.Tensor | None
    token_at: torch.Tensor | None


def _segment_plan(cu: torch.Tensor, group_size: int, buckets: bool) -> _SegmentPlan:
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    longest = int(lengths.max())
    if not buckets:
        return _SegmentPlan(cu.to(torch.int32), longest, [], [], None, None)
    total = int(cu[-1])
    quantum = _bucket_quantum(group_size)
    padded = torch.clamp((lengths + quantum - 1) // quantum * quantum, max=group_size)
    padded = torch.maximum(padded, lengths)  # only when a segment is longer than G (a caller's own boundaries)
    # Segments sorted by padded length: each bucket of equal length is then a contiguous run of one gather of q, k
    # and v (one gather each: the backward of every separate gather would fill a zero buffer of the full input).
    order = torch.argsort(padded, stable=True)
    rows = padded[order]
    sizes, counts = torch.unique_consecutive(rows, return_counts=True)
    location = torch.empty_like(starts)  # where each segment's first token lands in the gathered tokens
    location[order] = torch.cumsum(rows, 0) - rows
    within = torch.arange(int(rows.sum()), device=cu.device) - torch.repeat_interleave(location[order], rows)
    index = (torch.repeat_interleave(starts[order], rows) + within).clamp(max=total - 1)
    segment = torch.repeat_interleave(torch.arange(len(starts), device=cu.device), lengths)
    token_at = location[segment] + torch.arange(total, device=cu.device) - starts[segment]
    return _SegmentPlan(cu, longest, sizes.tolist(), counts.tolist(), index, token_at)


def _torch_varlen_attention(q, k, v, cu: torch.Tensor, longest: int, scale) -> torch.Tensor:
    """torch's varlen_attn, causal within each segment of ``cu``, across the keyword spellings torch releases use
    (``is_causal``, or ``window_size=(-1, 0)`` as in torch 2.13)."""
    varlen, names = _torch_varlen()
    options: dict[str, Any] = {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if "is_causal" in names:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)
    return varlen(q, k, v, cu, cu, longest, longest, **options)


def _varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _SegmentPlan, scale, dropout_p, kernel: str | None = None
) -> torch.Tensor:
    """Causal attention within each segment of the plan over the flat tokens; q (T, h, d), k/v (T, h_kv, d);
    returns (T, h, d). An unbucketed plan runs flash-attn's varlen kernel, or torch's with ``kernel="varlen"``; a
    bucketed one SDPA (``kernel="sdpa"``) or flash-attn per bucket (None: flash-attn where it can run)."""
    if plan.index is None:
        cu = plan.cu_seqlens
        if kernel == "varlen":
            return _torch_varlen_attention(q, k, v, cu, plan.longest, scale)
        varlen = _flash_attn("flash_attn_varlen_func")
        return varlen(q, k, v, cu, cu, plan.longest, plan.longest, dropout_p, softmax_scale=scale, causal=True)
    # split, not slicing: its backward concatenates the pieces' gradients instead of filling a zero buffer per piece.
    pieces = [x.index_select(0, plan.index).split([size * count for size, count in zip(plan.sizes, plan.counts,
                                                                                          strict=True)])
              for x in (q, k, v)]
    outputs = []
    for i, (size, count) in enumerate(zip(plan.sizes, plan.counts, strict=True)):
        qs, ks, vs = (x[i].unflatten(0, (count, size)).transpose(1, 2) for x in pieces)
        out = _causal_attention(qs, ks, vs, scale, dropout_p, None if kernel is None else kernel == "flash_attn")
        outputs.append(out.transpose(1, 2).reshape(count * size, out.shape[1], out.shape[-1]))
    merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return merged.index_select(0, plan.token_at)


def _check_documents(documents: torch.Tensor, total: int) -> torch.Tensor:
    """``documents`` as int64, or ValueError unless they are increasing cumulative lengths from 0 to ``total``."""
    cu = documents.to(dtype=torch.long)
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"documents must be increasing cumulative lengths from 0 to batch × seq = {total}, got "
                         f"{cu.tolist()[:8]}{'…' if len(cu) > 8 else ''}")
    return cu


_plans: tuple[weakref.ref, int, dict] | None = None


def _plans_for(documents: torch.Tensor, total: int, group_size: int, buckets: bool) -> tuple[_SegmentPlan, ...]:
    """The (unshifted, shifted) plans of these documents. Every layer gets the same documents tensor: planned once
    per forward (host syncs on GPU), not once per layer."""
    global _plans
    key = (total, group_size, buckets, documents.device)
    if _plans is None or _plans[0]() is not documents or _plans[1] != documents._version:
        _plans = (weakref.ref(documents), documents._version, {})
    cache = _plans[2]
    if key not in cache:
        cu = _check_documents(documents, total)
        cache[key] = tuple(_segment_plan(s2_segments(cu, group_size, shifted), group_size, buckets)
                           for shifted in (False, True))
    return cache[key]


def _document_sparse_attention(query, key, value, group_size, documents, scale, dropout_p, kernel: str | None = None,
                               shift: bool = True) -> torch.Tensor:
    """Document-aware S²-Attn with a resolved kernel: flash_attn (flash-attn's varlen kernel), varlen (torch's) or
    sdpa (length buckets); None: flash_attn where it can run, else sdpa. ``shift=False``: every head in the plain
    groups."""
    _validate(query, key, value, group_size, whole_groups=False)
    b, heads, n, _ = query.shape
    if kernel is None:
        kernel = "flash_attn" if _use_flash_attn(query) else "sdpa"
    buckets = kernel == "sdpa" or (kernel == "flash_attn" and _flash_attn("flash_attn_varlen_func") is None)
    plans = _plans_for(documents.to(query.device), b * n, group_size, buckets)
    half = heads // 2 if shift else heads
    if shift:
        key, value, kv_unshifted, kv_shifted = _kv_halves(key, value, heads)
    else:
        kv_unshifted = kv_shifted = slice(None)

    def flat(x):  # (b, h, n, d) → (b·n, h, d): a view for the (b, n, h, d) memory transformers produces
        return x.transpose(1, 2).reshape(b * n, x.shape[1], x.shape[-1])

    q, k, v = flat(query), flat(key), flat(value)
    halves = []
    if half:
        halves.append((slice(0, half), kv_unshifted, plans[0]))
    if half < heads:
        halves.append((slice(half, heads), kv_shifted, plans[1]))
    outs = [_varlen_attention(q[:, heads_q], k[:, heads_kv], v[:, heads_kv], plan, scale, dropout_p, kernel)
            for heads_q, heads_kv, plan in halves]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.view(b, n, heads, out.shape[-1]).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# transformers backend
# --------------------------------------------------------------------------------------------------------------------


def s2attn_group_size(config: Any, seq_len: int, whole_groups: bool = True) -> int:
    """Group size for a sequence of ``seq_len`` tokens from a model config: ``config.s2attn_group_size`` if set,
    else ``config.s2attn_group_size_ratio`` (default 0.25) × ``seq_len`` (see ``longlora.recipe.group_size_for``)."""
    return group_size_for(
        seq_len, getattr(config, "s2attn_group_size", None), getattr(config, "s2attn_group_size_ratio", None),
        whole_groups,
    )


def _same_function(a: Callable, b: Callable) -> bool:
    """Structural equality of two closures (same code, equal captured values), e.g. two sliding-window masks."""
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_a is not code_b:
        return False
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    if len(cells_a) != len(cells_b):
        return False
    for cell_a, cell_b in zip(cells_a, cells_b, strict=True):
        x, y = cell_a.cell_contents, cell_b.cell_contents
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or not all(_same_function(f, g) for f, g in zip(x, y, strict=True)):
                return False
        elif callable(x) and callable(y):
            if not _same_function(x, y):
                return False
        elif not (type(x) is type(y) and isinstance(x, int | float | str | type(None)) and x == y):
            return False  # tensors (packed-sequence ids, block ids) and anything else unknown: not plain causal
    return True


def _closure(function: Callable) -> dict[str, Any]:
    return dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ()),
                    strict=True))


_AND_CODE = and_masks(causal_mask_function).__code__
_PACKED_CODE = packed_sequence_mask_function(None).__code__
_REMAP_CODE = remap_positions_for_packed_sequence(causal_mask_function, None).__code__


def _without_packing(mask_function: Callable) -> Callable:
    """The mask function inside transformers' packed-sequence wrapper (built when position_ids restart per document
    and there is neither a 2D mask nor a cache), else ``mask_function`` itself. Document-aware S² takes the
    documents from position_ids itself, so the wrapper needs no N×N mask."""
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return mask_function
    parts = _closure(mask_function).get("mask_functions", ())
    if (len(parts) == 2 and getattr(parts[0], "__code__", None) is _PACKED_CODE
            and getattr(parts[1], "__code__", None) is _REMAP_CODE):
        return _closure(parts[1])["mask_function"]
    return mask_function


def _is_plain_causal(mask_function: Callable, local_size: int | None) -> bool:
    mask_function = _without_packing(mask_function)
    if mask_function is causal_mask_function:
        return True
    return local_size is not None and _same_function(mask_function, sliding_window_causal_mask_function(local_size))


def s2attn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder registered with ``AttentionMaskInterface`` under ``"s2attn"``.

    Without a KV cache (``q_length == kv_length``, no offsets) it returns the 2D boolean padding mask
    ``(batch, kv_length)``, or None without padding: S² needs no N×N mask. That includes packed sequences
    (position_ids restarting per document): the attention reads the documents from position_ids. Otherwise (cache
    in use, or a mask pattern that is not plain (sliding-window) causal) it returns transformers' ``sdpa_mask``, and
    the attention runs dense.
    """
    plain = (
        q_length == kv_length
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and (attention_mask is None or attention_mask.shape[-1] == kv_length)
        and _is_plain_causal(mask_function, kwargs.get("local_size"))
    )
    if not plain:
        return sdpa_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


_checked_mask: tuple[weakref.ref, int] | None = None


def _check_right_padding(mask: torch.Tensor) -> None:
    # Every layer receives the same mask object: check it once per forward, not once per layer (a host sync on GPU).
    global _checked_mask
    if _checked_mask is not None and _checked_mask[0]() is mask and _checked_mask[1] == mask._version:
        return
    # Right padding means no row ever goes from padding back to a real token.
    if mask.shape[-1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "S²-Attn training needs right-padded batches (each attention_mask row: ones, then zeros); got left or "
            "inner padding. Set tokenizer.padding_side = 'right'."
        )
    _checked_mask = (weakref.ref(mask), mask._version)


_documents_cache: tuple[weakref.ref, int, tuple, torch.Tensor | None] | None = None


def _documents(query: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The document boundaries of a packed batch from what the decoder layer passes (``cu_seq_lens_q`` of a
    flattened batch, else ``position_ids``), or None for one document per row. Every layer gets the same tensor:
    found once per forward (a host sync on GPU), not once per layer."""
    global _documents_cache
    source = kwargs.get("cu_seq_lens_q")
    name = "cu_seqlens"
    if source is None:
        source, name = kwargs.get("position_ids"), "position_ids"
    if not isinstance(source, torch.Tensor):
        return None
    shape = (query.shape[0], query.shape[2], name)
    cached = _documents_cache
    if cached is not None and cached[0]() is source and cached[1] == source._version and cached[2] == shape:
        return cached[3]
    documents = document_boundaries(query.shape[0], query.shape[2], device=query.device, **{name: source})
    _documents_cache = (weakref.ref(source), source._version, shape, documents)
    return documents


@functools.lru_cache(maxsize=8)
def _row_documents(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    # Cached: the same tensor for every layer, so that its segment plans are made once per shape.
    return torch.arange(0, batch * seq_len + 1, seq_len, device=device)


def _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    q_length, kv_length = query.shape[2], key.shape[2]
    if (attention_mask is None or attention_mask.dim() == 2) and q_length == kv_length:
        # s2attn_mask gave the light form: build what the "sdpa" backend would have received, documents kept apart
        # when position_ids restart (as transformers does for packed sequences).
        sliding_window = kwargs.get("sliding_window")
        mask_function = (causal_mask_function if sliding_window is None
                         else sliding_window_causal_mask_function(sliding_window))
        position_ids, packed = kwargs.get("position_ids"), None
        # _documents: once per forward, not a host sync per layer.
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == q_length and _documents(
            query, {"position_ids": position_ids}
        ) is not None:
            position_ids = position_ids.to(query.device).expand(query.shape[0], -1)
            packed = find_packed_sequence_indices(position_ids)
            if packed is not None:
                mask_function = packed_sequence_compatibility_function(mask_function, position_ids, packed)
        attention_mask = sdpa_mask(
            batch_size=query.shape[0],
            q_length=q_length,
            kv_length=kv_length,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=sliding_window,
            allow_is_causal_skip=packed is None,  # the packed mask is not plain causal
            device=query.device,
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


_UNSUPPORTED_SCORE_TERMS = {
    "softcap": "attention logit soft-capping (Gemma 2's attn_logit_softcapping)",
    "s_aux": "attention sinks (gpt-oss)",
}


def s2attn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered with ``AttentionInterface`` under ``"s2attn"``.

    Training without a KV cache: S²-Attn with the group size from ``module.config`` (see ``s2attn_group_size``) on
    the full, right-padded batch; document-aware when the rows are packed (``position_ids`` restarting per
    document, or ``cu_seq_lens_q`` of a flattened batch): every document computed as if alone in its row. Eval mode
    (unless ``config.s2attn_in_eval``), a KV cache or a 4D mask: dense causal attention through transformers' SDPA
    backend (the paper evaluates with dense attention), packed documents kept apart. Returns
    ``(output (b, seq, heads, d), None)``.
    """
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        raise ValueError(f"S²-Attn supports causal self-attention only; {type(module).__name__} is not causal")
    # Terms that change the attention scores themselves: neither the S² kernels nor SDPA (the dense path) apply
    # them, and leaving one out would train and evaluate a different model without a word.
    for name, what in _UNSUPPORTED_SCORE_TERMS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"S²-Attn does not implement {what}: {type(module).__name__} passes "
                             f"{name}={kwargs[name]!r}; disable it in the model config or train with sdpa or eager")
    four_d = attention_mask is not None and attention_mask.dim() == 4
    # `s2attn_in_eval`: S² at evaluation too (longlora.evaluation.perplexity's attention="s2"; the paper reports both).
    s2 = module.training or getattr(module.config, "s2attn_in_eval", False)
    shard = kwargs.get("sequence_shard")
    if shard is not None:
        return _sharded_attention(module, query, key, value, attention_mask, shard, s2, four_d, dropout, scaling)
    if not s2 or query.shape[2] != key.shape[2] or four_d:
        if module.training and four_d:
            _warn_once(
                "S²-Attn received a 4D attention mask in training (a custom mask pattern); "
                "running dense attention instead"
            )
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    # With right padding no real token can see a pad token: attention is causal and groups are fixed positions, so
    # the padded batch runs as is (no unpadding, no per-row segment boundaries to get wrong).
    if attention_mask is not None:
        _check_right_padding(attention_mask)
    documents = _documents(query, kwargs)
    batch, seq_len = query.shape[0], query.shape[2]
    group_size = s2attn_group_size(module.config, seq_len, whole_groups=False)
    if documents is None and seq_len % group_size:
        # A fixed group that does not divide the rows (e.g. a padding-free batch of single examples): each row is
        # computed as if right-padded to a multiple of the group, i.e. as one document.
        documents = _row_documents(batch, seq_len, query.device)
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and sliding_window < group_size:
        _warn_once(
            f"S²-Attn group size {group_size} exceeds the model's sliding window {sliding_window}: in training, "
            "tokens attend further back than the window allows"
        )
    kernel = getattr(module.config, "s2attn_kernel", "auto")
    if getattr(module.config, "s2attn_shift", True):
        out = shifted_sparse_attention(query, key, value, group_size, scale=scaling, dropout_p=dropout,
                                       documents=documents, kernel=kernel)
    elif documents is not None:
        raise ValueError("S²-Attn without the shift (s2attn.shift: false, the short-attention ablation) takes no "
                         "packed documents: use it with extend.document_attention false and sft.padding_free false")
    else:  # the no-shift ablation (configure_s2attn(shift=False))
        out = grouped_causal_attention(query, key, value, group_size, scale=scaling, dropout_p=dropout, kernel=kernel)
    return out.transpose(1, 2).contiguous(), None


def _sharded_attention(module, query, key, value, attention_mask, shard, s2, four_d, dropout, scaling):
    """One rank's shard of S²-Attn under sequence parallelism: `shard` is a longlora.method.context_parallel
    SequenceShard (not imported here: only the training stages need that module)."""
    if not s2 or four_d or query.shape[2] != key.shape[2]:
        raise ValueError("a sequence-parallel shard (sequence_shard) runs S²-Attn in training only: not in eval mode, "
                         "with a KV cache or with a 4D attention mask")
    group_size = s2attn_group_size(module.config, shard.length, whole_groups=False)
    shift = getattr(module.config, "s2attn_shift", True)
    if group_size != shard.group_size or shift != shard.shift:
        raise ValueError(f"the sequence shards were planned for S² group {shard.group_size} (shift {shard.shift}), "
                         f"the model uses group {group_size} (shift {shift}) at length {shard.length}")
    if attention_mask is not None and attention_mask.dim() == 2:
        _check_right_padding(attention_mask)
    kernel = getattr(module.config, "s2attn_kernel", "auto")
    if kernel in ("flex", "varlen"):
        raise ValueError(f"s2attn.kernel {kernel!r}: sequence-parallel shards (launch.sequence_parallel) run "
                         "flash-attn or SDPA; set s2attn.kernel to auto, flash_attn or sdpa")
    resolve_s2attn_kernel(kernel, query, dropout)  # an explicit flash_attn that cannot run: the error, not SDPA
    out = shard.attend(query, key, value, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register_s2attn() -> None:
    """Register ``"s2attn"`` with transformers' attention and mask interfaces (idempotent)."""
    transformers.AttentionInterface.register(S2ATTN, s2attn_attention_forward)
    AttentionMaskInterface.register(S2ATTN, s2attn_mask)


def configure_s2attn(target: Any, *, group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO, group_size: int | None = None,
                     shift: bool = True, kernel: str = "auto"):
    """Select S²-Attn on a config (before building the model) or on a built model (also PEFT-wrapped).

    ``group_size`` (even int) fixes the group size; otherwise it is ``group_size_ratio`` × the sequence length.
    ``shift=False`` trains every head in the plain groups (``grouped_causal_attention``: the paper's ablation, not the
    method). ``kernel``: auto, flash_attn, flex, varlen or sdpa (``resolve_s2attn_kernel``); an explicit kernel this
    machine cannot run at all (package missing, no CUDA) raises ValueError here, one the tensors rule out (dtype,
    device, dropout) at the first forward. Sets ``s2attn_group_size``, ``s2attn_group_size_ratio``, ``s2attn_shift``,
    ``s2attn_kernel`` and the attention implementation; returns ``target``.
    """
    if group_size is not None:
        check_group_size(group_size)
    group_size_ratio = check_group_size_ratio(group_size_ratio)
    problem = None if kernel == "auto" else _kernel_problem(kernel)
    if problem:
        raise ValueError(f"s2attn.kernel {kernel!r}: {problem}")
    register_s2attn()
    is_model = hasattr(target, "set_attn_implementation") and hasattr(target, "config")
    config = target.config if is_model else target
    config.s2attn_group_size = group_size
    config.s2attn_group_size_ratio = group_size_ratio
    config.s2attn_shift = bool(shift)
    config.s2attn_kernel = kernel
    if is_model:
        target.set_attn_implementation(S2ATTN)
    else:
        config._attn_implementation = S2ATTN
    return target


register_s2attn()
