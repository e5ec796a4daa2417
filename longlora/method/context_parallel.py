"""S²-aware sequence parallelism: each training row split into P contiguous shards, one per rank, with S²-Attn
computed exactly as on one rank while exchanging only the K/V that cross a shard boundary.

S²-Attn is local: a query attends only to keys in its own group. With shard boundaries on group boundaries (shard
length a multiple of G), the unshifted half of the heads needs nothing from another rank, and the shifted half needs
the K/V of the G/2 tokens just before the shard (its first group starts G/2 tokens before the shard's first token).
So each rank sends the last G/2 positions of its shifted heads' K/V to the next rank, receives the previous rank's,
and the gradients of those positions travel back in the backward pass (`HaloLink`) — against P − 1 K/V passes per
layer for ring attention, or two all-to-alls of the whole activations for Ulysses (benchmarks/context_parallel.py).

With packed documents (document-aware S², position_ids restarting per document) a document crossing a shard
boundary lays out its groups from its own start, so either half may need up to G − 1 tokens from the previous
rank: `plan_shards` works out, from the whole row's position_ids, exactly how many each half needs, and the
segments (cumulative boundaries) each shard attends within.

    batch = shard_batch(batch, shards=P, index=r, group_size=G, link=HaloLink(group, prev, next))
    model(**batch)  # the S² backend finds batch["sequence_shard"] among its kwargs and computes the rank's shard

`shard_batch` also gives each shard `shift_labels` (the labels shifted over the whole row, then cut), so the
Trainer's causal-LM loss summed over the shards is the whole row's, and `position_ids` with the row's own values
(RoPE positions stay global). Evaluation stays dense and on one rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from longlora.method.s2attn import _flash_attn, _segment_plan, _use_flash_attn, _varlen_attention, s2_segments
from longlora.recipe import check_group_size

__all__ = ["HaloLink", "LocalLink", "SequenceShard", "halo_needs", "plan_shards", "shard_batch",
           "sharded_s2_attention", "IGNORE_INDEX"]

IGNORE_INDEX = -100
SHARD_KEY = "sequence_shard"
"""The batch key (and so the attention kwarg) that carries a rank's `SequenceShard`."""


@dataclasses.dataclass(eq=False)
class SequenceShard:
    """What one rank's attention needs to compute its shard of the rows: where the shard lies, how many halo tokens
    each head half receives and sends, and the segments each half attends within (over the halo + shard tokens of
    every row, flattened)."""

    index: int
    shards: int
    start: int
    """First token of the shard in the whole row."""
    length: int
    """The whole row's length N (the S² group size is computed from it, not from the shard's)."""
    group_size: int
    shift: bool
    recv: tuple[int, int]
    """Halo tokens received from the previous shard: (unshifted half, shifted half)."""
    send: tuple[int, int]
    """Halo tokens sent to the next shard (the next shard's `recv`)."""
    segments: tuple[torch.Tensor, torch.Tensor]
    """Per half, cumulative boundaries (int64) over the batch's rows of (recv[half] + shard length) tokens each."""
    link: Any = None
    """Moves the halo between ranks (`HaloLink`); None on a single rank."""
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None,
               dropout_p: float = 0.0) -> torch.Tensor:
        """`sharded_s2_attention` of this shard (what the S² backend calls when a batch carries a shard)."""
        return sharded_s2_attention(query, key, value, self, scale=scale, dropout_p=dropout_p)


# --------------------------------------------------------------------------------------------------------------------
# Planning: from the whole rows' positions to each shard's halo and segments
# --------------------------------------------------------------------------------------------------------------------


