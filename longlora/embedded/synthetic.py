"""Code-shaped training sequences that reward looking far back, for the embedded base model's pre-training.

A model pre-trained a few minutes on source code alone barely uses its context: the induction mechanism that copies
what followed an earlier occurrence of the current text forms only after many more tokens. These sequences make
that mechanism pay off within each 256-token window, in three generic forms built around real code:

- recall: assignments `name = value` planted among lines of real code, and later lines that state some of them
  again (`name = value`, `assert name == value`, `print(name)  # value`): the value can only be predicted by
  finding the earlier assignment of the same name. Names share words, so the whole name must be matched. A share
  of the facts is stated as a comment in prose instead (`# The retry limit is 4411.`, restated later), so that
  recall does not hinge on code syntax.
- copy: a span of real code that reappears later in the window.
- haystack: one fact stated in prose (`The retry limit is 4411.`) hidden in a few other short statements repeated to
  fill the window (`The queue is full. The mode is 7.`), and stated again at the end. Every distractor ends in the
  same words as the fact, so only matching the whole name, several tokens back, predicts the value.

Nothing here uses the passkey evaluation's wording (no filler sentences, no "pass key"), so passkey retrieval
measures whether the mechanism generalises, not whether a format was memorised.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from longlora.evaluation import passkey

# Identifier parts for the planted names; deliberately without "pass" or "key".
WORDS = (
    "max", "min", "count", "size", "limit", "retry", "timeout", "buffer", "total", "user", "file", "path", "port",
    "node", "batch", "index", "offset", "level", "depth", "width", "height", "delay", "rate", "score", "version",
    "channel", "block", "chunk", "cache", "queue", "worker", "thread", "frame", "window", "layer", "token", "page",
    "row", "col", "mode", "flag", "state", "stage", "step", "epoch", "seed", "split", "group", "shard", "slot",
    "bucket", "region", "zone", "host", "client", "server", "session", "request", "reply", "packet", "stream",
    "record", "field", "entry", "value", "item_id", "label", "tag", "kind", "code", "status", "error", "retries",
    "attempts", "threshold", "margin", "budget", "quota", "weight", "bias", "scale", "factor", "ratio", "alpha",
    "beta", "gamma", "delta", "lambda",
)

RECALL_FORMS = ("{name} = {value}", "assert {name} == {value}", "print({name})  # {value}")
"""How a planted assignment `name = value` is stated again; the value always comes last but for punctuation."""
PROSE_DEFINITION = "# The {words} is {value}."
PROSE_FORMS = ("# The {words} is {value}.", "# Note that the {words} is {value}.", "# (the {words} is {value})")
"""The same facts as comments in prose, so that recall does not hinge on code syntax."""
HAYSTACK_FACT = "The {words} is {value}."
HAYSTACK_RECALL = ("The {words} is {value}.", "So the {words} is {value}.", "Recall that the {words} is {value}.",
                   "Again, the {words} is {value}.")
"""How a haystack's fact is stated again at the end of the window."""


def word_counts(text: str) -> Counter:
    """How often each lower-case word of 3–12 letters occurs in `text` (add the counts of several texts up)."""
    return Counter(re.findall(r"\b[a-z]{3,12}\b", text))


def corpus_words(text: str | Counter, min_count: int = 3) -> tuple[str, ...]:
    """Lower-case words of 3–12 letters used at least `min_count` times in `text` (or in the texts `word_counts`
    counted), minus every word of the passkey prompt: an open set of names, so that recall cannot be learnt as a
    lookup of a few dozen memorised names."""
    banned = {w.lower() for part in (passkey.TASK, passkey.FILLER, passkey.KEY_LINE, passkey.QUESTION)
              for w in re.findall(r"[A-Za-z]+", part)}
    counts = text if isinstance(text, Counter) else word_counts(text)
    return tuple(sorted(w for w, c in counts.items() if c >= min_count and w not in banned))


def _name(rng: np.random.Generator, words: Sequence[str] = WORDS) -> str:
    parts = rng.choice(len(words), size=int(rng.integers(2, 4)), replace=False)
    name = "_".join(words[i] for i in parts)
    return name.upper() if rng.random() < 0.25 else name


def _words(name: str) -> str:
    return name.lower().replace("_", " ")


