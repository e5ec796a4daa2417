"""What fine-tuning bought: answer-token loss and exact-match answers on the held-out LongQA questions, asked in the
prompt format the sft stage trained with, for each model folder given.

    .venv/bin/python benchmarks/sft_answers.py data/extended_model data/sft_model \
        --questions data/corpus/longqa_heldout.json --n 48

The held-out questions come from source files no training stage saw (prepare_corpus's held-out split). Each is
rendered with the same template and tokenized the same way as prepare_sft does (`longlora.data.sft`), so the loss is
the SFT objective itself on unseen examples: mean cross-entropy of the answer tokens (and EOS) given the prompt.
Exact match: greedy decoding of the prompt alone, scored as eval_longqa scores it (longlora/evaluation/qa.py); the stage
itself (`dvc repro eval_longqa`) gives exact match and token F1 for every model without the answer-token loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longlora.data.sft import IGNORE_INDEX, fit_example, parse_instruction  # noqa: E402
from longlora.evaluation.qa import exact_match, prompt_ids  # noqa: E402


def score(folder: str, records: list[dict], max_length: int, template: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    nll = scored = correct = asked = 0
    for record in records:
        example = parse_instruction(record)
        prompt = prompt_ids(example, tokenizer, template)
        answer = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        fitted = fit_example(prompt, answer, max_length, "drop")
        if fitted.input_ids is None:
            continue
        ids, labels = torch.tensor(fitted.input_ids)[None], torch.tensor(fitted.labels)[None]
        count = int((labels[0, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            nll += model(input_ids=ids, labels=labels).loss.item() * count
            generated = model.generate(torch.tensor(prompt)[None], max_new_tokens=len(answer) + 2, do_sample=False)
        correct += int(exact_match(tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True),
                                   example.output))
        scored += count
        asked += 1
    return {"model": folder, "questions": asked, "answer_loss": round(nll / scored, 3), "exact_match": correct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (merged models)")
    parser.add_argument("--questions", default="data/corpus/longqa_heldout.json")
    parser.add_argument("--n", type=int, default=48, help="first N held-out questions")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--template", default="llama2")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-sequence decoding of a tiny model: more threads only wait on each other
    records = json.loads(Path(args.questions).read_text(encoding="utf-8"))[: args.n]
    print("| model | questions | answer-token loss | exact match |\n|---|---:|---:|---:|")
    for folder in args.models:
        r = score(folder, records, args.max_length, args.template)
        print(f"| {r['model']} | {r['questions']} | {r['answer_loss']:.3f} | {r['exact_match']}/{r['questions']} |")


if __name__ == "__main__":
    main()
