"""RULER's tasks as RULER builds and scores them: prompts sized to the length in the model's tokens with the answers
inside, RULER's wording and metrics, its QA readers' questions and documents from its files and from the hub's rows,
its summary.csv byte for byte, the effective length; the stage end to end."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path

import pytest

from longlora.choices import RULER_MODEL_TEMPLATES, RULER_OFFLINE_TASKS, RULER_QA_TASKS, RULER_TASKS
from longlora.evaluation import ruler


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped base model's: RULER's worked example for vt needs a vocabulary that spends fewer than 500 tokens
    on it, which the 400-token test tokenizer does not."""
    from transformers import AutoTokenizer

    from tests.conftest import ROOT

    return AutoTokenizer.from_pretrained(ROOT / "data/base_model")


HAYSTACK = ruler.essay_words("It was a bright cold day in April. The clocks were striking thirteen! Was it late? "
                             "Nobody knew. " * 200)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer.tokenize(text))


def test_the_tasks_and_templates_are_the_ones_params_validate_against():
    assert tuple(ruler.TASKS) == RULER_TASKS and tuple(ruler.MODEL_TEMPLATES) == RULER_MODEL_TEMPLATES
    assert ruler.QA_TASKS == RULER_QA_TASKS == RULER_TASKS[-2:] and len(RULER_OFFLINE_TASKS) == 11
    assert [ruler.tokens_to_generate(t) for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_1")] == [128, 30, 120, 50,
                                                                                                    32]
    assert [ruler.qa_dataset(t) for t in RULER_QA_TASKS] == ["squad", "hotpotqa"]


def test_the_chat_template_wraps_the_task_as_rulers_named_templates_do(tokenizer):
    """`chat`: the model's own template around one user turn, in the form of RULER's named ones; for the Llama-2
    format the sft stage saves, exactly RULER's meta-chat but for the spaces inside the brackets."""
    from longlora.data.sft import LLAMA2_CHAT_TEMPLATE

    chatty = copy.deepcopy(tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        ruler.chat_model_template(chatty)
    chatty.chat_template = LLAMA2_CHAT_TEMPLATE
    assert ruler.chat_model_template(chatty) == "[INST]{task_template}[/INST]"  # BOS: the encoding adds it
    chatty.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{ }"
    assert ruler.chat_model_template(chatty).format(task_template="T") == "<<T>>{ }"  # braces kept as they are
    chatty.chat_template = LLAMA2_CHAT_TEMPLATE
    sample, = ruler.build_samples("niah_single_1", chatty, 800, 1, model_template="chat")
    base, = ruler.build_samples("niah_single_1", tokenizer, 800, 1)
    assert sample.prompt.startswith("[INST]A special magic number is hidden within the following text.")
    assert sample.prompt.endswith("[/INST]" + sample.answer_prefix) and sample.answer_prefix == base.answer_prefix
    assert sample.outputs == base.outputs and chatty(sample.prompt)["input_ids"].count(chatty.bos_token_id) == 1


@pytest.mark.parametrize("task", [t for t in RULER_OFFLINE_TASKS if t != "cwe"])
def test_every_prompt_fits_its_length_and_holds_its_answers(tokenizer, task):
    samples = ruler.build_samples(task, tokenizer, 2000, 3, haystack=HAYSTACK)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        # RULER's `length`: the prompt (input and answer prefix) in tokens, plus the tokens to generate.
        assert s.length == _tokens(tokenizer, s.prompt) + ruler.tokens_to_generate(task) <= 2000
        assert s.length > 1600  # the haystack fills the length, up to a step of it
        assert s.outputs and all(answer in s.input for answer in s.outputs)
        assert s.answer_prefix.startswith(ruler.FAMILIES[ruler.TASKS[task][0]].answer_prefix[:10])


def test_cwe_lists_its_ten_common_words_more_often_than_any_other(tokenizer):
    sample, = ruler.build_samples("cwe", tokenizer, 3000, 1)
    listed = re.findall(r"\d+\. (\S+)", sample.input.split("\n")[-2])  # the last list: the question's
    counts = {word: listed.count(word) for word in set(listed)}
    assert len(sample.outputs) == 10 and all(counts[w] == 6 for w in sample.outputs)  # below 4096: 6 and 1
    assert max(c for w, c in counts.items() if w not in sample.outputs) == 1
    assert sample.length <= 3000


def test_niah_wording_is_rulers_singular_for_one_needle_plural_for_several(tokenizer):
    one, = ruler.build_samples("niah_single_1", tokenizer, 1500, 1)
    assert one.input.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                                "it. I will quiz you about the number afterwards.\n" + ruler.NOISE + "\n")
    key = re.search(r"One of the special magic numbers for (\S+) is: (\d{7})\.", one.input).group(1)
    assert one.input.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert one.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    several, = ruler.build_samples("niah_multivalue", tokenizer, 2000, 1, haystack=HAYSTACK)
    assert several.input.startswith("Some special magic numbers are hidden") and len(several.outputs) == 4
    assert several.answer_prefix.endswith("mentioned in the provided text are")


