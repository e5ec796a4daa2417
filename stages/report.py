"""Stage `report`: the evaluations of every eval_models model side by side, and each merged model's card with them.

    .venv/bin/python -m stages.report            # or: dvc repro report (after every evaluation)
    .venv/bin/python -m stages.report summary    # print the last report's summary (`make repro` ends with it)

Reads what the evaluation stages wrote (their metrics files and the passkey heatmaps, for each eval_models name) and
the model card `merge` wrote into each merged folder that an eval_models entry names (a merged folder no entry names
is left out, and no dependency of the report in dvc.yaml), and writes `report.out_dir` (data/report/):

- README.md: the models, the summary, perplexity by context length (tables, both numbers, and perplexity.png),
  passkey accuracy by prompt length (table, and each model's heatmap copied to passkey/<model>.png), the held-out
  questions, RULER's average by length and effective length (and each model's heatmap, ruler/<model>.png),
  LongBench scores by task and their average, LongBench v2's accuracies, the lm-evaluation-harness numbers, and
  how to publish each merged model with its card;
- models/<merge source>/README.md: the merged folder's card (longlora/method/modelcard.py) with its Evaluation section
  filled in and `model-index` metadata (huggingface_hub's EvalResult), ready to replace the folder's README.md
  before uploading it. The card cannot be completed in the model folder itself: that folder is merge's output, and
  writing into it would make merge and every evaluation of its model stale;
- summary.txt: per model, perplexity and passkey accuracy at each length, LongQA, the LongBench average, LongBench
  v2's accuracy and RULER's averages and effective length (what `make repro` prints at the end).

An evaluation that has not run (no metrics file) is reported as such, not guessed. Same inputs, same bytes (no
dates; the PNG carries no software tag).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from longlora.errors import InputError
from longlora.evaluation.report import (
    LONGQA_SCORES,
    ModelResults,
    comparison_sections,
    markdown_table,
    model_results,
    perplexity_plot,
    summary_text,
)
from longlora.io import StageOutput, same_path
from longlora.method.modelcard import CARD_FILE, with_evaluation
from longlora.sources import is_hub_name
from stages import _cli
from stages.params import DEFAULT_PARAMS_FILE, Params, load_params
from stages.registry import EVAL_STAGES, MERGE_SOURCES

log = logging.getLogger(__name__)

REPORT_FILE = "README.md"
SUMMARY_FILE = "summary.txt"
PLOT_FILE = "perplexity.png"
HEATMAP_FILE = "heatmap.png"
"""What eval_passkey and eval_ruler write into `<out_dir>/<model>/`."""
HEATMAP_STAGES = {"eval_passkey": "passkey", "eval_ruler": "ruler"}
"""The evaluations whose heatmaps the report copies, and the report's folder for each."""


def read_metrics(path: Path) -> dict | None:
    """An evaluation stage's metrics file, parsed; None when it does not exist (that evaluation has not run)."""
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable metrics file ({err})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: not a metrics file (a JSON object)")
    return metrics


def run(params: Params) -> dict:
    """Write the report of the evaluations and the merged models' cards with their results; return metrics."""
    with params.output("report") as out:  # checked and locked before any work
        return _report(params, out)


def _report(params: Params, out: StageOutput) -> dict:
    evaluated: dict[str, list[str]] = {}
    results: dict[str, ModelResults] = {}
    missing = []
    for name in params.eval_models:
        found = {}
        for stage in EVAL_STAGES:
            metrics_file = params.destination(f"{stage}@{name}")[2]
            found[stage] = read_metrics(metrics_file)
            if found[stage] is None:
                missing.append(f"{stage}@{name} (no {metrics_file})")
        evaluated[name] = [stage for stage in EVAL_STAGES if found[stage] is not None]
        results[name] = model_results(found)
    if missing:
        log.warning("not evaluated, left out of the report: %s", "; ".join(missing))
    heatmaps = {stage: _heatmaps(params, stage) for stage in HEATMAP_STAGES}
    sections = comparison_sections(results)
    cards = {}
    for source in MERGE_SOURCES:
        folder = params.section(f"merge@{source}").out_dir
        # Only an evaluated folder's card: dvc.yaml reaches the merged folders through their evaluations alone.
        if _evaluated_as(params, folder) and (folder / CARD_FILE).is_file():
            cards[source] = folder
    with out.publish() as tmp:
        plotted = perplexity_plot(results, tmp / PLOT_FILE)
        for stage, folder in HEATMAP_STAGES.items():
            for name, heatmap in heatmaps[stage].items():
                (tmp / folder).mkdir(exist_ok=True)
                shutil.copyfile(heatmap, tmp / folder / f"{name}.png")
        for source, folder in cards.items():
            card = _card_with_results(params, folder, results, sections)
            (tmp / "models" / source).mkdir(parents=True)
            card.save(tmp / "models" / source / CARD_FILE)
        summary = summary_text(results)
        (tmp / SUMMARY_FILE).write_text(summary, encoding="utf-8")
        (tmp / REPORT_FILE).write_text(_readme(params, results, sections, summary, plotted, heatmaps, cards, missing),
                                       encoding="utf-8")
    metrics = {
        "models": {name: {"evaluated": evaluated[name], "longbench_average": results[name].longbench_average}
                   for name in params.eval_models},
        "cards": {source: str(Path(params.report.out_dir) / "models" / source / CARD_FILE) for source in cards},
    }
    return out.write_metrics(metrics)


