""".venv/bin/python benchmarks/train_step.py [--seqs 4096 8192 16384] [--repeats 3] [--methods lora_plus full]
[--gradient-checkpointing {params,on,off,both}] [--threads 2] [--clock wall] [--no-memory]
[--quick]

Hardware: written and measured on a 2-core AMD EPYC KVM guest (AVX-512), torch 2.13.0 CPU build, float32.
Expected on that CPU at 16k tokens (target: ≥ 2.3× and ≥ 90 % of the Amdahl bound below): a whole LoRA+ training step
with S²-Attn ~3.2× faster than the same step with transformers' SDPA attention, ~110 % of the bound (2.9×); 2.3× at
8k, 2.1× at 4k (measured with `--threads 1 --clock cpu` while the machine was shared; table in docs/performance.md).

One whole training step (forward, loss over the vocabulary, backward, gradient clipping, AdamW step, zero_grad) of
the project's default tiny model (params.yaml `build_base_model`: Llama, vocab 1024, hidden 128, ff 256, 4 layers,
4 heads / 4 kv heads, tied embeddings), RoPE interpolated linearly to the sequence length as `extend` does, batch 1
of random tokens, as `stages/extend.py` trains it: LoRA+ (params.yaml `lora`, `extend.method: lora_plus`) or full
fine-tuning, AdamW over the trainable parameters with the `extend` betas/eps/weight decay (HF Trainer's
`adamw_torch` is `torch.optim.AdamW`), clipping at `extend.max_grad_norm`, gradient checkpointing as
`extend.gradient_checkpointing` says (off in the tiny default; `--gradient-checkpointing both` shows both).

Three copies of the model with the same initial weights, each with its own optimizer, differing only in the attention
implementation: `sdpa` (transformers' own, the baseline), `s2attn` (longlora.method.s2attn, group = seq/4) and `none`, a
stand-in of the same shapes that costs next to nothing (output q + k + v, so every projection still gets its
gradient). Runs are interleaved (the order rotates each round) after one warm-up step each, so drifting machine load
hits all alike; the table shows median times, the median of the per-round ratios sdpa/s2 and its range.

Amdahl bound: with `a` the attention share of the dense step, a = 1 − t(none) / t(sdpa) (median of per-round
values), and r_attn the speed-up of attention alone (S² vs SDPA forward+backward on this model's shapes, one layer,
measured in the same process, interleaved), the whole step can at best get 1 / ((1 − a) + a / r_attn): everything
else is the same work in both. "of bound" is the measured ratio divided by that bound.

Memory: each (variant, length) runs in a fresh subprocess (see benchmarks/s2attn_speed.py for the method): one step
to create the optimizer state, then the resident-memory high-water mark is reset and "peak MiB" is what the second
step adds on top of weights, gradients-to-be and optimizer state. On CUDA it is `max_memory_allocated` minus the
memory allocated before the step.

Busy machine: other processes on the cores stall every parallel op (each waits for its slowest thread), which
penalises S² (about 20 ops per layer) more than SDPA (one kernel each way). `--threads 1 --clock cpu` times the
process's CPU time on one thread instead, which leaves out the time spent waiting for a core (not what contention
does to caches and memory bandwidth).

`--quick`: 256 and 512 tokens (or `--seqs`), one timed round, no memory: a smoke run (seconds).
Run it on an otherwise idle machine; the header prints the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from longlora.method.lora import apply_lora_plus  # noqa: E402
from longlora.method.rope import interpolated_config  # noqa: E402
from longlora.method.s2attn import configure_s2attn, s2attn_mask, shifted_sparse_attention  # noqa: E402
from longlora.recipe import DEFAULT_GROUP_SIZE_RATIO  # noqa: E402
from stages.params import Params, load_params  # noqa: E402

VARIANTS = ("sdpa", "s2attn", "none")
NO_ATTENTION = "longlora_bench_none"


def no_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention's stand-in: the output shape of attention and a gradient to q, k and v, at the cost of an add."""
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, 1), value.repeat_interleave(repeats, 1)
    return (query + key + value).transpose(1, 2).contiguous(), None


