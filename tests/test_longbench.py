"""LongBench: each metric on worked examples (LongBench's own quirks included), the scorer's rules, predict + score
end to end on fixtures written here, the embedded sets, and clear errors for malformed prediction files."""

from __future__ import annotations

import difflib
import json
import random
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.errors import InputError
from longlora.evaluation.longbench import (
    TASKS,
    Example,
    build_prompt,
    classification_score,
    code_sim_score,
    count_score,
    predict_dataset,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_folder,
    stop_ids,
    truncate_middle,
)
from stages import longbench as stage
from stages.params import ParamsError, parse_params
from tests.conftest import tiny_params_dict

# --- the metrics, on examples worked by hand ----------------------------------------------------------------------


def test_qa_f1_normalises_case_punctuation_and_articles():
    # "cat sat on mat" vs "cat on mat": 3 shared words, precision 3/4, recall 1.
    assert qa_f1_score("The cat sat on the mat.", "a cat on mat") == pytest.approx(2 * 0.75 / 1.75)
    assert qa_f1_score("nothing shared", "cat") == 0.0


def test_qa_f1_zh_counts_jieba_words():
    # jieba: 北京 / 是 / 首都 against 北京: precision 1/3, recall 1.
    assert qa_f1_zh_score("北京是首都。", "北京") == pytest.approx(0.5)


def test_rouge_l_is_the_rouge_packages_own():
    # The `rouge` package scores summary-level ROUGE-L over distinct words: the, cat, on, mat of 5 distinct words on
    # each side, F = 0.8 (a plain LCS over the 6 tokens would give 5/6: why LongBench's package is used).
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_score("", "the cat") == 0.0  # `rouge` raises on an empty hypothesis: LongBench scores 0
    # Chinese: jieba words 我 / 爱 / 北京 against 我 / 爱 / 北京 / 天安门: precision 1, recall 3/4.
    assert rouge_zh_score("我爱北京", "我爱北京天安门") == pytest.approx(6 / 7, abs=1e-6)


def test_classification_keeps_longbenchs_removal_while_iterating():
    classes = ["Location", "Entity", "Description", "Human being"]
    assert classification_score("Type: Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Entity", "Location", all_classes=classes) == 0.5
    assert classification_score("Entity", "Location", all_classes=classes) == 0.0
    # Found x, y, xyz; x is dropped (a substring of the reference), which skips y, so 1/2 — LongBench's number.
    assert classification_score("x y xyz", "xyz", all_classes=["x", "y", "xyz"]) == 0.5


def test_retrieval_and_count_reward_the_share_of_right_numbers():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3, or Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    assert count_score("There are 7 unique paragraphs, 7 in all.", "7") == 1.0
    assert count_score("7 or 8", "7") == 0.5


def test_code_similarity_takes_the_first_line_without_fence_or_comment():
    # "    x = foo(1)" vs "    x = foo(2)": 13 of 14 characters match, difflib ratio 26/28 -> fuzz.ratio 93.
    assert code_sim_score("```python\n# comment\n    x = foo(1)\nmore", "    x = foo(2)") == 0.93
    assert code_sim_score("// only comments", "x = 1") == 0.0


def test_fuzzy_ratio_is_difflibs_as_in_longbenchs_environment():
    """LongBench installs fuzzywuzzy without python-Levenshtein: fuzz.ratio is difflib's ratio, rounded. The
    Levenshtein backend gives other numbers on such pairs, so it must not be the one in use."""
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab (x)=_\t") for _ in range(rng.randint(1, 30)))
        b = "".join(rng.choice("ab (x)=_\t") for _ in range(rng.randint(1, 30)))
        expected = 100 if a == b else int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))
        assert code_sim_score(a, b) == expected / 100, (a, b)


# --- the scorer ---------------------------------------------------------------------------------------------------

