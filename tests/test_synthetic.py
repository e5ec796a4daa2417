"""Synthetic recall and copy sequences: exact length, masks on exactly the tokens a look back predicts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from longlora.data.packing import join_documents
from longlora.embedded.corpus import stdlib_documents
from longlora.embedded.synthetic import (
    HAYSTACK_FACT,
    HAYSTACK_RECALL,
    PROSE_DEFINITION,
    PROSE_FORMS,
    RECALL_FORMS,
    WORDS,
    SyntheticSequences,
    corpus_words,
)


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer):
    texts = [d.text for d in stdlib_documents("base", max_documents=20)]
    code = join_documents(tiny_tokenizer(texts, add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id)
    return SyntheticSequences(tiny_tokenizer, code, 256)


def test_recall_masks_exactly_the_values_defined_earlier(sequences, tiny_tokenizer):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        ids, mask = sequences.recall(rng)
        assert ids.shape == mask.shape == (256,)
        text = tiny_tokenizer.decode(ids)
        definitions = dict(re.findall(r"^(\w+) = (\S+)$", text, flags=re.M))
        starts = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int)])) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate([mask.astype(int), [0]])) == -1) + 1
        for start, end in zip(starts, ends, strict=True):
            value = tiny_tokenizer.decode(ids[start:end]).strip()
            before = tiny_tokenizer.decode(ids[:start])
            assert value in definitions.values() and f" = {value}\n" in before
            checked += 1
    assert checked >= 30


def test_prose_facts_are_recalled_in_prose(tiny_tokenizer, sequences):
    prose = SyntheticSequences(tiny_tokenizer, sequences.code, 256, prose_share=1.0)
    ids, mask = prose.recall(np.random.default_rng(5))
    text = tiny_tokenizer.decode(ids)
    stated = dict(re.findall(r"^# The ([a-z_ ]+) is (\S+)\.$", text, flags=re.M))
    assert stated and "=" not in "".join(re.findall(r"^# .*$", text, flags=re.M))
    value = tiny_tokenizer.decode(ids[mask]).split()[0]
    assert value in stated.values()


def test_copy_masks_the_repeat_of_an_earlier_span(sequences):
    ids, mask = sequences.copy(np.random.default_rng(1))
    assert ids.shape == (256,) and mask.any()
    first = int(np.flatnonzero(mask)[0]) - 1  # the repeat starts one token before its first masked token
    span = ids[first:]
    assert any((ids[i:i + len(span)] == span).all() for i in range(first - len(span) + 1))


def test_haystack_masks_the_value_of_the_one_fact_among_look_alikes(sequences, tiny_tokenizer):
    rng = np.random.default_rng(2)
    for _ in range(20):
        ids, mask = sequences.haystack(rng)
        assert ids.shape == mask.shape == (256,)
        lines = tiny_tokenizer.decode(ids).split("\n")
        # haystack, fact, haystack, restatement: the fact and its restatement name the same thing and value
        assert len(lines) == 4
        fact = re.fullmatch(r"The ([a-z_ ]+?) is (\S+)\.( .+\.)?", lines[1])  # maybe with a sentence
        assert fact, lines[1]
        words, value, _ = fact.groups()
        assert lines[3].lower().endswith(f"the {words} is {value}.")
        assert tiny_tokenizer.decode(ids[mask]).strip() == value
        assert np.flatnonzero(mask)[-1] >= 250  # asked at the very end of the window
        # every distractor has the fact's shape, so the words before " is" are what tells them apart
        hay = lines[0] + lines[2]
        assert hay.count(" is ") >= 2 and f"The {words} is" not in hay


def test_batches_are_a_pure_function_of_the_generator(sequences):
    a = sequences.batch(6, 0.5, np.random.default_rng([3, 0, 17]), haystack_share=0.3)
    b = sequences.batch(6, 0.5, np.random.default_rng([3, 0, 17]), haystack_share=0.3)
    c = sequences.batch(6, 0.5, np.random.default_rng([3, 0, 18]), haystack_share=0.3)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()


def test_nothing_planted_uses_the_passkey_wording():
    planted = " ".join([*WORDS, *RECALL_FORMS, *PROSE_FORMS, PROSE_DEFINITION, HAYSTACK_FACT, *HAYSTACK_RECALL]).lower()
    for phrase in ("pass", "key", "grass", "sky", "sun", "remember"):
        assert phrase not in planted


def test_corpus_names_are_frequent_words_without_the_passkey_wording(sequences, tiny_tokenizer):
    text = "the pass key grass retry retry retry limit limit limit sky sky sky Sun ab ab ab"
    assert corpus_words(text) == ("limit", "retry")  # rare words, short words and the prompt's words are left out
    names = SyntheticSequences(tiny_tokenizer, sequences.code, 256, words=("alpha", "omega", "zulu"))
    ids, mask = names.haystack(np.random.default_rng(4))
    fact = tiny_tokenizer.decode(ids).split("\n")[1]
    assert re.match(r"The (alpha|omega|zulu)( (alpha|omega|zulu)){1,2} is \S+\.", fact), fact


def test_too_little_code_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="at least 512 tokens of code"):
        SyntheticSequences(tiny_tokenizer, np.arange(100), 256)
