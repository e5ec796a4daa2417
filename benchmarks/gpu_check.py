"""`make gpu-check` — the project's GPU path on one CUDA GPU, in at most 8 minutes, written to a results page.

    make gpu-check                                    # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --seqs 16384 32768 --skip-tests

Hardware: one CUDA GPU (any card; an 80 GB A100/H100 holds every step below). Without CUDA it prints one line saying
so and exits 0. It prints, and writes to `benchmarks/results/gpu/<card>.md`:

1. the environment: card, memory, torch, CUDA, flash-attn (or its absence), and which S²-Attn kernels can run here
   (`s2attn.kernel`: flash_attn, varlen, flex, sdpa; docs/method.md);
2. the `gpu`-marked tests (`pytest -m gpu`): the compiled kernels against the reference, on this card;
3. S²-Attn forward+backward with each kernel that can run against dense causal attention (SDPA's flash backend) at
   16K and 32K tokens (batch 1, 32 heads of 128, bf16, groups of N/4): median time of 3 after a warm-up, the speed-up
   over dense, peak memory added by the step;
4. one training step (forward, backward, AdamW) of a ~1.1B-parameter Llama (TinyLlama-1.1B's shape: hidden 2048, 22
   layers, 32 heads over 4 KV heads, vocabulary 32000; random weights, nothing downloaded) at 16K tokens, LoRA+ as
   `extend` trains it, bf16, gradient checkpointing, with S²-Attn (the `auto` kernel) and with dense attention.

Exits non-zero when a `gpu` test fails or a step raises, after writing what it measured. Expected on an H100/A100:
S² several times faster than dense at 32K (the FLOP bound is 4.27×), peak memory linear in N for both.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KERNELS = ("flash_attn", "varlen", "flex", "sdpa")
HEADS, HEAD_DIM = 32, 128
TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def environment() -> dict:
    from longlora.method import s2attn

    props = torch.cuda.get_device_properties(0)
    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = None
    probe = torch.zeros(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    kernels = {kernel: s2attn._kernel_problem(kernel, probe) or "runs" for kernel in KERNELS}
    return {"card": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "flash_attn": flash,
            "python": platform.python_version(), "auto": s2attn.resolve_s2attn_kernel("auto", probe),
            "kernels": kernels}


def gpu_tests(timeout: int) -> tuple[bool, str]:
    """`pytest -m gpu`: (passed, its summary line)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    if done.returncode not in (0, 5):  # 5: nothing collected
        print(done.stdout[-6000:], file=sys.stderr)
    return done.returncode in (0, 5), summary