def test_vt_puts_rulers_worked_example_before_the_task(tokenizer):
    sample, = ruler.build_samples("vt", tokenizer, 2500, 1)
    assert sample.input.count("Memorize and track the chain(s)") == 2  # the example's and the task's
    example, task = sample.input.split("\nMemorize and track", 1)
    # RULER's example: 3-letter names, its value 12345 and names redrawn, the answer after the prefix's space.
    assert re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}\n$", example) and "12345" not in example
    chain = re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))", task)
    assert [name for name, _, _ in chain] == sample.outputs and chain[0][2]  # the first holds the value
    assert f"assigned the value {chain[0][2]}" in sample.answer_prefix


def test_samples_are_a_function_of_the_seed(tokenizer):
    a = ruler.build_samples("niah_multikey_2", tokenizer, 800, 2, seed=1)
    b = ruler.build_samples("niah_multikey_2", tokenizer, 800, 2, seed=1)
    c = ruler.build_samples("niah_multikey_2", tokenizer, 800, 2, seed=2)
    assert a == b and a != c


def test_a_length_too_short_for_the_task_is_reported_not_looped_on(tokenizer):
    with pytest.raises(ruler.DoesNotFit):
        ruler.build_samples("vt", tokenizer, 400, 1)
    with pytest.raises(ValueError, match="unknown RULER task 'qa_3'"):
        ruler.build_samples("qa_3", tokenizer, 4000, 1)
    with pytest.raises(ValueError, match=r"qa_1 needs its data set \(squad\)"):
        ruler.build_samples("qa_1", tokenizer, 4000, 1)


def test_metrics_are_rulers():
    preds, refs = ["Alpha and BETA", "gamma"], [["alpha", "beta"], ["delta", "gamma"]]
    assert ruler.string_match_all(preds, refs) == 75.0  # (2/2 + 1/2) / 2
    assert ruler.string_match_part(preds, refs) == 100.0  # any reference found counts in full
    assert ruler.postprocess("  7\x0b1\t \n") == "7\n1"  # control characters become line breaks, then strip
    assert ruler.score_task("niah_multivalue", ["1 2", ""], [["1", "2"], ["3"]]) == (50.0, "1/2")
    assert ruler.score_task("vt", ["x y z"], [["x", "y", "q"]]) == (66.67, "0/1")


def test_summary_csv_is_byte_for_byte_what_rulers_evaluate_writes(tmp_path):
    pandas = pytest.importorskip("pandas")
    results = {"niah_single_1": (100.0, "0/4"), "vt": (66.67, "1/4"), "fwe": (0.0, "4/4")}
    path = ruler.write_summary(tmp_path, results)
    tasks = list(results)
    expected = pandas.DataFrame([["Tasks", *tasks], ["Score", *(results[t][0] for t in tasks)],
                                 ["Nulls", *(results[t][1] for t in tasks)]]).to_csv(index=False)
    assert path.name == "summary.csv" and path.read_text(encoding="utf-8") == expected
    assert ruler.read_summary(path) == results
    assert ruler.write_summary(tmp_path, {"vt": (5.0, "0/1")}).name == "summary-vt.csv"


def test_effective_length_and_weighted_averages():
    averages = {4096: 90.0, 8192: 86.0, 16384: 80.0, 32768: 88.0}
    assert ruler.effective_length(averages) == 8192  # 32K clears it again, but 16K did not
    assert ruler.effective_length({4096: 85.0}) is None
    assert ruler.effective_length({4096: 85.6}) == 4096
    assert ruler.weighted_averages({1: 10.0, 2: 40.0}) == (30.0, 20.0)  # (10 + 2·40) / 3, (2·10 + 40) / 3
    assert ruler.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-10)
    assert ruler.zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-10)


