""".venv/bin/python benchmarks/sft_padding.py [--model data/extended_model] [--data data/sft] [--batches 8]
[--rounds 3] [--crop 0] [--threads 2] [--json FILE]

Hardware: written and measured on a 2-core AMD EPYC KVM guest (AVX-512), torch 2.13.0 CPU build, float32.
Expected there on `make repro`'s outputs (quiet machine, `--rounds 7`): padding 26 % of the padded batches' tokens
against 13 % of the padding-free ones, and about the same real tokens/s both ways (1.02–1.03×: one example per row,
and on this CPU document-aware attention costs what the rounding saves); with `--crop 256` (four examples per row)
padding 37 % against 0 and 1.26× (2 threads) to 1.34× (1 thread) the real tokens/s. The losses agree to float32
rounding. Table in the README ("Performance report", "Padding-free SFT").

What `sft.padding_free` buys, measured on the sft stage's own inputs: the merged extended model (`--model`, default
`merge.extend.out_dir`) with S²-Attn at the fixed group the stage uses (`s2attn` at `model.target_context`) and LoRA+
(params.yaml `lora`), and `--batches` batches of `sft.per_device_batch_size` examples of prepare_sft's dataset
(`--data`, default `sft.data` or prepare_sft's output), drawn with a fixed seed. Each batch goes through the stage's
collator both ways: right-padded to the longest example rounded up to the group (`sft.padding_free: false`) and
packed into rows of up to the model's context, every example computed as if alone by document-aware S²-Attn
(`sft.padding_free: true`). One training step each (forward, the answer-token loss, backward; the optimizer's step is
the same work both ways and is left out, so the weights stay put and every round sees the same model). The two ways
run interleaved (the order alternates each round) after a warm-up pass, so drifting machine load hits both alike;
the table shows the median time per pass over the batches and the median of the per-round ratios.

Real tokens/s counts only the examples' tokens (what both ways train on); the padding share is padded ÷ all tokens
the collator produced. "max |Δ loss|" is the largest difference between a batch's loss padded and packed: the same
targets, the same model, so only float32 rounding separates them (tests/test_sft.py pins the equality, with the
gradients, to 1e-6).

`--crop T`: every example cut to a seeded random length between 64 and T tokens, keeping its end (the answer and its
labels), so that several fit one row: what padding-free batches save on short examples (LongAlpaca's lengths vary
from a few hundred tokens to the context; the embedded LongQA examples are 544–855 tokens in rows of 1024, so no two
share a row). Run it on an otherwise idle machine; the header prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longlora.sft_data import IGNORE_INDEX, PaddedBatches  # noqa: E402
from stages.params import Params, load_params  # noqa: E402

MIN_CROP = 64
WAYS = ("padded", "padding-free")


def load_model(params: Params, folder: str, group_size: int):
    """The model as the sft stage trains it: S²-Attn at the fixed group, LoRA+ (train mode, float32)."""
    from transformers import AutoModelForCausalLM

    from longlora.lora import apply_lora_plus
    from longlora.s2attn import configure_s2attn

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    configure_s2attn(model, group_size=group_size, shift=params.s2attn.shift)
    lora = params.lora
    model = apply_lora_plus(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                            target_modules=lora.target_modules, train_embeddings=lora.train_embeddings,
                            train_norms=lora.train_norms)
    return model.train()


def draw_examples(folder: str, batches: int, batch_size: int, crop: int, seed: int = 0) -> list[list[dict]]:
    """`batches` batches of `batch_size` examples of prepare_sft's dataset, drawn without replacement with `seed`;
    with `crop`, each example cut to a random length in [MIN_CROP, crop] keeping its end."""
    import datasets

    dataset = datasets.load_from_disk(folder)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(dataset))[: batches * batch_size]
    if len(picked) < batches * batch_size:
        raise SystemExit(f"--data {folder}: {len(dataset)} examples, fewer than {batches} × {batch_size}")
    examples = []
    for i in picked.tolist():
        ids, labels = dataset[i]["input_ids"], dataset[i]["labels"]
        if crop:
            keep = int(rng.integers(MIN_CROP, crop + 1))
            ids, labels = ids[-keep:], labels[-keep:]
        examples.append({"input_ids": ids, "labels": labels})
    return [examples[b * batch_size: (b + 1) * batch_size] for b in range(batches)]


def collate(batches: list[list[dict]], pad_id: int, group_size: int, row_length: int) -> dict[str, tuple]:
    """Each way's tensors for every batch, and its real and padded token counts (the stage's own collator)."""
    out = {}
    for way in WAYS:
        collator = PaddedBatches(pad_id, group_size, row_length=row_length if way == "padding-free" else None)
        tensors = [collator(batch) for batch in batches]
        out[way] = (tensors, collator.tokens, collator.padded_tokens)
    return out


def train_pass(model, tensors: list[dict]) -> tuple[float, list[float]]:
    """Seconds for one training step (forward, loss, backward) per batch, and the batches' losses."""
    losses = []
    start = time.perf_counter()
    for batch in tensors:
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return time.perf_counter() - start, losses