def _write(folder: Path, name: str, lines: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def _pred(pred, answers, length=100, classes=None) -> dict:
    return {"pred": pred, "answers": answers, "all_classes": classes, "length": length}


def test_first_line_rule_best_answer_rounding_and_categories(tmp_path):
    _write(tmp_path, "triviaqa.jsonl", [_pred("Paris\nLondon", ["London"]), _pred("\nLondon\nx", ["Rome", "London"])])
    _write(tmp_path, "hotpotqa.jsonl", [_pred("Paris\nLondon", ["London"])])
    _write(tmp_path, "2wikimqa.jsonl", [_pred("x y", ["x"]), _pred("x", ["x"]), _pred("w", ["x"])])
    result = score_folder(tmp_path)
    # triviaqa keeps the first line: 0, then (after the leading newline) the best of two answers, 1.
    assert result["scores"]["triviaqa"] == 50.0
    assert result["scores"]["hotpotqa"] == pytest.approx(66.67)  # all lines: "paris london" vs "london"
    assert result["scores"]["2wikimqa"] == 55.56  # (2/3 + 1 + 0) / 3, rounded to 2 decimals
    assert result["categories"] == {"few_shot": 50.0, "multi_doc_qa": round((66.67 + 55.56) / 2, 2)}


def test_longbench_e_buckets_by_length(tmp_path):
    _write(tmp_path, "passage_count.jsonl", [_pred("3", ["3"], 3999), _pred("2", ["3"], 4000),
                                             _pred("3", ["3"], 7999), _pred("3", ["3"], 8000)])
    code = stage.main(["score", str(tmp_path), "--e"])
    assert code == 0
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "passage_count": {"0-4k": 100.0, "4-8k": 50.0, "8k+": 100.0}}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"categories": {"synthetic": 75.0}, "length_buckets": {"0-4k": 100.0, "4-8k": 50.0,
                                                                                "8k+": 100.0}}


