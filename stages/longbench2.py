"""Stage `longbench2`: LongBench v2's four-choice questions for each model of `eval_models`, scored as its result.py.

    .venv/bin/python -m stages.longbench2 sft     # or: dvc repro longbench2@sft (one instance per model)

Each question in pred.py's prompt (`longbench2.mode`: 0shot, cot or no_context), cut in the middle to
`longbench2.max_length` tokens, answered greedily, the letter read by pred.py's regexes
(longlora/evaluation/longbench2.py). The default reads the embedded four-choice set prepare_corpus makes from
held-out code (`data/corpus/longbench2.jsonl`); the profiles read THUDM/LongBench-v2 from the hub.
Output: `<out_dir>/<model>/<model>.jsonl` (pred.py's records: rescore with result.py from a folder holding it) and
result.txt (result.py's table), and `<metrics_dir>/<model>.json`: accuracy overall, easy/hard, short/medium/long.
How to read it: docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

from longlora.errors import InputError
from longlora.io import StageOutput
from longlora.sources import is_hub_name
from stages import _cli, _eval
from stages.params import Params

RESULT_FILE = "result.txt"


def run(params: Params, model: str) -> dict:
    """Answer and score LongBench v2's questions with eval model `model`; return metrics."""
    out = params.output(f"longbench2@{model}")  # an unknown model name fails here
    out.check()
    records = _records(params)  # bad input stops here, before anything is created or loaded
    with out:
        return _evaluate(params, model, records, out)


def _records(params: Params) -> list[dict]:
    from longlora.evaluation.longbench2 import HUB_DATASET, check_record, read_records

    p = params.longbench2
    if p.max_length is not None and p.max_length < 1:
        raise InputError(f"longbench2.max_length: model.target_context {params.model.target_context} leaves no room "
                         f"for a prompt beside longbench2.max_new_tokens {p.max_new_tokens}; lower max_new_tokens")
    source = str(p.input)
    if is_hub_name(source):
        from datasets import load_dataset

        rows = load_dataset(source, split="train")  # pred.py's load_dataset('THUDM/LongBench-v2', split='train')
        limit = len(rows) if p.max_examples is None else min(p.max_examples, len(rows))
        return [check_record(dict(rows[i]), f"{source}[{i}]") for i in range(limit)]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"longbench2.input {source!r}: no such file (a local path, so the hub was not asked; "
                         f"LongBench v2 itself is {HUB_DATASET})")
    records = read_records(path, p.max_examples)
    if not records:
        raise InputError(f"longbench2.input {source!r}: no questions")
    return records


def _evaluate(params: Params, name: str, records: list[dict], out: StageOutput) -> dict:
    from longlora.evaluation import longbench2

    p = params.longbench2
    longest = p.max_length + (p.max_new_tokens_cot if p.mode == "cot" else p.max_new_tokens)
    _eval.check_positions(params, name, longest, "longbench2.max_length + its generation")
    chat = _eval.is_chat(params, name, _eval.load_tokenizer(params, name))
    model, tokenizer = _eval.load_model(params, name, p.dtype)
    predictions = longbench2.predict(model, tokenizer, records, p.max_length, p.max_new_tokens, mode=p.mode,
                                     chat=chat, max_new_tokens_cot=p.max_new_tokens_cot)
    with out.publish() as tmp:
        longbench2.write_predictions(tmp / f"{name}.jsonl", predictions)
        (tmp / RESULT_FILE).write_text(longbench2.result_table({name: predictions}, p.compensated),
                                       encoding="utf-8")
    scores = longbench2.score(predictions, p.compensated)
    metrics = {key: scores[key] for key in longbench2.SCORE_KEYS}
    metrics.update(questions=scores["n"], nulls=scores["nulls"])
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("longbench2", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
