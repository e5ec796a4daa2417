"""Passkey retrieval (Mohtashami & Jaggi, 2023), with LongLoRA's prompt and lengths measured in tokens.

The prompt is LongLoRA's, five lines joined by "\\n": the task, filler, the key line, filler, the question. Unlike
the reference (which places the key by character offset), length and depth are measured in tokens of the model's
own tokenizer: the prompt (BOS included, as the tokenizer encodes it) has between 0.9 × length and length tokens,
and the key line sits at `depth` of the filler tokens (0: right after the task line, 1: right before the question).
Scoring is the reference's: greedy decoding of as many tokens as the key has, compared exactly.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass

import torch

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The depth grid of the reported accuracy."""
KEY_RANGE = (1, 50000)
"""The reference draws the key uniformly from these integers."""


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def passkey(seed: int) -> str:
    """The key of trial `seed`: an integer drawn uniformly from KEY_RANGE, as digits."""
    return str(random.Random(seed).randint(*KEY_RANGE))


def _prompt(words: list[str], cut: int, key: str) -> str:
    return "\n".join([TASK, " ".join(words[:cut]), KEY_LINE.format(key=key), " ".join(words[cut:]), QUESTION])


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[str, str]:
    """LongLoRA's passkey prompt of about `length` tokens with the key at `depth`; returns (prompt, key)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must lie in [0, 1], got {depth}")
    key = passkey(seed)
    filler_words = FILLER.split()
    if _n_tokens(tokenizer, _prompt([], 0, key)) > length:
        raise ValueError(f"a passkey prompt needs more than {length} tokens with this tokenizer, even with no filler")
    # Filler words are added until the prompt would exceed `length`; token counts grow monotonically with words.
    low, high = 0, 1
    while _n_tokens(tokenizer, _prompt(_repeat(filler_words, high), 0, key)) <= length:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if _n_tokens(tokenizer, _prompt(_repeat(filler_words, mid), 0, key)) <= length:
            low = mid
        else:
            high = mid
    words = _repeat(filler_words, low)
    # Place the key line at the word boundary whose preceding filler has the share `depth` of all filler tokens
    # (one encoding with offsets: counting tokens per prefix would be quadratic at 100k tokens).
    text = " ".join(words)
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    boundaries = [0] + [m.start() for m in re.finditer(" ", text)] + [len(text)]
    before = [bisect.bisect_right(ends, b) for b in boundaries]
    goal = depth * len(ends)
    cut = min(range(len(boundaries)), key=lambda i: (abs(before[i] - goal), i))
    prompt = _prompt(words, cut, key)
    while _n_tokens(tokenizer, prompt) > length:  # a cut can merge differently than the unsplit filler
        words = words[:-1]
        cut = min(cut, len(words))
        prompt = _prompt(words, cut, key)
    return prompt, key


def _repeat(words: list[str], n: int) -> list[str]:
    return [words[i % len(words)] for i in range(n)]


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    depth: float
    seed: int
    key: str
    answer: str
    prompt_tokens: int

    @property
    def correct(self) -> bool:
        """The digits the model wrote first are exactly the key (a tokenizer that spends a token on the space before
        the key decodes one token more than the key's digits: what follows them is not held against it)."""
        digits = re.match(r"\s*(\d*)", self.answer).group(1)
        return digits == self.key


@torch.no_grad()
def passkey_trial(model, tokenizer, length: int, depth: float, seed: int) -> PasskeyTrial:
    """One greedy retrieval: decode as many tokens as the key takes (as the reference does) and compare."""
    # The prompt and the answer but its last token fit in `length` positions, so that a model evaluated at its
    # own context length is never asked to read past it.
    answer_tokens = len(tokenizer(" " + passkey(seed), add_special_tokens=False)["input_ids"])
    prompt, key = passkey_prompt(tokenizer, length - answer_tokens + 1, depth, seed)
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=answer_tokens,
                            min_new_tokens=answer_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None
                            else tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return PasskeyTrial(length, depth, seed, key, answer, input_ids.shape[1])


def passkey_accuracy(model, tokenizer, length: int, depths=PASSKEY_DEPTHS, trials: int = 4, seed: int = 0) -> float:
    """Share of correct retrievals over `depths` × `trials` prompts of `length` tokens (seeds seed, seed + 1, …)."""
    was_training = model.training
    model.eval()
    try:
        results = [passkey_trial(model, tokenizer, length, depth, seed + t)
                   for depth in depths for t in range(trials)]
    finally:
        model.train(was_training)
    return sum(r.correct for r in results) / len(results)
