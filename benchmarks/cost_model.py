"""First-principles cost of the full profile: Llama-2-7B extended with LongLoRA on one 8-GPU node, dense attention
against S²-Attn, from 8k to 100k tokens — FLOPs per step and memory per GPU, to plan a run.

    .venv/bin/python benchmarks/cost_model.py              # prints the tables of docs/full-size.md, then memory
                                                           # per rank under sequence parallelism (P = 1, 2, 4, 8)
    .venv/bin/python benchmarks/cost_model.py --mfu 0.3    # hours at another assumed utilisation

Runs anywhere in well under a second (arithmetic only, no torch). Every number follows from the formulas below; the
docs/full-size.md puts the paper's published figures beside them.

FLOPs (a multiply-add counts 2):
- Linear layers per token, forward: 2 × (4d² + 3·d·ff) per layer + 2·V·d for the output head (embedding lookups
  cost no FLOPs).
- Attention core (QKᵀ and AV) per layer: 4·d per (query, key) pair that attends. Dense causal attention over N tokens
  has N(N+1)/2 pairs. S²-Attn with groups of G = N/4: the unshifted half of the heads has N/G causal groups of G
  (N/G · G(G+1)/2 pairs), the shifted half N/G − 1 groups of G and two half-groups of G/2 at the ends. For large N
  the unshifted half costs N·G/2 = N²/8 pairs, a quarter of dense; the shifted half N²/8 − G²/4 = 7N²/64; together
  15/64 of dense (the 4.27× bound the S² benchmark quotes).
- Training: backward = 2 × forward where weights are trained (activation and weight gradients) and in attention
  (gradients of Q, K and V); 1 × forward for frozen linear layers (activation gradients only): under LoRA+ every
  linear layer is frozen (the adapters add < 0.2 %). Gradient checkpointing (the recipe's) runs each layer's forward
  once more. Flash-attention's own recomputation of the scores in its backward is not counted (it adds half an
  attention forward).

Memory per GPU (mixed precision, the ZeRO paper's accounting): bf16 weights 2 B/parameter, bf16 gradients 2 B and
fp32 master weights + Adam moments 12 B per *trainable* parameter; ZeRO-2 shards gradients and optimizer states over
the GPUs, ZeRO-3 the weights too. Activations with gradient checkpointing at micro-batch 1: every layer's input kept
(L·N·d bf16), one layer's activations rebuilt in the backward (34·N·d bytes with flash-attention: no N² term), and the
logits (N·V in bf16, their fp32 copy for the loss). Not counted: framework buffers, fragmentation, communication
buckets (DeepSpeed's defaults add a few GB).

Memory per rank with S²-aware sequence parallelism over P ranks (launch.sequence_parallel, 8 GPUs on one node;
longlora/method/context_parallel.py): weights, gradients and optimizer states as above, ZeRO sharding them over the
whole world (all 8 GPUs, whatever P); activations as above for the rank's N/P tokens (L·(N/P)·d bf16 kept,
34·(N/P)·d rebuilt, (N/P)·V logits in bf16 + fp32); plus the halo buffers of the layer being rebuilt: K and V of
the G/2 tokens before the shard for the kv heads serving the shifted half of the heads (16 of Llama-2-7B's 32),
bf16, × 2 for their gradients: 2 · 2 · (G/2) · (shifted kv heads · head dim) · 2 bytes. G = N/4 for P ≤ 4, N/P above
(s2attn.group_size_ratio 0.125 at P = 8: a shard holds whole groups). "fits 80 GB": yes when the total leaves
8 GiB of the A100's 80 GiB for what is not counted, tight when it is under 80 GiB, else no. Communication per layer:
benchmarks/context_parallel.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Model:
    vocab: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    ff: int = 11008
    tied: bool = False
    name: str = "Llama-2-7B"

    @property
    def layer_linear(self) -> int:
        return 4 * self.hidden**2 + 3 * self.hidden * self.ff

    @property
    def parameters(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_linear + norms + embeddings

    def lora_plus_trainable(self, rank: int = 8) -> dict[str, int]:
        """LoRA on q/k/v/o (rank × (in + out) each), the input embedding, every norm (LongLoRA's `embed,norm`)."""
        lora = self.layers * 4 * rank * (self.hidden + self.hidden)
        return {"lora": lora, "embeddings": self.vocab * self.hidden, "norms": (2 * self.layers + 1) * self.hidden}


LLAMA2_7B = Model()


def dense_pairs(n: int) -> int:
    """(query, key) pairs of causal attention over n tokens."""
    return n * (n + 1) // 2


def s2_pairs(n: int, group: int, heads: int = 2) -> float:
    """(query, key) pairs per head of S²-Attn with groups of `group`, averaged over the heads ([0, h//2) unshifted,
    [h//2, h) shifted, as longlora/method/s2attn.py splits them)."""
    if n % group or group % 2:
        raise ValueError(f"groups of {group} do not tile {n} tokens into whole, even groups")
    unshifted = (n // group) * dense_pairs(group)
    shifted = (n // group - 1) * dense_pairs(group) + 2 * dense_pairs(group // 2)
    half = heads // 2
    return (half * unshifted + (heads - half) * shifted) / heads


def attention_flops(model: Model, n: int, s2: bool) -> float:
    """Forward FLOPs of the attention core (QKᵀ, AV) over one sequence of n tokens, all layers."""
    pairs = s2_pairs(n, n // 4, model.heads) if s2 else dense_pairs(n)
    return 4 * model.hidden * pairs * model.layers


def linear_flops_per_token(model: Model) -> int:
    return 2 * (model.layers * model.layer_linear + model.vocab * model.hidden)


def training_flops(model: Model, n: int, s2: bool, method: str = "lora_plus", checkpointing: bool = True) -> float:
    """FLOPs of forward + backward (+ recomputation) of one sequence of n tokens."""
    linear = linear_flops_per_token(model) * n
    head = 2 * model.vocab * model.hidden * n
    attention = attention_flops(model, n, s2)
    linear_passes = 2 if method == "lora_plus" else 3
    total = linear_passes * linear + 3 * attention
    if checkpointing:  # every decoder layer's forward again; the output head is outside the checkpointed layers
        total += (linear - head) + attention
    return total


def memory_gib(model: Model, n: int, gpus: int, zero: int, method: str = "lora_plus") -> dict[str, float]:
    """Per-GPU memory: weights, gradients + optimizer, activations (gradient checkpointing, micro-batch 1)."""
    psi = model.parameters
    trainable = sum(model.lora_plus_trainable().values()) if method == "lora_plus" else psi
    weights = 2 * psi / (gpus if zero == 3 else 1)
    states = (2 + 12) * trainable / gpus  # ZeRO-2 and -3 both shard gradients and optimizer states
    kept = model.layers * n * model.hidden * 2
    rebuilt = 34 * n * model.hidden
    logits = n * model.vocab * (2 + 4)
    activations = kept + rebuilt + logits
    return {"weights": weights / GIB, "grads_optimizer": states / GIB, "activations": activations / GIB,
            "total": (weights + states + activations) / GIB}


LENGTHS = (8192, 16384, 32768, 65536, 100000)
A100_BF16 = 312e12
SP_LENGTHS = (32768, 65536, 100000, 131072, 262144)
SP_SHARDS = (1, 2, 4, 8)
A100_GIB = 80
HEADROOM_GIB = 8
"""What the model does not count (CUDA context, DeepSpeed buckets, fragmentation): left free for a "yes"."""


def sequence_parallel_group(n: int, shards: int) -> int:
    """The S² group with P shards: N/4 (ratio 0.25) while a shard holds whole groups of it, else N/P."""
    return n // 4 if shards <= 4 else n // shards


def halo_bytes(model: Model, n: int, shards: int, group: int | None = None, kv_heads: int | None = None) -> int:
    """One layer's halo buffers on a rank: K and V of the G/2 tokens before its shard for the kv heads serving the
    shifted heads [h//2, h), bf16, and their gradients. 0 on one rank."""
    if shards == 1:
        return 0
    group = sequence_parallel_group(n, shards) if group is None else group
    kv_heads = model.heads if kv_heads is None else kv_heads
    head_dim = model.hidden // model.heads
    shifted_kv = kv_heads - (model.heads // 2) // (model.heads // kv_heads)
    return 2 * 2 * (group // 2) * shifted_kv * head_dim * 2


def sequence_parallel_memory_gib(model: Model, n: int, shards: int, gpus: int = 8, zero: int = 3,
                                 method: str = "lora_plus", group: int | None = None,
                                 kv_heads: int | None = None) -> dict[str, float]:
    """Per-rank memory with a row of n tokens split over `shards` ranks: `memory_gib`'s weights and states (ZeRO over
    all `gpus`), its activations for n / shards tokens, and the halo buffers (gradient checkpointing, micro-batch 1)."""
    if n % shards:
        raise ValueError(f"{n} tokens do not split into {shards} equal shards")
    whole = memory_gib(model, n // shards, gpus, zero, method)
    halo = halo_bytes(model, n, shards, group, kv_heads) / GIB
    return {"weights": whole["weights"], "grads_optimizer": whole["grads_optimizer"],
            "activations": whole["activations"], "halo": halo, "total": whole["total"] + halo}


def fits(total_gib: float, capacity_gib: float = A100_GIB, headroom_gib: float = HEADROOM_GIB) -> str:
    """yes (the headroom stays free), tight (under the capacity only) or no."""
    return "yes" if total_gib + headroom_gib <= capacity_gib else "tight" if total_gib <= capacity_gib else "no"


def sequence_parallel_table(model: Model = LLAMA2_7B, gpus: int = 8) -> str:
    lines = [f"Memory per rank with S²-aware sequence parallelism over P ranks, {model.name} LoRA+, {gpus} GPUs (ZeRO "
             "over all of them), gradient checkpointing, micro-batch 1, bf16 (GiB: weights + gradients and optimizer "
             f"+ activations of N/P tokens + halo = total; fits: {HEADROOM_GIB} GiB of {A100_GIB} left free):", "",
             "| context | P | S² group | ZeRO-3 | fits 80 GB, ZeRO-3 | ZeRO-2 total | fits 80 GB, ZeRO-2 |",
             "|---:|---:|---:|---:|:---:|---:|:---:|"]
    for n in SP_LENGTHS:
        for p in SP_SHARDS:
            g = sequence_parallel_group(n, p)
            m3, m2 = (sequence_parallel_memory_gib(model, n, p, gpus, zero) for zero in (3, 2))
            lines.append(f"| {n:,} | {p} | {g:,} (N/{n // g}) | {m3['weights']:.1f} + {m3['grads_optimizer']:.1f} + "
                         f"{m3['activations']:.1f} + {m3['halo']:.2f} = **{m3['total']:.1f}** | {fits(m3['total'])} | "
                         f"{m2['total']:.1f} | {fits(m2['total'])} |")
    return "\n".join(lines)


def tables(model: Model = LLAMA2_7B, batch: int = 64, steps: int = 1000, gpus: int = 8, mfu: float = 0.4) -> str:
    lines = [f"{model.name}: {model.parameters / 1e9:.3f} B parameters; LoRA+ trains "
             f"{sum(model.lora_plus_trainable().values()) / 1e6:.1f} M "
             f"({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in model.lora_plus_trainable().items())}). "
             f"Global batch {batch} sequences, {steps} steps, {gpus} GPUs; hours at {mfu:.0%} of the A100's "
             f"{A100_BF16 / 1e12:.0f} TFLOP/s bf16 peak (an assumption: measure your own utilisation).", "",
             "| context | attention FLOPs per token, fwd, dense / S² | attention share of a LoRA+ step, dense / S² "
             "| LoRA+ step PFLOPs, dense / S² | dense / S² | LoRA+ hours, dense / S² | full FT step PFLOPs, "
             "dense / S² |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in LENGTHS:
        per_token = [attention_flops(model, n, s2) / n / 1e9 for s2 in (False, True)]
        lora = [training_flops(model, n, s2) for s2 in (False, True)]
        full = [training_flops(model, n, s2, method="full") for s2 in (False, True)]
        share = [(3 + 1) * attention_flops(model, n, s2) / total for s2, total in zip((False, True), lora,
                                                                                      strict=True)]
        hours = [batch * steps * f / (gpus * A100_BF16 * mfu) / 3600 for f in lora]
        lines.append(f"| {n:,} | {per_token[0]:.1f} / {per_token[1]:.1f} GFLOP | {share[0]:.0%} / {share[1]:.0%} | "
                     f"{batch * lora[0] / 1e15:,.0f} / {batch * lora[1] / 1e15:,.0f} | {lora[0] / lora[1]:.2f}× | "
                     f"{hours[0]:.0f} / {hours[1]:.0f} | "
                     f"{batch * full[0] / 1e15:,.0f} / {batch * full[1] / 1e15:,.0f} |")
    lines += ["", f"Linear layers: {linear_flops_per_token(model) / 1e9:.2f} GFLOP per token, forward, at any length.",
              "", f"Memory per GPU, {gpus} GPUs, gradient checkpointing, micro-batch 1 (GiB: weights + gradients and "
              "optimizer + activations = total):", "",
              "| context | LoRA+, ZeRO-2 | LoRA+, ZeRO-3 | full FT, ZeRO-2 | full FT, ZeRO-3 |",
              "|---:|---:|---:|---:|---:|"]
    for n in LENGTHS:
        cells = []
        for method, zero in (("lora_plus", 2), ("lora_plus", 3), ("full", 2), ("full", 3)):
            m = memory_gib(model, n, gpus, zero, method)
            cells.append(f"{m['weights']:.1f} + {m['grads_optimizer']:.1f} + {m['activations']:.1f} = "
                         f"**{m['total']:.1f}**")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch in sequences (paper: 64)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (paper: 1000)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed share of the bf16 peak reached")
    args = parser.parse_args(argv)
    print(tables(batch=args.batch, steps=args.steps, gpus=args.gpus, mfu=args.mfu))
    print()
    print(sequence_parallel_table(gpus=args.gpus))


if __name__ == "__main__":
    main()
