"""A verifiable long-context QA set (LongAlpaca format) generated from Python source files, offline.

Each example's instruction is a long stretch of real source code — consecutive top-level statements of one or more
files, each file introduced by a `# ==== file: <path> ====` header — followed by one question whose answer is
written somewhere in that code and can be checked mechanically:

- `next_function`: which top-level function is defined next after `f` in the same file;
- `constant_value`: the literal a module-level constant is assigned;
- `defining_file`: which file defines a given function or class (the header may be far above the definition).

What makes the set reward reading the whole context rather than the last lines: the position of the evidence is
spread evenly over the document (five depth bands, early to late, measured in tokens, filled in turn); every
document holds distractors of the same kind (other functions, other constants, other files), so the question's
name must be found, not guessed; each asked-about name occurs exactly once as a definition in its document; and no
item is asked about twice. Every question is derived from the parsed source (`ast`) and accepted only if an
independent line-based reading of the finished document (`answer_from_document`) gives the same answer.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

HEADER = "# ==== file: {name} ====\n"
PREAMBLE = (
    "Below is Python source code from one or more files. Read all of it: the question after it may be about "
    "any part.\nThe code begins.\n"
)
CLOSING = "The code ends.\n\nQuestion: {question}"
QUESTIONS = {
    "next_function": "Which top-level function is defined next after `{name}` in the same file? "
                     "Answer with the function name only.",
    "constant_value": "What value is the module-level constant `{name}` assigned? "
                      "Answer with the value exactly as written in the code.",
    "defining_file": "Which file defines the {what} `{name}`? Answer with the file path only.",
}
KINDS = tuple(QUESTIONS)
DEPTH_BANDS = 5
_CONSTANT_NAME = re.compile(r"^_?[A-Z][A-Z0-9_]*$")
_HEADER_LINE = re.compile(r"^# ==== file: (.+) ====$", re.M)
_MAX_VALUE_CHARS = 60


@dataclass(frozen=True)
class Unit:
    """One top-level statement of a file, with the comments and blank lines before it."""

    text: str
    kind: str
    """function, class, constant or other."""
    name: str | None = None
    value: str | None = None
    """For a constant: the literal's source text."""


def source_units(text: str) -> list[Unit]:
    """Split a module into top-level units (empty if it does not parse); their texts concatenate to the file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    # ast counts lines by \n only; str.splitlines would also split at form feeds, which stdlib files contain.
    lines = [line + "\n" for line in text.split("\n")]
    if text.endswith("\n"):
        lines.pop()
    units, previous_end = [], 0
    ast_lines = _ast_lines(text)
    for node in tree.body:
        end = node.end_lineno or node.lineno
        units.append(Unit("".join(lines[previous_end:end]), *_classify(node, ast_lines)))
        previous_end = end
    if units and previous_end < len(lines):
        last = units[-1]
        units[-1] = Unit(last.text + "".join(lines[previous_end:]), last.kind, last.name, last.value)
    return units


def _classify(node: ast.stmt, ast_lines: list[str]) -> tuple[str, str | None, str | None]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return "function", node.name, None
    if isinstance(node, ast.ClassDef):
        return "class", node.name, None
    target, value = None, None
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target, value = node.targets[0], node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target, value = node.target, node.value
    if isinstance(target, ast.Name) and _CONSTANT_NAME.match(target.id) and value is not None:
        source = _literal_source(value, ast_lines)
        if source is not None:
            return "constant", target.id, source
    return "other", None, None


def _literal_source(value: ast.expr, ast_lines: list[str]) -> str | None:
    try:
        literal = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(literal, int | float | str | bytes | tuple | frozenset):
        return None
    source = _source_segment(value, ast_lines)
    if not source or "\n" in source or len(source) > _MAX_VALUE_CHARS:
        return None
    return source


def _source_segment(node: ast.expr, ast_lines: list[str]) -> str:
    """`ast.get_source_segment(text, node)` from the module's lines split once: that function splits the whole
    module again on every call, which made LongQA generation quadratic in a file's constants."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return ast_lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    head = ast_lines[first].encode()[node.col_offset:].decode()
    tail = ast_lines[last].encode()[:node.end_col_offset].decode()
    return "".join([head, *ast_lines[first + 1:last], tail])


_AST_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _ast_lines(text: str) -> list[str]:
    """The module's lines as ast numbers them (ends kept; \\r\\n, \\r and \\n end a line, form feeds do not)."""
    return _AST_LINE.findall(text)


