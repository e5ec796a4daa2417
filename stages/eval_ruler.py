"""Stage `eval_ruler`: RULER's synthetic tasks at each prompt length, and the effective length, for each eval model.

    .venv/bin/python -m stages.eval_ruler extended     # or: dvc repro eval_ruler@extended (one per model)

RULER's prompts, sized to each length in the model's own tokens, answered greedily and scored as RULER's
evaluate.py scores them (longlora/evaluation/ruler.py); the average per length is over the tasks that fit every
length of the grid, and the effective length is the longest length up to which every average clears `threshold`.
The QA tasks (qa_1, qa_2) read `qa_squad` / `qa_hotpotqa` (RULER's JSON file or the hub's copy), once, before the
model loads; one whose source is null, or a hub set that cannot be loaded, is skipped with a warning and a note
under `skipped` in the metrics (a local file that does not exist stops the stage).
How to read it and what differs from RULER: docs/evaluation.md. On a GPU the model runs in bfloat16.
Output: `<out_dir>/<model>/<length>/` (RULER's `<task>.jsonl` predictions and its summary.csv: rescore with RULER's
`scripts/eval/evaluate.py --data_dir <that folder>`), ruler.csv, heatmap.png, and `<metrics_dir>/<model>.json`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from longlora.choices import RULER_CHAT_TEMPLATE
from longlora.errors import InputError
from longlora.io import StageOutput
from longlora.sources import is_hub_name, looks_local
from stages import _cli, _eval
from stages.params import Params

log = logging.getLogger(__name__)

RESULTS_FILE = "ruler.csv"
HEATMAP_FILE = "heatmap.png"
QA_PARAMS = {"qa_1": "qa_squad", "qa_2": "qa_hotpotqa"}
"""The eval_ruler parameter each QA task reads its data set from."""

QaData = tuple[dict[str, tuple[list[dict], list[str]]], dict[str, str], dict[str, str]]
"""(task: (questions, documents), task: its source, skipped task: why)."""


def run(params: Params, model: str) -> dict:
    """Build, answer and score RULER's tasks at every length with eval model `model`; return metrics."""
    out = params.output(f"eval_ruler@{model}")  # an unknown model name fails here
    out.check()
    haystack = _haystack(params)  # bad input stops here, before anything is created or loaded
    qa = _qa_data(params)
    with out:
        return _evaluate(params, model, haystack, qa, out)


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


def _qa_data(params: Params) -> QaData:
    """The QA data sets of the chosen QA tasks, read once; a task whose source is null or a hub set that cannot be
    loaded is skipped (with a warning), a local file that does not exist or is not RULER's format stops the stage."""
    from longlora.evaluation import ruler

    p = params.eval_ruler
    data, sources, skipped = {}, {}, {}
    for task in p.tasks:
        if task not in QA_PARAMS:
            continue
        key = f"eval_ruler.{QA_PARAMS[task]}"
        source, dataset = getattr(p, QA_PARAMS[task]), ruler.qa_dataset(task)
        if source is None:
            skipped[task] = f"{key} is null"
        elif is_hub_name(source) and not looks_local(source):
            try:
                data[task] = ruler.load_hub_qa(dataset, source)
            except Exception as err:  # any failure here means "cannot get it from the hub"
                skipped[task] = f"{key} {source!r} could not be loaded ({type(err).__name__}: {str(err)[:300]})"
        else:
            data[task] = _read_qa_file(key, Path(source), dataset)
        if task in skipped:
            continue
        sources[task] = source
        questions = len(data[task][0])
        if questions < p.samples:
            raise InputError(f"{key} {source!r}: {questions} answerable questions, fewer than eval_ruler.samples "
                             f"{p.samples}")
    if not [task for task in p.tasks if task not in skipped]:
        raise InputError(f"eval_ruler.tasks: every task is skipped ({'; '.join(skipped.values())})")
    for task, why in skipped.items():
        log.warning("eval_ruler: %s skipped: %s", task, why)
    return data, sources, skipped


def _read_qa_file(key: str, path: Path, dataset: str) -> tuple[list[dict], list[str]]:
    from longlora.evaluation import ruler

    expected = {"squad": "SQuAD's JSON (dev-v2.0.json)", "hotpotqa": "HotpotQA's JSON (hotpot_dev_distractor_v1.json)"}
    hub = ruler.QA_HUB[dataset][0]
    if not path.is_file():
        raise InputError(f"{key} {str(path)!r}: no such file (a local path, so the hub was not asked; RULER's "
                         f"download_qa_dataset.sh fetches it, or name the hub's copy, {hub})")
    try:
        return ruler.read_qa(dataset, json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError,
            AttributeError) as err:
        raise InputError(f"{key} {str(path)!r}: expected {expected[dataset]}, as RULER reads it: "
                         f"{type(err).__name__}: {err}") from None


def _evaluate(params: Params, name: str, haystack: tuple[list[str] | None, str], qa: QaData,
              out: StageOutput) -> dict:
    from longlora.evaluation import ruler

    p = params.eval_ruler
    lengths = tuple(sorted(p.lengths))
    qa_data, qa_sources, skipped = qa
    tasks = [task for task in p.tasks if task not in skipped]
    _eval.check_positions(params, name, max(lengths), "eval_ruler.lengths")
    tokenizer = _eval.load_tokenizer(params, name)
    template = p.model_template or (RULER_CHAT_TEMPLATE if _eval.is_chat(params, name, tokenizer) else "base")
    if template == RULER_CHAT_TEMPLATE and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"eval_ruler.model_template: chat, but the tokenizer of eval_models.{name} has no chat "
                         "template; name one of RULER's templates, or leave it null")
    words, haystack_name = haystack
    samples, not_fitting = {}, []
    for length in lengths:  # every prompt is built before any weights load
        for task in tasks:
            try:
                samples[length, task] = ruler.build_samples(task, tokenizer, length, p.samples, p.seed,
                                                            template, words, qa_data.get(task))
            except ruler.DoesNotFit:
                not_fitting.append(f"{task}@{length}")
    averaged = [task for task in tasks if all((length, task) in samples for length in lengths)]
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
                    missing = f"skipped: {skipped[task]}" if task in skipped else "does not fit"
                    score, nulls = scores.get((length, task), ("", missing))
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
        "skipped": skipped,
        "model_template": template,
        "essay_haystack": haystack_name,
        "qa_data": qa_sources,
    }
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("eval_ruler", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
