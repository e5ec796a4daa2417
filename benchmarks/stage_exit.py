""".venv/bin/python benchmarks/stage_exit.py [--rounds 5] [--json out.json]

How long a stage process takes to *end*, from its last line of work to the exit status its parent (DVC) sees, with
a plain `raise SystemExit` against `stages._cli.exit_process` (which freezes the objects left before exiting, so
that the interpreter's final garbage collections skip them). Each child imports what the merge stage imports (torch,
transformers, peft, the project's stage machinery), runs a small Llama forward and backward, prints the time and
exits one way or the other; the parent times from that printed time to the child's exit. The two kinds alternate,
in an order rotated from round to round; the table gives each kind's median and the ratio of the medians.

Hardware: written and measured on a 2-core AMD EPYC KVM guest; the numbers are in docs/performance.md
("Stage exit"). Expected there: plain about 2.4 s, exit_process about 0.4 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("plain", "exit_process")


def child(kind: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import stages.merge  # noqa: F401  (what a stage process has loaded: torch, transformers, peft, the params)
    from stages import _cli

    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 256))
    model(input_ids=ids, labels=ids).loss.backward()
    print(f"{time.time():.6f}", flush=True)
    if kind == "exit_process":
        _cli.exit_process(0)
    raise SystemExit(0)


def exit_seconds(kind: str) -> float:
    """Seconds from the child's last printed time to its exit as seen here."""
    done = subprocess.run([sys.executable, __file__, "--child", kind], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    ended = time.time()
    return ended - float(done.stdout.strip().splitlines()[-1])


def measure(rounds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            seconds[kind].append(exit_seconds(kind))
    return seconds


def table(seconds: dict[str, list[float]]) -> str:
    median = {kind: statistics.median(values) for kind, values in seconds.items()}
    rows = ["| exit | median s | each round (s) |", "|---|---:|---|"]
    rows += [f"| {kind} | {median[kind]:.2f} | {', '.join(f'{v:.2f}' for v in seconds[kind])} |" for kind in KINDS]
    rows.append(f"\nexit_process / plain: {median['exit_process'] / median['plain']:.2f}×")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the raw seconds here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
    seconds = measure(args.rounds)
    print(table(seconds))
    if args.json:
        args.json.write_text(json.dumps(seconds, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
