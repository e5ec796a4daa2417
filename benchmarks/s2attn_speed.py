""".venv/bin/python benchmarks/s2attn_speed.py [--seqs 4096 8192 16384] [--repeats 3] [--no-memory] [--packed 16384]

Hardware: written and measured on a 2-core AMD EPYC KVM guest (AVX-512), torch 2.13.0 CPU build, float32.
On CUDA it runs in bfloat16 (S² through flash-attn when installed, else SDPA; dense is always SDPA).
Expected on that CPU, idle: S²-Attn forward+backward ~3.0× faster than dense causal SDPA at 4k tokens, ~3.5× at
8k, ~3.85× at 16k (FLOP bound 4.27× at group = seq/4: dense N²/2 vs N·G/2 − G²/8 per head; the rest is the CPU
kernel's block granularity on the diagonal, proportionally larger for short groups). Peak extra memory: dense
38 / 70 / 134 MiB, S² 49 / 89 / 169 MiB at 4k / 8k / 16k — both linear in N, S² ~1.3× (it keeps its per-group
outputs and the merged output, and per-call gradients next to the merged gradient buffers). Packed 16k block (below):
document-aware S² 1.22× faster than plain S², 4.5× faster than dense (idle, 2 threads); 1.15–1.31× and
4.1–4.7× under load (1 thread).
Run it on an otherwise idle machine: when other processes compete for the cores, each parallel op can stall for a
scheduler quantum, which penalises S² (about 20 ops) far more than dense (one kernel each way); the header prints
the load average.

Forward+backward of ``shifted_sparse_attention`` (group = seq/4) against ``F.scaled_dot_product_attention(...,
is_causal=True)`` on the same inputs: batch 1, 8 heads, head_dim 64, in the strided (b, n, h, d)-transposed layout
transformers hands to attention functions. Runs are interleaved (dense, S², dense, S², …) after one warm-up each, so
drifting machine load hits both alike; the table shows median times and the median of the per-pair ratios.

Packed case (``--packed N``, 0 to skip): one block of N tokens holding documents with the length distribution of
the embedded corpus (the standard library's sources of the extend split, at an estimated 4 characters per token,
shuffled with a fixed seed and cut into the block as prepare_pretrain packs them): document-aware S²
(``documents=…``, every document as if alone) against plain S² (documents see each other) and dense causal SDPA on
the same block, interleaved as above. Target: document-aware no slower than plain S² (it computes fewer scores: a
document shorter than a group is one short segment instead of part of a full group).

Memory: on CPU, tracemalloc does not see torch's allocations, so each variant runs once in a fresh subprocess with
glibc's mmap threshold pinned low (freed tensors go back to the OS at once) and the kernel's resident-set high-water
mark reset just before the step (/proc/self/clear_refs): "peak MiB" is the peak resident memory the forward+backward
added on top of its inputs (activations, saved tensors, gradients, temporaries). On CUDA it is
``max_memory_allocated`` minus the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longlora.method.s2attn import shifted_sparse_attention  # noqa: E402

HEADS, HEAD_DIM = 8, 64
CHARS_PER_TOKEN = 4


def packed_documents(seq: int, seed: int = 0) -> torch.Tensor:
    """Document boundaries (cumulative lengths) of one packed block of `seq` tokens from the embedded corpus."""
    from longlora.embedded.corpus import stdlib_documents

    lengths = [max(1, len(doc.text) // CHARS_PER_TOKEN) for doc in stdlib_documents("extend")]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0]
    for i in order:
        if bounds[-1] >= seq:
            break
        bounds.append(min(seq, bounds[-1] + lengths[i]))
    return torch.tensor(bounds)


def make_inputs(seq: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(seq)

    def one():
        x = torch.randn(1, seq, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = one(), one(), one()
    grad = torch.randn(1, seq, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, grad


def step(variant: str, q, k, v, grad, documents=None) -> None:
    if variant == "dense":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif variant == "s2-documents":
        out = shifted_sparse_attention(q, k, v, q.shape[2] // 4, documents=documents)
    else:
        out = shifted_sparse_attention(q, k, v, q.shape[2] // 4)
    out.backward(grad)
    q.grad = k.grad = v.grad = None


def timed(variant: str, device: torch.device, *tensors, documents=None) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(variant, *tensors, documents=documents)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_child(variant: str, seq: int) -> None:
    """Runs in a fresh subprocess: prints the peak resident memory (bytes) one step adds on top of its inputs."""
    tensors = make_inputs(seq, torch.device("cpu"), torch.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    step(variant, *tensors)
    print(json.dumps({"peak_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(variant: str, seq: int, device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type == "cuda":
        tensors = make_inputs(seq, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(variant, *tensors)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, __file__, "--_memory-child", variant, str(seq)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="timed (dense, S²) pairs per length")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--packed", type=int, default=16384, help="packed-block length (0: skip the packed case)")
    parser.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        peak_memory_child(args._memory_child[0], int(args._memory_child[1]))
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(
        f"torch {torch.__version__}, {device.type} ({name}), {torch.get_num_threads()} threads, {dtype}, "
        f"batch 1, {HEADS} heads, head_dim {HEAD_DIM}, group = seq/4, forward+backward; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    header = f"{'seq':>6} {'dense ms':>10} {'S² ms':>10} {'dense/S²':>9} {'dense peak MiB':>15} {'S² peak MiB':>12}"
    print(header)
    for seq in args.seqs:
        tensors = make_inputs(seq, device, dtype)
        timed("dense", device, *tensors)  # warm-up: thread pools, allocator, kernel selection
        timed("s2", device, *tensors)
        dense_times, s2_times = [], []
        for _ in range(args.repeats):
            dense_times.append(timed("dense", device, *tensors))
            s2_times.append(timed("s2", device, *tensors))
        del tensors
        ratio = statistics.median(d / s for d, s in zip(dense_times, s2_times, strict=True))
        if args.no_memory:
            memory = "", ""
        else:
            peaks = [peak_memory(variant, seq, device, dtype) for variant in ("dense", "s2")]
            memory = tuple("n/a" if p is None else f"{p / 2**20:.0f}" for p in peaks)
        print(
            f"{seq:>6} {statistics.median(dense_times) * 1e3:>10.0f} {statistics.median(s2_times) * 1e3:>10.0f} "
            f"{ratio:>8.2f}× {memory[0]:>15} {memory[1]:>12}",
            flush=True,
        )
    if args.packed:
        packed_case(args.packed, args.repeats, device, dtype)


def packed_case(seq: int, repeats: int, device: torch.device, dtype: torch.dtype) -> None:
    documents = packed_documents(seq)
    lengths = (documents[1:] - documents[:-1]).tolist()
    print(f"\npacked block of {seq} tokens: {len(lengths)} documents of {sorted(lengths)} tokens, group {seq // 4}; "
          f"load average {os.getloadavg()[0]:.2f}")
    variants = ("dense", "s2", "s2-documents")
    tensors = make_inputs(seq, device, dtype)
    docs = documents.to(device)
    for variant in variants:  # warm-up
        timed(variant, device, *tensors, documents=docs)
    times = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            times[variant].append(timed(variant, device, *tensors, documents=docs))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"{'dense ms':>10} {'S² ms':>10} {'doc-S² ms':>10} {'S²/doc-S²':>10} {'dense/doc-S²':>13}")
    print(f"{statistics.median(times['dense']) * 1e3:>10.0f} {statistics.median(times['s2']) * 1e3:>10.0f} "
          f"{statistics.median(times['s2-documents']) * 1e3:>10.0f} {ratio('s2', 's2-documents'):>9.2f}× "
          f"{ratio('dense', 's2-documents'):>12.2f}×", flush=True)


if __name__ == "__main__":
    main()
