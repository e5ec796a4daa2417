"""RULER's tasks as RULER builds and scores them: prompts sized to the length in the model's tokens with the answers
inside, RULER's wording and metrics, its summary.csv byte for byte, the effective length; the stage end to end."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from longlora.choices import RULER_MODEL_TEMPLATES, RULER_TASKS
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
    assert [ruler.tokens_to_generate(t) for t in ("niah_single_1", "vt", "cwe", "fwe")] == [128, 30, 120, 50]


@pytest.mark.parametrize("task", [t for t in RULER_TASKS if t != "cwe"])
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
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
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
    import longlora.embedded.longqa as longqa
    import longlora.embedded.synthetic as synthetic

    sources = " ".join(Path(m.__file__).read_text(encoding="utf-8") for m in (synthetic, longqa)).lower()
    phrases = ["special magic", "memorize", "quiz you", "variable assignment", "most common words",
               "appear most often", "coded text", "frequently appeared", "mentioned in the provided text"]
    for family in ruler.FAMILIES.values():
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
    ({"eval_ruler": {"tasks": ["qa_1"]}}, r"eval_ruler\.tasks: .*'qa_1'.*not built yet"),
    ({"eval_ruler": {"model_template": "llama9"}}, r"eval_ruler\.model_template: unknown RULER model template"),
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
    raw = tiny_params_dict(eval_models={"tiny": {"path": "models/tiny", "extrapolate": True}}, **sections)
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = eval_ruler.main(["tiny", "--params", "params.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    written = [path for path in Path("data").rglob("*") if path.is_file()]
    assert not written, written
