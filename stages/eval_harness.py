"""Stage `eval_harness`: lm-evaluation-harness tasks on each model of `eval_models`, as the pipeline loads it.

    .venv/bin/python -m stages.eval_harness sft     # or: dvc repro eval_harness@sft (one instance per model)

Runs `eval_harness.tasks` with lm-eval's own evaluator (`lm_eval.simple_evaluate` on its `HFLM` wrapper) on the
model loaded as every evaluation here loads it: RoPE interpolated to model.target_context where eval_models says so,
dense attention, the stage's dtype, the GPU when there is one. The default runs `longlora_longbench2`
(longlora/evaluation/harness_tasks/: LongBench v2's four-choice prompt, scored as lm-eval's `longbench2` scores it)
on the embedded LongBench v2 set, offline; the profiles run lm-eval's `longbench2`, `babilong`, `ruler` and
`infinitebench` from the hub. Commands, and what lm-eval's own CLI gives for the same model: docs/evaluation.md.
Output: `<out_dir>/<model>/results.json` (lm-eval's results, less its date, environment and git fields, which go to
the run log: DVC hashes the file) and `samples_<task>.jsonl` (its --log_samples records), and
`<metrics_dir>/<model>.json`: `results.<task>.<metric>` for each task's and group's numbers, stderr left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from longlora.errors import InputError
from longlora.io import StageOutput, run_log
from stages import _cli, _eval
from stages.params import Params

RESULTS_FILE = "results.json"
VOLATILE_FIELDS = ("date", "pretty_env_info", "git_hash", "upper_git_hash", "start_time", "end_time",
                   "total_evaluation_time_seconds")
"""Fields of lm-eval's results that change from run to run or machine to machine: kept in the run log instead."""


def run(params: Params, model: str) -> dict:
    """Run the lm-eval tasks with eval model `model`; return metrics."""
    out = params.output(f"eval_harness@{model}")  # an unknown model name fails here
    out.check()
    _check_inputs(params)  # bad input stops here, before anything is created or loaded
    with out:
        return _evaluate(params, model, out)


def _check_inputs(params: Params) -> None:
    """The local task folder and the files its metadata names, checked before lm-eval or a model is loaded."""
    p = params.eval_harness
    if not p.include_path.is_dir():
        raise InputError(f"eval_harness.include_path {str(p.include_path)!r}: no such folder")
    if "longlora_longbench2" in p.tasks:
        from longlora.evaluation.longbench2 import read_records

        path = p.metadata.get("longbench2_path")
        if not isinstance(path, str):
            raise InputError("eval_harness.metadata.longbench2_path: the task longlora_longbench2 reads a LongBench v2 "
                             "file named there (default: data/corpus/longbench2.jsonl, which prepare_corpus writes)")
        if not Path(path).is_file():
            raise InputError(f"eval_harness.metadata.longbench2_path {path!r}: no such file")
        read_records(Path(path))  # a malformed record names the file and line


def task_runs(params: Params) -> list[tuple[list[str], dict]]:
    """(tasks, metadata) of each lm-eval call: the tasks that share their metadata (`metadata` updated with their
    `task_metadata`) run together, in the order `tasks` lists them."""
    p = params.eval_harness
    runs: list[tuple[list[str], dict]] = []
    for task in p.tasks:
        metadata = {**p.metadata, **p.task_metadata.get(task, {})}
        for tasks, shared in runs:
            if shared == metadata:
                tasks.append(task)
                break
        else:
            runs.append(([task], metadata))
    return runs


def _task_manager(params: Params, tasks: list[str], metadata: dict):
    """lm-eval's TaskManager for `tasks`: the include_path folder alone when it has them all (indexing lm-eval's
    thousands of task files takes seconds per instance), else that folder and lm-eval's own tasks."""
    from lm_eval.tasks import TaskManager

    p = params.eval_harness
    local = TaskManager(include_path=str(p.include_path), include_defaults=False, metadata=metadata)
    if all(local.match_tasks([task]) for task in tasks):
        return local
    manager = TaskManager(include_path=str(p.include_path), metadata=metadata)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise InputError(f"eval_harness.tasks: {unknown} are neither lm-eval {_lm_eval_version()}'s tasks or groups "
                         f"nor in eval_harness.include_path {str(p.include_path)!r}; `lm_eval ls tasks` lists them")
    return manager


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _evaluate(params: Params, name: str, out: StageOutput) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    p = params.eval_harness
    runs = [(tasks, _task_manager(params, tasks, metadata)) for tasks, metadata in task_runs(params)]
    _eval.check_positions(params, name, p.max_length, "eval_harness.max_length")
    chat = _eval.is_chat(params, name, _eval.load_tokenizer(params, name))
    model, tokenizer = _eval.load_model(params, name, p.dtype)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=p.batch_size, max_length=p.max_length)
    limit = None if p.limit is None else (int(p.limit) if p.limit >= 1 else p.limit)
    results: dict = {}
    for tasks, manager in runs:
        found = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=p.num_fewshot,
            apply_chat_template=chat, log_samples=True, random_seed=p.seed,
            numpy_random_seed=p.seed, torch_random_seed=p.seed, fewshot_random_seed=p.seed)
        if found is None:  # lm-eval returns None on the ranks other than 0
            raise RuntimeError("lm_eval.simple_evaluate returned no results (not rank 0?)")
        merge_results(results, found)
    samples = results.pop("samples", {})
    volatile = {key: results.pop(key) for key in VOLATILE_FIELDS if key in results}
    log = run_log(out.owner)
    log.mkdir(parents=True, exist_ok=True)
    (log / "lm_eval_environment.json").write_text(json.dumps(volatile, indent=2, default=handle_non_serializable))
    with out.publish() as tmp:
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
        for task, records in samples.items():
            with open(tmp / f"samples_{task}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + "\n")
    metrics = {"results": headline_numbers(results),
               "samples": {task: len(records) for task, records in samples.items()},
               "lm_eval_version": _lm_eval_version()}
    return out.write_metrics(metrics)


def merge_results(into: dict, found: dict) -> None:
    """Fold one lm-eval call's results into `into`: its per-task tables (results, groups, configs, versions, …)
    joined, every other field kept from the first call."""
    for key, value in found.items():
        if key in into and isinstance(value, dict) and isinstance(into[key], dict) and key != "config":
            into[key].update(value)
        else:
            into.setdefault(key, value)


def headline_numbers(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results (its `results` and `groups` tables): each `<metric>,<filter>`
    value under the metric's name (the filter kept when it is not `none`), stderr and text fields left out."""
    numbers: dict[str, dict] = {}
    for table in ("results", "groups"):
        for task, row in results.get(table, {}).items():
            for key, value in row.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                    continue
                label = metric if filter_name == "none" else f"{metric}.{filter_name}"
                numbers.setdefault(task, {})[label] = value
    return numbers


def main(argv: list[str] | None = None) -> int:
    # lm-eval reads no hub for the local tasks; the hub tasks of the profiles ask for it as any hub input does.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _eval.main("eval_harness", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