def register_no_attention() -> None:
    transformers.AttentionInterface.register(NO_ATTENTION, no_attention_forward)
    AttentionMaskInterface.register(NO_ATTENTION, s2attn_mask)  # None without padding: no N×N mask either


def model_config(params: Params, seq: int) -> LlamaConfig:
    """The default base model's config (stages/build_base_model.py), RoPE interpolated to `seq` as extend does."""
    b = params.build_base_model
    config = LlamaConfig(
        vocab_size=b.vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads,
        num_key_value_heads=b.num_kv_heads,
        max_position_embeddings=b.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=b.tie_word_embeddings,
        use_cache=False,
    )
    return interpolated_config(config, seq, params.model.rope_type, b.context_length)


class Trained:
    """One model copy with its attention implementation and optimizer, stepped the way extend's Trainer steps."""

    def __init__(self, params: Params, base: LlamaForCausalLM, variant: str, method: str, checkpointing: bool,
                 device: torch.device):
        model = copy.deepcopy(base)
        if variant == "s2attn":
            s2 = params.s2attn
            configure_s2attn(model, group_size_ratio=s2.group_size_ratio or DEFAULT_GROUP_SIZE_RATIO,
                             group_size=s2.group_size)
        else:
            model.set_attn_implementation(variant if variant == "sdpa" else NO_ATTENTION)
        if checkpointing:
            # What TrainingArguments(activation_checkpointing=True, kwargs use_reentrant=False) does.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            lora = params.lora
            model = apply_lora_plus(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                    target_modules=lora.target_modules, train_embeddings=lora.train_embeddings,
                                    train_norms=lora.train_norms)
        model.to(device).train()
        p = params.extend
        self.model, self.max_grad_norm = model, p.max_grad_norm
        self.trainable = [w for w in model.parameters() if w.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=p.lr, betas=(p.adam_beta1, p.adam_beta2),
                                           eps=p.adam_epsilon, weight_decay=p.weight_decay)

    def step(self, ids: torch.Tensor) -> float:
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


CPU = torch.device("cpu")


def build(params: Params, seq: int, method: str, checkpointing: bool, device: torch.device = CPU,
          variants=VARIANTS) -> dict[str, Trained]:
    torch.manual_seed(params.build_base_model.seed)
    base = LlamaForCausalLM(model_config(params, seq))
    trained = {}
    for variant in variants:
        torch.manual_seed(1)  # LoRA's A matrices: the same in every copy
        trained[variant] = Trained(params, base, variant, method, checkpointing, device)
    return trained


def tokens(params: Params, seq: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seq)
    return torch.randint(0, params.build_base_model.vocab_size, (1, seq), generator=gen).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, device: torch.device, clock: str = "wall") -> tuple[float, object]:
    _sync(device)
    start = CLOCKS[clock]()
    result = fn()
    _sync(device)
    return CLOCKS[clock]() - start, result


