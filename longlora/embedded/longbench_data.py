"""Small LongBench-format sets made offline from held-out source code, for the embedded default pipeline.

Each set is written as `<dataset>.jsonl` in LongBench's input format (`input`, `context`, `answers`, `all_classes`,
`length` in words, plus `dataset`, `language` and `_id`) under the name of the LongBench task whose prompt,
generation length and metric it is scored with; the texts are ours, never LongBench's:

- `lcc` (code completion, edit similarity): a run of consecutive lines of one held-out file; the answer is the
  line that follows, one whole simple statement (not a docstring, comment or continuation line).
- `passage_count` (count): top-level functions and classes of held-out files as "Paragraph i: ..." blocks, some
  repeated; the answer is how many distinct ones there are.
- `passage_retrieval_en` (retrieval): functions as numbered paragraphs; the "abstract" is the docstring of one of
  them (which its paragraph contains, so finding it is a long-range look-up); the answer is "Paragraph i".
- `multifieldqa_en` (single-document QA, F1): the held-out LongQA questions (longlora/embedded/longqa.py), the code as
the
  context and the question as the input.

Every context is between `min_tokens` and `max_tokens` tokens of the model's tokenizer (the LongQA set's own
range), so that the prompts fit the extended context. Deterministic for a given seed, files and tokenizer.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from longlora.embedded.longqa import CLOSING, instruction_document, source_units

CountTokens = Callable[[list[str]], Sequence[int]]
EMBEDDED_DATASETS = ("multifieldqa_en", "passage_count", "passage_retrieval_en", "lcc")
_MIN_PARAGRAPH_TOKENS = 16


def _record(dataset: str, index: int, context: str, question: str, answers: list[str]) -> dict:
    return {"input": question, "context": context, "answers": answers, "all_classes": None,
            "length": len(context.split()), "dataset": dataset, "language": "en", "_id": f"{dataset}-{index:05d}"}


def longqa_as_single_doc_qa(examples: list[dict]) -> list[dict]:
    """LongAlpaca-format LongQA records (longlora/embedded/longqa.py) as multifieldqa_en records: code → context,
    question
    → input, the checked answer → answers."""
    marker = CLOSING.split("{")[0]
    return [_record("multifieldqa_en", i, instruction_document(e["instruction"]),
                    e["instruction"][e["instruction"].rindex(marker) + len(marker):], [e["output"]])
            for i, e in enumerate(examples)]


def _statement_lines(text: str) -> set[int]:
    """0-based indices of the lines that hold one whole simple statement of a module (no docstring, no comment,
    no continuation line): the lines worth predicting."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    return {node.lineno - 1 for node in ast.walk(tree)
            if isinstance(node, ast.stmt) and node.lineno == node.end_lineno
            and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))}


def code_completion(files: list[tuple[str, str]], count_tokens: CountTokens, n_examples: int, min_tokens: int,
                    max_tokens: int, rng: np.random.Generator) -> list[dict]:
    """lcc records: at most one per file, the context a run of lines ending right before the answer line."""
    records: list[dict] = []
    for file_index in rng.permutation(len(files)):
        if len(records) >= n_examples:
            break
        text = files[file_index][1]
        # ast numbers lines by \n only (str.splitlines would also split at form feeds, which stdlib files hold).
        lines = [line + "\n" for line in text.split("\n")]
        statements = _statement_lines(text)
        if len(lines) < 4 or not statements:
            continue
        ends = np.cumsum([0, *count_tokens(lines)])  # ends[i]: tokens of lines[:i], about
        length = int(rng.integers(min_tokens, max_tokens + 1))
        targets = [i for i in sorted(statements) if i > 0 and ends[i] >= length and len(lines[i].strip()) >= 8]
        if not targets:
            continue
        target = targets[int(rng.integers(len(targets)))]
        start = int(np.searchsorted(ends, ends[target] - length))
        context = "".join(lines[start:target])
        if not min_tokens <= count_tokens([context])[0] <= max_tokens:
            continue
        records.append(_record("lcc", len(records), context, "", [lines[target].rstrip("\n")]))
    return records


@dataclass(frozen=True)
class _Paragraph:
    text: str
    tokens: int
    docstring: str | None