def _heatmaps(params: Params, stage: str) -> dict[str, Path]:
    """Each evaluated model's heatmap of `stage`, by model name."""
    found = {}
    for name in params.eval_models:
        heatmap = params.destination(f"{stage}@{name}")[0] / HEATMAP_FILE
        if heatmap.is_file():
            found[name] = heatmap
    return found


def _evaluated_as(params: Params, folder: Path) -> list[str]:
    """The eval_models names whose path is `folder`."""
    return [name for name, model in params.eval_models.items() if same_path(model.path, folder)]


def _card_with_results(params: Params, folder: Path, results: dict[str, ModelResults], sections: dict[str, str]):
    """The card merge wrote into `folder`, its Evaluation section filled in from the evaluations of the eval_models
    entry that names the folder (compared with the other models), its results as `model-index` metadata."""
    from huggingface_hub import ModelCard

    path = folder / CARD_FILE
    try:
        card = ModelCard.load(path)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a model card merge wrote ({err})") from None
    name = _evaluated_as(params, folder)[0]
    text = "\n".join([
        f"This model is `{name}` in the tables below, beside the other models the pipeline evaluated "
        f"({', '.join(f'`{n}`' for n in results if n != name) or 'none'}).",
        "",
        *(f"{section.replace('### ', '#### ')}\n{_setup(params)[stage]}\n" for stage, section in sections.items()),
    ])
    try:
        return with_evaluation(card, text, _eval_results(params, results[name]))
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None


def _setup(params: Params) -> dict[str, str]:
    """How each evaluation measured, a sentence each, by evaluation stage."""
    return {
        "eval_perplexity": f"On the held-out token stream prepared from `{params.prepare_eval.input}` (prepare_eval): "
                           "the standard strided perplexity, and LongLoRA's own (its eval.py: a window every "
                           f"{params.eval_perplexity.windowed_step} tokens).",
        "eval_passkey": f"LongLoRA's passkey prompt, {params.eval_passkey.trials} keys per prompt length and key "
                        "depth, greedy decoding; a key counts when the digits generated are exactly the key.",
        "eval_longqa": f"The first {params.eval_longqa.max_examples or 'all'} questions of "
                       f"`{params.eval_longqa.input}` (no training stage read them) in the SFT prompt format "
                       f"(`{params.prepare_sft.template}`), greedy answers of at most "
                       f"{params.eval_longqa.max_new_tokens} tokens; exact match of the first line and token F1 over "
                       "its alphanumeric runs (longlora/evaluation/qa.py).",
        "eval_ruler": f"RULER's synthetic tasks ({', '.join(params.eval_ruler.tasks)}), "
                      f"{params.eval_ruler.samples} prompts per task and length built and scored as RULER does "
                      "(longlora/evaluation/ruler.py); the average is over the tasks that fit every length, the "
                      f"effective length the longest up to which every average is at least "
                      f"{params.eval_ruler.threshold:g}. Essay haystack: {_ruler_haystack(params)}.",
        "eval_harness": f"lm-evaluation-harness {_harness_version()} ({', '.join(params.eval_harness.tasks)}) on "
                        "the model as the pipeline loads it, lm-eval's own evaluator and metrics; its results.json "
                        f"and samples are in `{params.eval_harness.out_dir}/<model>/`.",
        "longbench": f"LongBench's prompts, generation lengths and metrics on `{params.longbench.input}`; the average "
                     "is the mean over the tasks.",
        "longbench2": f"LongBench v2's `{params.longbench2.mode}` prompt on `{params.longbench2.input}`, cut in the "
                      "middle as its pred.py cuts, greedy answers, the letter read by its regexes, accuracy as its "
                      "result.py computes it" + (" (compensated: an unreadable answer counts 0.25)"
                                                 if params.longbench2.compensated else "") + ".",
    }