def test_sentences_and_words_of_a_prose_haystack():
    assert ruler.split_sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    assert ruler.essay_words(" a\n\tb  c ") == ["a", "b", "c"]


def test_nothing_the_embedded_models_train_on_uses_rulers_wording():
    """RULER's prompts are new to the embedded models, so their RULER scores measure generalisation: the generators
    of every training text (pre-training mix, SFT questions) never write RULER's phrases."""
    import longlora.embedded.longbench2_data as choices
    import longlora.embedded.longqa as longqa
    import longlora.embedded.synthetic as synthetic

    sources = " ".join(Path(m.__file__).read_text(encoding="utf-8") for m in (synthetic, longqa, choices)).lower()
    phrases = ["special magic", "memorize", "quiz you", "variable assignment", "most common words",
               "appear most often", "coded text", "frequently appeared", "mentioned in the provided text"]
    phrases += ["given documents", "only give me the answer", "do not output any other words"]
    for name, family in ruler.FAMILIES.items():
        if name != "qa":  # its prefix, "Answer:", is a word, not a phrase (and a field name in longqa.py)
            phrases.append(family.answer_prefix.split("{")[0].strip().lower())
    assert not [phrase for phrase in phrases if phrase and phrase in sources]


def test_predictions_are_rulers_records(tokenizer, tmp_path):
    samples = ruler.build_samples("niah_single_1", tokenizer, 800, 2)
    path = ruler.write_predictions(tmp_path, "niah_single_1", samples, ["x", samples[1].outputs[0]])
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [list(r) for r in records] == [["index", "pred", "input", "outputs", "others", "truncation", "length"]] * 2
    assert records[1]["input"] == samples[1].input + samples[1].answer_prefix
    assert ruler.score_task("niah_single_1", [r["pred"] for r in records], [r["outputs"] for r in records]) \
        == (50.0, "0/2")


# -- the QA tasks (scripts/data/synthetic/qa.py) --

SQUAD = {"version": "v2.0", "data": [
    {"title": "Normans", "paragraphs": [
        {"context": "The Normans were a people of Normandy.", "qas": [
            {"question": "Who were the Normans?", "id": "n1", "is_impossible": False,
             "answers": [{"text": "a people of Normandy", "answer_start": 16},
                         {"text": "a people", "answer_start": 16}]},
            {"question": "Who were the Vikings?", "id": "n2", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "a people", "answer_start": 16}]}]},
        {"context": "Bread is baked in Rouen.", "qas": [
            {"question": "Where is bread baked?", "id": "n3", "is_impossible": False,
             "answers": [{"text": "Rouen", "answer_start": 18}]}]},
        {"context": "Apples grow in Caen.", "qas": [
            {"question": "Where do apples grow?", "id": "n4", "is_impossible": False,
             "answers": [{"text": "Caen", "answer_start": 15}]}]}]},
    {"title": "Alps", "paragraphs": [
        {"context": "An Alpine lake is cold.", "qas": [
            {"question": "What is cold?", "id": "a1", "is_impossible": False,
             "answers": [{"text": "An Alpine lake", "answer_start": 0}]}]}]},
]}
"""SQuAD v2.0's format (dev-v2.0.json, RULER's squad.json) in miniature: an impossible question, two articles."""

SQUAD_ROWS = [
    {"id": "n1", "title": "Normans", "context": "The Normans were a people of Normandy.",
     "question": "Who were the Normans?",
     "answers": {"text": ["a people of Normandy", "a people"], "answer_start": [16, 16]}},
    {"id": "n2", "title": "Normans", "context": "The Normans were a people of Normandy.",
     "question": "Who were the Vikings?", "answers": {"text": [], "answer_start": []}},
    {"id": "n3", "title": "Normans", "context": "Bread is baked in Rouen.", "question": "Where is bread baked?",
     "answers": {"text": ["Rouen"], "answer_start": [18]}},
    {"id": "n4", "title": "Normans", "context": "Apples grow in Caen.", "question": "Where do apples grow?",
     "answers": {"text": ["Caen"], "answer_start": [15]}},
    {"id": "a1", "title": "Alps", "context": "An Alpine lake is cold.", "question": "What is cold?",
     "answers": {"text": ["An Alpine lake"], "answer_start": [0]}},
]
"""The same questions as rajpurkar/squad_v2's validation rows have them."""

