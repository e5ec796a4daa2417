"""Stage `eval_passkey`: passkey retrieval of each model of `eval_models` over prompt lengths × key depths.

    .venv/bin/python -m stages.eval_passkey base     # or: dvc repro eval_passkey@base (one per model)

LongLoRA's prompt (longlora/evaluation/passkey.py), with length and depth measured in the model's own tokens; greedy
decoding
with a KV cache of as many tokens as the key has; a trial is right when the digits the model writes are exactly the
key. Every cell (length, depth) runs `trials` prompts, keys seeded seed, seed + 1, … in every cell with 4 trials or
more, each cell its own keys with fewer (longlora.evaluation.passkey.cell_seeds). On a GPU the model runs in bfloat16.
How to
run it and read it: docs/evaluation.md; to 100k tokens: docs/full-size.md.
Output: `<out_dir>/<model>/` with passkey.csv (accuracy per cell), trials.csv (every prompt: key, answer, tokens)
and heatmap.png (length × depth, a DVC plot), and `<metrics_dir>/<model>.json` (`accuracy` overall and
`by_length.<length>`).
"""

from __future__ import annotations

import csv
from dataclasses import asdict

from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli, _eval
from stages.params import Params


def run(params: Params, model: str) -> dict:
    """Run the passkey grid on model `model` of eval_models; return metrics."""
    with params.output(f"eval_passkey@{model}") as out:  # checked and locked before any work
        return _evaluate(params, model, out)


def _evaluate(params: Params, name: str, out: StageOutput) -> dict:
    from longlora.evaluation.passkey import cell_accuracy, grid_seeds, passkey_grid, save_heatmap, trial_prompt

    p = params.eval_passkey
    lengths = tuple(sorted(p.lengths))
    _eval.check_positions(params, name, max(lengths), "eval_passkey.lengths")
    tokenizer = _eval.load_tokenizer(params, name)
    for seed in grid_seeds(len(lengths) * len(p.depths), p.trials, p.seed):  # the shortest prompts fit, or none runs
        try:
            trial_prompt(tokenizer, lengths[0], min(p.depths), seed)
        except ValueError as err:
            raise InputError(f"eval_passkey.lengths: {lengths[0]} tokens cannot hold the passkey prompt and its "
                             f"answer with eval_models.{name}'s tokenizer ({err})") from None
    model, tokenizer = _eval.load_model(params, name, p.dtype)
    trials = passkey_grid(model, tokenizer, lengths, p.depths, p.trials, p.seed)
    cells = cell_accuracy(trials)
    with out.publish() as tmp:
        with open(tmp / "passkey.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("model", "length", "depth", "trials", "correct", "accuracy"))
            for (length, depth), (correct, total) in cells.items():
                writer.writerow((name, length, depth, total, correct, round(correct / total, 4)))
        with open(tmp / "trials.csv", "w", newline="", encoding="utf-8") as f:
            fields = ("length", "depth", "seed", "key", "answer", "prompt_tokens", "correct")
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows({**asdict(trial), "correct": trial.correct} for trial in trials)
        save_heatmap(cells, tmp / "heatmap.png", f"passkey retrieval: {name}")

    def accuracy(keep) -> float:
        kept = [t.correct for t in trials if keep(t)]
        return round(sum(kept) / len(kept), 4)

    # Overall and by length only: `dvc metrics show <metrics_dir>` is then a model-by-length table that fits a
    # terminal; the length × depth grid is passkey.csv and the heatmap (`dvc plots show`).
    metrics = {
        "accuracy": accuracy(lambda t: True),
        "by_length": {str(n): accuracy(lambda t, n=n: t.length == n) for n in lengths},
        "prompts": len(trials),
    }
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("eval_passkey", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
