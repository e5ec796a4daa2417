"""Stage `eval_ruler`: RULER's synthetic tasks at each prompt length, and the effective length, for each eval model.

    .venv/bin/python -m stages.eval_ruler extended     # or: dvc repro eval_ruler@extended (one per model)

RULER's prompts, sized to each length in the model's own tokens, answered greedily and scored as RULER's
evaluate.py scores them (longlora/evaluation/ruler.py); the average per length is over the tasks that fit every
length of the grid, and the effective length is the longest length up to which every average clears `threshold`.
How to read it and what differs from RULER: docs/evaluation.md. On a GPU the model runs in bfloat16.
Output: `<out_dir>/<model>/<length>/` (RULER's `<task>.jsonl` predictions and its summary.csv: rescore with RULER's
`scripts/eval/evaluate.py --data_dir <that folder>`), ruler.csv, heatmap.png, and `<metrics_dir>/<model>.json`.
"""

from __future__ import annotations

import csv
import json

from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli, _eval
from stages.params import Params

RESULTS_FILE = "ruler.csv"
HEATMAP_FILE = "heatmap.png"


def run(params: Params, model: str) -> dict:
    """Build, answer and score RULER's tasks at every length with eval model `model`; return metrics."""
    out = params.output(f"eval_ruler@{model}")  # an unknown model name fails here
    out.check()
    haystack = _haystack(params)  # bad input stops here, before anything is created or loaded
    with out:
        return _evaluate(params, model, haystack, out)


def _haystack(params: Params) -> tuple[list[str] | None, str]:
    """(words of the essay haystack, what they are), or (None, "") when no chosen task reads one."""
    from longlora.evaluation.ruler import ESSAY_TASKS, essay_words

    p = params.eval_ruler
    if not set(p.tasks) & set(ESSAY_TASKS):
        return None, ""
    if p.haystack is None:
        texts = [doc.text for doc in params.embedded_corpus.documents("heldout")]
        return essay_words("\n".join(texts)), "the embedded corpus' held-out Python sources"
    if not p.haystack.is_file():
        raise InputError(f"eval_ruler.haystack {str(p.haystack)!r}: no such file")
    try:
        text = p.haystack.read_text(encoding="utf-8")
        if p.haystack.suffix == ".json":
            text = json.loads(text)["text"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"eval_ruler.haystack {str(p.haystack)!r}: expected UTF-8 text or RULER's "
                         f"PaulGrahamEssays.json ({{\"text\": ...}}): {err}") from None
    words = essay_words(text)
    if len(words) < 100:
        raise InputError(f"eval_ruler.haystack {str(p.haystack)!r}: {len(words)} words; a haystack needs prose")
    return words, str(p.haystack)


def _evaluate(params: Params, name: str, haystack: tuple[list[str] | None, str], out: StageOutput) -> dict:
    from longlora.evaluation import ruler

    p = params.eval_ruler
    lengths = tuple(sorted(p.lengths))
    _eval.check_positions(params, name, max(lengths), "eval_ruler.lengths")
    tokenizer = _eval.load_tokenizer(params, name)
    words, haystack_name = haystack
    samples, not_fitting = {}, []
    for length in lengths:  # every prompt is built before any weights load
        for task in p.tasks:
            try:
                samples[length, task] = ruler.build_samples(task, tokenizer, length, p.samples, p.seed,
                                                            p.model_template, words)
            except ruler.DoesNotFit:
                not_fitting.append(f"{task}@{length}")
    averaged = [task for task in p.tasks if all((length, task) in samples for length in lengths)]
    if not averaged:
        raise InputError(f"eval_ruler.lengths {list(lengths)}: no task of eval_ruler.tasks fits every length with "
                         f"eval_models.{name}'s tokenizer (RULER's prompts are sized for 4096 tokens and more); "
                         "leave out the shortest")
    model, tokenizer = _eval.load_model(params, name, p.dtype)
    scores: dict[tuple[int, str], tuple[float, str]] = {}
    with out.publish() as tmp:
        for length in lengths:
            folder = tmp / str(length)
            folder.mkdir()
            results = {}
            for task in p.tasks:
                if (length, task) not in samples:
                    continue
                predictions = ruler.predict(model, tokenizer, task, samples[length, task])
                ruler.write_predictions(folder, task, samples[length, task], predictions)
                results[task] = scores[length, task] = ruler.score_task(
                    task, predictions, [s.outputs for s in samples[length, task]])
            ruler.write_summary(folder, results)
        with open(tmp / RESULTS_FILE, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("model", "length", "task", "score", "nulls", "averaged"))
            for length in lengths:
                for task in p.tasks:
                    score, nulls = scores.get((length, task), ("", "does not fit"))
                    writer.writerow((name, length, task, score, nulls, task in averaged))
        ruler.save_heatmap({key: score for key, (score, _) in scores.items()}, lengths, p.tasks,
                           tmp / HEATMAP_FILE, f"RULER: {name}")
    averages = {length: ruler.average(scores[length, task][0] for task in averaged) for length in lengths}
    inc, dec = ruler.weighted_averages(averages)
    effective = ruler.effective_length(averages, p.threshold)
    metrics = {
        "average": {str(length): value for length, value in averages.items()},
        "effective_length": effective or 0,
        "wavg_inc": inc,
        "wavg_dec": dec,
        "tasks_averaged": len(averaged),
        "not_fitting": not_fitting,
        "essay_haystack": haystack_name,
    }
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("eval_ruler", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