HOTPOT = [
    {"_id": "h1", "question": "Which river is longer?", "answer": "the Nile", "type": "comparison", "level": "hard",
     "supporting_facts": [["Nile", 0], ["Amazon", 0]],
     "context": [["Nile", ["The Nile is long.", " It flows north."]], ["Amazon", ["The Amazon is wide."]]]},
    {"_id": "h2", "question": "Where does the Nile flow?", "answer": "north", "type": "bridge", "level": "easy",
     "supporting_facts": [["Nile", 1]],
     "context": [["Tiber", ["The Tiber is in Rome."]], ["Nile", ["The Nile is long.", " It flows north."]]]},
]
"""HotpotQA's distractor format (hotpot_dev_distractor_v1.json, RULER's hotpotqa.json) in miniature: a paragraph in
two questions."""

HOTPOT_ROWS = [
    {"id": "h1", "question": "Which river is longer?", "answer": "the Nile", "type": "comparison", "level": "hard",
     "supporting_facts": {"title": ["Nile", "Amazon"], "sent_id": [0, 0]},
     "context": {"title": ["Nile", "Amazon"], "sentences": [["The Nile is long.", " It flows north."],
                                                           ["The Amazon is wide."]]}},
    {"id": "h2", "question": "Where does the Nile flow?", "answer": "north", "type": "bridge", "level": "easy",
     "supporting_facts": {"title": ["Nile"], "sent_id": [1]},
     "context": {"title": ["Tiber", "Nile"], "sentences": [["The Tiber is in Rome."],
                                                          ["The Nile is long.", " It flows north."]]}},
]
"""The same questions as hotpotqa/hotpot_qa (distractor, validation) has them."""


def test_the_qa_readers_give_what_rulers_give():
    # Pinned from RULER's read_squad / read_hotpotqa (scripts/data/synthetic/qa.py) run on these files.
    squad_docs = ["An Alpine lake is cold.", "Apples grow in Caen.", "Bread is baked in Rouen.",
                  "The Normans were a people of Normandy."]
    squad_qas = [
        {"query": "Who were the Normans?", "outputs": ["a people of Normandy", "a people"], "context": [3],
         "more_context": [2, 1]},
        {"query": "Where is bread baked?", "outputs": ["Rouen"], "context": [2], "more_context": [3, 1]},
        {"query": "Where do apples grow?", "outputs": ["Caen"], "context": [1], "more_context": [3, 2]},
        {"query": "What is cold?", "outputs": ["An Alpine lake"], "context": [0], "more_context": []},
    ]
    assert ruler.read_squad(SQUAD) == (squad_qas, squad_docs)
    hotpot_docs = ["Amazon\nThe Amazon is wide.", "Nile\nThe Nile is long. It flows north.",
                   "Tiber\nThe Tiber is in Rome."]
    hotpot_qas = [{"query": "Which river is longer?", "outputs": ["the Nile"], "context": [1, 0]},
                  {"query": "Where does the Nile flow?", "outputs": ["north"], "context": [2, 1]}]
    assert ruler.read_hotpotqa(HOTPOT) == (hotpot_qas, hotpot_docs)
    assert ruler.read_qa("squad", SQUAD) == (squad_qas, squad_docs)


def test_the_hubs_rows_give_what_rulers_files_give():
    assert ruler.qa_from_rows("squad", SQUAD_ROWS) == ruler.read_squad(SQUAD)
    assert ruler.qa_from_rows("hotpotqa", HOTPOT_ROWS) == ruler.read_hotpotqa(HOTPOT)
    converted = ruler.squad_from_rows(SQUAD_ROWS)["data"]
    assert [(a["title"], [p["context"] for p in a["paragraphs"]]) for a in converted] \
        == [(a["title"], [p["context"] for p in a["paragraphs"]]) for a in SQUAD["data"]]
    assert [q["is_impossible"] for p in converted[0]["paragraphs"] for q in p["qas"]] == [False, True, False, False]
    assert [{k: d[k] for k in ("question", "answer", "context")} for d in ruler.hotpotqa_from_rows(HOTPOT_ROWS)] \
        == [{k: d[k] for k in ("question", "answer", "context")} for d in HOTPOT]


