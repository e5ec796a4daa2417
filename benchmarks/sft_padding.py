""".venv/bin/python benchmarks/sft_padding.py [--model data/extended_model] [--data data/sft] [--batches 8]
[--rounds 3] [--crop 0] [--threads 2] [--json FILE]

Hardware: written and measured on a 2-core AMD EPYC KVM guest (AVX-512), torch 2.13.0 CPU build, float32. Expected
there on `make repro`'s outputs (quiet machine, `--rounds 7`): padding 26 % of the padded batches' tokens against 13
% of the padding-free ones, and about the same real tokens/s both ways (1.02–1.12× over two runs: one example per
row, and on this CPU document-aware attention costs what the rounding saves); with `--crop 256` (four examples per
row) padding 37 % against 0 and 1.12–1.38× the real tokens/s (the per-round ratios spread widely on a 2-core guest:
read the range it prints). The losses agree to float32 rounding. Table in docs/performance.md
("Padding-free SFT").

What `sft.padding_free` buys, measured on the sft stage's own job (`stages.sft.prepare_job` with params.yaml, the same
checks of model and data): its model built by `longlora.method.training.trainable_model` as the stage builds it — the
merged extended model (`--model`,
default `sft.base_model`), S²-Attn at the stage's fixed group, LoRA+ — and `--batches` batches of
`sft.per_device_batch_size` examples of its dataset (`--data`, default `sft.data`), drawn with a fixed seed. Each
batch goes through the stage's collator both ways: right-padded to the longest example rounded up to the group
(`sft.padding_free: false`) and packed into rows of up to the model's context, every example computed as if alone by
document-aware S²-Attn (`sft.padding_free: true`). One training step each (forward, the answer-token loss, backward;
the optimizer's step is the same work both ways and is left out, so the weights stay put and every round sees the
same model). The two ways run interleaved (the order alternates each round) after a warm-up pass, so drifting machine
load hits both alike; the table shows the median time per pass over the batches and the median of the per-round
ratios.

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

from longlora.data.sft import IGNORE_INDEX, PaddedBatches  # noqa: E402
from longlora.errors import InputError  # noqa: E402
from stages.params import load_params  # noqa: E402

MIN_CROP = 64
WAYS = ("padded", "padding-free")


def stage_job(model: str | None, data: str | None):
    """The sft stage's job as params.yaml describes it (padding-free, and without replay: what is measured is
    `--data`'s examples), `--model` and `--data` put in its section: its config, dataset, collator and S²-Attn
    settings, checked as the stage checks them (InputError otherwise)."""
    from stages import sft

    params = load_params(ROOT / "params.yaml")
    given = {k: v for k, v in (("base_model", model), ("data", data)) if v}
    update = {"padding_free": True, "replay_share": 0.0} | given
    return sft.prepare_job(params.model_copy(update={"sft": params.sft.model_copy(update=update)}))


def draw_examples(dataset, batches: int, batch_size: int, crop: int, seed: int = 0) -> list[list[dict]]:
    """`batches` batches of `batch_size` examples of prepare_sft's `dataset`, drawn without replacement with `seed`;
    with `crop`, each example cut to a random length in [MIN_CROP, crop] keeping its end."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(dataset))[: batches * batch_size]
    if len(picked) < batches * batch_size:
        raise SystemExit(f"{len(dataset)} examples, fewer than {batches} × {batch_size}")
    examples = []
    for i in picked.tolist():
        ids, labels = dataset[i]["input_ids"], dataset[i]["labels"]
        if crop:
            keep = int(rng.integers(MIN_CROP, crop + 1))
            ids, labels = ids[-keep:], labels[-keep:]
        examples.append({"input_ids": ids, "labels": labels})
    return [examples[b * batch_size: (b + 1) * batch_size] for b in range(batches)]


def collate(batches: list[list[dict]], packing: PaddedBatches) -> dict[str, tuple]:
    """Each way's tensors for every batch, and its real and padded token counts: the stage's padding-free collator,
    and the same one without rows (right-padded to its multiple of the group)."""
    out = {}
    for way in WAYS:
        collator = packing if way == "padding-free" else PaddedBatches(packing.pad_id, packing.multiple)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", help="the model to fine-tune (default: params.yaml sft.base_model)")
    parser.add_argument("--data", help="prepare_sft's dataset (default: params.yaml sft.data)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, default=0, help=f"cut examples to {MIN_CROP}..CROP tokens (0: as written)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.crop and args.crop < MIN_CROP:
        parser.error(f"--crop {args.crop}: at least {MIN_CROP} tokens (or 0)")
    torch.set_num_threads(args.threads)
    try:
        job = stage_job(args.model, args.data)
    except InputError as err:
        parser.error(f"{err} (run `make repro` first, or point --model/--data elsewhere)")
    p, packing = job.section, job.collator
    batches = draw_examples(job.dataset, args.batches, p.per_device_batch_size, args.crop)
    if any(all(x == IGNORE_INDEX for x in e["labels"][1:]) for batch in batches for e in batch):
        raise SystemExit("an example has no target left: raise --crop")
    torch.manual_seed(p.seed)  # LoRA's initialisation
    from longlora.method.training import trainable_model

    model = trainable_model(job.model_source, job.config, method=p.method, attention=p.attention, precision="fp32",
                            s2attn=job.s2attn, lora=job.params.lora.model_dump()).train()
    result = measure(model, collate(batches, packing), args.rounds)
    result.update(batches=args.batches, batch_size=p.per_device_batch_size, crop=args.crop,
                  group_size=packing.multiple, row_length=packing.row_length, threads=args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"load average {load:.1f}; {job.model_source} (context {packing.row_length}, group {packing.multiple}), "
              f"{args.batches} batches of {p.per_device_batch_size} from {p.data}"
              + (f" cropped to {MIN_CROP}–{args.crop} tokens" if args.crop else "") + f", {args.rounds} rounds")
    print(table(result, header))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
