"""Stage `prepare_corpus`: the embedded default data, built offline from the Python standard library sources.

    .venv/bin/python -m stages.prepare_corpus     # or: dvc repro prepare_corpus

It writes, under `data/corpus/`, the inputs the other data stages read, in the formats real data comes in:

- `pretrain.jsonl` — RedPajama format ({"text", "meta"}), one record per file of the `extend` split;
- `eval/doc_00000.txt`… — PG19 style, one long document per file: held-out files (never seen by the base model)
  joined until each has ≥ 2 × model.target_context tokens, so every document reaches the evaluation lengths;
- `longqa.json` (from the extend split) and `longqa_heldout.json` (held-out split) — LongAlpaca format
  ({"instruction", "output", "file"}, plus "meta" with the question kind, name and depth): long source code with
  one mechanically verifiable question each (see longlora/embedded/longqa.py), by default 50–85 % of
  model.target_context tokens long; `longqa_choice_share` of longqa.json's questions come with four choices and are
  answered "The correct answer is (B).";
- `longbench/<dataset>.jsonl` — LongBench format, small sets from the held-out split scored with LongBench's
  prompts and metrics (lcc, passage_count, passage_retrieval_en, and the held-out LongQA as multifieldqa_en; see
  longlora/embedded/longbench_data.py), contexts in the LongQA length range;
- `longbench2.jsonl` — LongBench v2 format: the held-out LongQA questions as four-choice questions (wrong choices
  from the same code, "hard", or from other files, "easy"; see longlora/embedded/longbench2_data.py).

Deterministic for a given seed, Python version and tokenizer (the tokenizer only measures lengths); what the
embedded pipeline's run writes: docs/data.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longlora.data.tokenizing import BatchEncoder, load_tokenizer, rust_parallelism
from longlora.embedded.longbench2_data import embedded_longbench2, with_choice_questions
from longlora.embedded.longbench_data import embedded_longbench
from longlora.embedded.longqa import generate_longqa, long_documents
from longlora.errors import InputError
from longlora.io import StageOutput
from stages import _cli
from stages.params import Params


def run(params: Params) -> dict:
    """Write pretrain.jsonl, eval/ and the LongQA sets; return metrics."""
    with params.output("prepare_corpus") as out:  # checked and locked before any work
        return _run(params, out)


def _run(params: Params, out: StageOutput) -> dict:
    p = params.prepare_corpus
    tokenizer = load_tokenizer(params.model.name_or_path, params.model.trust_remote_code)
    encode = BatchEncoder(tokenizer)

    def count_tokens(texts: list[str]) -> list[int]:
        with rust_parallelism():
            return encode(texts)[0].tolist()

    metrics: dict = {}
    with out.publish() as tmp:
        metrics["pretrain_documents"], metrics["pretrain_chars"] = _write_pretrain(
            tmp / "pretrain.jsonl", params.embedded_corpus.documents("extend"))

        heldout = list(params.embedded_corpus.documents("heldout"))
        order = np.random.default_rng(p.seed).permutation(len(heldout))
        eval_lengths = _write_eval(tmp / "eval", [(heldout[i].name, heldout[i].text) for i in order],
                                   count_tokens, p.eval_min_tokens, p.eval_documents)
        if not eval_lengths:
            raise InputError(
                f"prepare_corpus.eval_min_tokens: the held-out split ({len(heldout)} files) does not add up to one "
                f"document of {p.eval_min_tokens} tokens; lower it or raise embedded_corpus.max_documents"
            )
        metrics.update(eval_documents=len(eval_lengths), eval_shortest_tokens=min(eval_lengths),
                       eval_median_tokens=int(np.median(eval_lengths)))

        longqa_sets = {}
        for split, count, filename in (("extend", p.longqa_examples, "longqa.json"),
                                       ("heldout", p.longqa_heldout_examples, "longqa_heldout.json")):
            files = [(d.name, d.text) for d in params.embedded_corpus.documents(split)]
            try:
                examples, qa = generate_longqa(files, count_tokens, count, p.longqa_min_tokens,
                                               p.longqa_max_tokens, seed=p.seed,
                                               source=f"python-stdlib/{split}")
            except ValueError as err:
                raise InputError(f"prepare_corpus.longqa_max_tokens: {err}") from None
            if count and not examples:
                raise InputError(
                    f"prepare_corpus: no LongQA question could be made from the {split} split ({len(files)} files, "
                    f"{p.longqa_min_tokens}–{p.longqa_max_tokens} tokens per instruction); raise "
                    "embedded_corpus.max_documents or model.target_context"
                )
            key = "longqa" if split == "extend" else "longqa_heldout"
            if split == "extend" and p.longqa_choice_share:
                asked, metrics["longqa_choice_questions"] = with_choice_questions(examples, p.longqa_choice_share,
                                                                                  seed=p.seed)
                _write_json_list(tmp / filename, asked)
            else:
                _write_json_list(tmp / filename, examples)
            longqa_sets[split] = examples
            metrics[f"{key}_examples"] = len(examples)
            metrics[f"{key}_by_kind"] = qa.kinds
            metrics[f"{key}_by_depth_band"] = qa.depth_bands

        if p.longbench_examples:
            sets = embedded_longbench([(d.name, d.text) for d in heldout], longqa_sets["heldout"], count_tokens,
                                      p.longbench_examples, p.longqa_min_tokens, p.longqa_max_tokens, seed=p.seed)
            (tmp / "longbench").mkdir()
            for dataset, records in sets.items():
                if records:
                    _write_jsonl(tmp / "longbench" / f"{dataset}.jsonl", records)
            metrics["longbench_examples"] = {dataset: len(records) for dataset, records in sets.items()}
        if p.longbench2_examples:
            questions = embedded_longbench2(longqa_sets["heldout"], count_tokens, p.longbench2_examples,
                                            p.longqa_min_tokens, p.longqa_max_tokens, seed=p.seed)
            if not questions:
                raise InputError(
                    f"prepare_corpus.longbench2_examples: no four-choice question could be made from the "
                    f"{len(longqa_sets['heldout'])} held-out LongQA questions (each needs three wrong choices of "
                    "its kind); raise prepare_corpus.longqa_heldout_examples, or set longbench2_examples to 0")
            _write_jsonl(tmp / "longbench2.jsonl", questions)
            metrics["longbench2_examples"] = len(questions)
            metrics["longbench2_by_group"] = {
                key: sum(q[field] == key for q in questions)
                for field, keys in (("difficulty", ("easy", "hard")), ("length", ("short", "medium", "long")))
                for key in keys}
    return out.write_metrics(metrics)



def _write_pretrain(path: Path, documents) -> tuple[int, int]:
    count = chars = 0
    with path.open("w", encoding="utf-8") as handle:
        for doc in documents:
            record = {"text": doc.text, "meta": {"source": "python-stdlib", "path": doc.name, "split": "extend"}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
            chars += len(doc.text)
    return count, chars


def _write_eval(folder: Path, files, count_tokens, min_tokens: int, max_documents: int | None) -> list[int]:
    folder.mkdir()
    lengths = []
    for index, (text, _) in enumerate(long_documents(files, count_tokens, min_tokens, max_documents)):
        (folder / f"doc_{index:05d}.txt").write_text(text, encoding="utf-8")
        lengths.append(count_tokens([text])[0])
    return lengths


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_json_list(path: Path, records: list[dict]) -> None:
    # One record per line inside the array: still one JSON value (LongAlpaca's format), but diffable and greppable.
    with path.open("w", encoding="utf-8") as handle:
        handle.write("[\n")
        handle.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in records))
        handle.write("\n]\n")


if __name__ == "__main__":
    _cli.exit_process(_cli.main("prepare_corpus", run))
