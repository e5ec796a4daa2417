"""Mini-replication of LongLoRA's ablations on the embedded base model: the same extension (256 → 1024 tokens, same
data, steps and seeds) under each variant, then held-out perplexity and passkey at 256/512/1024, training
speed and memory.

    .venv/bin/python benchmarks/replicate.py            # the study (docs/results.md): 64 steps, 2 seeds, 2 × 1 thread
    .venv/bin/python benchmarks/replicate.py --quick    # smoke run: 2 variants × 1 seed × 2 steps, about a minute

Writes benchmarks/results/replication.{md,csv,png}, the command that made them and its wall clock in the .md header;
docs/results.md and docs/extension.md discuss them. `--base`, `--pretrain`, `--eval` default to the
pipeline's outputs (run `make repro` first).

Each trained variant runs the real `extend` stage (`python -m stages.extend --params <file>`, one process per run,
params.yaml with the variant's overrides: `extend.method`, `extend.attention`, `s2attn.shift`, `extend.seed`,
`extend.max_steps`), in its own working folder under --work, so its checkpoints and run log never touch the
project's data/. The evaluation is the pipeline's: `longlora.method.extension.load_extended` (dense attention),
`longlora.evaluation.perplexity.strided_perplexity` (standard, every token scored once, windows of 256, 512 and 1024
over the same first --eval-tokens tokens of the held-out stream) and `longlora.evaluation.passkey.passkey_accuracy`
at each length over the depth grid. Training speed is the Trainer's tokens/s (wall clock); CPU seconds and peak
resident memory come from the run's own process (`os.wait4`), so they hold on a shared machine where the wall clock
does not.

Variants (the paper's Tables 2 and 6, issue #10; 9 and 10: the default's departures from the paper, issue #19):
  no_pi       base model as it is (no fine-tuning, no interpolation)
  pi          position interpolation ×4, no training
  lora        PI + LoRA on q/k/v/o only, dense attention
  lora_plus   PI + LoRA+ (embeddings and norms trainable), dense attention
  full        PI + full fine-tuning, dense attention
  longlora    PI + LoRA+ with S²-Attn (the method)
  no_shift    PI + LoRA+ with S²-Attn without the shift (every head in plain groups: the paper's short attention)
  doc_aware   LongLoRA with document-aware S²-Attn (extend.document_attention: each packed document attends to itself)
  group_half  LongLoRA with S² groups of N/2 (s2attn.group_size_ratio 0.5)
  rope_linear LongLoRA with linear position interpolation and no headroom (model.rope_type linear,
              model.rope_headroom 1), the paper's
  no_headroom LongLoRA with the default's scaling type but no headroom (model.rope_headroom 1): the factor is
              target / original, as in the paper
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    train: dict | None = None
    """extend.method / extend.attention, and model, s2attn and sft overrides; None: no training."""
    interpolate: bool = True


VARIANTS = (
    Variant("no_pi", "1. no fine-tuning, no PI", interpolate=False),
    Variant("pi", "2. PI only"),
    Variant("lora", "3. PI + LoRA (q/k/v/o), dense", {"method": "lora", "attention": "dense"}),
    Variant("lora_plus", "4. PI + LoRA+, dense", {"method": "lora_plus", "attention": "dense"}),
    Variant("full", "5. PI + full fine-tuning, dense", {"method": "full", "attention": "dense"}),
    Variant("longlora", "6. PI + LoRA+, S²-Attn (LongLoRA)", {"method": "lora_plus", "attention": "s2"}),
    # The no-shift ablation takes no packed documents (refused at load): sft's padding-free rows go off with it.
    Variant("no_shift", "7. PI + LoRA+, S²-Attn without shift", {"method": "lora_plus", "attention": "s2",
                                                                   "s2attn": {"shift": False},
                                                                   "sft": {"padding_free": False}}),
    Variant("doc_aware", "8. LongLoRA, document-aware S²-Attn", {"method": "lora_plus", "attention": "s2",
                                                                  "document_attention": True}),
    Variant("group_half", "9. LongLoRA, S² groups of N/2", {"method": "lora_plus", "attention": "s2",
                                                           "s2attn": {"group_size_ratio": 0.5}}),
    Variant("rope_linear", "10. LongLoRA, linear interpolation", {"method": "lora_plus", "attention": "s2",
                                                                 "model": {"rope_type": "linear",
                                                                           "rope_headroom": 1.0}}),
    Variant("no_headroom", "11. LongLoRA, no position headroom", {"method": "lora_plus", "attention": "s2",
                                                                  "model": {"rope_headroom": 1.0}}),
)
QUICK_VARIANTS = ("pi", "longlora")


@dataclass
class Run:
    variant: str
    seed: int | None
    ppl: dict = field(default_factory=dict)
    passkey: dict = field(default_factory=dict)
    """Share of keys retrieved, by prompt length."""
    final_loss: float | None = None
    tokens_per_second: float | None = None
    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    peak_memory_mib: float | None = None
    eval_cpu_seconds: float | None = None


# --- training: the extend stage, one process per run ---------------------------------------------------------------


def run_params(args, variant: Variant, seed: int, folder: Path) -> dict:
    raw = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    train = dict(variant.train)
    raw["model"]["name_or_path"] = str(args.base)
    raw["model"].update(train.pop("model", {}))
    raw["s2attn"].update(train.pop("s2attn", {}))
    raw["sft"].update(train.pop("sft", {}))
    raw["extend"].update(train, data=str(args.pretrain), max_steps=args.steps, seed=seed, resume="never",
                         log_every=max(1, args.steps // 4), checkpoint_every=10**6,
                         out_dir=str(folder / "extend"), metrics_file=str(folder / "extend.json"),
                         checkpoint_dir=str(folder / "checkpoints"))
    return raw


def train(args, variant: Variant, seed: int, run: Run) -> Path:
    folder = args.work / f"{variant.name}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(run_params(args, variant, seed, folder), sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    log_file = folder / "extend.log"
    started = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        # cwd: the run's folder, so that the stage's run log (data/logs/extend/) lands there, not in the project.
        process = subprocess.Popen([sys.executable, "-m", "stages.extend", "--params", str(params_file)],
                                   cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"extend failed for {variant.name}, seed {seed} (exit {process.returncode}); "
                         f"log {log_file}:\n{tail}")
    run.wall_seconds = round(time.perf_counter() - started, 1)
    run.cpu_seconds = round(usage.ru_utime + usage.ru_stime, 1)
    run.peak_memory_mib = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    metrics = json.loads((folder / "extend.json").read_text(encoding="utf-8"))
    timings = json.loads((folder / "data/logs/extend/timings.json").read_text(encoding="utf-8"))
    run.final_loss = metrics["final_loss"]
    run.tokens_per_second = round(timings["tokens_per_second"], 1)
    return folder / "extend"


# --- evaluation, in this process -----------------------------------------------------------------------------------


def load_model(args, variant: Variant, trained: Path | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longlora.method.extension import load_extended
    from longlora.method.rope import interpolated_config

    if trained is not None:
        model = load_extended(trained, base=args.base)
        return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval()
    config = AutoConfig.from_pretrained(args.base)
    if variant.interpolate:
        config = interpolated_config(config, args.lengths[-1], args.rope_type, headroom=args.rope_headroom)
    return AutoModelForCausalLM.from_pretrained(args.base, config=config).eval()


def evaluate(args, model, tokenizer, tokens, run: Run) -> None:
    from longlora.evaluation.passkey import passkey_accuracy, shortest_trial_length
    from longlora.evaluation.perplexity import strided_perplexity
    from longlora.recipe import PASSKEY_DEPTHS

    started = time.process_time()
    for length in args.lengths:
        run.ppl[length] = round(strided_perplexity(model, tokens, length, batch_size=4, progress=False)["perplexity"],
                                3)
    shortest = shortest_trial_length(tokenizer, range(args.passkey_trials))
    for length in args.lengths:
        # None where the prompt alone is longer than `length` (a small base context with a coarse tokenizer).
        run.passkey[length] = (passkey_accuracy(model, tokenizer, length, depths=PASSKEY_DEPTHS,
                                                trials=args.passkey_trials) if length >= shortest else None)
    run.eval_cpu_seconds = round(time.process_time() - started, 1)


# --- tables, plot ---------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and standard deviation, None if nothing was measured."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run], variants: list[Variant], lengths: tuple[int, ...]) -> list[dict]:
    rows = []
    for variant in variants:
        mine = [r for r in runs if r.variant == variant.name]
        row = {"variant": variant.name, "label": variant.label, "seeds": len(mine) if variant.train else 0}
        for length in lengths:
            row[f"ppl_{length}"] = _mean_sd([r.ppl[length] for r in mine])
        for length in lengths:
            row[f"passkey_{length}"] = _mean_sd([r.passkey[length] for r in mine])
        for key in ("tokens_per_second", "cpu_seconds", "peak_memory_mib", "final_loss"):
            row[key] = _mean_sd([getattr(r, key) for r in mine])
        rows.append(row)
    return rows


def paired(runs: list[Run], a: str, b: str, length: int, metric: str = "ppl") -> dict | None:
    """`metric` (ppl or passkey) of b minus a at `length`, seed by seed (same seed: same data order and LoRA
    initialisation)."""
    first = {r.seed: getattr(r, metric)[length] for r in runs if r.variant == a}
    second = {r.seed: getattr(r, metric)[length] for r in runs if r.variant == b}
    if list(first) == [None]:  # an untrained variant: the same model against every seed
        first = dict.fromkeys(second, first[None])
    seeds = sorted(s for s in set(first) & set(second) if first[s] is not None and second[s] is not None)
    if not seeds:
        return None
    diffs = [second[s] - first[s] for s in seeds]
    spread = max(_mean_sd([first[s] for s in seeds])[1], _mean_sd([second[s] for s in seeds])[1])
    mean = statistics.fmean(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    base = statistics.fmean(first.values())
    return {"a": a, "b": b, "diffs": diffs, "mean": mean, "relative": mean / base if base else None,
            "spread": spread, "resolved": same_sign and abs(mean) > spread and len(seeds) > 1}


CLAIMS = (  # (a, b, what the paper says)
    ("full", "lora_plus", "LoRA+ ≈ full fine-tuning (Table 2)"),
    ("lora_plus", "lora", "LoRA alone ≫ LoRA+ in perplexity (Table 2)"),
    ("lora_plus", "longlora", "S²-Attn ≈ dense attention in training (Table 6)"),
    ("longlora", "no_shift", "without the shift, worse (Table 6: short attention)"),
    ("longlora", "doc_aware", "document-aware groups vs LongLoRA's"),
    ("pi", "longlora", "extension vs interpolation alone"),
    ("longlora", "group_half", "S² groups of N/2 vs N/4 (the paper's ablation)"),
    ("longlora", "rope_linear", "linear interpolation (the paper's) vs the default scaling"),
    ("longlora", "no_headroom", "factor target / original (the paper's) vs the default's headroom"),
)


def _cell(value: tuple[float, float] | None, digits: int, seeds: int) -> str:
    if value is None:
        return "—"
    mean, sd = value
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def markdown(rows: list[dict], runs: list[Run], lengths: tuple[int, ...], command: str, setup: dict) -> str:
    target = lengths[-1]
    lines = [
        f"# Mini-replication: LongLoRA's ablations on the embedded base model (→ {target} tokens)",
        "",
        f"Command: `{command}`",
        "",
        "Setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()) + ".",
        "",
        "Mean ± standard deviation over seeds (trained variants; the untrained ones have no seed). Perplexity:"
        " standard strided, held-out stream, the same tokens at every length, dense attention. Passkey: share of"
        " correct keys at each prompt length over depths 0, ¼, ½, ¾, 1. tokens/s: the Trainer's, wall clock; CPU s"
        " and peak MiB: the training process's own (`os.wait4`).",
        "",
        "| variant | " + " | ".join(f"ppl @ {length}" for length in lengths) + " | "
        + " | ".join(f"passkey @ {length}" for length in lengths) + " | final train loss | tokens/s | CPU s |"
        " peak MiB |",
        "|---|" + "---:|" * (2 * len(lengths) + 4),
    ]
    for row in rows:
        n = row["seeds"]
        lines.append("| " + " | ".join([
            row["label"], *(_cell(row[f"ppl_{length}"], 2, n) for length in lengths),
            *(_cell(row[f"passkey_{length}"], 2, n) for length in lengths), _cell(row["final_loss"], 3, n),
            _cell(row["tokens_per_second"], 0, n), _cell(row["cpu_seconds"], 0, n),
            _cell(row["peak_memory_mib"], 0, n)]) + " |")
    for metric, what, digits in (("ppl", "perplexity", 2), ("passkey", "passkey accuracy", 2)):
        lines += ["", f"Paired differences in {what} at {target} tokens (b − a, seed by seed; resolved: every seed"
                  " has the same sign and the mean exceeds the larger seed-to-seed standard deviation of the two):",
                  "", "| claim | a | b | b − a per seed | mean (relative to a) | seed spread | resolved |",
                  "|---|---|---|---|---:|---:|---|"]
        for a, b, claim in CLAIMS:
            result = paired(runs, a, b, target, metric)
            if result is None:
                continue
            diffs = ", ".join(f"{d:+.{digits}f}" for d in result["diffs"])
            relative = "" if result["relative"] is None else f" ({result['relative']:+.1%})"
            lines.append(f"| {claim} | {a} | {b} | {diffs} | {result['mean']:+.{digits}f}{relative} | "
                         f"{result['spread']:.{digits}f} | {'yes' if result['resolved'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs: list[Run], lengths: tuple[int, ...]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *(f"ppl_{length}" for length in lengths),
                         *(f"passkey_{length}" for length in lengths), "final_loss",
                         "tokens_per_second", "cpu_seconds", "wall_seconds", "peak_memory_mib", "eval_cpu_seconds"])
        for r in runs:
            writer.writerow([r.variant, "" if r.seed is None else r.seed, *(r.ppl[length] for length in lengths),
                             *(r.passkey[length] for length in lengths), r.final_loss, r.tokens_per_second,
                             r.cpu_seconds, r.wall_seconds,
                             r.peak_memory_mib, r.eval_cpu_seconds])


def plot(path: Path, rows: list[dict], lengths: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for row in rows:
        means = [row[f"ppl_{length}"][0] for length in lengths]
        sds = [row[f"ppl_{length}"][1] for length in lengths]
        ax.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, label=row["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel("held-out perplexity (standard, strided)")
    ax.set_title(f"Extension to {lengths[-1]} tokens: perplexity by variant (mean ± sd over seeds)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="the recipe (extend, lora, s2attn) and model.target_context every variant starts from")
    parser.add_argument("--base", type=Path, default=Path("data/base_model"), help="base model folder (256 tokens)")
    parser.add_argument("--pretrain", type=Path, default=Path("data/pretrain"),
                        help="prepare_pretrain's packed 1024-token blocks")
    parser.add_argument("--eval", type=Path, default=Path("data/eval"), help="prepare_eval's held-out stream")
    parser.add_argument("--variants", nargs="+", default=None, help="names (default: all)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="extend.max_steps of every trained variant")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored at every length")
    parser.add_argument("--passkey-trials", type=int, default=4, help="keys per depth at each length")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one per core is fastest)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training process and of the "
                        "evaluation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results", help="replication.{csv,md,png}")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {', '.join(QUICK_VARIANTS)}, 1 seed, 2 steps, 2048 tokens, 1 key per depth")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants = args.variants or list(QUICK_VARIANTS)
        args.seeds, args.steps, args.eval_tokens, args.passkey_trials = 1, 2, 2048, 1

    import numpy as np
    import torch

    from longlora.data.packing import TokenStream
    from longlora.data.tokenizing import load_tokenizer
    from longlora.errors import InputError
    from stages.params import ParamsError, load_params

    torch.set_num_threads(args.threads)
    try:
        recipe = load_params(args.params)
    except ParamsError as err:
        raise SystemExit(str(err)) from None
    target = recipe.model.target_context
    args.rope_type = recipe.model.rope_type
    args.rope_headroom = recipe.model.rope_headroom
    args.lengths = tuple(sorted({target // 4, target // 2, target}))
    known = {v.name: v for v in VARIANTS}
    names = args.variants or [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    variants = [known[n] for n in names]
    for what, path in (("--base", args.base), ("--pretrain", args.pretrain), ("--eval", args.eval)):
        if not path.is_dir():
            raise SystemExit(f"{what} {str(path)!r}: no such folder (run the pipeline first: make repro)")
    args.base, args.pretrain = args.base.resolve(), args.pretrain.resolve()
    tokens = np.asarray(TokenStream(args.eval).tokens)[: args.eval_tokens]
    if len(tokens) < target:
        raise SystemExit(f"--eval {str(args.eval)!r}: {len(tokens)} tokens, fewer than one window of {target}")
    try:
        tokenizer = load_tokenizer(str(args.base), False, "--base")
    except InputError as err:
        raise SystemExit(str(err)) from None

    work = tempfile.TemporaryDirectory(prefix="replicate-") if args.work is None else None
    args.work = Path(work.name) if work is not None else args.work.resolve()
    started = time.perf_counter()
    runs = [Run(v.name, seed) for v in variants for seed in (range(args.seeds) if v.train else [None])]
    try:
        # --jobs training processes at a time (each with --threads threads); every model is evaluated here, in run
        # order, as soon as its training is done.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            planned = [(run, known[run.variant]) for run in runs]
            trained = [pool.submit(train, args, variant, run.seed, run) if variant.train else None
                       for run, variant in planned]
            for (run, variant), training in zip(planned, trained, strict=True):
                folder = training.result() if training is not None else None
                evaluate(args, load_model(args, variant, folder), tokenizer, tokens, run)
                print(json.dumps(asdict(run)), flush=True)
    finally:
        if work is not None:
            work.cleanup()
    elapsed = time.perf_counter() - started

    rows = summarise(runs, variants, args.lengths)
    command = "python benchmarks/replicate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    batch = f"{recipe.extend.global_batch_size} × {target} tokens"
    setup = {"steps": args.steps, "seeds": args.seeds, "batch": f"{batch} (the rest of the recipe: {args.params.name})",
             "held-out tokens": len(tokens), "passkey keys per depth": args.passkey_trials,
             "jobs × threads": f"{args.jobs} × {args.threads}", "wall clock": f"{elapsed / 60:.1f} min",
             "CPU": f"{sum((r.cpu_seconds or 0) + (r.eval_cpu_seconds or 0) for r in runs) / 60:.1f} min"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replication.md").write_text(markdown(rows, runs, args.lengths, command.strip(), setup),
                                             encoding="utf-8")
    write_csv(args.out / "replication.csv", runs, args.lengths)
    plot(args.out / "replication.png", rows, args.lengths)
    print((args.out / "replication.md").read_text(encoding="utf-8"))
    if not all(math.isfinite(r.ppl[length]) for r in runs for length in args.lengths):
        raise SystemExit("a perplexity is not finite: see the table")
    return runs


if __name__ == "__main__":
    main()
