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

from longlora.recipe import PASSKEY_DEPTHS

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)
"""The reference draws the key uniformly from these integers."""
PAIRED_TRIALS = 4
"""With at least this many trials per cell, every cell of a grid uses the same keys (seeds seed … seed + trials - 1),
so that cells are compared on equal keys; with fewer, each cell draws keys of its own (`cell_seeds`)."""


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def passkey(seed: int) -> str:
    """The key of trial `seed`: an integer drawn uniformly from KEY_RANGE, as digits."""
    return str(random.Random(seed).randint(*KEY_RANGE))


def _prompt(words: list[str], cut: int, key: str) -> str:
    return "\n".join([TASK, " ".join(words[:cut]), KEY_LINE.format(key=key), " ".join(words[cut:]), QUESTION])


def cell_seeds(cell: int, trials: int, seed: int = 0) -> list[int]:
    """The key seeds of the `trials` trials of a grid's `cell`-th cell (cells numbered from 0 in grid order).

    With PAIRED_TRIALS or more trials, seed, seed + 1, … in every cell: the cells are compared on the same keys.
    With fewer, seed + cell × trials + t: every cell has keys of its own, so that a grid of one or two trials per
    cell does not rest on one or two keys (one key for every cell made the whole heatmap one key's)."""
    offset = 0 if trials >= PAIRED_TRIALS else cell * trials
    return [seed + offset + t for t in range(trials)]


def grid_seeds(cells: int, trials: int, seed: int = 0) -> list[int]:
    """Every key seed a grid of `cells` cells uses, each once, in order."""
    return sorted({s for cell in range(cells) for s in cell_seeds(cell, trials, seed)})


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


def trial_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[str, str, int]:
    """(prompt, key, answer tokens) of a trial of `length` tokens: the prompt and the answer but its last token fit
    in `length` positions, so that a model evaluated at its own context length is never asked to read past it."""
    answer_tokens = len(tokenizer(" " + passkey(seed), add_special_tokens=False)["input_ids"])
    prompt, key = passkey_prompt(tokenizer, length - answer_tokens + 1, depth, seed)
    return prompt, key, answer_tokens


def shortest_trial_length(tokenizer, seeds) -> int:
    """The fewest positions in which the trial of every seed in `seeds` fits with this tokenizer (no filler): a
    shorter `length` makes `trial_prompt` raise."""
    def needed(seed: int) -> int:
        key = passkey(seed)
        return (_n_tokens(tokenizer, _prompt([], 0, key))
                + len(tokenizer(" " + key, add_special_tokens=False)["input_ids"]) - 1)
    return max(needed(seed) for seed in seeds)


@torch.no_grad()
def passkey_trial(model, tokenizer, length: int, depth: float, seed: int) -> PasskeyTrial:
    """One greedy retrieval with a KV cache: decode as many tokens as the key takes (as the reference does) and
    compare."""
    prompt, key, answer_tokens = trial_prompt(tokenizer, length, depth, seed)
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=answer_tokens,
                            min_new_tokens=answer_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None
                            else tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return PasskeyTrial(length, depth, seed, key, answer, input_ids.shape[1])


def passkey_accuracy(model, tokenizer, length: int, depths=PASSKEY_DEPTHS, trials: int = 4, seed: int = 0) -> float:
    """Share of correct retrievals over `depths` × `trials` prompts of `length` tokens (keys seeded per cell:
    `cell_seeds`)."""
    was_training = model.training
    model.eval()
    try:
        results = [passkey_trial(model, tokenizer, length, depth, trial_seed)
                   for cell, depth in enumerate(depths) for trial_seed in cell_seeds(cell, trials, seed)]
    finally:
        model.train(was_training)
    return sum(r.correct for r in results) / len(results)


def passkey_grid(model, tokenizer, lengths, depths=PASSKEY_DEPTHS, trials: int = 4, seed: int = 0,
                 progress: bool = True) -> list[PasskeyTrial]:
    """Every trial of the grid lengths × depths × `trials` (keys seeded per cell: `cell_seeds`), in that order."""
    from itertools import product

    from tqdm.auto import tqdm

    cells = [(length, depth, trial_seed) for cell, (length, depth) in enumerate(product(lengths, depths))
             for trial_seed in cell_seeds(cell, trials, seed)]
    was_training = model.training
    model.eval()
    try:
        return [passkey_trial(model, tokenizer, length, depth, trial_seed)
                for length, depth, trial_seed in tqdm(cells, desc="passkey", unit="prompt", disable=not progress)]
    finally:
        model.train(was_training)


def cell_accuracy(trials: list[PasskeyTrial]) -> dict[tuple[int, float], tuple[int, int]]:
    """(correct, trials) per (length, depth) cell, in the order the cells first appear."""
    cells: dict[tuple[int, float], tuple[int, int]] = {}
    for trial in trials:
        correct, total = cells.get((trial.length, trial.depth), (0, 0))
        cells[(trial.length, trial.depth)] = (correct + trial.correct, total + 1)
    return cells


def save_heatmap(cells: dict[tuple[int, float], tuple[int, int]], path, title: str) -> None:
    """A PNG of the accuracy per cell: prompt length across, key depth down, each cell labelled correct/trials."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    fig, ax = plt.subplots(figsize=(max(4.8, 2.0 + 0.9 * len(lengths)), max(3.4, 1.6 + 0.45 * len(depths))),
                           dpi=100)
    for (length, depth), (correct, total) in cells.items():
        row, col = depths.index(depth), lengths.index(length)
        grid[row, col] = correct / total
        ax.text(col, row, f"{correct}/{total}", ha="center", va="center", fontsize=8)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth (share of filler)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
