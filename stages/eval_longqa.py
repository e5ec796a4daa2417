"""Stage `eval_longqa`: held-out long-context questions in the SFT prompt format, for each model of `eval_models`.

    .venv/bin/python -m stages.eval_longqa sft     # or: dvc repro eval_longqa@sft (one instance per model)

What `sft` trains for, on questions no training stage saw (the embedded default: prepare_corpus's held-out LongQA,
questions about long source files whose answer is written somewhere in them). Each record is rendered with
`prepare_sft.template` and tokenized exactly as prepare_sft does; the model answers greedily (at most
`max_new_tokens`), and its first line is scored by exact match and token F1 (longlora/evaluation/qa.py), 0–100.
A prompt that leaves no room for the answer within model.target_context is fitted as prepare_sft fits its examples
(`prepare_sft.truncation`): cut in the middle (truncate_middle), or left out (drop); both are counted.
Output: `<out_dir>/<model>/predictions.jsonl` (every question: reference, prediction, scores) and
`<metrics_dir>/<model>.json` (`exact_match`, `f1`, both by question kind, `questions`, `skipped`, `truncated`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict

import numpy as np

from longlora.data.readers import iter_records
from longlora.data.sft import middle_cut, parse_instruction
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli, _eval
from stages.params import Params

SCORE_DIGITS = 2


def run(params: Params, model: str) -> dict:
    """Answer and score the held-out questions with eval model `model`; return metrics."""
    out = params.output(f"eval_longqa@{model}")  # an unknown model name fails here
    out.check()
    records = _records(params)  # bad input stops here, before anything is created or loaded
    with out:
        return _evaluate(params, model, records, out)


def _records(params: Params) -> list[tuple[int, str | None, object]]:
    """(index, kind, parsed instruction) of the first max_examples records; a malformed one names file and record."""
    p = params.eval_longqa
    if not p.input.exists():
        raise InputError(f"eval_longqa.input {str(p.input)!r}: no such file or folder")
    picked = []
    for index, record in enumerate(iter_records(p.input)):
        if p.max_examples is not None and index >= p.max_examples:
            break
        try:
            example = parse_instruction(record.data)
        except ValueError as err:
            raise InputError(f"eval_longqa.input {record.where}: {err}") from None
        meta = record.data.get("meta")
        picked.append((index, meta.get("kind") if isinstance(meta, dict) else None, example))
    if not picked:
        raise InputError(f"eval_longqa.input {p.input}: no records")
    return picked


def _evaluate(params: Params, name: str, records, out: StageOutput) -> dict:
    from longlora.evaluation.qa import answer_all, prompt_ids

    p = params.eval_longqa
    _eval.check_positions(params, name, params.model.target_context,
                          "model.target_context (eval_longqa's prompt and answer)")
    model, tokenizer = _eval.load_model(params, name, p.dtype)
    room = params.model.target_context - p.max_new_tokens
    prompts, skipped, truncated = [], 0, 0
    for index, kind, example in records:
        ids = prompt_ids(example, tokenizer, params.prepare_sft.template, params.prepare_sft.system_prompt)
        if len(ids) > room:
            # As prepare_sft fits its examples: cut from the middle when it does, else leave the question out.
            if params.prepare_sft.truncation != "truncate_middle":
                skipped += 1
                continue
            ids = middle_cut(np.asarray(ids), room).tolist()
            truncated += 1
        prompts.append((index, kind, example.output, ids))
    if not prompts:
        raise InputError(f"eval_longqa.input {p.input}: every prompt is longer than model.target_context "
                         f"{params.model.target_context} minus eval_longqa.max_new_tokens {p.max_new_tokens}")
    answers = answer_all(model, tokenizer, prompts, p.max_new_tokens)
    with out.publish() as tmp, open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
        for answer in answers:
            f.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")

    def scores(subset) -> dict:
        return {"exact_match": round(100 * sum(a.exact_match for a in subset) / len(subset), SCORE_DIGITS),
                "f1": round(100 * sum(a.f1 for a in subset) / len(subset), SCORE_DIGITS)}

    by_kind = defaultdict(list)
    for answer in answers:
        by_kind[answer.kind or "all"].append(answer)
    metrics = {**scores(answers), "by_kind": {kind: scores(subset) for kind, subset in sorted(by_kind.items())},
               "questions": len(answers), "skipped": skipped, "truncated": truncated}
    return out.write_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    return _eval.main("eval_longqa", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
