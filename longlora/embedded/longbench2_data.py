"""A small LongBench-v2-format four-choice set made offline from the held-out LongQA examples, for the embedded
default pipeline.

Each record has LongBench v2's fields (`_id`, `domain`, `sub_domain`, `difficulty`, `length`, `question`,
`choice_A` … `choice_D`, `answer`, `context`; longlora/evaluation/longbench2.py reads and scores them) and is made
from one held-out LongQA example (longlora/embedded/longqa.py): its code document is the context, its question
without the closing "Answer with …" sentence is the question, and its checked answer is one of the four choices.
The three wrong choices are of the same kind as the answer (function names, constant values, file paths):

- `hard`: taken from the same document — other top-level functions defined there, other module-level constants'
  values, other files' paths — so only reading the asked-about place tells them apart;
- `easy`: other held-out examples' answers of the same kind that do not occur anywhere in the document, so any
  choice found in the text is the right one.

Difficulties alternate (easy first); an example without three distinct wrong choices of its turn's difficulty is
skipped. The answer's position is drawn uniformly. `length` is short, medium or long by the LongQA instruction's token
count (the code and the question) in thirds of [min_tokens, max_tokens], the range LongQA draws it from. The domain and
sub-domain are LongBench v2's "Code Repository Understanding" and "Code repo QA"; the texts are ours, never LongBench's.
Deterministic for a given seed, examples and tokenizer.

The same choices serve the SFT mix (`with_choice_questions`): a share of the training LongQA questions is asked with
four choices in our own wording and answered with the sentence LongBench v2 reads ("The correct answer is (B)."), as
instruction-tuned models learn to answer multiple-choice questions; the held-out questions stay open.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from longlora.embedded.longqa import CLOSING, HEADER, KINDS, instruction_document, source_units

CountTokens = Callable[[list[str]], Sequence[int]]
DOMAIN = "Code Repository Understanding"
SUB_DOMAIN = "Code repo QA"
LETTERS = ("A", "B", "C", "D")
DIFFICULTIES = ("easy", "hard")
"""In turn, easy first."""
CHOICE_REPLY = 'Reply with "The correct answer is" and the letter of the right choice in brackets.'
ANSWER_SENTENCE = "The correct answer is ({letter})."
"""The answer of a four-choice training question: the sentence LongBench v2 (and most multiple-choice yardsticks
that generate) reads the letter from."""
_HEAD, _TAIL = HEADER.rstrip("\n").split("{name}")
_HEADER_LINE = re.compile(f"^{re.escape(_HEAD)}(.+){re.escape(_TAIL)}$", re.M)
_INSTRUCTION_SENTENCE = " Answer with "


def question_of(instruction: str) -> str:
    """The LongQA question of an instruction, without its closing "Answer with …" sentence."""
    marker = CLOSING.split("{")[0]
    question = instruction[instruction.rindex(marker) + len(marker):]
    at = question.rfind(_INSTRUCTION_SENTENCE)
    return (question[:at] if at >= 0 else question).strip()


def _sections(document: str) -> list[tuple[str, str]]:
    """(file path, code) of each file of a LongQA document, in order."""
    heads = list(_HEADER_LINE.finditer(document))
    return [(h.group(1), document[h.end() + 1: heads[i + 1].start() if i + 1 < len(heads) else len(document)])
            for i, h in enumerate(heads)]


def document_items(document: str, kind: str) -> list[str]:
    """The distinct items of a question kind a document holds, in order of appearance: the top-level functions
    (next_function), the module-level constants' values as written (constant_value), the file paths
    (defining_file)."""
    sections = _sections(document)
    if kind == "defining_file":
        return list(dict.fromkeys(path for path, _ in sections))
    wanted = {"next_function": "function", "constant_value": "constant"}[kind]
    units = [unit for _, code in sections for unit in source_units(code) if unit.kind == wanted]
    return list(dict.fromkeys(unit.name if wanted == "function" else unit.value for unit in units))


def _length_class(tokens: int, min_tokens: int, max_tokens: int) -> str:
    third = (max_tokens - min_tokens) / 3
    return "short" if tokens < min_tokens + third else "medium" if tokens < min_tokens + 2 * third else "long"


def _answers_by_kind(examples: list[dict]) -> dict[str, list[str]]:
    answers: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for example in examples:
        answers[example["meta"]["kind"]].append(example["output"])
    return {kind: list(dict.fromkeys(found)) for kind, found in answers.items()}


def four_choices(example: dict, answers_by_kind: dict[str, list[str]], difficulty: str,
                 rng: np.random.Generator) -> tuple[list[str], int] | None:
    """(the four choices, the answer's index) for a LongQA example, its three wrong choices `hard` (from its own
    document) or `easy` (other examples' answers of its kind found nowhere in it); None without three of them."""
    kind, answer = example["meta"]["kind"], example["output"]
    context = instruction_document(example["instruction"])
    if difficulty == "hard":
        asked = example["meta"].get("name")
        pool = [item for item in document_items(context, kind) if item not in (answer, asked)]
    else:
        pool = [item for item in answers_by_kind[kind] if item != answer and item not in context]
    if len(pool) < 3:
        return None
    wrong = [pool[i] for i in rng.permutation(len(pool))[:3]]
    position = int(rng.integers(len(LETTERS)))
    return wrong[:position] + [answer] + wrong[position:], position


def _usable(examples: list[dict]) -> list[dict]:
    return [e for e in examples if (e.get("meta") or {}).get("kind") in KINDS]


def with_choice_questions(examples: list[dict], share: float, seed: int = 0) -> tuple[list[dict], int]:
    """The LongQA training examples with `share` of them (drawn at random, difficulties alternating as they can)
    asked as four-choice questions instead: the question without its "Answer with …" sentence, the choices as
    `(A) …` lines and CHOICE_REPLY; the answer ANSWER_SENTENCE. What teaches a model the answer sentence that
    LongBench v2 reads.
    (examples, how many were turned)."""
    rng = np.random.default_rng(seed)
    usable = _usable(examples)
    answers_by_kind = _answers_by_kind(usable)
    askable = {id(example) for example in usable}
    chosen = set(rng.permutation(len(examples))[: round(share * len(examples))].tolist())
    out, turned = [], 0
    for i, example in enumerate(examples):
        found = None
        if i in chosen and id(example) in askable:
            turn = DIFFICULTIES[turned % 2]
            for difficulty in (turn, *(d for d in DIFFICULTIES if d != turn)):  # the other one when this one fails
                if (found := four_choices(example, answers_by_kind, difficulty, rng)) is not None:
                    break
        if found is None:
            out.append(example)
            continue
        choices, position = found
        instruction = example["instruction"]
        question = question_of(instruction)
        head = instruction[: instruction.rindex(question) + len(question)]
        listed = "\n".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices, strict=True))
        out.append({**example, "instruction": f"{head}\nChoices:\n{listed}\n{CHOICE_REPLY}",
                    "output": ANSWER_SENTENCE.format(letter=LETTERS[position]),
                    "meta": {**example["meta"], "choices": choices, "difficulty": difficulty}})
        turned += 1
    return out, turned