def _facts(articles: int = 6, paragraphs: int = 5) -> dict:
    """A SQuAD file of `articles` × `paragraphs` one-sentence paragraphs, a question each."""
    return {"version": "v2.0", "data": [
        {"title": f"Topic {a}", "paragraphs": [
            {"context": f"Fact {k} of topic {a}: the code is {1000 + 10 * a + k}.",
             "qas": [{"question": f"What is the code of fact {k} of topic {a}?", "id": f"{a}.{k}",
                      "is_impossible": False, "answers": [{"text": str(1000 + 10 * a + k), "answer_start": 0}]}]}
            for k in range(paragraphs)]}
        for a in range(articles)]}


def test_qa_documents_are_drawn_and_shuffled_as_rulers_generate_input_output():
    qa = ruler.read_squad(_facts())
    qas, docs = qa
    # Pinned from RULER's generate_input_output after random.seed(42), on the same QAS and DOCS: question 7 among
    # 8 documents (its own, its article's 4 others, 3 drawn), and question 3 among 3 (its own and 2 of its article's).
    for index, num_docs, expected in ((7, 8, [19, 25, 4, 0, 7, 24, 13, 1]), (3, 3, [0, 18, 24])):
        builder = ruler._Builder("qa_1", None, 4096, 42, "base", None, qa)
        text, answer = builder._qa(index, num_docs)
        listed = re.findall(r"Document (\d+):\n(.*)", text)
        assert [int(i) for i, _ in listed] == list(range(1, num_docs + 1))
        assert [docs.index(d) for _, d in listed] == expected and answer == qas[index]["outputs"]
    builder = ruler._Builder("qa_1", None, 4096, 42, "base", None, qa)
    text, _ = builder._qa(0, 65)  # more than there are: every document, repeated as needed, shuffled
    listed = re.findall(r"Document \d+:\n(.*)", text)
    assert sorted(listed) == sorted((docs * 3)[:65]) and listed != (docs * 3)[:65]


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_a_qa_prompt_fits_its_length_and_holds_its_question_and_documents(tokenizer, task):
    if task == "qa_1":
        qa = ruler.read_squad(_facts())
    else:  # ten questions, three paragraphs each
        qa = ruler.read_hotpotqa([{"question": f"Which code does river {q} carry?", "answer": str(2000 + q),
                                   "context": [[f"River {q}.{k}", [f"River {q}.{k} carries", f" code {2000 + q}."]]
                                               for k in range(3)]} for q in range(10)])
    qas, docs = qa
    samples = ruler.build_samples(task, tokenizer, 700, 2, qa=qa)
    family = ruler.FAMILIES["qa"]
    head, tail = family.template.split("{context}")
    per_doc = max(_tokens(tokenizer, f"Document 10:\n{d}\n\n") for d in docs)
    for index, s in enumerate(samples):
        question = qas[index]  # question i for sample i
        assert s.input.startswith(head + "Document 1:\n")
        assert s.input.endswith(tail.format(query=question["query"])) and s.answer_prefix == " Answer:"
        assert s.outputs == question["outputs"]
        parts = re.split(r"(?:^|\n\n)Document (\d+):\n", s.input[len(head):s.input.rindex(tail.split("{")[0])])
        numbers, shown = [int(i) for i in parts[1::2]], parts[2::2]
        assert parts[0] == "" and numbers == list(range(1, len(shown) + 1)) and len(shown) >= 10
        assert set(shown) <= set(docs)
        assert all(docs[i] in shown for i in question["context"] + question.get("more_context", []))
        assert s.length == _tokens(tokenizer, s.prompt) + 32 <= 700
        # the documents fill the length: sample 0's up to one more, the others' up to RULER's step back of 10
        assert s.length > 700 - (1 if index == 0 else 11) * per_doc
    with pytest.raises(ruler.DoesNotFit):
        ruler.build_samples(task, tokenizer, 300, 1, qa=qa)  # ten documents and the template do not fit


def test_qa_is_scored_by_string_match_part():
    refs = [["a people of Normandy", "a people"], ["Rouen"], ["Caen"]]
    assert ruler.score_task("qa_1", ["A people, from France.", "  ", "Caen and Rouen"], refs) == (66.67, "1/3")
    assert ruler.score_task("qa_2", ["the nile"], [["The Nile"]]) == (100.0, "0/1")


