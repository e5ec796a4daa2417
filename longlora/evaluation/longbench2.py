"""LongBench v2 (Bai et al., 2024): 503 four-choice questions over long contexts, predicted as its `pred.py` and
scored as its `result.py`.

- Prompts: its five templates (prompts/*.txt), filled by `pred.py`'s chain of `str.replace` with every field
  stripped; the prompt cut in the middle to `max_length` tokens of the model's tokenizer as `pred.py`'s
  `query_llm` does (special tokens counted, the first max_length // 2 and the last max_length - max_length // 2
  tokens kept); in the model's chat template when `chat` (`pred.py` sends the prompt as one user turn to a chat
  server, which applies it).
- Generation: greedy here (`pred.py` samples at temperature 0.1 through an API); chain of thought (`mode="cot"`)
  as `pred.py`: a first generation of up to 1024 tokens after the 0shot_cot prompt, then the 0shot_cot_ans prompt,
  which holds the question, the choices and that reasoning (not the text), for the answer.
- Answers: "The correct answer is (X)" or "... is X" read by `pred.py`'s regexes (`extract_answer`).
- Prediction files: `pred.py`'s JSON lines (the input record, its context cut to 1000 characters, plus `response`,
  `pred`, `judge` and for chain of thought `response_cot`), so `result.py` reads ours; `score` and `result_table`
  give `result.py`'s numbers and its result.txt text.

The prompt templates and answer regexes are LongBench's (github.com/THUDM/LongBench, prompts/ and pred.py), used
under its MIT licence: see THIRD_PARTY_NOTICES.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from longlora.errors import InputError

# --- the prompts (LongBench v2 prompts/*.txt, byte for byte: no trailing newline) --------------------------------

_QUESTION_AND_CHOICES = (
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n")
_FORMAT = 'Format your response as follows: "The correct answer is (insert answer here)".'

TEMPLATES: dict[str, str] = {
    "0shot": "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
             + _QUESTION_AND_CHOICES + _FORMAT,
    "0shot_cot": "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
                 + _QUESTION_AND_CHOICES + "Let\u2019s think step by step:",
    "0shot_cot_ans": "Please read the following text and answer the questions below.\n\nThe text is too long and "
                     "omitted here.\n\n" + _QUESTION_AND_CHOICES + "Let\u2019s think step by step: $COT$\n\n"
                     "Based on the above, what is the single, most likely answer choice? " + _FORMAT,
    "0shot_no_context": _QUESTION_AND_CHOICES + "What is the single, most likely answer choice? " + _FORMAT,
    "0shot_rag": "Please read the following retrieved text chunks and answer the question below.\n\n<text>\n$DOC$\n"
                 "</text>\n\n" + _QUESTION_AND_CHOICES + _FORMAT,
}
"""LongBench v2's prompt templates by file name: `$DOC$`, `$Q$`, `$C_A$` … `$C_D$` and `$COT$` are replaced."""

MODES = {"0shot": "0shot", "cot": "0shot_cot", "no_context": "0shot_no_context"}
"""Prediction modes (pred.py's default, --cot, --no_context) and the template of their first prompt."""

FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
          "choice_D", "answer", "context")
"""The fields of a LongBench v2 record that pred.py keeps, in its order."""

DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
LETTERS = ("A", "B", "C", "D")
HUB_DATASET = "THUDM/LongBench-v2"
"""The hub dataset repository (its data.json is a JSON list of records)."""
CONTEXT_KEPT = 1000
"""Characters of the context a prediction record keeps (pred.py's `context[:1000]`)."""
RESULT_HEADER = "Model\tOverall\tEasy\tHard\tShort\tMedium\tLong"
"""The first line of result.py's result.txt."""


# --- records --------------------------------------------------------------------------------------------------------