def answer_from_document(document: str, kind: str, name: str) -> str | None:
    """The answer read off the finished document line by line (independently of `ast`); None if ambiguous."""
    sections = _sections(document)
    if kind == "constant_value":
        found = [m for _, body in sections for m in re.finditer(
            rf"^{re.escape(name)}\s*(?::[^=\n]*)?=\s*(.+?)\s*$", body, re.M)]
        assigned = sum(len(re.findall(rf"^\s*{re.escape(name)}\s*(?::[^=\n]*)?=", body, re.M))
                       for _, body in sections)
        return found[0].group(1) if len(found) == 1 and assigned == 1 else None
    definition = re.compile(rf"^(?:class|(?:async\s+)?def)\s+{re.escape(name)}\b", re.M)
    hits = [(file, body) for file, body in sections for _ in definition.finditer(body)]
    if len(hits) != 1:
        return None
    file, body = hits[0]
    if kind == "defining_file":
        return file
    if kind == "next_function":
        functions = re.findall(r"^(?:async\s+)?def\s+(\w+)", body, re.M)
        if name not in functions:
            return None
        at = functions.index(name)
        return functions[at + 1] if at + 1 < len(functions) else None
    raise ValueError(f"unknown question kind {kind!r}")


def _sections(document: str) -> list[tuple[str, str]]:
    heads = list(_HEADER_LINE.finditer(document))
    return [(h.group(1), document[h.end(): heads[i + 1].start() if i + 1 < len(heads) else len(document)])
            for i, h in enumerate(heads)]


def instruction_document(instruction: str) -> str:
    """The source code part of a generated instruction."""
    start = instruction.index(PREAMBLE) + len(PREAMBLE)
    return instruction[start: instruction.rindex(CLOSING.split("{")[0])]


@dataclass
class _File:
    name: str
    units: list[Unit]
    tokens: list[int]
    header_tokens: int


@dataclass
class _Piece:
    file: str
    unit: Unit
    token_offset: int


@dataclass
class _Candidate:
    kind: str
    name: str
    answer: str
    depth: float
    file: str
    what: str = ""


@dataclass
class LongQAStats:
    windows: int = 0
    without_question: int = 0
    out_of_range: int = 0
    skipped_for_balance: int = 0
    kinds: dict = field(default_factory=dict)
    depth_bands: list = field(default_factory=lambda: [0] * DEPTH_BANDS)


def generate_longqa(
    files: Iterable[tuple[str, str]],
    count_tokens: Callable[[list[str]], Sequence[int]],
    n_examples: int,
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
    source: str = "",
    max_passes: int = 8,
) -> tuple[list[dict], LongQAStats]:
    """Up to `n_examples` LongAlpaca records whose instructions have between `min_tokens` and `max_tokens` tokens.

    `files` are (name, Python source) pairs; `count_tokens` maps texts to their token counts (the model's
    tokenizer). Deterministic for a given seed, files and tokenizer.
    """
    rng = np.random.default_rng(seed)
    overheads = count_tokens([PREAMBLE + CLOSING.format(question=q.format(name=name, what="function"))
                              for q in QUESTIONS.values() for name in ("x", "x" * 24)])
    overhead = max(overheads)
    # Code budget: the question's size varies, so the finished instruction is measured again (and may be skipped).
    lo, hi = min_tokens - min(overheads), int((max_tokens - overhead) * 0.97)
    if hi <= 0 or hi < lo:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for code after the {overhead}-token question")
    parsed = _parse_files(files, count_tokens)
    stats = LongQAStats(kinds=dict.fromkeys(KINDS, 0))
    examples: list[dict] = []
    asked: set[tuple[str, str, str]] = set()
    for pass_index in range(max_passes):
        # Windows are plentiful: skip those that would overfill a depth band, except in the last pass.
        balance = 2 if pass_index < max_passes - 1 else None
        order = [parsed[i] for i in rng.permutation(len(parsed))]
        for pieces, doc_tokens in _windows(order, max(lo, 1), hi, rng):
            if len(examples) >= n_examples:
                return examples, stats
            stats.windows += 1
            example = _example(pieces, doc_tokens, rng, asked, count_tokens, min_tokens, max_tokens, stats,
                               balance)
            if example is not None:
                examples.append(example)
                meta = example["meta"]
                stats.kinds[meta["kind"]] += 1
                stats.depth_bands[min(int(meta["depth"] * DEPTH_BANDS), DEPTH_BANDS - 1)] += 1
                if source:
                    meta["source"] = source
    return examples, stats


def _parse_files(files: Iterable[tuple[str, str]], count_tokens) -> list[_File]:
    named = [(name, source_units(text)) for name, text in files]
    named = [(name, units) for name, units in named if units]
    texts = [u.text for _, units in named for u in units] + [HEADER.format(name=name) for name, _ in named]
    counts = list(count_tokens(texts)) if texts else []
    parsed, at = [], 0
    headers = counts[len(counts) - len(named):]
    for (name, units), header_tokens in zip(named, headers, strict=True):
        parsed.append(_File(name, units, counts[at: at + len(units)], header_tokens))
        at += len(units)
    return parsed