def _document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, N) bool: where a document starts (the position does not follow the previous one; every row's first)."""
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return restart


def halo_needs(position_ids: torch.Tensor, start: int, group_size: int, shift: bool = True) -> tuple[int, int]:
    """Tokens before `start` that a shard starting there needs, per head half (unshifted, shifted), the most over
    the rows: the distance from the start of the S² segment holding token `start` back to the segment's start."""
    if start == 0:
        return 0, 0
    restart = _document_starts(position_ids)
    index = torch.arange(position_ids.shape[1]).expand_as(position_ids)
    document_start = torch.cummax(torch.where(restart, index, 0), dim=1).values[:, start]
    offset = start - document_start  # how far into its document the shard's first token is
    half = group_size // 2
    unshifted = offset % group_size
    shifted = torch.where(offset < half, offset, (offset - half) % group_size) if shift else unshifted
    return int(unshifted.max()), int(shifted.max())


def _window_segments(position_ids: torch.Tensor, low: int, high: int, group_size: int, shifted: bool) -> torch.Tensor:
    """Cumulative segment boundaries over the rows' tokens [low, high), row after row: the whole rows' S² segments
    cut at the window's ends (a segment cut at `low` only ever holds halo tokens, whose outputs are dropped)."""
    restart = _document_starts(position_ids)
    rows, width = position_ids.shape[0], high - low
    bounds = []
    for row in range(rows):
        starts = restart[row].nonzero().flatten()
        documents = torch.cat((starts, starts.new_tensor([position_ids.shape[1]])))
        cut = s2_segments(documents, group_size, shifted)
        inside = cut[(cut > low) & (cut < high)] - low
        bounds.append(torch.cat((inside.new_tensor([0]), inside)) + row * width)
    return torch.cat((*bounds, torch.tensor([rows * width], dtype=torch.long)))


def plan_shards(position_ids: torch.Tensor, shards: int, group_size: int, shift: bool = True) -> list[dict]:
    """For each of `shards` equal contiguous shards of rows with these position_ids (b, N): its start, halo
    received and sent per head half, and its segments (see `SequenceShard`). N must be a multiple of shards × G."""
    check_group_size(group_size)
    position_ids = position_ids.to("cpu", torch.long)
    length = position_ids.shape[1]
    if shards < 1 or length % (shards * group_size):
        raise ValueError(f"a row of {length} tokens cannot be cut into {shards} shards of whole S² groups of "
                         f"{group_size}: the length must be a multiple of {shards} × {group_size}")
    size = length // shards
    needs = [halo_needs(position_ids, index * size, group_size, shift) for index in range(shards)]
    plans = []
    for index in range(shards):
        start, recv = index * size, needs[index]
        send = needs[index + 1] if index + 1 < shards else (0, 0)
        segments = tuple(_window_segments(position_ids, start - halo, start + size, group_size, shifted and shift)
                         for halo, shifted in zip(recv, (False, True), strict=True))
        plans.append({"index": index, "shards": shards, "start": start, "length": length, "group_size": group_size,
                      "shift": shift, "recv": recv, "send": send, "segments": segments})
    return plans


def shard_batch(batch: dict, shards: int, index: int, group_size: int, *, shift: bool = True, link=None,
                pad_id: int = 0) -> dict:
    """Rank `index`'s shard of a causal-LM batch (`input_ids`, `labels`, optional `attention_mask` and
    `position_ids`, all (b, N)): every tensor cut to the shard, `position_ids` the whole row's (made when absent),
    `shift_labels` the labels shifted by one over the whole row then cut (the shard's last token predicts the next
    shard's first), and the `SequenceShard` under "sequence_shard"."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length).expand(rows, length)
    plan = plan_shards(position_ids, shards, group_size, shift)[index]
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    cut = slice(plan["start"], plan["start"] + length // shards)
    out = {key: value[:, cut] for key, value in batch.items()
           if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (rows, length)}
    out["position_ids"] = position_ids[:, cut].contiguous()
    out["shift_labels"] = shift_labels[:, cut].contiguous()
    out.setdefault("labels", labels[:, cut])
    out[SHARD_KEY] = SequenceShard(**plan, link=link)
    return {key: value.contiguous() if isinstance(value, torch.Tensor) else value for key, value in out.items()}


# --------------------------------------------------------------------------------------------------------------------
# Moving the halo
# --------------------------------------------------------------------------------------------------------------------


class LocalLink:
    """All shards in one process (tests against the one-rank reference): shard s receives the very tensors shard
    s − 1 sent, so autograd carries their gradients back by itself. Shards must run in order, each one's layers in
    the same order; `bytes_sent` counts the forward halo only."""

    def __init__(self):
        self.sent: list[list[torch.Tensor]] = []
        self.received: list[list[torch.Tensor]] = []
        self._calls = 0
        self.bytes_sent = 0

    def next_shard(self) -> None:
        self.received, self.sent, self._calls = self.sent, [], 0

    def exchange(self, tails: list[torch.Tensor], recv_shapes: list[tuple[int, ...]],
                 anchor: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.sent.append(tails)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tails)
        got = self.received[self._calls] if self._calls < len(self.received) else [None] * len(recv_shapes)
        self._calls += 1
        out = []
        for tensor, shape, tail in zip(got, recv_shapes, tails, strict=True):
            if tensor is None and 0 in shape:
                tensor = tail.new_zeros(shape)
            if tensor is None or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"halo of shape {shape} expected, the previous shard sent "
                                   f"{None if tensor is None else tuple(tensor.shape)}")
            out.append(tensor)
        return anchor, out

    def wait(self) -> None:
        pass


class _Swap(torch.autograd.Function):
    """Forward: send `tails` to the next rank, receive the previous rank's (started, not awaited: `HaloLink.wait`).
    Backward: the gradients of what was received go back to the previous rank; those of `tails` come from the next."""

    @staticmethod
    def forward(ctx, link, recv_shapes, anchor, *tails):
        ctx.link = link
        ctx.tails = [(t.shape, t.dtype, t.device) for t in tails]
        received = link.start(list(tails), [(shape, t.dtype, t.device) for shape, t in zip(recv_shapes, tails,
                                                                                             strict=True)],
                              backward=False)
        ctx.received = [(r.shape, r.dtype, r.device) for r in received]
        # `anchor` (the query) comes out unchanged: the caller uses it, so this backward runs on every rank even
        # where nothing was received (autograd skips a node none of whose outputs is used, and the next rank would
        # wait for ever for the gradients it sends back).
        return (anchor.view_as(anchor), *received)

    @staticmethod
    def backward(ctx, anchor_grad, *grads):
        # The previous rank waits for every gradient it sent a tensor for: an unused one goes back as zeros.
        grads = [g.contiguous() if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                 for g, (shape, dtype, device) in zip(grads, ctx.received, strict=True)]
        link = ctx.link
        tail_grads = link.start(grads, ctx.tails, backward=True)
        link.wait()
        return (None, None, anchor_grad, *tail_grads)


class HaloLink:
    """The halo between ranks of one sequence-parallel group (torch.distributed point-to-point; gloo or nccl).
    `prev`/`next` are global ranks (None at the ends of the row). Counts the bytes it sends."""

    def __init__(self, group, prev: int | None, next: int | None):
        self.group, self.prev, self.next = group, prev, next
        self._work: list = []
        self._pending: list | None = None
        self.bytes_sent = 0

    def exchange(self, tails: list[torch.Tensor], recv_shapes: list[tuple[int, ...]],
                 anchor: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Start sending `tails` forward and receiving `recv_shapes` tensors; call `wait` before reading them.
        Returns `anchor` (use it in its place: it ties the exchange's backward to the graph) and the receive
        buffers."""
        anchor, *received = _Swap.apply(self, recv_shapes, anchor, *[t.contiguous() for t in tails])
        return anchor, received

    def start(self, tensors: list[torch.Tensor], like: list[tuple], *, backward: bool) -> list[torch.Tensor]:
        """Send `tensors`, receive tensors of (shape, dtype, device) `like`: forward to the next rank and from the
        previous, backward the reverse. Returns the receive buffers (zeros where no rank sends)."""
        import torch.distributed as dist

        to, source = (self.prev, self.next) if backward else (self.next, self.prev)
        buffers = [(torch.empty if source is not None else torch.zeros)(shape, dtype=dtype, device=device)
                   for shape, dtype, device in like]
        ops = []
        for tensor in tensors:
            if tensor.numel() and to is not None:
                ops.append(dist.P2POp(dist.isend, tensor, to, self.group))
                self.bytes_sent += tensor.numel() * tensor.element_size()
        for buffer in buffers:
            if buffer.numel() and source is not None:
                ops.append(dist.P2POp(dist.irecv, buffer, source, self.group))
        self._work = dist.batch_isend_irecv(ops) if ops else []
        self._pending = tensors  # kept alive until sent
        return buffers

    def wait(self) -> None:
        for work in self._work:
            work.wait()
        self._work, self._pending = [], None


# --------------------------------------------------------------------------------------------------------------------
# The sharded S² attention
# --------------------------------------------------------------------------------------------------------------------


def _head_halves(heads: int, heads_kv: int, shift: bool) -> list[tuple[slice, slice, int]]:
    """(query heads, kv heads serving them, half index) per head half that has heads: with the shift, [0, h//2)
    unshifted (index 0) and [h//2, h) shifted (index 1); without, all heads unshifted."""
    split = heads // 2 if shift else heads
    halves = []
    for index, (low, high) in enumerate(((0, split), (split, heads))):
        if high > low:
            rep = heads // heads_kv
            halves.append((slice(low, high), slice(low // rep, -(-high // rep)), index))
    return halves


def _expand_kv(x: torch.Tensor, q_heads: slice, kv_heads: slice, rep: int) -> torch.Tensor:
    """kv heads (b, h_kv', L, d) for query heads q_heads: as they are when the half's heads keep a uniform GQA ratio,
    else one copy per query head (a kv head straddling the halves, e.g. 9 heads over 3 kv heads)."""
    count = q_heads.stop - q_heads.start
    if q_heads.start % rep == 0 and count % rep == 0:
        return x
    index = torch.arange(q_heads.start, q_heads.stop, device=x.device) // rep - kv_heads.start
    return x.index_select(1, index)


def _plan(shard: SequenceShard, half: int, device: torch.device, buckets: bool):
    key = (half, device, buckets)
    if key not in shard._plans:
        shard._plans[key] = _segment_plan(shard.segments[half].to(device), shard.group_size, buckets)
    return shard._plans[key]


def sharded_s2_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard, *,
                         scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """S²-Attn of one shard: query (b, h, n, d), key/value (b, h_kv, n, d) of the shard's n tokens; returns
    (b, h, n, d), the rows' whole-sequence S²-Attn output at the shard's positions. The previous shard's K/V tails
    arrive through `shard.link`; the unshifted half is computed while they travel."""
    b, heads, n, d = query.shape
    heads_kv = key.shape[1]
    if heads_kv == 0 or heads % heads_kv or key.shape[2] != n or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"sharded S²-Attn: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)} do not fit (kv heads must divide heads; same length)")
    if n * shard.shards != shard.length:
        raise ValueError(f"sharded S²-Attn: the shard holds {n} tokens, its plan {shard.length} / {shard.shards}")
    rep = heads // heads_kv
    halves = _head_halves(heads, heads_kv, shard.shift)
    buckets = not (_use_flash_attn(query) and _flash_attn("flash_attn_varlen_func") is not None)

    tails, shapes = [], []
    for _, kv_heads, half in halves:
        width = kv_heads.stop - kv_heads.start
        for x in (key, value):
            tails.append(x[:, kv_heads, n - shard.send[half]:] if shard.send[half] else x[:, kv_heads, :0])
            shapes.append((b, width, shard.recv[half], d))
    link = shard.link
    if link is None:
        if any(shard.recv) or any(shard.send):
            raise ValueError("sharded S²-Attn: the shard exchanges a halo but has no link to the other ranks")
        received = [torch.zeros(shape, dtype=key.dtype, device=key.device) for shape in shapes]
    else:
        query, received = link.exchange(tails, shapes, anchor=query)

    def attend(q_heads: slice, kv_heads: slice, half: int, k_halo, v_halo) -> torch.Tensor:
        halo = shard.recv[half]
        q, k, v = query[:, q_heads], key[:, kv_heads], value[:, kv_heads]
        if halo:
            # The halo's own queries are never needed: zeros stand in, and their outputs are dropped.
            q = torch.cat((q.new_zeros(b, q.shape[1], halo, d), q), dim=2)
            k, v = torch.cat((k_halo, k), dim=2), torch.cat((v_halo, v), dim=2)
        k, v = (_expand_kv(x, q_heads, kv_heads, rep) for x in (k, v))
        width = halo + n
        flat = [x.transpose(1, 2).reshape(b * width, x.shape[1], d) for x in (q, k, v)]
        out = _varlen_attention(*flat, _plan(shard, half, query.device, buckets), scale, dropout_p)
        return out.view(b, width, q.shape[1], d)[:, halo:]

    outs = {}
    # The half with no halo first, so that the other's K/V travel meanwhile.
    for position, (q_heads, kv_heads, half) in sorted(enumerate(halves), key=lambda item: shard.recv[item[1][2]] > 0):
        if shard.recv[half] and link is not None:
            link.wait()
        outs[position] = attend(q_heads, kv_heads, half, received[2 * position], received[2 * position + 1])
    if link is not None:
        link.wait()
    out = torch.cat([outs[i] for i in range(len(halves))], dim=2) if len(halves) > 1 else outs[0]
    return out.transpose(1, 2)