def embedded_longbench2(longqa_heldout: list[dict], count_tokens: CountTokens, n_examples: int, min_tokens: int,
                        max_tokens: int, seed: int = 0) -> list[dict]:
    """Up to `n_examples` LongBench v2 records from LongAlpaca-format held-out LongQA records (`instruction`,
    `output`, `meta` with its `kind` and `name`); those of another kind or without three wrong choices are
    skipped."""
    rng = np.random.default_rng(seed)
    usable = _usable(longqa_heldout)
    answers_by_kind = _answers_by_kind(usable)
    records: list[dict] = []
    for example in usable:
        if len(records) >= n_examples:
            break
        difficulty = DIFFICULTIES[len(records) % 2]
        found = four_choices(example, answers_by_kind, difficulty, rng)
        if found is None:
            continue
        choices, position = found
        tokens = count_tokens([example["instruction"]])[0]  # what min_tokens and max_tokens bound
        records.append({
            "_id": f"embedded-{len(records):05d}", "domain": DOMAIN, "sub_domain": SUB_DOMAIN,
            "difficulty": difficulty, "length": _length_class(tokens, min_tokens, max_tokens),
            "question": question_of(example["instruction"]),
            **{f"choice_{letter}": choice for letter, choice in zip(LETTERS, choices, strict=True)},
            "answer": LETTERS[position], "context": instruction_document(example["instruction"]),
        })
    return records