def _harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "(not installed)"


def _ruler_haystack(params: Params) -> str:
    if params.eval_ruler.haystack is None:
        return "held-out Python sources (RULER-format scores, not comparable to published essay-haystack numbers)"
    return f"`{params.eval_ruler.haystack}`"


def _eval_results(params: Params, r: ModelResults):
    """The results as huggingface_hub EvalResults (the card's `model-index`)."""
    from huggingface_hub import EvalResult

    from longlora.evaluation.longbench import TASKS

    perplexity_data = str(params.prepare_eval.input)
    longbench_data = str(params.longbench.input)
    results = []
    for values, kind in ((r.perplexity, "strided"), (r.windowed_perplexity, "LongLoRA eval.py")):
        for length, value in values.items():
            results.append(EvalResult(
                task_type="text-generation", task_name="Language modelling", dataset_type=perplexity_data,
                dataset_name=f"{perplexity_data} (held-out)", metric_type="perplexity", metric_value=value,
                metric_name=f"perplexity ({kind}) at {length} tokens", metric_config=str(length)))
    for length, value in r.passkey_by_length.items():
        results.append(EvalResult(
            task_type="text-generation", task_name="Passkey retrieval", dataset_type="passkey-retrieval",
            dataset_name="passkey retrieval (LongLoRA's prompt)", metric_type="accuracy", metric_value=value,
            metric_name=f"passkey accuracy at {length} tokens", metric_config=str(length)))
    for key, value in r.longqa.items():
        results.append(EvalResult(
            task_type="question-answering", task_name="Long-context QA (SFT prompt format)",
            dataset_type=str(params.eval_longqa.input), dataset_name=f"{params.eval_longqa.input} (held-out)",
            metric_type=key, metric_value=value, metric_name=f"LongQA {LONGQA_SCORES[key]}"))
    for length, value in r.ruler.items():
        results.append(EvalResult(
            task_type="text-generation", task_name="RULER", dataset_type="ruler",
            dataset_name="RULER (synthetic tasks)", metric_type="score", metric_value=value,
            metric_name=f"RULER average at {length} tokens", metric_config=str(length)))
    for task, score in r.longbench.items():
        results.append(EvalResult(
            task_type="text-generation", task_name="LongBench",
            dataset_type=longbench_data,
            dataset_name=f"LongBench {task}" if is_hub_name(longbench_data)
            else f"{task} (LongBench format, {longbench_data})",
            dataset_config=task, metric_type=TASKS[task].metric if task in TASKS else "score",
            metric_value=score, metric_name=f"LongBench {task}"))
    longbench2_data = str(params.longbench2.input)
    for key, value in r.longbench2.items():
        if value is not None:
            results.append(EvalResult(
                task_type="multiple-choice", task_name="LongBench v2", dataset_type=longbench2_data,
                dataset_name="LongBench v2" if is_hub_name(longbench2_data)
                else f"{longbench2_data} (LongBench v2 format)", metric_type="accuracy", metric_value=value,
                metric_name=f"LongBench v2 accuracy ({key})", metric_config=key))
    for key, value in r.harness.items():
        task, _, metric = key.partition(" ")
        results.append(EvalResult(
            task_type="text-generation", task_name=f"lm-evaluation-harness {task}", dataset_type=task,
            dataset_name=task, metric_type=metric, metric_value=value, metric_name=f"{task} {metric} (lm-eval)"))
    return results


def _image(path: str, alt: str) -> str:
    return f"![{alt}]({path})"