@pytest.mark.parametrize(("name", "lines", "message"), [
    ("lcc.jsonl", ['{"pred": "x", "answers": ["y"], "all_classes": null, "length": 1}', '{"pred": "x", "answ'],
     r"lcc\.jsonl:2: not valid JSON"),
    ("lcc.jsonl", [{"answers": ["y"], "all_classes": None, "length": 1}], r"lcc\.jsonl:1: missing \"pred\""),
    ("qasper.jsonl", [_pred("x", ["y"]), {"pred": "x", "all_classes": None, "length": 1}],
     r"qasper\.jsonl:2: missing \"answers\""),
    ("qasper.jsonl", [_pred("x", "y")], r"qasper\.jsonl:1: \"answers\" must be a non-empty list of strings"),
    ("trec.jsonl", [_pred("x", ["y"])], r"trec\.jsonl:1: trec is scored by class names"),
    ("my_task.jsonl", [_pred("x", ["y"])], r"my_task\.jsonl: unknown LongBench dataset 'my_task'"),
])
def test_malformed_prediction_files_name_file_and_line(tmp_path, capsys, name, lines, message):
    path = _write(tmp_path / "pred", name, lines)
    with pytest.raises(InputError, match=message):
        score_folder(path.parent)
    assert stage.main(["score", str(path.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stages.longbench score: error: ") and str(path.parent) in err and "Traceback" not in err
    assert not (path.parent / "result.json").exists()


def test_longbench_e_needs_lengths(tmp_path):
    _write(tmp_path, "lcc.jsonl", [{"pred": "x", "answers": ["y"], "all_classes": None}])
    assert score_folder(tmp_path)["scores"] == {"lcc": 0.0}
    with pytest.raises(InputError, match=r"lcc\.jsonl:1: \"length\" must be a non-negative integer"):
        score_folder(tmp_path, by_length=True)


# --- prompts and prediction ---------------------------------------------------------------------------------------

def test_middle_truncation_keeps_both_ends(tiny_tokenizer):
    prompt = "BEGIN " + " ".join(f"word{i}" for i in range(400)) + " END"
    cut = truncate_middle(prompt, tiny_tokenizer, 40)
    assert cut.startswith("BEGIN") and cut.endswith("END") and "word200" not in cut
    assert len(tiny_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 40 + 2
    assert truncate_middle("short", tiny_tokenizer, 40) == "short"


def test_chat_template_except_where_longbench_skips_it(tiny_tokenizer):
    chat = deepcopy(tiny_tokenizer)  # a copy: the session's fixture stays without a template
    chat.chat_template = ("{% for m in messages %}[USER]{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}[BOT]{% endif %}")
    example = Example({"input": "Who?", "context": "Ann met Bob.", "answers": ["Ann"], "all_classes": None,
                       "length": 3})
    text, has_special = build_prompt("hotpotqa", example, chat, 500, chat=True)
    assert text.startswith("[USER]Answer the question") and text.endswith("Answer:[BOT]") and has_special
    text, has_special = build_prompt("lcc", example, chat, 500, chat=True)
    assert text == "Please complete the code given below. \nAnn met Bob.Next line of code:\n" and not has_special
    assert build_prompt("hotpotqa", example, chat, 500, chat=False)[0] == TASKS["hotpotqa"].prompt.format(
        **example.fields)


def test_samsum_also_stops_at_a_newline(tiny_tokenizer):
    stops = stop_ids("samsum", tiny_tokenizer)
    assert stops[0] == tiny_tokenizer.eos_token_id and tiny_tokenizer.decode([stops[1]]) == "\n"
    assert stop_ids("lcc", tiny_tokenizer) is None


@pytest.fixture
def model_folder(tmp_path, tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny_model")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny_model")
    return tmp_path / "tiny_model"


def test_predictions_are_greedy_continuations_of_the_prompt(model_folder, tiny_tokenizer, single_torch_thread):
    model = LlamaForCausalLM.from_pretrained(model_folder).eval()
    example = Example({"input": "", "context": "def f(x):\n    return x + 1\n" * 30, "answers": ["y = f(2)"],
                       "all_classes": None, "length": 120})
    record = predict_dataset(model, tiny_tokenizer, "lcc", [example], max_length=60, max_new_tokens=5,
                             progress=False)[0]
    assert record["answers"] == ["y = f(2)"] and record["length"] == 120
    text, _ = build_prompt("lcc", example, tiny_tokenizer, 60, chat=False)
    ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] <= 62  # cut in the middle to 60 tokens (re-encoding may shift a token or two)
    with torch.no_grad():
        for _ in range(5):  # the obviously-correct greedy loop: argmax of a full forward pass, one token at a time
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    generated = ids[0, -5:].tolist()
    if tiny_tokenizer.eos_token_id in generated:
        generated = generated[:generated.index(tiny_tokenizer.eos_token_id) + 1]
    assert record["pred"] == tiny_tokenizer.decode(generated, skip_special_tokens=True)


def _inputs(folder: Path) -> None:
    code = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(60))  # far longer than the model's 128
    _write(folder, "lcc.jsonl", [{"input": "", "context": code, "answers": ["def f60(x):"], "all_classes": None,
                                  "length": len(code.split())},
                                 {"input": "", "context": "import os\n", "answers": ["import sys"],
                                  "all_classes": None, "length": 2}])
    _write(folder, "passage_retrieval_en.jsonl", [{"input": "Cats purr.", "context": "Paragraph 1: Dogs bark.\n\n"
                                                   "Paragraph 2: Cats purr.", "answers": ["Paragraph 2"],
                                                   "all_classes": None, "length": 7}])
    _write(folder, "trec.jsonl", [{"input": "Question: Where is Rome?\nType:", "context": "Question: Who?\nType: "
                                   "Human being", "answers": ["Location"],
                                   "all_classes": ["Location", "Human being"], "length": 5}])
    (folder / "lcc_e.jsonl").write_text((folder / "lcc.jsonl").read_text())  # LongBench-E's file of the task
    (folder / "notes.txt").write_text("not a task")


def test_predict_and_score_end_to_end(tmp_path, monkeypatch, model_folder, single_torch_thread):
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path / "lb_inputs")
    params = parse_params(tiny_params_dict(
        # The tiny model has 128 positions; the budget (max_length 250 + 6 new tokens) is past them, on purpose.
        eval_models={"tiny": {"path": str(model_folder), "extrapolate": True},
                     "tiny_pi": {"path": str(model_folder), "interpolate": True}},
        model={"target_context": 256},
        longbench={"input": "lb_inputs", "max_new_tokens": 6, "cpu_threads": 1}))
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n))
    metrics = stage.run(params, "tiny")
    assert threads == [1, torch.get_num_threads()]  # one thread while predicting, then torch's count as it was
    out = tmp_path / "data/longbench/tiny"
    assert sorted(p.name for p in out.iterdir()) == [".longlora-output.json", "lcc.jsonl",
                                                     "passage_retrieval_en.jsonl", "result.json", "summary.json",
                                                     "trec.jsonl"]
    lcc = [json.loads(line) for line in (out / "lcc.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in lcc] == [["def f60(x):"], ["import sys"]]
    assert set(lcc[0]) == {"pred", "answers", "all_classes", "length"} and isinstance(lcc[0]["pred"], str)
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"lcc", "passage_retrieval_en", "trec"}
    assert all(0 <= value <= 100 for value in result.values())
    assert metrics["scores"] == result and metrics["examples"] == {"lcc": 2, "passage_retrieval_en": 1, "trec": 1}
    assert set(metrics["categories"]) == {"code", "synthetic", "few_shot"}
    ran_with = json.loads((tmp_path / "data/logs/longbench@tiny/params.json").read_text())["params"]
    assert ran_with["max_length"] == 250 and ran_with["eval_model"]["path"] == str(model_folder)
    written = json.loads((tmp_path / "data/metrics/longbench/tiny.json").read_text())
    assert written["stage"] == "longbench@tiny" and written["scores"] == result
    # The standalone scorer gives the same numbers from the prediction files alone.
    (out / "result.json").unlink()
    assert stage.main(["score", str(out)]) == 0
    assert json.loads((out / "result.json").read_text()) == result
    # The interpolated instance writes beside it; LongBench-E reads lcc_e.jsonl and scores by length too.
    params = parse_params(tiny_params_dict(
        # The tiny model has 128 positions; the budget (max_length 250 + 6 new tokens) is past them, on purpose.
        eval_models={"tiny": {"path": str(model_folder), "extrapolate": True},
                     "tiny_pi": {"path": str(model_folder), "interpolate": True}},
        model={"target_context": 256}, longbench={"input": "lb_inputs", "max_new_tokens": 6, "longbench_e": True}))
    metrics = stage.run(params, "tiny_pi")
    assert metrics["examples"] == {"lcc": 2} and set(metrics["by_length"]["lcc"]) == {"0-4k", "4-8k", "8k+"}
    out = tmp_path / "data/longbench/tiny_pi"
    assert json.loads((out / "result.json").read_text()) == metrics["by_length"]
    ran_with = json.loads((tmp_path / "data/logs/longbench@tiny_pi/params.json").read_text())["params"]
    assert (out / "lcc.jsonl").exists() and ran_with["eval_model"]["interpolate"] is True


def test_bad_inputs_stop_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "lb", "lcc.jsonl", [{"input": "", "context": 3, "answers": ["x"], "all_classes": None,
                                           "length": 1}])
    raw = tiny_params_dict(eval_models={"m": {"path": str(tmp_path / "absent")}}, longbench={"input": "lb"})
    Path("params.yaml").write_text(json.dumps(raw))
    assert stage.main(["m", "--params", "params.yaml"]) == 2
    assert "lcc.jsonl:1: \"context\" must be a string" in capsys.readouterr().err
    _write(tmp_path / "empty", "notes.jsonl", [{}])
    raw["longbench"]["input"] = "empty"
    Path("params.yaml").write_text(json.dumps(raw))
    assert stage.main(["m", "--params", "params.yaml"]) == 2
    assert "longbench.input 'empty': no LongBench task files" in capsys.readouterr().err
    assert stage.main(["nobody", "--params", "params.yaml"]) == 2
    assert "no model 'nobody' in eval_models" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# --- params -------------------------------------------------------------------------------------------------------