def check_record(record: object, where: str) -> dict:
    """The record restricted to FIELDS in pred.py's order; an InputError naming `where` for a missing or non-string
    field, or a difficulty, length or answer LongBench v2 does not have."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in FIELDS if key not in record]
    if missing:
        raise InputError(f"{where}: missing {', '.join(repr(key) for key in missing)} (a LongBench v2 record has "
                         f"{', '.join(FIELDS)})")
    for key in FIELDS:
        if not isinstance(record[key], str):
            raise InputError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    for key, allowed in (("difficulty", DIFFICULTIES), ("length", LENGTHS), ("answer", LETTERS)):
        if record[key] not in allowed:
            raise InputError(f"{where}: {key!r} is {record[key]!r}, not one of {', '.join(allowed)}")
    return {key: record[key] for key in FIELDS}


def _json_values(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of each element of a JSON list file, or of each line of a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from None
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _json_list(path, text, start)
        return
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err})") from None


def _json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, object]]:
    """The elements of the JSON list that opens at text[start], each with the line it starts on."""
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")

    def line_of(at: int) -> int:
        return text.count("\n", 0, at) + 1

    at = space.match(text, start + 1).end()
    closed = text[at:at + 1] == "]"
    while not closed:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError as err:
            raise InputError(f"{path}:{line_of(at)}: not valid JSON ({err.msg})") from None
        yield line_of(at), value
        at = space.match(text, end).end()
        if text[at:at + 1] == ",":
            at = space.match(text, at + 1).end()
        elif text[at:at + 1] == "]":
            closed = True
        else:
            raise InputError(f"{path}:{line_of(at)}: expected ',' or ']' after a record of the JSON list")
    after = space.match(text, at + 1).end()
    if after < len(text):
        raise InputError(f"{path}:{line_of(after)}: text after the JSON list")


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` records (all by default) of a LongBench v2 file, a JSON list (the released data.json) or
    JSON lines, each checked and restricted to FIELDS; InputErrors name the file and line."""
    path = Path(path)
    records = []
    for number, record in _json_values(path):
        if limit is not None and len(records) >= limit:
            break
        records.append(check_record(record, f"{path}:{number}"))
    if not records:
        raise InputError(f"{path}: no records")
    return records


def read_predictions(path: Path) -> list[dict]:
    """The records of a prediction file (pred.py's JSON lines, or a JSON list as result.py also reads), each
    checked to have what `score` reads: `judge` (true or false), `pred` (a letter or null), `difficulty`,
    `length`."""
    path = Path(path)
    records = []
    for number, record in _json_values(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("judge", "pred", "difficulty", "length"):
            if key not in record:
                raise InputError(f"{where}: missing {key!r} (not a LongBench v2 prediction record)")
        if not isinstance(record["judge"], bool):
            raise InputError(f"{where}: 'judge' must be true or false")
        if record["pred"] is not None and record["pred"] not in LETTERS:
            raise InputError(f"{where}: 'pred' must be A, B, C, D or null, got {record['pred']!r}")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no predictions")
    return records


# --- prompts (pred.py) -------------------------------------------------------------------------------------------

def fill(template: str, record: dict, context: str | None = None, cot: str | None = None) -> str:
    """pred.py's prompt: `template` with $DOC$ (`context`, by default the record's), $Q$, $C_A$ … $C_D$ and $COT$
    replaced in that order by the stripped texts.

    One replacement after the other, as there: a `$Q$` or `$C_A$` written in the document is replaced too."""
    context = record["context"] if context is None else context
    prompt = (template.replace("$DOC$", context.strip()).replace("$Q$", record["question"].strip())
              .replace("$C_A$", record["choice_A"].strip()).replace("$C_B$", record["choice_B"].strip())
              .replace("$C_C$", record["choice_C"].strip()).replace("$C_D$", record["choice_D"].strip()))
    return prompt if cot is None else prompt.replace("$COT$", cot.strip())


def truncate_middle(prompt: str, tokenizer, max_length: int) -> str:
    """pred.py's cut for Hugging Face tokenizers: the prompt itself when `tokenizer.encode(prompt)` (special tokens
    added) has at most `max_length` ids, else its first max_length // 2 and last max_length - max_length // 2 ids
    (Python's `ids[-max_length//2:]`: one more at the end when max_length is odd) decoded together without special
    tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")  # ids[-0:] would keep everything
    ids = tokenizer.encode(prompt)
    if len(ids) <= max_length:
        return prompt
    return tokenizer.decode(ids[:max_length // 2] + ids[-max_length // 2:], skip_special_tokens=True)


_ANSWER = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_answer(response: str) -> str | None:
    """pred.py's reading of a response: without its `*`s (markdown bold), the letter of the first "The correct
    answer is (X)", else of the first "The correct answer is X", else None. Case-sensitive, as there."""
    response = response.replace("*", "")
    match = _ANSWER.search(response) or _ANSWER_BARE.search(response)
    return match.group(1) if match else None


def build_prompt(template: str, record: dict, tokenizer, max_length: int, chat: bool, cot: str | None = None
                 ) -> tuple[str, bool]:
    """(text, whether it already holds its special tokens): the filled template cut in the middle to `max_length`
    tokens, then in the chat template as one user turn when `chat`."""
    prompt = truncate_middle(fill(TEMPLATES[template], record, cot=cot), tokenizer, max_length)
    if chat:
        # The chat template writes BOS itself: not added again when encoding.
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), True
    return prompt, False


# --- prediction (pred.py) ------------------------------------------------------------------------------------------

