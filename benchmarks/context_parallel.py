""".venv/bin/python benchmarks/context_parallel.py            # the table: arithmetic only, well under a second
.venv/bin/python benchmarks/context_parallel.py --count    # and the S² formula confirmed by counting on gloo

Hardware: none for the table (plain Python, no torch). `--count` runs on CPU (gloo, torch.multiprocessing): written
and measured on a 2-core AMD EPYC KVM guest, torch 2.13.0 CPU build, about 25 s for the 2- and 4-process runs.

Prints, for Llama-2-7B (hidden 4096, 32 layers, 32 heads over 32 kv heads, head dim 128, bf16 = 2 bytes) at
N = 32K, 64K, 100K (100000), 128K and 256K (262144) tokens per row split over P = 2, 4 and 8 ranks: the bytes the
busiest rank sends per decoder layer in one training step (forward + backward, micro-batch 1) under
(a) S²-aware sequence parallelism (longlora/method/context_parallel.py), without and with gradient checkpointing,
(b) ring attention and (c) DeepSpeed-Ulysses, and the ratios ring / S² and Ulysses / S² (both without
checkpointing). The whole model sends 32 × that. S² groups are G = N/4 (s2attn.group_size_ratio 0.25) for P ≤ 4;
shards must hold whole groups, so P = 8 uses G = N/8 (ratio 0.125), which halves the S² halo.

`--count` (also `count_on_gloo`) confirms the S² formula: P = 2 and 4 processes on gloo each run one forward and
backward of a tiny Llama (2 layers, 8 heads over 2 kv heads and 9 over 3, head dim 8, 2 rows of N = 64, G = 16,
fp32; with and without gradient checkpointing) on their `shard_batch` shard with a `HaloLink`, and compare each
rank's `bytes_sent` with `s2_rank_bytes` at that shape. Prints "confirmed", or exits 1 naming the mismatch.

Conventions (bytes one rank sends per layer per step, micro-batch 1, n = N/P tokens per rank, b bytes per element,
w_q = heads × head dim, w_kv = kv heads × head dim):
- S²: a boundary's halo is K and V of the G/2 tokens before the shard, for the kv heads serving the shifted half of
  the query heads, heads [h/2, h): kv heads [(h/2) // (h/h_kv), h_kv), 16 of Llama-2-7B's 32. Halo H = 2 × G/2 ×
  that many kv heads × head dim × b. Forward: every rank but the last sends H to the next; backward: every rank but
  the first sends the gradient of what it received (H) back. So a middle rank sends 2H, the ends H; with gradient
  checkpointing the forward runs twice (recomputation), so a middle rank sends 3H and the first 2H. The table shows
  the busiest rank. Independent of P at a fixed G: only the boundaries' neighbourhoods travel.
- Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context",
  arXiv:2310.01889; torchtitan's context parallel): each rank's K/V block, 2 × n × w_kv × b, passes to the next
  rank P − 1 times in the forward. Backward: K/V go round again and dK/dV go round with them, counted as
  2 × (P − 1) K/V-sized passes (implementations differ by a pass: the accumulated dK/dV make a last hop home in some).
  Total 3 × (P − 1) × 2 × n × w_kv × b. Plain causal ring attention, no S²-specific skipping of blocks (a ring that
  knew S²'s locality would skip most passes: it would become this project's halo exchange).
- DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509): all-to-all of Q, K, V before attention (sequence-sharded
  to head-sharded) and of the output after it; in an all-to-all each rank keeps 1/P of its n × width tensor and sends
  (P − 1)/P of it. Forward (P − 1)/P × n × (w_q + 2 w_kv + w_q) × b; the backward the same again for the gradients.
  Ulysses splits the heads over the ranks: P ≤ kv heads (32 here; 8 for Llama-2-70B's grouped-query attention).
With gradient checkpointing ring and Ulysses redo their forward traffic too (ring 4 (P − 1) passes instead of
3 (P − 1), Ulysses 3 all-to-all rounds instead of 2); the ratios compare all three without it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2


@dataclass(frozen=True)
class AttentionShape:
    """What the communication depends on: the attention's heads and widths, the layers, bytes per element."""

    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    layers: int = 32
    itemsize: int = 2
    name: str = "Llama-2-7B"

    @property
    def shifted_kv_heads(self) -> int:
        """kv heads serving the shifted query heads [h//2, h) (as longlora/method/context_parallel.py splits them: a
        kv head shared by both halves, as with 9 heads over 3, travels too)."""
        return self.kv_heads - (self.heads // 2) // (self.heads // self.kv_heads)


LLAMA2_7B = AttentionShape()
LENGTHS = (32768, 65536, 100000, 131072, 262144)
SHARDS = (2, 4, 8)


def group_size(n: int, shards: int) -> int:
    """The S² group the table uses: N/4 (the paper's ratio) while a shard holds whole groups of it, else N/P."""
    return n // 4 if shards <= 4 else n // shards


def s2_halo_bytes(shape: AttentionShape, group: int, rows: int = 1) -> int:
    """One boundary's forward halo for one layer: K and V of the shifted kv heads for the G/2 tokens before it."""
    return 2 * rows * shape.shifted_kv_heads * (group // 2) * shape.head_dim * shape.itemsize


def s2_rank_bytes(shape: AttentionShape, shards: int, group: int, rank: int, *, checkpointing: bool = False,
                  rows: int = 1, layers: int = 1) -> int:
    """Bytes rank `rank` of `shards` sends in one step: the halo forward (twice with gradient checkpointing) unless
    it is the last rank, its gradient backward unless it is the first; `layers` layers."""
    halo = s2_halo_bytes(shape, group, rows)
    forward = halo * (2 if checkpointing else 1) if rank < shards - 1 else 0
    backward = halo if rank > 0 else 0
    return layers * (forward + backward)


def s2_bytes(shape: AttentionShape, n: int, shards: int, group: int | None = None, *,
             checkpointing: bool = False) -> int:
    """The busiest rank's bytes per layer per step under S²-aware sharding."""
    group = group_size(n, shards) if group is None else group
    if n % (shards * group):
        raise ValueError(f"{n} tokens do not split into {shards} shards of whole groups of {group}")
    return max(s2_rank_bytes(shape, shards, group, rank, checkpointing=checkpointing) for rank in range(shards))


def ring_bytes(shape: AttentionShape, n: int, shards: int) -> int:
    """Each rank's bytes per layer per step under ring attention: P − 1 K/V passes forward, 2 × (P − 1) backward."""
    block = 2 * (n // shards) * shape.kv_heads * shape.head_dim * shape.itemsize
    return 3 * (shards - 1) * block


def ulysses_bytes(shape: AttentionShape, n: int, shards: int) -> int:
    """Each rank's bytes per layer per step under DeepSpeed-Ulysses: (P − 1)/P of its Q, K, V and output, forward
    and again backward. ValueError where P exceeds the kv heads (Ulysses splits heads over the ranks)."""
    if shards > shape.kv_heads:
        raise ValueError(f"Ulysses needs P <= kv heads: {shards} > {shape.kv_heads}")
    width = 2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim
    return 2 * (shards - 1) * (n // shards) * width * shape.itemsize // shards


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.0f}" if nbytes >= 10 * MIB else f"{nbytes / MIB:,.1f}"


def table(shape: AttentionShape = LLAMA2_7B, lengths=LENGTHS, shards=SHARDS) -> str:
    lines = [f"{shape.name}: {shape.heads} heads over {shape.kv_heads} kv heads of {shape.head_dim}, "
             f"{shape.itemsize}-byte elements; S² sends K/V of {shape.shifted_kv_heads} kv heads. MiB the busiest "
             f"rank sends per layer per training step (forward + backward, micro-batch 1); × {shape.layers} layers "
             "for the whole model.", "",
             "| context N | P | S² group G | S² | S² + gradient checkpointing | ring attention | Ulysses | ring / S² "
             "| Ulysses / S² |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in lengths:
        for p in shards:
            g = group_size(n, p)
            s2 = s2_bytes(shape, n, p, g)
            s2_ckpt = s2_bytes(shape, n, p, g, checkpointing=True)
            ring = ring_bytes(shape, n, p)
            ulysses = ulysses_bytes(shape, n, p)
            note = f"N/{n // g}"
            lines.append(f"| {n:,} | {p} | {g:,} ({note}) | {_mib(s2)} | {_mib(s2_ckpt)} | {_mib(ring)} | "
                         f"{_mib(ulysses)} | {ring / s2:.0f}× | {ulysses / s2:.0f}× |")
    lines += ["", "G = N/8 at P = 8: s2attn.group_size_ratio 0.125 (a shard must hold whole groups). S²: the busiest "
              "rank (a middle one; at P = 2 the first with checkpointing); the first rank sends forward only, the "
              "last backward only. Ring and Ulysses: every rank the same."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Counting on gloo
# --------------------------------------------------------------------------------------------------------------------

COUNT_LENGTH, COUNT_GROUP, COUNT_ROWS, COUNT_LAYERS, COUNT_HEAD_DIM = 64, 16, 2, 2, 8
COUNT_CASES = (
    {"heads": 8, "kv_heads": 2, "checkpointing": False},
    {"heads": 8, "kv_heads": 2, "checkpointing": True},
    {"heads": 9, "kv_heads": 3, "checkpointing": False},
    {"heads": 9, "kv_heads": 3, "checkpointing": True},
)


def _case_name(case: dict) -> str:
    return f"{case['heads']} heads over {case['kv_heads']}{', checkpointing' if case['checkpointing'] else ''}"


def _tiny_llama(heads: int, kv_heads: int, checkpointing: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longlora.method.s2attn import configure_s2attn

    config = LlamaConfig(vocab_size=97, hidden_size=COUNT_HEAD_DIM * heads, intermediate_size=64,
                         num_hidden_layers=COUNT_LAYERS, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2 * COUNT_LENGTH, tie_word_embeddings=True)
    configure_s2attn(config, group_size_ratio=COUNT_GROUP / COUNT_LENGTH)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _count_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """One process: each case's forward + backward on its shard, and the bytes its HaloLink sent."""
    import torch
    import torch.distributed as dist

    from longlora.method.context_parallel import HaloLink, shard_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        counted = {}
        for case in COUNT_CASES:
            link = HaloLink(group, rank - 1 if rank else None, rank + 1 if rank + 1 < world else None)
            model = _tiny_llama(case["heads"], case["kv_heads"], case["checkpointing"])
            torch.manual_seed(1)
            ids = torch.randint(0, 97, (COUNT_ROWS, COUNT_LENGTH))
            batch = shard_batch({"input_ids": ids, "labels": ids}, world, rank, COUNT_GROUP, link=link)
            model(**batch).loss.backward()
            counted[_case_name(case)] = link.bytes_sent
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counted), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def count_on_gloo(world: int) -> list[dict]:
    """Run `world` gloo processes over COUNT_CASES; per case and rank, the bytes counted and the formula's."""
    import torch.multiprocessing as mp

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    # By its importable name, so that the spawned processes find the function (this file may run as __main__ or be
    # loaded from its path).
    worker = importlib.import_module("benchmarks.context_parallel")._count_rank
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, str(Path(tmp, "store")), tmp), nprocs=world, join=True)
        counted = [json.loads(Path(tmp, f"rank{rank}.json").read_text(encoding="utf-8")) for rank in range(world)]
    rows = []
    for case in COUNT_CASES:
        shape = AttentionShape(heads=case["heads"], kv_heads=case["kv_heads"], head_dim=COUNT_HEAD_DIM,
                               layers=COUNT_LAYERS, itemsize=4, name="tiny Llama")
        for rank in range(world):
            expected = s2_rank_bytes(shape, world, COUNT_GROUP, rank, checkpointing=case["checkpointing"],
                                     rows=COUNT_ROWS, layers=COUNT_LAYERS)
            rows.append({"world": world, "case": _case_name(case), "rank": rank,
                         "counted": counted[rank][_case_name(case)], "formula": expected})
    return rows


def confirm(worlds=(2, 4)) -> tuple[list[dict], float]:
    """Count on gloo at each world size; the rows and the seconds it took."""
    start = time.perf_counter()
    rows = [row for world in worlds for row in count_on_gloo(world)]
    return rows, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bytes per layer per step: S²-aware sharding against ring attention and Ulysses.")
    parser.add_argument("--count", action="store_true",
                        help="also confirm the S² formula by counting the bytes sent on 2 and 4 gloo processes")
    args = parser.parse_args(argv)
    print(table())
    if not args.count:
        return 0
    rows, seconds = confirm()
    print(f"\nCounted on gloo ({seconds:.0f} s): N = {COUNT_LENGTH}, G = {COUNT_GROUP}, {COUNT_ROWS} rows, "
          f"{COUNT_LAYERS} layers, head dim {COUNT_HEAD_DIM}, fp32; bytes each rank sent, forward + backward.\n")
    print("| P | case | rank | counted | formula |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['world']} | {row['case']} | {row['rank']} | {row['counted']:,} | {row['formula']:,} |")
    wrong = [row for row in rows if row["counted"] != row["formula"]]
    if wrong:
        print(f"\nMISMATCH in {len(wrong)} of {len(rows)}: {wrong}", file=sys.stderr)
        return 1
    print(f"\nconfirmed: all {len(rows)} counts equal the formula")
    return 0


if __name__ == "__main__":
    sys.exit(main())
