"""Passkey prompts: LongLoRA's wording, lengths and depths in tokens, and the reference's exact-match scoring."""

from __future__ import annotations

import re

import pytest
import torch

from longlora.evaluation.passkey import (
    FILLER,
    KEY_LINE,
    QUESTION,
    TASK,
    PasskeyTrial,
    passkey,
    passkey_accuracy,
    passkey_prompt,
    shortest_trial_length,
    trial_prompt,
)


@pytest.mark.parametrize("length", [300, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_the_reference_lines_and_fits_the_length_in_tokens(tiny_tokenizer, length, depth):
    prompt, key = passkey_prompt(tiny_tokenizer, length, depth, seed=7)
    lines = prompt.split("\n")
    assert len(lines) == 5
    assert lines[0] == TASK and lines[2] == KEY_LINE.format(key=key) and lines[4] == QUESTION
    assert key == passkey(7) and key.isdigit() and 1 <= int(key) <= 50000
    filler = (lines[1] + " " + lines[3]).split()
    assert filler == (FILLER.split() * (len(filler) // len(FILLER.split()) + 1))[: len(filler)]
    n_tokens = len(tiny_tokenizer(prompt)["input_ids"])
    assert 0.9 * length <= n_tokens <= length


def test_depth_is_measured_in_filler_tokens(tiny_tokenizer):
    def share_before_key(depth: float) -> float:
        prompt, _ = passkey_prompt(tiny_tokenizer, 2000, depth, seed=1)
        _, before, _, after, _ = prompt.split("\n")
        count = [len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (before, after)]
        return count[0] / sum(count)

    assert share_before_key(0.0) == 0.0 and share_before_key(1.0) == 1.0
    shares = [share_before_key(d) for d in (0.1, 0.25, 0.5, 0.75, 0.9)]
    for want, got in zip((0.1, 0.25, 0.5, 0.75, 0.9), shares, strict=True):
        assert abs(got - want) < 0.02


def test_same_seed_same_prompt_and_bad_arguments_are_clear_errors(tiny_tokenizer):
    assert passkey_prompt(tiny_tokenizer, 300, 0.5, 3) == passkey_prompt(tiny_tokenizer, 300, 0.5, 3)
    assert passkey(3) != passkey(4)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tiny_tokenizer, 300, 1.5, 0)
    with pytest.raises(ValueError, match="needs more than 20 tokens"):
        passkey_prompt(tiny_tokenizer, 20, 0.5, 0)


def test_shortest_trial_length_is_exactly_where_every_trial_starts_to_fit(tiny_tokenizer):
    seeds = range(4)
    shortest = shortest_trial_length(tiny_tokenizer, seeds)
    for seed in seeds:
        trial_prompt(tiny_tokenizer, shortest, 0.5, seed)
    with pytest.raises(ValueError, match="needs more than"):
        for seed in seeds:
            trial_prompt(tiny_tokenizer, shortest - 1, 0.5, seed)


class _Oracle(torch.nn.Module):
    """Answers by reading the key line of the prompt (or a wrong key): exercises decoding and scoring exactly."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong, self.new_tokens = tokenizer, wrong, []

    def generate(self, input_ids, max_new_tokens, min_new_tokens, **kwargs):
        assert max_new_tokens == min_new_tokens and kwargs["do_sample"] is False
        key = re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(input_ids[0])).group(1)
        if self.wrong:
            key = str(int(key) + 1)
        answer = self.tokenizer(" " + key, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.new_tokens.append((input_ids.shape[1], answer.shape[1], max_new_tokens))
        return torch.cat([input_ids, answer[:, :max_new_tokens]], dim=1)


def test_accuracy_scores_exact_keys_and_keeps_the_exchange_within_the_length(tiny_tokenizer):
    oracle = _Oracle(tiny_tokenizer)
    assert passkey_accuracy(oracle, tiny_tokenizer, 300, (0.0, 0.5, 1.0), trials=3) == 1.0
    for prompt_tokens, answer_tokens, decoded in oracle.new_tokens:
        assert answer_tokens == decoded  # as many tokens as the key has, as the reference decodes
        assert prompt_tokens + answer_tokens - 1 <= 300
    assert oracle.training, "the model's training mode is restored"
    assert passkey_accuracy(_Oracle(tiny_tokenizer, wrong=True), tiny_tokenizer, 300, (0.5,), trials=2) == 0.0


@pytest.mark.parametrize(("answer", "correct"), [(" 4211", True), (" 4211.", True), ("4211 is", True),
                                                 (" 42110", False), (" 421", False), (" a 4211", False), ("", False)])
def test_a_trial_is_correct_when_the_first_digits_are_exactly_the_key(answer, correct):
    assert PasskeyTrial(256, 0.5, 0, "4211", answer, 250).correct is correct


def test_one_trial_per_cell_draws_a_key_per_cell_and_four_keep_the_same_keys_in_every_cell(tiny_tokenizer):
    """`eval_passkey.trials: 1` used to test one key in every cell of the grid; with 4 or more (the default) every
    cell keeps the keys seeded seed … seed + trials - 1, as before, so that cells compare on the same keys."""
    from longlora.evaluation.passkey import grid_seeds, passkey_grid

    one = passkey_grid(_Oracle(tiny_tokenizer), tiny_tokenizer, (256, 300), (0.0, 1.0), trials=1, seed=5,
                       progress=False)
    assert [(t.length, t.depth, t.seed) for t in one] == [(256, 0.0, 5), (256, 1.0, 6), (300, 0.0, 7), (300, 1.0, 8)]
    assert len({t.key for t in one}) == 4 and all(t.correct for t in one)
    two = passkey_grid(_Oracle(tiny_tokenizer), tiny_tokenizer, (256,), (0.0, 1.0), trials=2, progress=False)
    assert [t.seed for t in two] == [0, 1, 2, 3]
    four = passkey_grid(_Oracle(tiny_tokenizer), tiny_tokenizer, (256, 300), (0.0, 1.0), trials=4, progress=False)
    assert [t.seed for t in four] == [0, 1, 2, 3] * 4
    assert grid_seeds(15, 4) == [0, 1, 2, 3] and grid_seeds(15, 1, seed=2) == list(range(2, 17))
