"""LongBench v2: its prompts (pinned to the bytes of LongBench's prompts/*.txt), pred.py's filling, cut and answer
reading, result.py's scores and result.txt (the expected texts were produced by running LongBench's own result.py on
these records), clear errors for malformed files, the embedded four-choice set, and prediction end to end on a tiny
Llama."""

from __future__ import annotations

import hashlib
import json
from copy import deepcopy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.embedded.longbench2_data import (
    CHOICE_REPLY,
    LETTERS,
    document_items,
    embedded_longbench2,
    question_of,
    with_choice_questions,
)
from longlora.embedded.longqa import CLOSING, HEADER, PREAMBLE, QUESTIONS, instruction_document
from longlora.errors import InputError
from longlora.evaluation.longbench2 import (
    FIELDS,
    TEMPLATES,
    check_record,
    extract_answer,
    fill,
    predict,
    read_predictions,
    read_records,
    result_table,
    score,
    truncate_middle,
    write_predictions,
)

# --- the prompts ----------------------------------------------------------------------------------------------------

# SHA-256 of LongBench's prompts/<name>.txt (github.com/THUDM/LongBench, checked against the files themselves).
PROMPT_SHA256 = {
    "0shot": "68a162252bc9ff71d5d7abca3d69bb31aac3c35f832d657a2866f2018b8a6950",
    "0shot_cot": "6cc33d92fd8f611662b756c1f10f302c541ca005b58c46d5f3188ac3a939bfe8",
    "0shot_cot_ans": "85ec59df4ac0e27aabbc619a7ca5cf3ae1787dd5a76cf51a18944eb52c91955f",
    "0shot_no_context": "125fb44183af01ffc623df19392b80a287db62af3e2a2805e5b2ff9c7b2bee30",
    "0shot_rag": "5c50ce4fa24d297b8c72eb048599681ee01ced5d24a6636464386d6d3c72c4c9",
}
PROMPT_CHARS = {"0shot": 262, "0shot_cot": 210, "0shot_cot_ans": 381, "0shot_no_context": 224, "0shot_rag": 279}


def test_templates_are_longbench_v2s_prompt_files_byte_for_byte():
    assert set(TEMPLATES) == set(PROMPT_SHA256)
    for name, template in TEMPLATES.items():
        assert hashlib.sha256(template.encode("utf-8")).hexdigest() == PROMPT_SHA256[name], name
        assert len(template) == PROMPT_CHARS[name] and not template.endswith("\n"), name
        assert template.endswith('"The correct answer is (insert answer here)".') or name == "0shot_cot"
    assert TEMPLATES["0shot_cot"].endswith("\n\nLet\u2019s think step by step:")  # a curly apostrophe (3 bytes)
    assert len(TEMPLATES["0shot_cot"].encode("utf-8")) == 212
    # The answer prompt of chain of thought omits the text: only the question, choices and the reasoning.
    assert "$DOC$" not in TEMPLATES["0shot_cot_ans"] and "The text is too long and omitted here." in \
        TEMPLATES["0shot_cot_ans"] and "Let\u2019s think step by step: $COT$\n\n" in TEMPLATES["0shot_cot_ans"]
    assert TEMPLATES["0shot"].startswith("Please read the following text and answer the question below.\n\n<text>\n")
    assert TEMPLATES["0shot_cot"].startswith("Please read the following text and answer the questions below.")
    assert TEMPLATES["0shot_no_context"].startswith("What is the correct answer to this question: $Q$\nChoices:\n")
    assert "retrieved text chunks" in TEMPLATES["0shot_rag"]


def _record(**changes) -> dict:
    record = {"_id": "x1", "domain": "Code Repository Understanding", "sub_domain": "Code repo QA",
              "difficulty": "hard", "length": "short", "question": "  Which one?\n", "choice_A": " alpha ",
              "choice_B": "beta\n", "choice_C": "gamma", "choice_D": "\tdelta", "answer": "B",
              "context": "\n  The document.  \n"}
    record.update(changes)
    return record