def _measure(fn, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of `fn` over `repeats` runs after one warm-up, and the peak memory (GiB) it added."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def _dense_step(q, k, v, grad) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)


def _s2_step(q, k, v, grad, kernel: str) -> None:
    from longlora.method.s2attn import shifted_sparse_attention

    shifted_sparse_attention(q, k, v, q.shape[2] // 4, kernel=kernel).backward(grad)


def _train_step(model, optimizer, ids) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def attention_rows(seqs: list[int], kernels: list[str]) -> list[dict]:
    rows = []
    for seq in seqs:
        # The (b, n, h, d) memory transformers' projections produce, seen as (b, h, n, d).
        q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        dense_time, dense_memory = _measure(functools.partial(_dense_step, q, k, v, grad))
        rows.append({"seq": seq, "attention": "dense (SDPA flash)", "ms": dense_time * 1e3, "speedup": 1.0,
                     "peak_gib": dense_memory})
        for kernel in kernels:
            try:
                seconds, memory = _measure(functools.partial(_s2_step, q, k, v, grad, kernel))
                rows.append({"seq": seq, "attention": f"S² {kernel}", "ms": seconds * 1e3,
                             "speedup": dense_time / seconds, "peak_gib": memory})
            except Exception as err:  # noqa: BLE001 — recorded in the table, and the run fails at the end
                rows.append({"seq": seq, "attention": f"S² {kernel}", "error": f"{type(err).__name__}: {err}"})
        torch.cuda.empty_cache()
    return rows


def training_rows(seq: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from longlora.method.lora import apply_lora_plus
    from longlora.method.rope import interpolated_config
    from longlora.method.s2attn import configure_s2attn

    rows = []
    for attention in ("s2", "sdpa"):
        torch.manual_seed(0)
        config = LlamaConfig(**TINYLLAMA, max_position_embeddings=2048, use_cache=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        config = interpolated_config(config, seq, "linear", 2048)
        try:
            model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
            if attention == "s2":
                configure_s2attn(model)
            else:
                model.set_attn_implementation("sdpa")
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model = apply_lora_plus(model).train()
            trainable = [w for w in model.parameters() if w.requires_grad]
            for weight in trainable:  # fp32 masters for what trains, as the Trainer keeps them under bf16
                weight.data = weight.data.float()
            optimizer = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.95))
            ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
            seconds, memory = _measure(functools.partial(_train_step, model, optimizer, ids), repeats=2)
            parameters = sum(w.numel() for w in model.parameters())
            rows.append({"seq": seq, "attention": "S² (auto)" if attention == "s2" else "dense (SDPA)",
                         "s_per_step": seconds, "tokens_per_s": seq / seconds, "peak_gib": memory,
                         "parameters_b": parameters / 1e9})
        except Exception as err:  # noqa: BLE001
            rows.append({"seq": seq, "attention": attention, "error": f"{type(err).__name__}: {err}"})
        finally:
            model = optimizer = None
            torch.cuda.empty_cache()
    return rows


def markdown(env: dict, tests: tuple[bool, str], attention: list[dict], training: list[dict]) -> str:
    lines = [f"# GPU check: {env['card']}", "",
             f"`make gpu-check` on {time.strftime('%Y-%m-%d')}: {env['card']} ({env['memory_gib']} GiB), torch "
             f"{env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, flash-attn {env['flash_attn'] or 'absent'}, "
             f"Python {env['python']}.", "",
             "| S²-Attn kernel | here |", "|---|---|",
             *[f"| {kernel} | {state} |" for kernel, state in env["kernels"].items()],
             f"| auto picks | {env['auto']} |", "",
             f"`pytest -m gpu`: {'passed' if tests[0] else 'FAILED'} — {tests[1]}", "",
             "Attention forward+backward, batch 1, 32 heads of 128, bf16, S² groups of N/4 (median of 3):", "",
             "| tokens | attention | ms | speed-up over dense | peak GiB |", "|---:|---|---:|---:|---:|"]
    for row in attention:
        if "error" in row:
            lines.append(f"| {row['seq']:,} | {row['attention']} | error: {row['error'][:120]} | | |")
        else:
            lines.append(f"| {row['seq']:,} | {row['attention']} | {row['ms']:.1f} | {row['speedup']:.2f}× | "
                         f"{row['peak_gib']:.2f} |")
    lines += ["", "One training step of TinyLlama-1.1B's shape (random weights), LoRA+, bf16 autocast, gradient "
                  "checkpointing, AdamW:", "",
              "| tokens | attention | s/step | tokens/s | peak GiB |", "|---:|---|---:|---:|---:|"]
    for row in training:
        if "error" in row:
            lines.append(f"| {row['seq']:,} | {row['attention']} | error: {row['error'][:120]} | | |")
        else:
            lines.append(f"| {row['seq']:,} | {row['attention']} | {row['s_per_step']:.2f} | "
                         f"{row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--train-seq", type=int, default=16384)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    env = environment()
    print(json.dumps(env, indent=2))
    tests = (True, "skipped (--skip-tests)") if args.skip_tests else gpu_tests(args.test_timeout)
    print(f"pytest -m gpu: {tests[1]}")
    runnable = [kernel for kernel, state in env["kernels"].items() if state == "runs"]
    attention = attention_rows(args.seqs, runnable)
    training = training_rows(args.train_seq)
    page = markdown(env, tests, attention, training)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{_slug(env['card'])}.md"
    path.write_text(page, encoding="utf-8")
    print(page)
    print(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    failed = not tests[0] or any("error" in row for row in attention + training)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