def test_longbench_params_are_checked_and_derived():
    params = parse_params(tiny_params_dict())
    assert params.longbench.max_length == 128 - params.longbench.max_new_tokens
    assert parse_params({"longbench": {"max_new_tokens": None}}).longbench.max_length == 1024 - 512
    with pytest.raises(ParamsError, match=r"longbench\.datasets: .*unknown LongBench tasks \['wiki'\]"):
        parse_params({"longbench": {"datasets": ["lcc", "wiki"]}})
    with pytest.raises(ParamsError, match=r"LongBench-E has no \['narrativeqa'\]"):
        parse_params({"longbench": {"longbench_e": True, "datasets": ["narrativeqa"]}})
    with pytest.raises(ParamsError, match="model name 'score' is reserved"):
        parse_params({"eval_models": {"score": {"path": "x"}}})
    with pytest.raises(ParamsError, match=r"longbench\.out_dir: .*is the same place as|longbench\.out_dir"):
        parse_params({"longbench": {"out_dir": "data/corpus"}})


# --- the embedded sets --------------------------------------------------------------------------------------------

def test_embedded_sets_are_longbench_format_with_checkable_answers(tiny_tokenizer):
    from longlora.embedded.corpus import stdlib_documents
    from longlora.embedded.longbench_data import embedded_longbench

    def count(texts):
        return [len(ids) for ids in tiny_tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    files = [(d.name, d.text) for d in stdlib_documents("heldout", max_documents=15)]
    from longlora.embedded.longqa import CLOSING, PREAMBLE

    longqa = [{"instruction": PREAMBLE + "x = 1\n" + CLOSING.format(question="What is x?"), "output": "1"}]
    sets = embedded_longbench(files, longqa, count, 2, 200, 400, seed=0)
    assert set(sets) <= set(TASKS)
    for dataset, records in sets.items():
        assert records, dataset
        for record in records:
            assert {"input", "context", "answers", "all_classes", "length"} <= set(record)
            assert record["length"] == len(record["context"].split())
            if dataset != "multifieldqa_en":
                assert 200 <= count([record["context"]])[0] <= 400
    assert sets["multifieldqa_en"] == [{"input": "What is x?", "context": "x = 1\n", "answers": ["1"],
                                        "all_classes": None, "length": 3, "dataset": "multifieldqa_en",
                                        "language": "en", "_id": "multifieldqa_en-00000"}]
    sources = dict(files)
    for record in sets["lcc"]:  # the answer is the line right after the context in one source file
        assert any(record["context"] + record["answers"][0] + "\n" in text for text in sources.values())
    for record in sets["passage_count"]:
        paragraphs = record["context"].split("\n\nParagraph ")
        distinct = {p.split(": ", 1)[1] for p in paragraphs}
        assert record["answers"] == [str(len(distinct))] and len(paragraphs) > len(distinct) - 1
    for record in sets["passage_retrieval_en"]:
        number = int(record["answers"][0].removeprefix("Paragraph "))
        paragraphs = record["context"].split("\n\n" + "Paragraph ")
        assert record["input"].split("\n")[0].strip() in paragraphs[number - 1]
        assert sum(record["input"].split("\n")[0].strip() in p for p in paragraphs) == 1


def test_an_instance_never_replaces_files_it_did_not_write(tmp_path, monkeypatch, model_folder):
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path / "lb_inputs")
    mine = tmp_path / "data/longbench/tiny"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    params = parse_params(tiny_params_dict(eval_models={"tiny": {"path": str(model_folder)}},
                                           longbench={"input": "lb_inputs"}))
    with pytest.raises(InputError, match=r"longbench\.out_dir 'data/longbench/tiny' holds files that stage "
                                         r"longbench@tiny did not write \(thesis\.tex"):
        stage.run(params, "tiny")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert not (tmp_path / "data/metrics").exists()
