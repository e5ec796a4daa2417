"""Stage eval_longqa and its scoring (longlora/evaluation/qa.py): held-out questions in the SFT prompt format, exact
match and
token F1, on a tiny model and on an oracle that answers from the prompt as prepare_sft would have taught it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longlora.data.sft import Instruction, render_prompt
from longlora.errors import InputError
from longlora.evaluation.longbench import qa_f1_score
from longlora.evaluation.qa import answer_all, answer_f1, answer_tokens, exact_match, prompt_ids
from stages import eval_longqa
from tests import test_eval_stages
from tests.test_eval_stages import _params

# The tiny models and the project folder of the other evaluation stages' tests.
inputs, project = test_eval_stages.inputs, test_eval_stages.project

RECORDS = [
    {"instruction": "In `x.py`: `LIMIT = 40`. What is LIMIT?", "output": "40", "meta": {"kind": "constant_value"}},
    {"instruction": "`def read_config(): pass` is in json/tool.py. Which file?", "output": "json/tool.py",
     "meta": {"kind": "defining_file"}},
    {"instruction": "After `def a()` comes `def make_parser()`. Next?", "output": "make_parser",
     "meta": {"kind": "next_function"}},
]


@pytest.mark.parametrize(("prediction", "reference", "em", "f1"), [
    ("make_parser", "make_parser", 1.0, 1.0),
    ("  make_parser  \nand more", "make_parser", 1.0, 1.0),  # the first line, stripped, is the answer
    ("\n\nmake_parser", "make_parser", 1.0, 1.0),  # blank lines before it are skipped
    ("make_reader", "make_parser", 0.0, 0.5),  # `make` right, `reader` wrong: P = R = 1/2
    ("Make_Parser", "make_parser", 0.0, 1.0),  # F1 is case-blind, exact match is not
    ("json/decoder.py", "json/tool.py", 0.0, 2 / 3),  # json, py of json, decoder, py
    ("", "40", 0.0, 0.0),
    ("40 is the value", "40", 0.0, 0.4),  # P = 1/4, R = 1: 2PR / (P + R)
])
def test_exact_match_and_token_f1_by_hand(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert answer_f1(prediction, reference) == pytest.approx(f1)


def test_token_f1_is_longbench_qa_f1_on_plain_words():
    """On answers without punctuation or articles, the same numbers as LongBench's qa_f1_score."""
    for prediction, reference in (("red green blue", "green blue"), ("one two", "three"), ("x y z", "x y z")):
        assert answer_f1(prediction, reference) == pytest.approx(qa_f1_score(prediction, reference))
    assert answer_tokens("_make_iterencode(o, 2)") == ["make", "iterencode", "o", "2"]


class _Oracle(torch.nn.Module):
    """Answers with the reference found after `oracle:` in the prompt: what a model that learnt the task would do."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.prompts = tokenizer, answers, []

    def generate(self, input_ids, max_new_tokens, do_sample, **kwargs):
        assert do_sample is False
        prompt = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        self.prompts.append(input_ids[0].tolist())
        answer = next(a for q, a in self.answers.items() if q in prompt)
        new = self.tokenizer(answer + "\nmore", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


def test_an_oracle_scores_100_on_prompts_rendered_as_prepare_sft_renders_them(tiny_tokenizer):
    examples = [Instruction(r["instruction"], r["output"]) for r in RECORDS]
    oracle = _Oracle(tiny_tokenizer, {e.instruction: e.output for e in examples})
    items = [(i, r["meta"]["kind"], e.output, prompt_ids(e, tiny_tokenizer, "llama2"))
             for i, (r, e) in enumerate(zip(RECORDS, examples, strict=True))]
    answers = answer_all(oracle, tiny_tokenizer, items, max_new_tokens=16, progress=False)
    assert [(a.exact_match, a.f1) for a in answers] == [(1.0, 1.0)] * 3
    for example, ids in zip(examples, oracle.prompts, strict=True):
        # prepare_sft's prompt: the llama2 template, BOS added by the tokenizer, nothing of the answer
        assert ids == tiny_tokenizer(render_prompt(example, "llama2"))["input_ids"]
        assert ids[0] == tiny_tokenizer.bos_token_id


@pytest.fixture
def longqa(project):
    path = Path("data/corpus/longqa_heldout.json")
    path.parent.mkdir(parents=True)
    too_long = {"instruction": "word " * 400, "output": "x", "meta": {"kind": "constant_value"}}
    path.write_text(json.dumps([*RECORDS, too_long]), encoding="utf-8")
    return path


def test_stage_writes_every_prediction_and_scores_that_agree_with_them(longqa):
    params = _params(eval_longqa={"max_new_tokens": 8}, prepare_sft={"truncation": "drop"})
    metrics = eval_longqa.run(params, "extended")
    lines = Path("data/eval_results/longqa/extended/predictions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == [0, 1, 2] and metrics["skipped"] == 1  # the long one cannot fit 128 tokens
    assert [r["reference"] for r in rows] == [r["output"] for r in RECORDS]
    for row in rows:
        assert row["exact_match"] == exact_match(row["prediction"], row["reference"])
        assert row["f1"] == pytest.approx(answer_f1(row["prediction"], row["reference"]))
        assert row["prompt_tokens"] + 8 <= 128
    assert metrics["questions"] == 3
    assert metrics["f1"] == round(100 * sum(r["f1"] for r in rows) / 3, 2)
    assert metrics["exact_match"] == round(100 * sum(r["exact_match"] for r in rows) / 3, 2)
    assert set(metrics["by_kind"]) == {"constant_value", "defining_file", "next_function"}
    assert json.loads(Path("data/metrics/eval_longqa/extended.json").read_text()) == metrics
    # max_examples: the first N records only
    assert eval_longqa.run(_params(eval_longqa={"max_examples": 2}), "base")["questions"] == 2
    # As prepare_sft with truncate_middle: the long prompt is cut in the middle to fit, not left out.
    cut = eval_longqa.run(_params(eval_longqa={"max_new_tokens": 8}, prepare_sft={"truncation": "truncate_middle"}),
                          "extended")
    assert (cut["questions"], cut["skipped"], cut["truncated"]) == (4, 0, 1)
    last = json.loads(Path("data/eval_results/longqa/extended/predictions.jsonl").read_text().splitlines()[-1])
    assert last["prompt_tokens"] == 128 - 8


@pytest.mark.parametrize(("content", "message"), [
    (None, r"eval_longqa\.input 'data/corpus/longqa_heldout\.json': no such file"),
    ("[{\"instruction\": \"q\"}]", r"eval_longqa\.input data/corpus/longqa_heldout\.json.*no 'output' field"),
    ("[]", r"eval_longqa\.input data/corpus/longqa_heldout\.json: no records"),
    (json.dumps([{"instruction": "word " * 400, "output": "x"}]), r"every prompt is longer than model\.target_context"),
])
def test_bad_input_stops_with_the_parameter_and_writes_nothing(project, content, message):
    if content is not None:
        Path("data/corpus").mkdir(parents=True)
        Path("data/corpus/longqa_heldout.json").write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        eval_longqa.run(_params(prepare_sft={"truncation": "drop"}), "extended")
    assert not Path("data/eval_results/longqa").exists() or not any(Path("data/eval_results/longqa").iterdir())
    assert not Path("data/metrics/eval_longqa/extended.json").exists()