def _readme(params: Params, results: dict[str, ModelResults], sections: dict[str, str], summary: str,
            plotted: bool, heatmaps: dict[str, dict[str, Path]], cards: dict[str, Path], missing: list[str]) -> str:
    m = params.model
    models = [[name, f"`{model.path}`", "yes" if model.interpolate else "no"]
              for name, model in params.eval_models.items()]
    lines = [
        "# Evaluation report",
        "",
        f"`{m.name_or_path}` extended to {m.target_context} tokens ({m.rope_type} position interpolation), "
        "evaluated beside the models it is compared with. Written by `dvc repro report` (stages/report.py) from "
        "the evaluation stages' metrics files; `make repro` prints the summary below at the end. The same results "
        "give the same bytes.",
        "",
        "## Models",
        "",
        markdown_table(["model", "folder", "RoPE interpolated at load (no training)"], models),
        "## Summary",
        "",
        "```text",
        summary.rstrip("\n"),
        "```",
        "",
    ]
    if missing:
        lines += ["Not evaluated (left out; `dvc repro` runs them): " + "; ".join(missing) + ".", ""]
    setup = _setup(params)
    lines += ["## Perplexity", "", setup["eval_perplexity"], ""]
    if plotted:
        lines += [_image(PLOT_FILE, "perplexity vs context length"), ""]
    lines += [sections.get("eval_perplexity", "No perplexity results.\n"), "## Passkey retrieval", "",
              setup["eval_passkey"], ""]
    lines += [sections.get("eval_passkey", "No passkey results.\n")]
    for name in heatmaps["eval_passkey"]:
        lines += [f"#### {name}", "", _image(f"passkey/{name}.png", f"passkey retrieval: {name}"), ""]
    lines += ["## Held-out questions (what SFT trains for)", "", setup["eval_longqa"], "",
              sections.get("eval_longqa", "No LongQA results.\n")]
    lines += ["## RULER", "", setup["eval_ruler"], "", sections.get("eval_ruler", "No RULER results.\n")]
    for name in heatmaps["eval_ruler"]:
        lines += [f"#### {name}", "", _image(f"ruler/{name}.png", f"RULER: {name}"), ""]
    lines += ["## LongBench", "", setup["longbench"], "", sections.get("longbench", "No LongBench results.\n"),
              "## LongBench v2", "", setup["longbench2"], "", sections.get("longbench2", "No LongBench v2 results.\n"),
              "## lm-evaluation-harness", "", setup["eval_harness"], "",
              sections.get("eval_harness", "No lm-evaluation-harness results.\n"), "## Model cards", ""]
    unevaluated = [f"`{params.section(f'merge@{source}').out_dir}` (merge@{source})" for source in MERGE_SOURCES
                   if not _evaluated_as(params, params.section(f"merge@{source}").out_dir)]
    if not cards:
        lines += ["No evaluated merged model with a card (the merge stages write one).", ""]
    else:
        rows = [[f"`{folder}`", f"[models/{source}/{CARD_FILE}](models/{source}/{CARD_FILE})",
                 ", ".join(f"`{n}`" for n in _evaluated_as(params, folder))]
                for source, folder in cards.items()]
        source, folder = next(reversed(cards.items()))
        lines += [
            "Each merged folder holds the card `merge` wrote, its Evaluation section pointing here; the card with "
            "the results is in this folder:",
            "",
            markdown_table(["merged model", "its card with results", "evaluated as"], rows),
            "To publish one, upload a copy of its folder with the card replaced (the merged folder itself stays as "
            "DVC wrote it, so `dvc status` stays clean):",
            "",
            "```bash",
            f"cp -r {folder} /tmp/upload && cp {Path(params.report.out_dir) / 'models' / source / CARD_FILE} "
            f"/tmp/upload/{CARD_FILE}",
            "hf upload <your-namespace>/<model-name> /tmp/upload    # huggingface_hub's CLI; `hf auth login` first",
            "```",
            "",
        ]
    if unevaluated:
        lines += [f"No card here for {' or '.join(unevaluated)}: no `eval_models` entry names it (the report reads "
                  "the cards of evaluated models only, so that `dvc repro report` does not run the merges it does not "
                  "evaluate); add one to report it.", ""]
    return "\n".join(lines)


def print_summary(params_file: Path = DEFAULT_PARAMS_FILE) -> int:
    """Print the last report's summary.txt; 1 with a note when there is none yet."""
    try:
        params = load_params(params_file)
    except InputError as err:
        print(f"stages.report summary: error: {err}", file=sys.stderr)
        return 2
    path = Path(params.report.out_dir) / SUMMARY_FILE
    if not path.is_file():
        print(f"stages.report summary: no {path} yet (run `dvc repro report`)", file=sys.stderr)
        return 1
    print(f"Summary ({path}; the full report: {Path(params.report.out_dir) / REPORT_FILE})")
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.report [--params params.yaml]` or `python -m stages.report summary [--params ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        parser = argparse.ArgumentParser(prog="python -m stages.report summary",
                                         description="Print the summary of the last report.")
        parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="parameters file (params.yaml)")
        return print_summary(parser.parse_args(argv[1:]).params)
    return _cli.main("report", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
