"""Answering held-out instructions in the SFT prompt format, scored by exact match and token F1.

What `sft` trains for, measured on examples no training stage saw: each record (LongAlpaca format) is rendered with
the template and tokenized exactly as `prepare_sft` does (longlora/data/sft.py), the model answers greedily, and the
first line of its answer is compared with the reference:

- exact match: the stripped first line equals the stripped reference, character for character;
- token F1: SQuAD's F1 over the lower-cased alphanumeric runs of each (`_make_iterencode` → `make`, `iterencode`;
  `json/decoder.py` → `json`, `decoder`, `py`), so that a path or an identifier that is partly right gets partial
  credit. (LongBench's `qa_f1_score` deletes punctuation instead, which fuses an identifier into one token: it gives
  no more than exact match on code answers.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from longlora.data.sft import Instruction, prompt_has_special_tokens, render_prompt
from longlora.evaluation.longbench import token_f1

_WORD = re.compile(r"[a-z0-9]+")


def answer_tokens(text: str) -> list[str]:
    """The lower-cased alphanumeric runs of `text`: the tokens token F1 compares."""
    return _WORD.findall(text.lower())


def first_line(text: str) -> str:
    """What counts as the answer: the first non-empty line, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def exact_match(prediction: str, reference: str) -> float:
    return float(first_line(prediction) == reference.strip())


def answer_f1(prediction: str, reference: str) -> float:
    return token_f1(answer_tokens(first_line(prediction)), answer_tokens(reference))


@dataclass(frozen=True)
class Answer:
    """One question answered: the model's text beside the reference, and their scores."""

    index: int
    kind: str | None
    reference: str
    prediction: str
    prompt_tokens: int
    exact_match: float
    f1: float


def prompt_ids(example: Instruction, tokenizer, template: str, system_prompt: str = "") -> list[int]:
    """The prompt's tokens exactly as prepare_sft gives them to the model."""
    text = render_prompt(example, template, tokenizer, system_prompt)
    return tokenizer(text, add_special_tokens=not prompt_has_special_tokens(template))["input_ids"]


def answer_all(model, tokenizer, prompts: Iterable[tuple[int, str | None, str, list[int]]], max_new_tokens: int,
               progress: bool = True) -> list[Answer]:
    """Greedy answers to (index, kind, reference, prompt ids) items, scored."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    items = list(prompts)
    for index, kind, reference, ids in tqdm(items, desc="questions", disable=not progress):
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad)[0]
        prediction = tokenizer.decode(output[len(ids):], skip_special_tokens=True)
        answers.append(Answer(index, kind, reference, prediction, len(ids), exact_match(prediction, reference),
                              answer_f1(prediction, reference)))
    return answers