def _value(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.7:
        return str(int(rng.integers(1, 100000)))
    if kind < 0.85:
        return f"0x{int(rng.integers(0, 2**24)):06x}"
    return repr(WORDS[int(rng.integers(len(WORDS)))] + str(int(rng.integers(10, 100))))


class SyntheticSequences:
    """Recall, copy and haystack sequences of exactly `length` tokens around real code from `code` (a token stream).

    Every draw takes its random generator, so a batch is a pure function of the generator's seed: a resumed run
    draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokenizer, code: np.ndarray, length: int, prose_share: float = 0.0,
                 words: Sequence[str] = WORDS):
        if len(code) < 2 * length:
            raise ValueError(f"synthetic sequences of {length} tokens need at least {2 * length} tokens of code, "
                             f"got {len(code)}")
        self.tokenizer = tokenizer
        self.code = code
        self.length = length
        self.prose_share = prose_share
        self.words = tuple(words)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def _restated(self, before: str, value: str, after: str) -> tuple[np.ndarray, np.ndarray]:
        """`before`, ` value` and `after` encoded in pieces at a pre-token boundary (the value keeps its leading
        space), so the value's tokens are known: they are what only a look back can predict; (ids, value mask)."""
        pieces = [self._encode(before), self._encode(f" {value}"), self._encode(after)]
        mask = np.concatenate([np.full(len(ids), is_value)
                               for ids, is_value in zip(pieces, (False, True, False), strict=True)])
        return np.concatenate(pieces), mask

    def _code(self, n: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, len(self.code) - n))
        return self.code[start:start + n].astype(np.int64)

    def recall(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Assignments spread over the window, then some of them recalled near its end; (ids, recalled-value mask)."""
        facts = [(_name(rng, self.words), _value(rng), rng.random() < self.prose_share)
                 for _ in range(int(rng.integers(2, 6)))]
        definitions = [self._encode("\n" + (PROSE_DEFINITION.format(words=_words(name), value=value) if prose
                                            else f"{name} = {value}") + "\n") for name, value, prose in facts]
        asked = rng.choice(len(facts), size=int(rng.integers(1, len(facts) + 1)), replace=False)
        tail, tail_mask = [], []
        for i in asked:
            name, value, prose = facts[i]
            forms = PROSE_FORMS if prose else RECALL_FORMS
            prefix, _, suffix = forms[int(rng.integers(len(forms)))].partition(" {value}")
            fill = {"name": name, "words": _words(name)}
            ids, mask = self._restated(f"\n{prefix.format(**fill)}", value, suffix.format(**fill) + "\n")
            tail.append(ids)
            tail_mask.append(mask)
        tail, tail_mask = np.concatenate(tail), np.concatenate(tail_mask)
        room = self.length - len(tail) - sum(len(d) for d in definitions)
        if room < 8:
            return self.copy(rng)
        # Definitions go at random points of the code before the queries; the distance to each recall varies
        # from a few tokens to the whole window.
        cuts = np.sort(rng.integers(0, room + 1, size=len(definitions)))
        code = self._code(room, rng)
        pieces, last = [], 0
        for cut, definition in zip(cuts, definitions, strict=True):
            pieces += [code[last:cut], definition]
            last = cut
        pieces.append(code[last:])
        head = np.concatenate(pieces)
        ids = np.concatenate([head, tail])
        mask = np.concatenate([np.zeros(len(head), dtype=bool), tail_mask])
        return ids[: self.length], mask[: self.length]

    def copy(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A span of code that reappears later in the window; (ids, mask of the repeat after its first token)."""
        span = int(rng.integers(max(2, self.length // 16), max(3, self.length // 3)))
        before = int(rng.integers(0, self.length - 2 * span))
        source = self._code(span, rng)
        gap = self._code(self.length - 2 * span, rng)
        ids = np.concatenate([gap[:before], source, gap[before:], source])
        mask = np.zeros(self.length, dtype=bool)
        mask[self.length - span + 1:] = True
        return ids, mask

    def _sentence(self, rng: np.random.Generator) -> str:
        """A plain sentence of three to six random words."""
        return " ".join(self.words[i] for i in rng.integers(len(self.words), size=int(rng.integers(3, 7)))
                        ).capitalize() + "."

    def haystack(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A prose fact among repeated look-alike statements, restated at the end; (ids, recalled-value mask)."""
        words = _words(_name(rng, self.words))
        value = _value(rng)
        distractors = [HAYSTACK_FACT.format(
            words=_words(_name(rng, self.words)) if rng.random() < 0.5 else self.words[i],
            value=_value(rng) if rng.random() < 0.5 else self.words[j])
            for i, j in rng.integers(len(self.words), size=(int(rng.integers(1, 5)), 2))]
        # and a few plain sentences, so that not every sentence of the haystack is a fact
        for _ in range(int(rng.integers(0, 3))):
            distractors.insert(int(rng.integers(len(distractors) + 1)), self._sentence(rng))
        # The fact and its restatement each start a line, alone or next to another sentence: where a statement sits
        # on its line must not decide whether it is a fact to look up or filler to continue.
        fact_line = [HAYSTACK_FACT.format(words=words, value=value)]
        if rng.random() < 0.5:
            fact_line.append(self._sentence(rng))
        fact = self._encode("\n" + " ".join(fact_line) + "\n")
        prefix, _, suffix = HAYSTACK_RECALL[int(rng.integers(len(HAYSTACK_RECALL)))].partition(" {value}")
        lead = "\n" + (self._sentence(rng) + " " if rng.random() < 0.5 else "")
        tail, tail_mask = self._restated(lead + prefix.format(words=words), value, suffix)
        room = self.length - len(fact) - len(tail)
        filler = self._encode(" ".join(distractors) + " ")
        while len(distractors) > 1 and 2 * len(filler) > room:  # the statements must repeat at least twice
            distractors.pop()
            filler = self._encode(" ".join(distractors) + " ")
        if 2 * len(filler) > room:
            return self.recall(rng)
        hay = np.resize(filler, room)  # the statements repeated, cut wherever the room ends
        # The fact goes in at a word boundary (a token that starts with a space), anywhere in the haystack.
        starts = np.flatnonzero(np.char.startswith(np.asarray(self.tokenizer.convert_ids_to_tokens(hay.tolist())),
                                                   "Ġ"))
        cut = int(starts[rng.integers(len(starts))]) if len(starts) else 0
        ids = np.concatenate([hay[:cut], fact, hay[cut:], tail])
        mask = np.concatenate([np.zeros(len(ids) - len(tail), dtype=bool), tail_mask])
        return ids, mask

    def batch(self, n: int, recall_share: float, rng: np.random.Generator,
              haystack_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """`n` sequences: a haystack with probability `haystack_share`, else a recall with probability
        `recall_share`, else a copy; (ids, masks)."""
        def draw():
            if rng.random() < haystack_share:
                return self.haystack(rng)
            return self.recall(rng) if rng.random() < recall_share else self.copy(rng)
        drawn = [draw() for _ in range(n)]
        return np.stack([ids for ids, _ in drawn]), np.stack([mask for _, mask in drawn])
