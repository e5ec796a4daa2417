"""Held-out perplexity at the extended length: the base model with position interpolation alone against the extended
(merged) model, on prepare_eval's token stream.

    .venv/bin/python benchmarks/extension_ppl.py --base data/base_model --extended data/extended_model \
        --stream data/eval --length 1024

Both models see the same windows: the stream cut into consecutive, non-overlapping windows of `--length` tokens (the
standard non-overlapping perplexity; documents run into each other at their EOS/BOS as in the stream). "base + PI" is
the base model built with the very RoPE scaling the extension trained with
(`longlora.method.rope.interpolated_config`), no
training; "base, no PI" is the base as it is, shown for reference. Perplexity is exp(mean next-token loss over every
scored position); the loss is also reported by position range, which shows where the long context is used.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longlora.data.packing import TokenStream, cut_blocks  # noqa: E402
from longlora.embedded.probes import bucket_means, loss_by_position  # noqa: E402
from longlora.method.rope import interpolated_config  # noqa: E402

BUCKETS = ((0, 64), (64, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096))


def _models(base: str, extended: str, length: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    yield "base, no PI", AutoModelForCausalLM.from_pretrained(base)
    scaled = interpolated_config(AutoConfig.from_pretrained(base), length)
    yield "base + PI", AutoModelForCausalLM.from_pretrained(base, config=scaled)
    yield "extended (merged)", AutoModelForCausalLM.from_pretrained(extended)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="data/base_model")
    parser.add_argument("--extended", default="data/extended_model")
    parser.add_argument("--stream", default="data/eval")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    args = parser.parse_args(argv)

    stream = TokenStream(args.stream)
    windows = cut_blocks(np.asarray(stream.tokens), args.length)[: args.max_windows]
    blocks = torch.from_numpy(windows.astype(np.int64))
    print(f"{len(blocks)} windows of {args.length} tokens from {args.stream} ({int(blocks.numel()):,} tokens)")
    buckets = [(a, b) for a, b in BUCKETS if a < args.length - 1]
    header = ["model", f"ppl @ {args.length}", *(f"loss {a}-{min(b, args.length)}" for a, b in buckets), "seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, model in _models(args.base, args.extended, args.length):
        started = time.perf_counter()
        per_position = loss_by_position(model.eval(), blocks, batch_size=8)
        by_range = bucket_means(per_position, buckets)
        cells = [name, f"{math.exp(float(per_position.mean())):.3f}", *(f"{v:.3f}" for v in by_range.values()),
                 f"{time.perf_counter() - started:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
