"""Stage `longbench`: LongBench predictions of each model of `eval_models`, scored exactly as LongBench's eval.py.

    .venv/bin/python -m stages.longbench base        # or: dvc repro longbench@base (one instance per eval model)
    .venv/bin/python -m stages.longbench score PRED_DIR [--e]

The first form predicts with LongBench's prompts and generation lengths, middle truncation and greedy decoding
(longlora/evaluation/longbench.py) on every task of `longbench.input` (default: the small LongBench-format sets
prepare_corpus
makes from held-out code, see longlora/embedded/longbench_data.py), then scores. It writes
`<longbench.out_dir>/<model>/`:
the prediction files `<dataset>.jsonl`, `result.json` (score per task, 0–100, as LongBench writes it) and
`summary.json` (category averages; for LongBench-E the length buckets), and the DVC metrics
`<longbench.metrics_dir>/<model>.json`, so `dvc metrics show` puts the models side by side. How long it takes, and
the full LongBench on GPUs: docs/evaluation.md, docs/full-size.md.

The second form scores any folder of LongBench prediction files (`{"pred", "answers", "all_classes", "length"}`
per line, files named `<dataset>.jsonl`), ours or LongBench's own pred.py's, and writes result.json and
summary.json into it; `--e` scores LongBench-E predictions by length bucket too, like eval.py's `--e`. It reads no
params.yaml and loads no model. A malformed file stops it with the file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from longlora.choices import LONGBENCH_DATASETS, LONGBENCH_E_DATASETS
from longlora.errors import InputError
from longlora.evaluation.longbench import (
    TASKS,
    hub_examples,
    local_datasets,
    predict_dataset,
    read_examples,
    score_folder,
)
from longlora.io import StageOutput, write_json
from longlora.sources import is_hub_name
from stages import _cli
from stages.params import Params
from stages.registry import RESERVED_MODEL_NAMES


def run(params: Params, model: str = "base") -> dict:
    """Predict and score LongBench with eval model `model`; return metrics."""
    out = params.output(f"longbench@{model}")  # an unknown model name fails here
    out.check()
    examples = _examples(params)  # bad input stops here, before anything is created or loaded
    with out:  # claimed and locked (and checked again) for the work
        return _run(params, model, examples, out)


def _examples(params: Params) -> dict[str, list]:
    """Every selected task's examples, read (and checked) before any model is loaded."""
    p = params.longbench
    source = str(p.input)
    if is_hub_name(source):
        names = p.datasets or (LONGBENCH_E_DATASETS if p.longbench_e else LONGBENCH_DATASETS)
        return {name: hub_examples(source, name, p.longbench_e, p.max_examples) for name in names}
    folder = Path(source)
    if not folder.is_dir():
        raise InputError(f"longbench.input {source!r}: no such folder (a local path, so the hub was not asked)")
    names = p.datasets or local_datasets(folder, p.longbench_e)
    if not names:
        suffix = "_e.jsonl" if p.longbench_e else ".jsonl"
        raise InputError(f"longbench.input {source!r}: no LongBench task files (<dataset>{suffix}, e.g. "
                         f"lcc{suffix})")
    return {name: read_examples(folder, name, p.longbench_e, p.max_examples) for name in names}


def _run(params: Params, model_name: str, examples: dict[str, list], out: StageOutput) -> dict:
    import torch

    from stages._eval import check_positions, is_chat, load_model, load_tokenizer

    p = params.longbench
    check_positions(params, model_name, p.max_length + p.max_new_tokens, "longbench.max_length + max_new_tokens")
    chat = is_chat(params, model_name, load_tokenizer(params, model_name))
    model, tokenizer = load_model(params, model_name, p.dtype)  # on the GPU when there is one
    loaded = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if p.cpu_threads is not None:
            torch.set_num_threads(p.cpu_threads)  # restored after: the Prefect flow runs stages in one process
        with out.publish() as tmp:
            for dataset, records in examples.items():
                predictions = predict_dataset(model, tokenizer, dataset, records, p.max_length, p.max_new_tokens,
                                              chat=chat)
                _write_jsonl(tmp / f"{dataset}.jsonl", predictions)
            result = _score_and_write(tmp, p.longbench_e)
    finally:
        torch.set_num_threads(threads)
    predicted = time.perf_counter() - loaded
    count = sum(len(records) for records in examples.values())
    metrics = {
        **result,
        "examples": {dataset: len(records) for dataset, records in examples.items()},
    }
    return out.write_metrics(metrics, timings={"seconds_per_example": round(predicted / count, 3)})


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _score_and_write(folder: Path, longbench_e: bool) -> dict:
    """Score the prediction files of `folder`; write result.json (LongBench's: task → score, or → buckets for
    LongBench-E) and summary.json (category averages, and the bucket averages for LongBench-E)."""
    result = score_folder(folder, by_length=longbench_e)
    write_json(folder / "result.json", result["by_length"] if longbench_e else result["scores"])
    write_json(folder / "summary.json", {key: value for key, value in result.items()
                                         if key in ("categories", "length_buckets")})
    return result


def score(folder: Path, longbench_e: bool = False) -> dict:
    """Score a folder of LongBench prediction files in place; return the scores."""
    return _score_and_write(Path(folder), longbench_e)


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.longbench <eval model> [--params params.yaml]` or `... score PRED_DIR [--e]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == list(RESERVED_MODEL_NAMES[:1]):
        parser = argparse.ArgumentParser(prog="python -m stages.longbench score",
                                         description="Score a folder of LongBench prediction files as LongBench's "
                                                     "eval.py does; writes result.json and summary.json into it.")
        parser.add_argument("pred_dir", type=Path, help=f"folder of <dataset>.jsonl files ({', '.join(TASKS)})")
        parser.add_argument("--e", action="store_true", help="LongBench-E: also score by length bucket")
        args = parser.parse_args(argv[1:])
        try:
            result = score(args.pred_dir, args.e)
        except InputError as err:
            print(f"stages.longbench score: error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("model", nargs="?", default="base")
    known, rest = parser.parse_known_args(argv)
    return _cli.main(f"longbench@{known.model}", lambda params: run(params, known.model), rest)


if __name__ == "__main__":
    _cli.exit_process(main())