def attention_alone(params: Params, seq: int, repeats: int, device: torch.device,
                    clock: str = "wall") -> tuple[list[float], list[float]]:
    """Per-round SDPA and S² times (seconds) of one layer's attention alone (forward+backward) on this model's
    shapes, in the (b, n, h, d)-transposed layout transformers hands to attention functions."""
    b = params.build_base_model
    head_dim, group = b.hidden_size // b.num_heads, params.s2attn.group_size_for(seq)
    gen = torch.Generator().manual_seed(seq)

    def leaf(heads):
        return torch.randn(1, seq, heads, head_dim, generator=gen).to(device).transpose(1, 2).requires_grad_()

    q, k, v = leaf(b.num_heads), leaf(b.num_kv_heads), leaf(b.num_kv_heads)
    grad = torch.randn(1, seq, b.num_heads, head_dim, generator=gen).to(device).transpose(1, 2)
    gqa = b.num_kv_heads != b.num_heads

    def run(kind):
        if kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = shifted_sparse_attention(q, k, v, group)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    for kind in ("sdpa", "s2"):
        run(kind)
    dense, sparse = [], []
    for _ in range(repeats):
        dense.append(timed(lambda: run("sdpa"), device, clock)[0])
        sparse.append(timed(lambda: run("s2"), device, clock)[0])
    return dense, sparse


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_child(params: Params, variant: str, seq: int, method: str, checkpointing: bool) -> None:
    """Runs in a fresh subprocess: prints the peak resident memory (bytes) the second step adds."""
    trained = build(params, seq, method, checkpointing, variants=(variant,))[variant]
    ids = tokens(params, seq, CPU)
    trained.step(ids)  # creates the optimizer state
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    trained.step(ids)
    print(json.dumps({"peak_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(params, params_file, variant, seq, method, checkpointing, device) -> float | None:
    if device.type == "cuda":
        trained = build(params, seq, method, checkpointing, device, variants=(variant,))[variant]
        ids = tokens(params, seq, device)
        trained.step(ids)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trained.step(ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = [sys.executable, __file__, "--params", str(params_file), "--threads", str(torch.get_num_threads()),
             "--_memory-child", variant, str(seq), method, str(int(checkpointing))]
    result = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def measure(params, seq, method, checkpointing, repeats, memory, device, clock="wall",
            params_file=ROOT / "params.yaml") -> dict:
    trained = build(params, seq, method, checkpointing, device)
    ids = tokens(params, seq, device)
    losses = {variant: t.step(ids) for variant, t in trained.items()}  # warm-up
    times = {variant: [] for variant in VARIANTS}
    for round_ in range(repeats):
        order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
        for variant in order:
            seconds, loss = timed(lambda t=trained[variant]: t.step(ids), device, clock)
            times[variant].append(seconds)
            if not torch.isfinite(torch.tensor(loss)):
                raise RuntimeError(f"{variant} at {seq} tokens: non-finite loss {loss}")
    del trained
    ratios = [d / s for d, s in zip(times["sdpa"], times["s2attn"], strict=True)]
    shares = [1 - n / d for d, n in zip(times["sdpa"], times["none"], strict=True)]
    # In the step: attention's own time is what the stand-in saves (a cross-check of r_attn, not used in the bound).
    in_step = [(d - n) / (s - n) if s > n else float("inf")
               for d, s, n in zip(times["sdpa"], times["s2attn"], times["none"], strict=True)]
    dense, sparse = attention_alone(params, seq, repeats, device, clock)
    attention = [d / s for d, s in zip(dense, sparse, strict=True)]
    share, r_attn = statistics.median(shares), statistics.median(attention)
    bound = 1 / ((1 - share) + share / r_attn)
    ratio = statistics.median(ratios)
    peaks = {}
    if memory:
        for variant in ("sdpa", "s2attn"):
            peak = peak_memory(params, params_file, variant, seq, method, checkpointing, device)
            peaks[variant] = None if peak is None else peak / 2**20
    return {
        "seq": seq, "method": method, "gradient_checkpointing": checkpointing,
        "ms": {v: statistics.median(times[v]) * 1e3 for v in VARIANTS},
        "ratio": ratio, "ratio_spread": _spread(ratios), "attention_share": share, "share_spread": _spread(shares),
        "r_attn": r_attn, "r_attn_spread": _spread(attention), "bound": bound,
        "attention_alone_ms": {"sdpa": statistics.median(dense) * 1e3, "s2attn": statistics.median(sparse) * 1e3},
        "r_attn_in_step": statistics.median(in_step), "of_bound": ratio / bound,
        "peak_mib": peaks, "first_losses": losses,
    }


def _tokens(seq: int) -> str:
    return f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| method | ckpt | seq | sdpa | S² | sdpa / S² (range) | attention share a | r_attn | bound | of bound "
        "| peak MiB sdpa / S² |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peaks = r["peak_mib"]
        memory = " / ".join("n/a" if peaks.get(v) is None else f"{peaks[v]:.0f}" for v in ("sdpa", "s2attn")) \
            if peaks else "–"
        lines.append(
            f"| {r['method']} | {'on' if r['gradient_checkpointing'] else 'off'} | {_tokens(r['seq'])} "
            f"| {r['ms']['sdpa']:.0f} ms | {r['ms']['s2attn']:.0f} ms | **{r['ratio']:.2f}×** ({r['ratio_spread']}) "
            f"| {r['attention_share']:.3f} | {r['r_attn']:.2f}× | {r['bound']:.2f}× | {r['of_bound']:.0%} | {memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 4096 8192 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one step of each variant) per row")
    parser.add_argument("--methods", nargs="+", choices=("lora_plus", "full"), default=["lora_plus", "full"])
    parser.add_argument("--gradient-checkpointing", choices=("params", "on", "off", "both"), default="params")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="cpu: the process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 and 512 tokens, one round, no memory")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # PEFT asks the model for the deprecated name; the step itself is unaffected.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    register_no_attention()
    if args._memory_child:
        variant, seq, method, checkpointing = args._memory_child
        peak_memory_child(load_params(args.params), variant, int(seq), method, checkpointing == "1")
        return
    if args.quick:
        args.seqs, args.repeats, args.no_memory = args.seqs or [256, 512], 1, True
    args.seqs = args.seqs or [4096, 8192, 16384]

    params = load_params(args.params)
    checkpointing = {"params": [params.extend.gradient_checkpointing], "on": [True], "off": [False],
                     "both": [False, True]}[args.gradient_checkpointing]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    b = params.build_base_model
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {device.type} ({name}), "
        f"{torch.get_num_threads()} threads, float32, batch 1; model: vocab {b.vocab_size}, hidden {b.hidden_size}, "
        f"ff {b.intermediate_size}, {b.num_layers} layers, {b.num_heads}/{b.num_kv_heads} heads, tied "
        f"{b.tie_word_embeddings}; S² group = {params.s2attn.group_size_ratio or params.s2attn.group_size}; "
        f"{args.repeats} interleaved rounds, {args.clock} clock; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print("bound = 1 / ((1 - a) + a / r_attn), a = 1 - t(no attention) / t(sdpa), r_attn = attention-only "
          "sdpa/S² (forward+backward, one layer)", flush=True)
    rows = []
    for method in args.methods:
        for ckpt in checkpointing:
            for seq in args.seqs:
                row = measure(params, seq, method, ckpt, args.repeats, not args.no_memory, device, args.clock,
                              args.params)
                rows.append(row)
                print(f"{method} ckpt={'on' if ckpt else 'off'} {seq}: sdpa {row['ms']['sdpa']:.0f} ms, "
                      f"s2 {row['ms']['s2attn']:.0f} ms, none {row['ms']['none']:.0f} ms, ratio {row['ratio']:.2f}× "
                      f"({row['ratio_spread']}), a {row['attention_share']:.3f} ({row['share_spread']}), r_attn "
                      f"{row['r_attn']:.2f}× ({row['r_attn_spread']}), bound {row['bound']:.2f}×, "
                      f"{row['of_bound']:.0%} of bound; one layer's attention alone sdpa "
                      f"{row['attention_alone_ms']['sdpa']:.0f} ms, s2 {row['attention_alone_ms']['s2attn']:.0f} ms; "
                      f"attention speed-up inside the step (t(sdpa) − t(none)) / (t(s2) − t(none)) "
                      f"{row['r_attn_in_step']:.2f}×; first losses "
                      + ", ".join(f"{k} {v:.3f}" for k, v in row["first_losses"].items()), flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    print(_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
