"""Stage `eval_perplexity`: each model of `eval_models` scored on prepare_eval's stream at each context length.

    .venv/bin/python -m stages.eval_perplexity base     # or: dvc repro eval_perplexity@base (one per model)

Two numbers per length (longlora/evaluation/perplexity.py): the standard strided perplexity (each token of the
whole windows scored once; the tail after the last whole window is not) and
LongLoRA's own (its eval.py: windows every 256 tokens, exp of the mean window loss), which the paper's tables use.
Dense attention unless `attention: s2`. On a GPU the model runs in bfloat16. How to run it and read it:
docs/evaluation.md; PG19 and proof-pile at 2k … 32k: docs/full-size.md.
Output: `<out_dir>/<model>/perplexity.csv` (one row per length: the DVC plot of perplexity against context length,
one line per model) and `<metrics_dir>/<model>.json`: `ppl.<length>` (strided) and `ppl_windowed.<length>` (LongLoRA's),
so that `dvc metrics show data/metrics/eval_perplexity` is a model-by-length table.
"""

from __future__ import annotations

import csv
from pathlib import Path

from longlora.data.packing import TokenStream
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli, _eval
from stages.params import Params

CSV_FIELDS = ("model", "length", "perplexity", "windowed_perplexity", "tokens_scored", "windows")


def run(params: Params, model: str) -> dict:
    """Score model `model` of eval_models at every length, both ways; return metrics."""
    with params.output(f"eval_perplexity@{model}") as out:  # checked and locked before any work
        return _evaluate(params, model, out)


def _read_stream(params: Params, lengths: tuple[int, ...]):
    p, folder = params.eval_perplexity, Path(params.prepare_eval.out_dir)
    try:
        stream = TokenStream(folder)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"prepare_eval.out_dir {str(folder)!r}: not a token stream prepare_eval wrote ({err}); "
                         "run `dvc repro prepare_eval`") from None
    tokens = stream.tokens[:p.max_tokens]
    # LongLoRA's loop needs more than one window and one step (it drops its last window).
    needed = max(lengths) + p.windowed_step + 1
    if len(tokens) < needed:
        raise InputError(f"prepare_eval.out_dir {str(folder)!r}: {len(tokens)} tokens"
                         f"{' (eval_perplexity.max_tokens)' if p.max_tokens else ''}, too few for eval_perplexity."
                         f"lengths up to {max(lengths)}: windows at that length every windowed_step "
                         f"{p.windowed_step} tokens need {needed}; give prepare_eval more or longer documents, or "
                         "evaluate at shorter lengths")
    return stream, tokens


def _evaluate(params: Params, name: str, out: StageOutput) -> dict:
    from longlora.evaluation.perplexity import strided_perplexity, windowed_perplexity

    p = params.eval_perplexity
    lengths = tuple(sorted(p.lengths))
    stream, tokens = _read_stream(params, lengths)  # before loading anything
    if p.attention == "s2":
        for length in lengths:
            try:
                params.s2attn.group_size_for(length)
            except ValueError as err:
                raise InputError(f"eval_perplexity.attention s2 at length {length}: {err} (s2attn)") from None
    _eval.check_positions(params, name, max(lengths), "eval_perplexity.lengths")
    tokenizer = _eval.load_tokenizer(params, name)
    path = params.eval_models[name].path
    if len(tokenizer) != stream.meta.get("vocab_size"):
        raise InputError(f"eval_models.{name}.path {path!r}: its tokenizer has {len(tokenizer)} tokens, but "
                         f"{params.prepare_eval.out_dir} was tokenized with {stream.meta.get('tokenizer')!r} "
                         f"({stream.meta.get('vocab_size')} tokens): evaluate models that share that tokenizer")
    model, _ = _eval.load_model(params, name, p.dtype)
    settings = {"batch_size": p.batch_size, "attention": p.attention, "group_size": params.s2attn.group_size,
                "group_size_ratio": params.s2attn.group_size_ratio}
    rows = []
    for length in lengths:
        strided = strided_perplexity(model, tokens, length, p.stride, **settings)
        windowed = windowed_perplexity(model, tokens, length, p.windowed_step, **settings)
        rows.append({"model": name, "length": length, "perplexity": round(strided["perplexity"], 4),
                     "windowed_perplexity": round(windowed["perplexity"], 4),
                     "tokens_scored": strided["tokens_scored"], "windows": windowed["windows"]})
    with out.publish() as tmp, open(tmp / "perplexity.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    # Two short keys per length, nothing else: `dvc metrics show <metrics_dir>` is then a model-by-length table that
    # fits a terminal (the counts of tokens and windows are in perplexity.csv).
    metrics = {key: {str(row["length"]): row[field] for row in rows}
               for key, field in (("ppl", "perplexity"), ("ppl_windowed", "windowed_perplexity"))}
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("eval_perplexity", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