def test_a_qa_task_is_read_from_the_hub_and_skipped_with_the_error_when_it_cannot_be(tmp_path, monkeypatch, caplog):
    import datasets

    from stages import eval_ruler
    from stages.params import parse_params
    from tests.conftest import tiny_params_dict

    monkeypatch.chdir(tmp_path)
    asked = []

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        if name == "hotpotqa/hotpot_qa":
            raise ConnectionError("no network")
        return SQUAD_ROWS

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    params = parse_params(tiny_params_dict(eval_ruler={
        "tasks": ["fwe", "qa_1", "qa_2"], "samples": 2, "qa_squad": "rajpurkar/squad_v2",
        "qa_hotpotqa": "hotpotqa/hotpot_qa"}))
    with caplog.at_level("WARNING"):
        data, sources, skipped = eval_ruler._qa_data(params)
    assert asked == [("rajpurkar/squad_v2", None, "validation"), ("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert data == {"qa_1": ruler.read_squad(SQUAD)} and sources == {"qa_1": "rajpurkar/squad_v2"}
    note = "eval_ruler.qa_hotpotqa 'hotpotqa/hotpot_qa' could not be loaded (ConnectionError: no network)"
    assert skipped == {"qa_2": note} and f"qa_2 skipped: {note}" in caplog.text


def test_the_stage_writes_rulers_folders_and_the_effective_length(tokenizer, tmp_path, monkeypatch,
                                                                   single_torch_thread):
    import yaml

    from stages import eval_ruler
    from stages.params import parse_params
    from tests.conftest import tiny_params_dict
    from tests.test_eval_stages import _save_model

    monkeypatch.chdir(tmp_path)
    _save_model(Path("models/tiny"), tokenizer, 128, seed=0)
    raw = tiny_params_dict(
        eval_models={"tiny": {"path": "models/tiny", "extrapolate": True}},
        eval_ruler={"lengths": [512, 1024], "tasks": ["niah_single_1", "niah_single_2", "vt", "fwe"], "samples": 2,
                    "threshold": 0.0})
    metrics = eval_ruler.run(parse_params(raw), "tiny")
    folder = Path("data/eval_results/ruler/tiny")
    rows = list(csv.DictReader((folder / "ruler.csv").read_text(encoding="utf-8").splitlines()))
    fits = {(int(r["length"]), r["task"]): r["nulls"] != "does not fit" for r in rows}
    assert fits == {(512, "niah_single_1"): True, (512, "niah_single_2"): True, (512, "vt"): False,
                    (512, "fwe"): True, (1024, "niah_single_1"): True, (1024, "niah_single_2"): True,
                    (1024, "vt"): True, (1024, "fwe"): True}
    assert metrics["not_fitting"] == ["vt@512"] and metrics["tasks_averaged"] == 3
    for length in (512, 1024):
        summary = ruler.read_summary(folder / str(length) / "summary.csv")
        for task, (score, nulls) in summary.items():
            lines = (folder / str(length) / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines]
            assert len(records) == 2 and all(r["length"] <= length for r in records)
            assert ruler.score_task(task, [r["pred"] for r in records], [r["outputs"] for r in records]) \
                == (score, nulls)  # rescoring the files gives the summary
        averaged = [summary[t][0] for t in ("niah_single_1", "niah_single_2", "fwe")]
        assert metrics["average"][str(length)] == round(sum(averaged) / 3, 2)
    assert metrics["effective_length"] == 1024  # threshold 0: every length clears it
    assert metrics["essay_haystack"] == "the embedded corpus' held-out Python sources"
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load(Path("data/metrics/eval_ruler/tiny.json").read_text())["stage"] == "eval_ruler@tiny"


@pytest.mark.parametrize(("sections", "message"), [
    ({"eval_ruler": {"lengths": [300], "tasks": ["vt"]}},
     r"eval_ruler\.lengths \[300\]: no task of eval_ruler\.tasks fits every length"),
    ({"eval_ruler": {"lengths": [512], "tasks": ["niah_single_2"], "haystack": "absent.txt"}},
     r"eval_ruler\.haystack 'absent\.txt': no such file"),
    ({"eval_ruler": {"lengths": [512], "tasks": ["fwe", "qa_1"], "qa_squad": "absent.json"}},
     r"eval_ruler\.qa_squad 'absent\.json': no such file \(a local path, so the hub was not asked"),
    ({"eval_ruler": {"lengths": [512], "tasks": ["qa_2"]}},
     r"eval_ruler\.tasks: every task is skipped \(eval_ruler\.qa_hotpotqa is null\)"),
    ({"eval_ruler": {"model_template": "llama9"}}, r"eval_ruler\.model_template: unknown RULER model template"),
    ({"eval_ruler": {"lengths": [512], "tasks": ["fwe"], "model_template": "chat"}},
     r"eval_ruler\.model_template: chat, but the tokenizer of eval_models\.tiny has no chat template"),
    ({"eval_ruler": {"lengths": [512], "tasks": ["fwe"]}, "eval_models": {"tiny": {"path": "models/tiny",
                                                                                  "chat": True, "extrapolate": True}}},
     r"eval_models\.tiny\.chat: true, but the tokenizer of 'models/tiny' has no chat template"),
])
def test_bad_input_stops_before_any_work_naming_the_parameter(tokenizer, tmp_path, monkeypatch, capsys,
                                                             sections, message):
    import yaml

    from stages import eval_ruler
    from tests.conftest import tiny_params_dict
    from tests.test_eval_stages import _save_model

    monkeypatch.chdir(tmp_path)
    _save_model(Path("models/tiny"), tokenizer, 128, seed=0)
    capsys.readouterr()  # its progress bar
    raw = tiny_params_dict(**{"eval_models": {"tiny": {"path": "models/tiny", "extrapolate": True}}, **sections})
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = eval_ruler.main(["tiny", "--params", "params.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    written = [path for path in Path("data").rglob("*") if path.is_file()]
    assert not written, written


def test_the_stage_answers_qa_from_rulers_file_and_skips_a_qa_task_without_data(tokenizer, tmp_path, monkeypatch,
                                                                               caplog, single_torch_thread):
    from stages import eval_ruler
    from stages.params import parse_params
    from tests.conftest import tiny_params_dict
    from tests.test_eval_stages import _save_model

    monkeypatch.chdir(tmp_path)
    _save_model(Path("models/tiny"), tokenizer, 128, seed=0)
    Path("squad.json").write_text(json.dumps(_facts()), encoding="utf-8")
    raw = tiny_params_dict(
        eval_models={"tiny": {"path": "models/tiny", "extrapolate": True}},
        eval_ruler={"lengths": [1024], "tasks": ["fwe", "qa_1", "qa_2"], "samples": 2, "qa_squad": "squad.json",
                    "threshold": 0.0})
    with caplog.at_level("WARNING"):
        metrics = eval_ruler.run(parse_params(raw), "tiny")
    note = "eval_ruler.qa_hotpotqa is null"
    assert metrics["skipped"] == {"qa_2": note} and f"qa_2 skipped: {note}" in caplog.text
    assert metrics["qa_data"] == {"qa_1": "squad.json"} and metrics["tasks_averaged"] == 2
    folder = Path("data/eval_results/ruler/tiny")
    rows = list(csv.DictReader((folder / "ruler.csv").read_text(encoding="utf-8").splitlines()))
    assert [(r["task"], r["nulls"].startswith("skipped"), r["averaged"]) for r in rows] \
        == [("fwe", False, "True"), ("qa_1", False, "True"), ("qa_2", True, "False")]
    assert rows[2]["nulls"] == f"skipped: {note}" and rows[2]["score"] == ""
    summary = ruler.read_summary(folder / "1024/summary.csv")
    assert list(summary) == ["fwe", "qa_1"] and not (folder / "1024/qa_2.jsonl").exists()
    records = [json.loads(line) for line in (folder / "1024/qa_1.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["outputs"] for r in records] == [["1000"], ["1001"]]  # questions 0 and 1
    assert all(r["input"].endswith("?" + " Answer:") and r["length"] <= 1024 for r in records)
    assert ruler.score_task("qa_1", [r["pred"] for r in records], [r["outputs"] for r in records]) == summary["qa_1"]
    assert metrics["average"]["1024"] == round((summary["fwe"][0] + summary["qa_1"][0]) / 2, 2)


def test_a_chat_marker_bos_stays_in_the_chat_template_since_the_encoding_adds_none(smol_chat_model_dir):
    """SmolLM2's BOS is ChatML's `<|im_start|>` and encoding adds no BOS: the marker is part of the turn, kept."""
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(smol_chat_model_dir)
    wrapper = ruler.chat_model_template(smol)
    assert wrapper.startswith("<|im_start|>system\n") and wrapper.endswith(
        "<|im_start|>user\n{task_template}<|im_end|>\n<|im_start|>assistant\n")
    sample, = ruler.build_samples("niah_single_1", smol, 1500, 1, model_template="chat")
    ids = smol(sample.prompt)["input_ids"]
    assert ids[0] == smol.bos_token_id and ids.count(smol.convert_tokens_to_ids("<|im_start|>")) == 3