def test_fill_is_pred_pys_replace_chain_with_stripped_fields():
    record = _record()
    assert fill(TEMPLATES["0shot"], record) == (
        "Please read the following text and answer the question below.\n\n<text>\nThe document.\n</text>\n\n"
        "What is the correct answer to this question: Which one?\nChoices:\n(A) alpha\n(B) beta\n(C) gamma\n"
        "(D) delta\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
    assert fill("[$DOC$]", record, context=" other ") == "[other]"
    assert fill("$COT$|$Q$", record, cot="  I think B.\n") == "I think B.|Which one?"
    assert fill("$COT$", record) == "$COT$"  # no reasoning given: left as it is
    # One replacement after the other, as pred.py: a `$Q$` in the document becomes the question.
    assert fill("$DOC$ / $Q$", _record(context="see $Q$ and $C_D$")) == "see Which one? and delta / Which one?"


def test_extract_answer_reads_pred_pys_two_patterns():
    assert extract_answer("The correct answer is (B)") == "B"
    assert extract_answer("**The correct answer is (C)**") == "C"  # asterisks removed first
    assert extract_answer("The correct answer is **(D)**") == "D"
    assert extract_answer("The correct answer is (*A*)") == "A"
    assert extract_answer("The correct answer is D.") == "D"  # without parentheses
    assert extract_answer("The correct answer is AB") == "A"
    assert extract_answer("the correct answer is (A)") is None  # case-sensitive
    assert extract_answer("The correct answer is (a)") is None
    assert extract_answer("The correct answer is (E)") is None
    assert extract_answer("The correct answer is: (A)") is None
    assert extract_answer("The correct  answer is (A)") is None
    assert extract_answer("") is None
    assert extract_answer("The correct answer is (A) or The correct answer is (B)") == "A"  # the first match
    # The parenthesised pattern is tried first over the whole response: a later "(C)" wins over an earlier "B".
    assert extract_answer("The correct answer is B, no: The correct answer is (C)") == "C"


def test_truncate_middle_keeps_pred_pys_halves(tiny_tokenizer):
    prompt = "BEGIN " + " ".join(f"w{i}" for i in range(200)) + " END"
    ids = tiny_tokenizer.encode(prompt)
    assert ids[0] == tiny_tokenizer.bos_token_id and len(ids) > 100  # BOS is counted, as in pred.py

    def text(part):
        return tiny_tokenizer.decode(part, skip_special_tokens=True)

    # Even: 5 ids from the start (BOS among them, dropped when decoding) and 5 from the end.
    assert truncate_middle(prompt, tiny_tokenizer, 10) == text(ids[1:5]) + text(ids[-5:])
    # Odd: -11 // 2 == -6, so one more id from the end.
    assert truncate_middle(prompt, tiny_tokenizer, 11) == text(ids[1:5]) + text(ids[-6:])
    cut = truncate_middle(prompt, tiny_tokenizer, 40)
    assert cut.startswith("BEGIN") and cut.endswith("END") and " w100 " not in cut
    assert truncate_middle(prompt, tiny_tokenizer, len(ids)) == prompt
    assert truncate_middle(prompt, tiny_tokenizer, len(ids) - 1) != prompt
    assert truncate_middle("  short\n", tiny_tokenizer, 40) == "  short\n"
    with pytest.raises(ValueError):
        truncate_middle(prompt, tiny_tokenizer, 0)


# --- records and their errors ---------------------------------------------------------------------------------------

def test_check_record_keeps_pred_pys_fields_in_order():
    record = _record(extra="dropped")
    checked = check_record(record, "f:1")
    assert tuple(checked) == FIELDS and "extra" not in checked


@pytest.mark.parametrize(("changes", "message"), [
    ({"difficulty": "medium"}, "'difficulty' is 'medium'"),
    ({"length": "tiny"}, "'length' is 'tiny'"),
    ({"answer": "E"}, "'answer' is 'E'"),
    ({"answer": "b"}, "'answer' is 'b'"),
    ({"choice_C": 3}, "'choice_C' must be a string"),
])
def test_check_record_rejects_values_longbench_v2_does_not_have(changes, message):
    with pytest.raises(InputError, match=f"^data.json:7: {message}"):
        check_record(_record(**changes), "data.json:7")


def test_read_records_errors_name_file_and_line(tmp_path):
    lines = tmp_path / "v2.jsonl"
    bad = _record()
    del bad["context"], bad["answer"]
    lines.write_text(json.dumps(_record()) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{lines}:3: missing 'answer', 'context'"):
        read_records(lines)
    assert read_records(lines, limit=1) == [check_record(_record(), "")]
    # A JSON list (the released data.json), a record per element, pretty-printed over many lines.
    listed = tmp_path / "data.json"
    records = [_record(_id=f"x{i}") for i in range(3)]
    records[2]["length"] = "huge"
    text = json.dumps(records, indent=2)
    listed.write_text(text, encoding="utf-8")
    start = text.split("\n").index('    "_id": "x2",')  # the line of its "{": the one before, counted from 1
    with pytest.raises(InputError, match=rf"^{listed}:{start}: 'length' is 'huge'"):
        read_records(listed)
    listed.write_text("[" + ",\n".join(json.dumps(r) for r in records) + "]\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{listed}:3: 'length' is 'huge'"):
        read_records(listed)
    assert [r["_id"] for r in read_records(listed, limit=2)] == ["x0", "x1"]
    listed.write_text('[\n{"_id": 1},\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{listed}:2: missing"):
        read_records(listed)
    listed.write_text('[\n  ' + json.dumps(_record()) + '\n  {"_id": "x"}\n]', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{listed}:3: expected ',' or ']'"):
        read_records(listed)
    lines.write_text(json.dumps(_record()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{lines}:2: not valid JSON"):
        read_records(lines)
    lines.write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="no records"):
        read_records(lines)
    with pytest.raises(InputError, match="cannot read"):
        read_records(tmp_path / "absent.json")


# --- result.py's scores ---------------------------------------------------------------------------------------------

def _prediction(i: int, difficulty: str, length: str, pred: str | None, answer: str) -> dict:
    return {"_id": f"id{i}", "domain": "Code Repository Understanding", "sub_domain": "Code repo QA",
            "difficulty": difficulty, "length": length, "question": "q", "choice_A": "a", "choice_B": "b",
            "choice_C": "c", "choice_D": "d", "answer": answer, "context": "ctx", "response": "", "pred": pred,
            "judge": pred == answer}


MODEL_A = [_prediction(1, "easy", "short", "A", "A"), _prediction(2, "easy", "medium", "B", "C"),
           _prediction(3, "hard", "short", None, "A"), _prediction(4, "hard", "long", "C", "C"),
           _prediction(5, "hard", "medium", None, "D"), _prediction(6, "easy", "long", "D", "D"),
           _prediction(7, "hard", "short", "A", "B")]
MODEL_B = [_prediction(1, "easy", "short", "A", "A"), _prediction(2, "hard", "medium", None, "B"),
           _prediction(3, "hard", "long", "B", "B"), _prediction(4, "easy", "medium", "C", "C"),
           _prediction(5, "hard", "long", "D", "A"), _prediction(6, "hard", "short", None, "C")]


def test_score_is_result_pys_accuracy_by_hand():
    # Right: 1, 4, 6 of 7. Easy 1, 2, 6 (2 right); hard 3, 4, 5, 7 (1); short 1, 3, 7 (1); medium 2, 5 (0); long 4, 6.
    assert score(MODEL_A) == {"overall": 42.9, "easy": 66.7, "hard": 25.0, "short": 33.3, "medium": 0.0,
                              "long": 100.0, "n": 7, "nulls": 2}
    # Compensated: the two null preds (3 hard short, 5 hard medium) count 0.25 each.
    assert score(MODEL_A, compensated=True) == {"overall": 50.0, "easy": 66.7, "hard": 37.5, "short": 41.7,
                                                "medium": 12.5, "long": 100.0, "n": 7, "nulls": 2}
    # A wrong pred is not compensated, only a missing one.
    assert score([_prediction(1, "easy", "short", "B", "A")], compensated=True)["overall"] == 0.0
    # Groups without records are None (result.py would divide by zero); result.py's `else` branches: any
    # difficulty but "easy" is hard, any length but short or medium is long.
    assert score([_prediction(1, "easy", "short", "A", "A"), _prediction(2, "easy", "short", None, "A")]) == {
        "overall": 50.0, "easy": 50.0, "hard": None, "short": 50.0, "medium": None, "long": None, "n": 2, "nulls": 1}
    odd = score([_prediction(1, "expert", "xl", "A", "A")])
    assert odd["hard"] == 100.0 and odd["long"] == 100.0 and odd["easy"] is None and odd["short"] is None
    assert score([])["overall"] is None and score([])["n"] == 0


def test_result_table_is_result_pys_result_txt():
    # Produced by LongBench's result.py over results/modelA.jsonl (these records as JSON lines) and
    # results/model.B.json (a JSON list), in that order, with compensated False and then True.
    rows = {"modelA": MODEL_A, "model.B": MODEL_B}
    assert result_table(rows) == ("Model\tOverall\tEasy\tHard\tShort\tMedium\tLong\n"
                                  "modelA\t42.9\t66.7\t25.0\t33.3\t0.0\t100.0\n"
                                  "model.B\t50.0\t100.0\t25.0\t50.0\t50.0\t50.0")
    assert result_table(rows, compensated=True) == ("Model\tOverall\tEasy\tHard\tShort\tMedium\tLong\n"
                                                    "modelA\t50.0\t66.7\t37.5\t41.7\t12.5\t100.0\n"
                                                    "model.B\t58.3\t100.0\t37.5\t62.5\t62.5\t50.0")
    assert result_table({}) == "Model\tOverall\tEasy\tHard\tShort\tMedium\tLong"
    assert result_table({"m": MODEL_A[:1]}).endswith("\nm\t100.0\t100.0\t-\t100.0\t-\t-")


def test_prediction_files_round_trip(tmp_path):
    records = [dict(MODEL_A[0], question="Qu’est-ce que c’est ?"), *MODEL_A[1:]]
    path = tmp_path / "out" / "model.jsonl"
    write_predictions(path, records)
    text = path.read_text(encoding="utf-8")
    assert "Qu’est-ce" in text and text.endswith("}\n") and text.count("\n") == len(records)  # ensure_ascii=False
    assert read_predictions(path) == records
    (tmp_path / "model.json").write_text(json.dumps(records), encoding="utf-8")  # result.py also reads a JSON list
    assert read_predictions(tmp_path / "model.json") == records
    # One line reads too (result.py's json.load takes a one-line file for a dict and fails).
    write_predictions(path, records[:1])
    assert score(read_predictions(path))["overall"] == 100.0
    path.write_text(json.dumps(dict(records[0], pred="E")) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:1: 'pred' must be A, B, C, D or null"):
        read_predictions(path)
    path.write_text(json.dumps({k: v for k, v in records[0].items() if k != "judge"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:1: missing 'judge'"):
        read_predictions(path)


# --- the embedded set -----------------------------------------------------------------------------------------------

def _longqa(document: str, kind: str, name: str, answer: str) -> dict:
    question = QUESTIONS[kind].format(name=name, what="function")
    return {"instruction": PREAMBLE + document + CLOSING.format(question=question), "output": answer,
            "meta": {"kind": kind, "name": name, "depth": 0.0}}


def _module(i: int, size: int = 0) -> str:
    functions = "".join(f"def p{i}{c}():\n    return {i}\n\n\n" for c in "abcde")
    return HEADER.format(name=f"pkg/m{i}.py") + "# " + "x" * size + "\n" + functions


def test_embedded_set_on_worked_examples():
    examples = [
        _longqa(_module(0), "next_function", "p0a", "p0b"),
        # Its turn is hard, but its document has one other constant: skipped, and the next takes the turn.
        _longqa(HEADER.format(name="c.py") + "A = 1\nB = 2\n", "constant_value", "A", "1"),
        {"instruction": PREAMBLE + "x\n" + CLOSING.format(question="?"), "output": "x"},  # no kind: not used
        _longqa(_module(1, 100), "next_function", "p1a", "p1b"),
        _longqa(_module(2, 200), "next_function", "p2c", "p2d"),
        _longqa(_module(3, 300), "next_function", "p3a", "p3b"),
    ]
    records = embedded_longbench2(examples, lambda texts: [len(t) for t in texts], 10, 400, 700, seed=0)
    assert [r["_id"] for r in records] == [f"embedded-{i:05d}" for i in range(4)]
    assert [r["difficulty"] for r in records] == ["easy", "hard", "easy", "hard"]
    assert [r["question"] for r in records] == [
        f"Which top-level function is defined next after `{name}` in the same file?"
        for name in ("p0a", "p1a", "p2c", "p3a")]
    choices = [{r[f"choice_{x}"] for x in "ABCD"} for r in records]
    assert choices[0] == {"p0b", "p1b", "p2d", "p3b"}  # easy: the other answers of the kind
    assert choices[1] == {"p1b", "p1c", "p1d", "p1e"}  # hard: the document's functions, not the asked-about one
    assert choices[2] == {"p2d", "p0b", "p1b", "p3b"}
    assert choices[3] == {"p3b", "p3c", "p3d", "p3e"}
    assert [r[f"choice_{r['answer']}"] for r in records] == ["p0b", "p1b", "p2d", "p3b"]
    # Thirds of [400, 700] characters of the instruction here: below 500 short, below 600 medium, else long.
    assert [r["length"] for r in records] == ["short", "medium", "long", "long"]
    assert [len(examples[i]["instruction"]) for i in (0, 3, 4, 5)] == [423, 523, 623, 723]
    assert embedded_longbench2(examples, lambda texts: [len(t) for t in texts], 2, 400, 700) == records[:2]
    assert document_items(_module(4) + HEADER.format(name="b.py") + "X = 'a'\nY: int = 2\ndef f(): pass\n",
                          "constant_value") == ["'a'", "2"]
    assert document_items(_module(4) + HEADER.format(name="b.py") + "def f(): pass\n", "defining_file") == [
        "pkg/m4.py", "b.py"]
    assert question_of(examples[0]["instruction"]) == examples[0]["instruction"].split("Question: ")[1].split(
        " Answer with")[0]


@pytest.fixture(scope="module")
def generated_longqa(tiny_tokenizer):
    from longlora.embedded.corpus import stdlib_documents
    from longlora.embedded.longqa import generate_longqa

    def count(texts):
        return [len(ids) for ids in tiny_tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    files = [(d.name, d.text) for d in stdlib_documents("heldout", max_documents=30)]
    return generate_longqa(files, count, 24, 600, 1500, seed=1)[0], count


def test_embedded_set_from_generated_longqa(generated_longqa):
    longqa, count = generated_longqa
    records = embedded_longbench2(longqa, count, 12, 600, 1500, seed=0)
    assert len(records) >= 4 and {r["difficulty"] for r in records} == {"easy", "hard"}
    by_question = {question_of(e["instruction"]): e for e in longqa}
    for i, record in enumerate(records):
        assert tuple(record) == FIELDS and check_record(record, "embedded") == record
        assert record["_id"] == f"embedded-{i:05d}" and record["domain"] == "Code Repository Understanding"
        assert record["sub_domain"] == "Code repo QA" and record["difficulty"] == ("easy", "hard")[i % 2]
        example = by_question[record["question"]]
        assert "Answer with" not in record["question"] and record["question"].endswith("?")
        assert record["context"] == instruction_document(example["instruction"])
        choices = [record[f"choice_{x}"] for x in "ABCD"]
        assert len(set(choices)) == 4 and choices.count(example["output"]) == 1
        assert record[f"choice_{record['answer']}"] == example["output"]
        wrong = [c for c in choices if c != example["output"]]
        if record["difficulty"] == "hard":
            assert all(c in record["context"] for c in wrong)
            assert set(wrong) <= set(document_items(record["context"], example["meta"]["kind"]))
        else:
            assert not any(c in record["context"] for c in wrong)
            assert set(wrong) <= {e["output"] for e in longqa if e["meta"]["kind"] == example["meta"]["kind"]}
        tokens = count([example["instruction"]])[0]
        assert record["length"] == ("short" if tokens < 900 else "medium" if tokens < 1200 else "long")
    assert embedded_longbench2(longqa, count, 12, 600, 1500, seed=0) == records  # deterministic
    other = embedded_longbench2(longqa, count, 12, 600, 1500, seed=1)
    assert [r["question"] for r in other] == [r["question"] for r in records]
    assert [r["answer"] for r in other] != [r["answer"] for r in records]


def test_a_share_of_the_training_questions_is_asked_with_four_choices(generated_longqa):
    """The SFT mix: the same choices as the evaluation set, in our wording, answered with the sentence LongBench v2's
    reader takes; the rest of the questions untouched."""
    longqa, _ = generated_longqa
    asked, turned = with_choice_questions(longqa, 0.5, seed=0)
    assert 0 < turned <= round(0.5 * len(longqa)) and len(asked) == len(longqa)  # those with three wrong choices
    changed = [(old, new) for old, new in zip(longqa, asked, strict=True) if new != old]
    assert len(changed) == turned
    for old, new in changed:
        wrong = [c for c in new["meta"]["choices"] if c != old["output"]]
        in_document = [c in instruction_document(old["instruction"]) for c in wrong]
        assert in_document == [new["meta"]["difficulty"] == "hard"] * 3
        letter = extract_answer(new["output"])
        assert new["output"] == f"The correct answer is ({letter})."
        choices = new["meta"]["choices"]
        assert len(set(choices)) == 4 and choices[LETTERS.index(letter)] == old["output"]
        question = question_of(old["instruction"])
        listed = "\n".join(f"({x}) {c}" for x, c in zip(LETTERS, choices, strict=True))
        assert new["instruction"] == (old["instruction"][: old["instruction"].rindex(question) + len(question)]
                                      + f"\nChoices:\n{listed}\n{CHOICE_REPLY}")
        assert instruction_document(new["instruction"]) == instruction_document(old["instruction"])
        assert "The correct answer is" in new["instruction"] and "insert answer here" not in new["instruction"]
    assert len({new["output"] for _, new in changed}) > 1  # the answer's position is drawn
    assert with_choice_questions(longqa, 0.5, seed=0) == (asked, turned)  # deterministic
    assert with_choice_questions(longqa, 0.0) == (longqa, 0)


# --- prediction -----------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_model(tmp_path, tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny_model")
    return LlamaForCausalLM.from_pretrained(tmp_path / "tiny_model").eval()


def _spy(model, monkeypatch) -> list[dict]:
    calls = []
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_predict_end_to_end_on_a_tiny_llama(tiny_model, tiny_tokenizer, monkeypatch, single_torch_thread,
                                            tmp_path):
    code = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(80))
    records = [_record(_id="a", context=code, answer="B"), _record(_id="b", context="é" + code[:1500], answer="D")]
    calls = _spy(tiny_model, monkeypatch)
    out = predict(tiny_model, tiny_tokenizer, records, max_length=120, max_new_tokens=4, progress=False)
    assert [r["_id"] for r in out] == ["a", "b"] and records[0]["context"] == code  # inputs left alone
    asked = list(calls)  # the generations below go through the spy too
    for record, result, call in zip(records, out, asked, strict=True):
        assert list(result) == [*FIELDS, "response", "pred", "judge"]
        assert result["context"] == record["context"][:1000] and len(result["context"]) == 1000
        assert result["response"] == result["response"].strip() and result["judge"] == (
            result["pred"] == record["answer"])
        # The prompt was cut in the middle to 120 tokens (re-encoding the decoded halves may shift a token or two).
        full = tiny_tokenizer.encode(fill(TEMPLATES["0shot"], record))
        ids = call["input_ids"][0].tolist()
        assert len(full) > 400 and 116 <= len(ids) <= 122 and call["max_new_tokens"] == 4
        assert ids == tiny_tokenizer.encode(truncate_middle(fill(TEMPLATES["0shot"], record), tiny_tokenizer, 120))
        assert ids[:10] == full[:10] and ids[-10:] == full[-10:] and call["do_sample"] is False
        # Greedy: the response is the decoded continuation.
        with torch.no_grad():
            again = tiny_model.generate(input_ids=call["input_ids"], max_new_tokens=4, do_sample=False,
                                        pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):]
        assert result["response"] == tiny_tokenizer.decode(again, skip_special_tokens=True).strip()
    write_predictions(tmp_path / "tiny.jsonl", out)
    assert score(read_predictions(tmp_path / "tiny.jsonl"))["n"] == 2


class _Scripted(torch.nn.Module):
    """A stand-in model that answers with given texts and records what it was asked."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies, self.calls = tokenizer, list(replies), []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, **kwargs):
        self.calls.append((self.tokenizer.decode(input_ids[0]), max_new_tokens, input_ids[0].tolist()))
        reply = self.tokenizer.encode(self.replies.pop(0), add_special_tokens=False)
        return torch.cat([input_ids, torch.tensor([reply + [self.tokenizer.eos_token_id]])], dim=1)


def test_chain_of_thought_answers_after_its_reasoning(tiny_tokenizer):
    model = _Scripted(tiny_tokenizer, ["  First x, then y.\n", "**The correct answer is (B)** because",
                                       "", " The correct answer is D"])
    records = [_record(_id="a"), _record(_id="b", answer="C")]
    out = predict(model, tiny_tokenizer, records, max_length=500, max_new_tokens=7, mode="cot", progress=False,
                  max_new_tokens_cot=99)
    assert [list(r) for r in out] == [[*FIELDS, "response_cot", "response", "pred", "judge"]] * 2
    assert out[0]["response_cot"] == "First x, then y." and out[0]["response"] == "**The correct answer is (B)** " \
        "because" and out[0]["pred"] == "B" and out[0]["judge"] is True
    # An empty reasoning is kept (pred.py would drop the record as a failed API call).
    assert out[1]["response_cot"] == "" and out[1]["pred"] == "D" and out[1]["judge"] is False
    (first, first_tokens, _), (second, second_tokens, _) = model.calls[:2]
    assert (first_tokens, second_tokens) == (99, 7)
    assert first == "<s>" + fill(TEMPLATES["0shot_cot"], records[0])
    assert second == "<s>" + fill(TEMPLATES["0shot_cot_ans"], records[0], cot="First x, then y.")
    assert "The document." not in second and "Let’s think step by step: First x, then y.\n\nBased" in second


def test_no_context_and_chat_template(tiny_tokenizer):
    chat = deepcopy(tiny_tokenizer)  # a copy: the session's fixture stays without a template
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}[USER]{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}[BOT]{% endif %}")
    model = _Scripted(chat, ["The correct answer is (A)", "I cannot tell."])
    out = predict(model, chat, [_record(), _record(_id="y")], max_length=500, mode="no_context", chat=True,
                  progress=False)
    text, _, ids = model.calls[0]
    assert text == "<s>[USER]" + fill(TEMPLATES["0shot_no_context"], _record()) + "[BOT]"
    assert ids.count(chat.bos_token_id) == 1  # the template's BOS only: none added when encoding
    assert "The document." not in text
    assert (out[0]["pred"], out[0]["judge"], out[1]["pred"], out[1]["judge"]) == ("A", False, None, False)
    assert out[1]["context"] == _record()["context"]  # kept whole when shorter than 1000 characters
    with pytest.raises(ValueError, match="unknown LongBench v2 mode"):
        predict(model, chat, [_record()], max_length=500, mode="rag")


# --- the stage ------------------------------------------------------------------------------------------------------

def _stage_params(**section):
    from stages.params import parse_params
    from tests.conftest import tiny_params_dict

    return parse_params(tiny_params_dict(eval_models={"m": {"path": "model", "interpolate": False}},
                                         longbench2={"input": "lb2.jsonl", "max_new_tokens": 16, "max_examples": None,
                                                     **section}))


@pytest.fixture
def stage_project(tmp_path, monkeypatch, tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    records = [_record(_id="e1", difficulty="easy", length="short", answer="A"),
               _record(_id="h1", difficulty="hard", length="medium", answer="B"),
               _record(_id="h2", difficulty="hard", length="long", answer="C")]
    (tmp_path / "lb2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_pred_py_records_result_txt_and_result_py_scores(stage_project, tiny_tokenizer, monkeypatch):
    from stages import longbench2 as stage

    model = _Scripted(tiny_tokenizer, ["The correct answer is (A)", "The correct answer is (D)", "no idea"])
    monkeypatch.setattr("stages._eval.load_model", lambda *_: (model, tiny_tokenizer))
    params = _stage_params()
    assert params.longbench2.max_length == params.model.target_context - 16  # derived: room for the answer
    metrics = stage.run(params, "m")
    out = stage_project / "data/eval_results/longbench2/m"
    predictions = read_predictions(out / "m.jsonl")
    assert [(p["_id"], p["pred"], p["judge"]) for p in predictions] == [("e1", "A", True), ("h1", "D", False),
                                                                      ("h2", None, False)]
    assert (out / "result.txt").read_text(encoding="utf-8") == (
        "Model\tOverall\tEasy\tHard\tShort\tMedium\tLong\nm\t33.3\t100.0\t0.0\t100.0\t0.0\t0.0")
    assert {key: metrics[key] for key in ("overall", "easy", "hard", "short", "medium", "long", "questions",
                                          "nulls")} == {"overall": 33.3, "easy": 100.0, "hard": 0.0, "short": 100.0,
                                                        "medium": 0.0, "long": 0.0, "questions": 3, "nulls": 1}
    assert all(tokens == 16 for _, tokens, _ in model.calls)
    assert all(len(ids) <= params.longbench2.max_length for _, _, ids in model.calls)  # cut as pred.py cuts


def test_stage_compensated_counts_an_unread_answer_as_chance(stage_project, tiny_tokenizer, monkeypatch):
    from stages import longbench2 as stage

    model = _Scripted(tiny_tokenizer, ["The correct answer is (A)", "?", "?"])
    monkeypatch.setattr("stages._eval.load_model", lambda *_: (model, tiny_tokenizer))
    metrics = stage.run(_stage_params(compensated=True), "m")
    assert (metrics["overall"], metrics["hard"]) == (50.0, 25.0)


@pytest.mark.parametrize(("section", "message"), [
    ({"input": "missing.jsonl"}, "longbench2.input 'missing.jsonl': no such file"),
    ({"max_new_tokens": 128}, "longbench2.max_length: model.target_context 128 leaves no room"),
])
def test_stage_bad_input_stops_before_the_model_is_loaded(stage_project, monkeypatch, section, message):
    from stages import longbench2 as stage

    def no_model(*_):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("stages._eval.load_model", no_model)
    with pytest.raises(InputError, match=message):
        stage.run(_stage_params(**section), "m")
    assert not (stage_project / "data/eval_results/longbench2/m").exists()


def test_stage_prompts_a_chat_model_in_its_chat_template(stage_project, tiny_tokenizer, monkeypatch):
    """eval_models.<name>.chat: each prompt is one user turn of the model's own template (the sft model's is the
    format it was fine-tuned in); a model marked chat without a template stops before loading, naming the key."""
    import copy

    from longlora.data.sft import LLAMA2_CHAT_TEMPLATE
    from stages import longbench2 as stage
    from tests.conftest import tiny_params_dict

    def params():
        from stages.params import parse_params

        return parse_params(tiny_params_dict(eval_models={"m": {"path": "model", "chat": True}},
                                             longbench2={"input": "lb2.jsonl", "max_new_tokens": 16,
                                                         "max_examples": None}))

    monkeypatch.setattr("stages._eval.load_model", lambda *_: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(InputError, match=r"eval_models\.m\.chat: true, but the tokenizer of 'model' has no chat "):
        stage.run(params(), "m")
    chatty = copy.deepcopy(tiny_tokenizer)
    chatty.chat_template = LLAMA2_CHAT_TEMPLATE
    chatty.save_pretrained(stage_project / "model")
    model = _Scripted(chatty, ["The correct answer is (A)", "The correct answer is (B)", "(C)"])
    monkeypatch.setattr("stages._eval.load_model", lambda *_: (model, chatty))
    metrics = stage.run(params(), "m")
    assert (metrics["overall"], metrics["nulls"]) == (66.7, 1)
    for text, _, ids in model.calls:
        assert text.startswith(f"{chatty.bos_token}[INST]Please read the following text") and text.endswith("[/INST]")
        assert ids.count(chatty.bos_token_id) == 1  # the template's BOS, not a second one
