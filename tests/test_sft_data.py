"""SFT examples: templates, labels −100 exactly on prompt and padding, truncation that never masks every label."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from longlora.data.sft import (
    IGNORE_INDEX,
    Instruction,
    chat_template_of,
    fit_example,
    length_grouped_order,
    middle_cut,
    pad_batch,
    padding_fraction,
    parse_instruction,
    prompt_has_special_tokens,
    render_prompt,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_llama2_prompt_as_in_the_paper_code():
    assert render_prompt(Instruction("Summarise this.", "ok"), "llama2") == "[INST]Summarise this.[/INST]"
    prompt = render_prompt(Instruction("Answer from the text.", "ok", input="The text."), "llama2",
                           system_prompt="Be brief.")
    assert prompt == "[INST] <<SYS>>\nBe brief.\n<</SYS>> \n\n Answer from the text. \nThe text. [/INST]"


@pytest.mark.parametrize("example", [Instruction("Read this.\nQuestion: which?", "a"),
                                     Instruction("Read this.", "a", "the document")])
def test_the_llama2_chat_template_renders_the_training_prompt_token_for_token(tiny_tokenizer, example):
    """The template saved with the fine-tuned model: what prepare_sft trains on is what a chat client sends."""
    trained = tiny_tokenizer(render_prompt(example, "llama2", system_prompt="Be brief."),
                             add_special_tokens=not prompt_has_special_tokens("llama2"))["input_ids"]
    chatty = copy.deepcopy(tiny_tokenizer)
    chatty.chat_template = chat_template_of("llama2", tiny_tokenizer)
    messages = [{"role": "user", "content": f"{example.instruction} \n{example.input}" if example.input
                 else example.instruction}]
    if example.input:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    text = chatty.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chatty(text, add_special_tokens=False)["input_ids"] == trained
    # A whole conversation closes each answer with EOS, as the examples' targets end.
    turns = chatty.apply_chat_template([messages[-1], {"role": "assistant", "content": "x"}], tokenize=False)
    assert turns.endswith(f"[/INST]x{tiny_tokenizer.eos_token}")


def test_the_chat_template_of_a_tokenizer_that_has_none(tiny_tokenizer):
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        chat_template_of("chat_template", tiny_tokenizer)
    chatty = copy.deepcopy(tiny_tokenizer)
    chatty.chat_template = CHAT_TEMPLATE
    assert chat_template_of("chat_template", chatty) == CHAT_TEMPLATE


def test_chat_template_prompt(tiny_tokenizer):
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        render_prompt(Instruction("q", "a"), "chat_template", tiny_tokenizer)
    chatty = copy.deepcopy(tiny_tokenizer)
    chatty.chat_template = CHAT_TEMPLATE
    assert render_prompt(Instruction("q", "a"), "chat_template", chatty) == "<s><|user|>q\n<|assistant|>"
    with_input = render_prompt(Instruction("q", "a", "doc"), "chat_template", chatty, system_prompt="sys")
    assert with_input == "<s><|system|>sys\n<|user|>q\ndoc\n<|assistant|>"


@pytest.mark.parametrize(("record", "message"), [
    ({"output": "a"}, "no 'instruction' field"),
    ({"instruction": "q"}, "no 'output' field"),
    ({"instruction": "q", "output": 3}, "'output' is a int, not a string"),
    ({"instruction": " ", "output": "a"}, "'instruction' is empty"),
    ({"instruction": "q", "output": ""}, "'output' is empty"),
    ({"instruction": "q", "output": "a", "input": ["x"]}, "'input' is a list"),
])
def test_parse_instruction_rejects_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        parse_instruction(record)


def test_parse_instruction_keeps_optional_fields():
    assert parse_instruction({"instruction": "q", "output": "a", "file": "x.pdf"}) == Instruction("q", "a", "")
    assert parse_instruction({"instruction": "q", "output": "a", "input": "i"}).input == "i"


def test_labels_are_masked_exactly_on_the_prompt():
    fitted = fit_example([1, 10, 11, 12], [20, 21, 2], max_length=16)
    assert fitted.status == "kept"
    assert fitted.input_ids.tolist() == [1, 10, 11, 12, 20, 21, 2]
    assert fitted.labels.tolist() == [IGNORE_INDEX] * 4 + [20, 21, 2]


def test_drop_policy_drops_prompts_that_leave_no_room_and_cuts_long_answers():
    assert fit_example(list(range(8)), [20, 2], max_length=8).status == "dropped"
    assert fit_example(list(range(9)), [20, 2], max_length=8).input_ids is None
    cut = fit_example(list(range(6)), [20, 21, 22, 2], max_length=8)
    assert cut.status == "answer_truncated" and cut.labels.tolist() == [IGNORE_INDEX] * 6 + [20, 21]


def test_truncate_middle_keeps_the_prompt_ends_and_room_for_the_answer():
    prompt = list(range(100, 120))  # 20 tokens: start of the template … question at the end
    fitted = fit_example(prompt, [7, 8, 2], max_length=10, truncation="truncate_middle")
    assert fitted.status == "prompt_truncated" and len(fitted.input_ids) == 10
    assert fitted.input_ids.tolist() == [100, 101, 102, 103, 117, 118, 119, 7, 8, 2]
    assert (fitted.labels != IGNORE_INDEX).sum() == 3
    long_answer = fit_example(prompt, list(range(50)) + [2], max_length=10, truncation="truncate_middle")
    assert (long_answer.labels != IGNORE_INDEX).sum() == 5  # half of max_length


def test_middle_cut():
    ids = np.arange(10)
    assert middle_cut(ids, 4).tolist() == [0, 1, 8, 9]
    assert middle_cut(ids, 5).tolist() == [0, 1, 2, 8, 9]
    assert middle_cut(ids, 20).tolist() == list(range(10))
    assert middle_cut(ids, 0).tolist() == []


@pytest.mark.parametrize("truncation", ["drop", "truncate_middle"])
def test_no_kept_example_is_all_masked(truncation):
    rng = np.random.default_rng(0)
    for _ in range(2000):
        max_length = int(rng.integers(2, 40))
        prompt = rng.integers(5, 99, size=int(rng.integers(0, 60))).tolist()
        answer = rng.integers(5, 99, size=int(rng.integers(0, 10))).tolist() + [2]
        fitted = fit_example(prompt, answer, max_length, truncation)
        if fitted.input_ids is None:
            assert truncation == "drop" and len(prompt) >= max_length
            continue
        assert len(fitted.input_ids) <= max_length
        masked = fitted.labels == IGNORE_INDEX
        assert not masked.all()
        n_prompt = int(masked.sum())
        assert masked[:n_prompt].all() and not masked[n_prompt:].any()  # a prompt prefix, then the answer
        assert np.array_equal(fitted.labels[n_prompt:], fitted.input_ids[n_prompt:])
        assert fitted.input_ids[n_prompt:].tolist() == answer[: len(fitted.input_ids) - n_prompt]


def test_fit_example_rejects_nonsense():
    with pytest.raises(ValueError, match="at least 2"):
        fit_example([1], [2], max_length=1)
    with pytest.raises(ValueError, match="no tokens"):
        fit_example([1], [], max_length=8)


def test_padding_is_masked_in_labels_and_attention():
    a = fit_example([1, 10, 11], [20, 2], 16)
    b = fit_example([1, 10], [20, 21, 22, 2], 16)
    batch = pad_batch([{"input_ids": a.input_ids, "labels": a.labels},
                       {"input_ids": b.input_ids, "labels": b.labels}], pad_id=3, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 3, 3, 3], [1, 10, 20, 21, 22, 2, 3, 3]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 20, 2, -100, -100, -100],
                                        [-100, -100, 20, 21, 22, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]


def test_length_grouped_order_is_a_permutation_with_less_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 1000, size=403)
    order = length_grouped_order(lengths, batch_size=4, seed=0)
    assert sorted(order.tolist()) == list(range(403))
    assert lengths[order[:4]].max() == lengths.max()  # the longest batch first: OOM shows at step one
    assert padding_fraction(lengths[order], 4) < 0.5 * padding_fraction(lengths, 4)
    assert np.array_equal(order, length_grouped_order(lengths, batch_size=4, seed=0))
    assert len(length_grouped_order([], 4)) == 0