def measure(model, collated: dict, rounds: int) -> dict:
    """Interleaved rounds after a warm-up pass of each way: per-way times, per-round ratios, losses."""
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    ratios, losses = [], {}
    for way in WAYS:
        _, losses[way] = train_pass(model, collated[way][0])
    for r in range(rounds):
        this_round = {}
        for way in WAYS if r % 2 == 0 else reversed(WAYS):
            this_round[way], _ = train_pass(model, collated[way][0])
            times[way].append(this_round[way])
        ratios.append(this_round["padded"] / this_round["padding-free"])
    rows = {}
    for way in WAYS:
        real, padded = collated[way][1], collated[way][2]
        seconds = statistics.median(times[way])
        rows[way] = {"seconds": seconds, "real_tokens": real, "padded_tokens": padded,
                     "padding_share": padded / (real + padded), "tokens_per_second": real / seconds,
                     "rows": sum(batch["input_ids"].shape[0] for batch in collated[way][0])}
    return {"ways": rows, "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["padded"], losses["padding-free"],
                                                                 strict=True))}


def table(result: dict, header: str) -> str:
    lines = [header, "",
             "| batches | rows | real tokens | padding | seconds per pass | real tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for way, row in result["ways"].items():
        lines.append(f"| {way} | {row['rows']} | {row['real_tokens']} | {100 * row['padding_share']:.1f} % | "
                     f"{row['seconds']:.2f} | {row['tokens_per_second']:.0f} |")
    low, high = result["speedup_range"]
    lines += ["", f"padding-free / padded tokens/s: {result['speedup']:.2f}× (rounds {low:.2f}–{high:.2f}); "
                  f"max |Δ loss| {result['max_loss_difference']:.1e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    params = load_params(ROOT / "params.yaml")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default=str(params.merge.extend.out_dir))
    parser.add_argument("--data", default=str(params.sft.data or params.prepare_sft.out_dir))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, default=0, help=f"cut examples to {MIN_CROP}..CROP tokens (0: as written)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.crop and args.crop < MIN_CROP:
        parser.error(f"--crop {args.crop}: at least {MIN_CROP} tokens (or 0)")
    for name, folder in (("--model", args.model), ("--data", args.data)):
        if not Path(folder).is_dir():
            parser.error(f"{name} {folder}: no such folder (run `make repro` first, or point it elsewhere)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # LoRA's initialisation

    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(args.model).max_position_embeddings
    group_size = params.s2attn.group_size_for(params.model.target_context)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = draw_examples(args.data, args.batches, params.sft.per_device_batch_size, args.crop)
    if any(all(x == IGNORE_INDEX for x in e["labels"][1:]) for batch in batches for e in batch):
        raise SystemExit("an example has no target left: raise --crop")
    model = load_model(params, args.model, group_size)
    result = measure(model, collate(batches, pad_id, group_size, context), args.rounds)
    result.update(batches=args.batches, batch_size=params.sft.per_device_batch_size, crop=args.crop,
                  group_size=group_size, row_length=context, threads=args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"load average {load:.1f}; {args.model} (context {context}, group {group_size}), {args.batches} batches "
              f"of {params.sft.per_device_batch_size} from {args.data}"
              + (f" cropped to {MIN_CROP}–{args.crop} tokens" if args.crop else "") + f", {args.rounds} rounds")
    print(table(result, header))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