def _paragraphs(files: list[tuple[str, str]], count_tokens: CountTokens, max_tokens: int) -> list[_Paragraph]:
    """Distinct top-level functions and classes of `files` of 16 to `max_tokens` tokens, with their docstrings."""
    units = list(dict.fromkeys(u.text.strip() for _, text in files for u in source_units(text)
                               if u.kind in ("function", "class")))
    if not units:
        return []
    found = []
    for text, tokens in zip(units, count_tokens(units), strict=True):
        if _MIN_PARAGRAPH_TOKENS <= tokens <= max_tokens:
            try:
                node = ast.parse(text).body[0]
                docstring = ast.get_docstring(node)
            except (SyntaxError, IndexError, TypeError):
                continue
            found.append(_Paragraph(text, tokens, docstring.strip() if docstring else None))
    return found


def _numbered(texts: list[str]) -> str:
    return "\n\n".join(f"Paragraph {i}: {text}" for i, text in enumerate(texts, 1))


def passage_count(paragraphs: list[_Paragraph], count_tokens: CountTokens, n_examples: int, min_tokens: int,
                  max_tokens: int, rng: np.random.Generator) -> list[dict]:
    """passage_count records: distinct paragraphs filling about 60 % of the length, repeats the rest, shuffled."""
    records: list[dict] = []
    for _ in range(4 * n_examples):
        if len(records) >= n_examples or len(paragraphs) < 2:
            break
        length = int(rng.integers(min_tokens, max_tokens + 1))
        chosen, total = [], 0
        for index in rng.permutation(len(paragraphs)):
            if total >= 0.6 * length:
                break
            if total + paragraphs[index].tokens <= length:
                chosen.append(paragraphs[index])
                total += paragraphs[index].tokens
        if len(chosen) < 2:
            continue
        sequence = list(chosen)
        for _ in range(4 * len(chosen)):
            repeat = chosen[int(rng.integers(len(chosen)))]
            if total + repeat.tokens > length:
                break
            sequence.append(repeat)
            total += repeat.tokens
        order = rng.permutation(len(sequence))
        context = _numbered([sequence[i].text for i in order])
        if not min_tokens <= count_tokens([context])[0] <= max_tokens:
            continue
        records.append(_record("passage_count", len(records), context, "", [str(len(chosen))]))
    return records


def passage_retrieval(paragraphs: list[_Paragraph], count_tokens: CountTokens, n_examples: int, min_tokens: int,
                      max_tokens: int, rng: np.random.Generator) -> list[dict]:
    """passage_retrieval_en records: one documented function among others, found by its docstring."""
    documented = [p for p in paragraphs if p.docstring and len(p.docstring) >= 20]
    records: list[dict] = []
    for _ in range(4 * n_examples):
        if len(records) >= n_examples or not documented or len(paragraphs) < 2:
            break
        length = int(rng.integers(min_tokens, max_tokens + 1))
        wanted = documented[int(rng.integers(len(documented)))]
        chosen, total = [wanted], wanted.tokens
        for index in rng.permutation(len(paragraphs)):
            other = paragraphs[index]
            if other.text == wanted.text or other.docstring == wanted.docstring or wanted.docstring in other.text:
                continue
            if total + other.tokens <= length:
                chosen.append(other)
                total += other.tokens
        if len(chosen) < 2:
            continue
        order = [chosen[i] for i in rng.permutation(len(chosen))]
        context = _numbered([p.text for p in order])
        if not min_tokens <= count_tokens([context])[0] <= max_tokens:
            continue
        answer = f"Paragraph {order.index(wanted) + 1}"
        records.append(_record("passage_retrieval_en", len(records), context, wanted.docstring, [answer]))
    return records


def embedded_longbench(files: list[tuple[str, str]], longqa_heldout: list[dict], count_tokens: CountTokens,
                       n_examples: int, min_tokens: int, max_tokens: int, seed: int = 0) -> dict[str, list[dict]]:
    """The embedded sets, by LongBench task name: up to `n_examples` records each (fewer when `files` run out)."""
    rng = np.random.default_rng(seed)
    # A paragraph at most a sixth of the shortest context: several of them make one context.
    paragraphs = _paragraphs(files, count_tokens, max(min_tokens // 6, _MIN_PARAGRAPH_TOKENS))
    return {
        "multifieldqa_en": longqa_as_single_doc_qa(longqa_heldout[:n_examples]),
        "passage_count": passage_count(paragraphs, count_tokens, n_examples, min_tokens, max_tokens, rng),
        "passage_retrieval_en": passage_retrieval(paragraphs, count_tokens, n_examples, min_tokens, max_tokens, rng),
        "lcc": code_completion(files, count_tokens, n_examples, min_tokens, max_tokens, rng),
    }