def _generate(model, tokenizer, text: str, has_special: bool, max_new_tokens: int) -> str:
    import torch

    encoded = tokenizer(text, truncation=False, add_special_tokens=not has_special, return_tensors="pt")
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=pad)[0]
    return tokenizer.decode(output[encoded["input_ids"].shape[-1]:], skip_special_tokens=True)


def predict(model, tokenizer, records: Iterable[dict], max_length: int, max_new_tokens: int = 128,
            mode: str = "0shot", chat: bool = False, progress: bool = True, max_new_tokens_cot: int = 1024
            ) -> list[dict]:
    """pred.py's prediction records of greedy generations: each input record with `response` (the stripped
    generation), `pred` (its letter by `extract_answer`, or None), `judge` (pred == answer), `context` cut to its
    first 1000 characters and, for `mode="cot"`, `response_cot` (the stripped reasoning).

    `mode`: "0shot" (pred.py's default), "cot" (--cot: up to `max_new_tokens_cot` tokens of reasoning after the
    0shot_cot prompt, then the 0shot_cot_ans prompt for the answer) or "no_context" (--no_context). Every prompt is
    cut in the middle to `max_length` tokens and, with `chat`, put in the tokenizer's chat template.

    Unlike pred.py, which samples at temperature 0.1 through an API, decoding is greedy; and no record is dropped:
    pred.py skips a record whose response is '' (its sign of a failed API call), here an empty generation is a
    response like any other (pred None, judge false)."""
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"unknown LongBench v2 mode {mode!r} (one of {', '.join(MODES)})")
    results = []
    records = list(records)
    for record in tqdm(records, desc=f"LongBench v2 ({mode})", disable=not progress):
        item = dict(record)
        text, has_special = build_prompt(MODES[mode], record, tokenizer, max_length, chat)
        output = _generate(model, tokenizer, text, has_special, max_new_tokens_cot if mode == "cot"
                           else max_new_tokens)
        if mode == "cot":
            item["response_cot"] = output.strip()
            text, has_special = build_prompt("0shot_cot_ans", record, tokenizer, max_length, chat,
                                             cot=item["response_cot"])
            output = _generate(model, tokenizer, text, has_special, max_new_tokens)
        item["response"] = output.strip()
        item["pred"] = extract_answer(item["response"])
        item["judge"] = item["pred"] == record["answer"]
        item["context"] = record["context"][:CONTEXT_KEPT]
        results.append(item)
    return results


def write_predictions(path: Path, records: Iterable[dict]) -> None:
    """Prediction records as pred.py writes them: one `json.dumps(record, ensure_ascii=False)` a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- scores (result.py) --------------------------------------------------------------------------------------------

SCORE_KEYS = ("overall", "easy", "hard", "short", "medium", "long")


def score(records: list[dict], compensated: bool = False) -> dict:
    """result.py's accuracies in percent, rounded to 1 decimal: `overall`, `easy`, `hard` (any difficulty but
    "easy"), `short`, `medium`, `long` (any length but "short" or "medium"); None for a group without records
    (result.py divides by zero there). A record counts `judge` as 1 or 0, or 0.25 when `compensated` (result.py's
    flag) and its pred is None. Also `n`, the number of records, and `nulls`, how many have no pred."""
    totals = dict.fromkeys(SCORE_KEYS, 0)
    correct: dict[str, float] = dict.fromkeys(SCORE_KEYS, 0)
    for record in records:
        acc = 0.25 if compensated and record["pred"] is None else int(record["judge"])
        difficulty = "easy" if record["difficulty"] == "easy" else "hard"
        length = record["length"] if record["length"] in ("short", "medium") else "long"
        for group in (difficulty, length):
            totals[group] += 1
            correct[group] += acc
    # Overall as result.py: the easy and hard sums added, over the number of records.
    totals["overall"], correct["overall"] = len(records), correct["easy"] + correct["hard"]
    result: dict = {key: round(100 * correct[key] / totals[key], 1) if totals[key] else None for key in SCORE_KEYS}
    result["n"] = len(records)
    result["nulls"] = sum(record["pred"] is None for record in records)
    return result


def result_table(rows: dict[str, list[dict]], compensated: bool = False) -> str:
    """The text result.py writes to result.txt: RESULT_HEADER, then one tab-separated line per name (result.py's
    file name without its extension) with `score`'s six numbers as Python prints them, joined by newlines, no
    newline at the end. A group without records, where result.py fails, is written "-"."""
    lines = [RESULT_HEADER]
    for name, records in rows.items():
        scores = score(records, compensated)
        lines.append("\t".join([name, *("-" if scores[key] is None else str(scores[key]) for key in SCORE_KEYS)]))
    return "\n".join(lines)