def _windows(files: list[_File], lo: int, hi: int, rng) -> Iterator[tuple[list[_Piece], int]]:
    """Consecutive runs of units (crossing into the next file) of lo..hi tokens, a random target each."""
    flat = [(f, i) for f in files for i in range(len(f.units))]
    start = 0
    while start < len(flat):
        target = int(rng.integers(lo, hi + 1))
        pieces: list[_Piece] = []
        total, current, end = 0, None, start
        while end < len(flat):
            f, i = flat[end]
            cost = f.tokens[i] + (f.header_tokens if f is not current else 0)
            if total + cost > hi:
                break
            pieces.append(_Piece(f.name, f.units[i], total + (f.header_tokens if f is not current else 0)))
            total += cost
            current = f
            end += 1
            if total >= target:
                break
        if total >= lo and pieces:
            yield pieces, total
        start = max(end, start + 1)


def _render(pieces: list[_Piece]) -> str:
    parts, current = [], None
    for piece in pieces:
        if piece.file != current:
            parts.append(HEADER.format(name=piece.file))
            current = piece.file
        parts.append(piece.unit.text)
    return "".join(parts)


def _candidates(pieces: list[_Piece], doc_tokens: int, document: str) -> list[_Candidate]:
    functions = [p for p in pieces if p.unit.kind == "function"]
    constants = [p for p in pieces if p.unit.kind == "constant"]
    files = {p.file for p in pieces}
    found: list[_Candidate] = []

    def depth(piece: _Piece) -> float:
        return piece.token_offset / doc_tokens

    if len(functions) >= 3:  # the asked-about pair plus at least one distractor
        for a, b in zip(functions, functions[1:], strict=False):
            if a.file == b.file:
                found.append(_Candidate("next_function", a.unit.name, b.unit.name, depth(a), a.file))
    if len(constants) >= 2:
        found.extend(_Candidate("constant_value", p.unit.name, p.unit.value, depth(p), p.file) for p in constants)
    if len(files) >= 2:
        found.extend(_Candidate("defining_file", p.unit.name, p.file, depth(p), p.file, p.unit.kind)
                     for p in pieces if p.unit.kind in ("function", "class"))
    return [c for c in found if answer_from_document(document, c.kind, c.name) == c.answer]


def _example(pieces, doc_tokens, rng, asked, count_tokens, min_tokens, max_tokens, stats, balance) -> dict | None:
    document = _render(pieces)
    candidates = [c for c in _candidates(pieces, doc_tokens, document) if (c.kind, c.file, c.name) not in asked]
    if not candidates:
        stats.without_question += 1
        return None
    # Greedy balance: the least-filled depth band this window can serve, then its least-used question kind.
    band_of = {id(c): min(int(c.depth * DEPTH_BANDS), DEPTH_BANDS - 1) for c in candidates}
    band = min(set(band_of.values()), key=lambda b: (stats.depth_bands[b], b))
    if balance is not None and stats.depth_bands[band] >= min(stats.depth_bands) + balance:
        stats.skipped_for_balance += 1
        return None
    in_band = [c for c in candidates if band_of[id(c)] == band]
    kind = min({c.kind for c in in_band}, key=lambda k: (stats.kinds[k], KINDS.index(k)))
    pool = [c for c in in_band if c.kind == kind]
    chosen = pool[int(rng.integers(len(pool)))]
    question = QUESTIONS[chosen.kind].format(name=chosen.name, what=chosen.what)
    instruction = PREAMBLE + document + CLOSING.format(question=question)
    if not min_tokens <= count_tokens([instruction])[0] <= max_tokens:
        stats.out_of_range += 1
        return None
    asked.add((chosen.kind, chosen.file, chosen.name))
    return {
        "instruction": instruction,
        "output": chosen.answer,
        "file": ", ".join(dict.fromkeys(p.file for p in pieces)),
        "meta": {"kind": chosen.kind, "name": chosen.name, "depth": round(chosen.depth, 4)},
    }


def long_documents(
    files: Iterable[tuple[str, str]], count_tokens: Callable[[list[str]], Sequence[int]], min_tokens: int,
    max_documents: int | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """Join files (each under its header) into documents of at least `min_tokens` tokens; yield (text, names).

    The last files, if they do not reach `min_tokens` together, are left out.
    """
    parts: list[str] = []
    names: list[str] = []
    tokens = 0
    made = 0
    batch = list(files)
    texts = [HEADER.format(name=name) + text + ("" if text.endswith("\n") else "\n") for name, text in batch]
    counts = count_tokens(texts) if texts else []
    for (name, _), text, count in zip(batch, texts, counts, strict=True):
        parts.append(text)
        names.append(name)
        tokens += count
        if tokens >= min_tokens:
            yield "".join(parts), names
            made += 1
            if max_documents is not None and made >= max_documents:
                return
            parts, names, tokens = [], [], 0
