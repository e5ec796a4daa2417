"""Where an extended model retrieves, and where it stops: passkey accuracy per key depth and strided perplexity of one
model folder, its RoPE factor overridden at load (no training), for each factor given.

    .venv/bin/python benchmarks/rope_headroom.py --model data/extended_model --factors 4 5 6 --trials 6
    .venv/bin/python benchmarks/rope_headroom.py --model data/base_model --factors 4 6 --lengths 256 1024

It answers "is the target length at the edge of what this model reads well?": a model extended with factor
target / original and evaluated with a larger factor scales positions further than it was trained on; if retrieval
at the full window then improves (and perplexity there does not get worse), the longest distances of the target sit
where the model is weakest. docs/extension.md, "Position headroom", has what it gave on the embedded default.
The folder's own rope type, theta and original context are kept; only `factor` changes (and for YaRN the attention
factor that transformers derives from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_with_factor(folder: str, factor: float):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") == "default":
        raise SystemExit(f"--model {folder}: its config has no RoPE scaling to override (rope_type default)")
    rope["factor"] = factor
    config.rope_parameters = rope
    return AutoModelForCausalLM.from_pretrained(folder, config=config).eval()


def measure(model, tokenizer, tokens, lengths, trials: int) -> dict:
    """{length: (perplexity or None, accuracy, [correct per depth])} over LongLoRA's depth grid."""
    from longlora.evaluation.passkey import cell_accuracy, passkey_grid
    from longlora.evaluation.perplexity import strided_perplexity

    trials_run = passkey_grid(model, tokenizer, lengths, trials=trials, progress=False)
    cells = cell_accuracy(trials_run)
    out = {}
    for length in lengths:
        by_depth = [correct for (cell_length, _), (correct, _) in cells.items() if cell_length == length]
        ppl = (strided_perplexity(model, tokens, length, batch_size=4, progress=False)["perplexity"]
               if tokens is not None else None)
        out[length] = (ppl, sum(by_depth) / (trials * len(by_depth)), by_depth)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder whose config has RoPE scaling")
    parser.add_argument("--factors", type=float, nargs="+", required=True, help="RoPE factors to load it with")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="prompt lengths")
    parser.add_argument("--trials", type=int, default=6, help="keys per depth at each length")
    parser.add_argument("--eval", default="data/eval", help="prepare_eval's held-out stream (perplexity)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored at every length")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from longlora.data.packing import TokenStream
    from longlora.data.tokenizing import load_tokenizer
    from longlora.recipe import PASSKEY_DEPTHS

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, False, "--model")
    tokens = TokenStream(args.eval).tokens[: args.eval_tokens] if Path(args.eval).is_dir() else None
    depths = " / ".join(f"{d:g}" for d in PASSKEY_DEPTHS)
    print(f"| factor | length | perplexity | passkey | correct per depth ({depths}), of {args.trials} |")
    print("|---:|---:|---:|---:|---|")
    for factor in args.factors:
        model = load_with_factor(args.model, factor)
        for length, (ppl, accuracy, by_depth) in measure(model, tokenizer, tokens, args.lengths, args.trials).items():
            shown = f"{ppl:.2f}" if ppl is not None else "—"
            print(f"| {factor:g} | {length} | {shown} | {accuracy:.0%} | {' / '.join(map(str, by_depth))} |",
                  flush=True)


if __name__ == "__main__":
    main()
