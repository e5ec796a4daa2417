"""Stage eval_harness: lm-eval's own evaluator on the model as the pipeline loads it. Its accuracy on the local
LongBench v2 task is recomputed here from the model's own log-likelihoods; the local task's prompt is lm-eval's
longbench2 prompt; tasks sharing their metadata run together; bad input stops before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.errors import InputError
from stages import eval_harness
from stages.params import ParamsError, parse_params
from tests.conftest import HARNESS_TASKS, tiny_params_dict

CONTEXTS = ["x = 1\ny = 2\n", "def f():\n    return 3\n", "NAME = 'abc'\n", "z = 4\n" * 3, "w = 5\n"]


def _records() -> list[dict]:
    return [{"_id": f"r{i}", "domain": "Code Repository Understanding", "sub_domain": "Code repo QA",
             "difficulty": "easy" if i % 2 else "hard", "length": "short", "question": f" Which value, {i}? ",
             "choice_A": "1", "choice_B": "2", "choice_C": "3", "choice_D": "abc", "answer": "ABCD"[i % 4],
             "context": context} for i, context in enumerate(CONTEXTS)]


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_tokenizer, single_torch_thread):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "lb2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(**section):
    harness = {"include_path": str(HARNESS_TASKS), "metadata": {"longbench2_path": "lb2.jsonl"}, "limit": None,
               "max_length": 512, **section}
    return parse_params(tiny_params_dict(eval_models={"m": {"path": "model", "interpolate": False}},
                                         eval_harness=harness))


def _prompt(record: dict) -> str:
    """lm-eval's longbench2 prompt (tasks/longbench2/_longbench_common_yaml), written out here for the record."""
    return ("Please read the following text and answer the question below.\n\n<text>\n" + record["context"]
            + "\n</text>\n\nWhat is the correct answer to this question: " + record["question"].strip()
            + "\nChoices:\n" + "".join(f"({x}) {record['choice_' + x]}\n" for x in "ABCD") + "\nAnswer:")


@torch.no_grad()
def _log_likelihoods(folder: Path, tokenizer) -> list[list[float]]:
    """Each record's log-likelihood of " A" … " D" after its prompt (lm-eval's target delimiter " "), by the model
    itself: the context encoded with BOS, the continuation the tokens the whole text adds to it."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    found = []
    for record in _records():
        context = tokenizer(_prompt(record))["input_ids"]
        scores = []
        for letter in "ABCD":
            continuation = tokenizer(_prompt(record) + " " + letter)["input_ids"][len(context):]
            ids = torch.tensor([context + continuation])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation)))
        found.append(scores)
    return found


def test_accuracy_is_the_models_own_choice_by_log_likelihood(project, tiny_tokenizer):
    metrics = eval_harness.run(_params(), "m")
    out = project / "data/eval_results/harness/m"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in (out / "samples_longlora_longbench2.jsonl").read_text().splitlines()]
    expected = _log_likelihoods(project / "model", tiny_tokenizer)
    assert [[float(r[0]) for r in s["filtered_resps"]] for s in samples] == [
        pytest.approx(scores, abs=1e-4) for scores in expected]
    right = [scores.index(max(scores)) == "ABCD".index(r["answer"])
             for scores, r in zip(expected, _records(), strict=True)]
    acc = results["results"]["longlora_longbench2"]["acc,none"]
    assert acc == pytest.approx(sum(right) / len(right))
    assert metrics["results"] == {"longlora_longbench2": {"acc": acc}}
    assert metrics["samples"] == {"longlora_longbench2": 5}
    assert [s["doc"]["_id"] for s in samples] == [r["_id"] for r in _records()]
    assert samples[0]["arguments"][0][0] == _prompt(_records()[0])  # lm-eval's prompt, filled from our record
    assert [s["target"] for s in samples] == [r["answer"] for r in _records()]
    # What differs between runs and machines is in the run log, not in the output DVC hashes.
    assert not set(eval_harness.VOLATILE_FIELDS) & set(results)
    logged = json.loads((project / "data/logs/eval_harness@m/lm_eval_environment.json").read_text())
    assert "date" in logged and "pretty_env_info" in logged
    assert results["config"]["random_seed"] == 1234 and results["max_length"] == 512


def test_the_local_prompt_is_lm_evals_longbench2_prompt():
    """The local task is lm-eval's longbench2 task on THUDM's field names (lm-eval's copy of the set has a list
    `choices`); everything else about scoring is lm-eval's own."""
    import lm_eval

    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/longbench2/_longbench_common_yaml").read_text())
    ours = yaml.load((HARNESS_TASKS / "longlora_longbench2.yaml").read_text(), Loader=_IgnoreTags)
    for index, letter in enumerate("ABCD"):
        theirs["doc_to_text"] = theirs["doc_to_text"].replace(f"{{{{choices[{index}]}}}}", f"{{{{choice_{letter}}}}}")
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list"):
        assert ours[key] == theirs[key], key


class _IgnoreTags(yaml.SafeLoader):
    """Reads lm-eval's `!function` tags as plain strings."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def test_tasks_that_share_metadata_run_together():
    params = parse_params(tiny_params_dict(eval_harness={
        "tasks": ["ruler", "longbench2", "babilong"], "metadata": {"max_seq_lengths": [4096], "pretrained": "m"},
        "task_metadata": {"babilong": {"max_seq_lengths": "4k"}}}))
    shared = {**params.eval_harness.metadata, "max_seq_lengths": [4096], "pretrained": "m"}
    assert eval_harness.task_runs(params) == [(["ruler", "longbench2"], shared),
                                              (["babilong"], {**shared, "max_seq_lengths": "4k"})]
    with pytest.raises(ParamsError, match="task_metadata names \\['ruler'\\]"):
        parse_params(tiny_params_dict(eval_harness={"tasks": ["babilong"], "task_metadata": {"ruler": {}}}))


def test_headline_numbers_keep_metrics_and_filters_and_drop_stderr():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 1.0,
                                 "sample_len": 4}},
               "groups": {"g": {"alias": "g", "acc,none": 0.25, "acc_stderr,none": "N/A"}}}
    assert eval_harness.headline_numbers(results) == {"t": {"acc": 0.5, "em.strict": 1.0}, "g": {"acc": 0.25}}
    merged = {"results": {"a": {"acc,none": 1}}, "config": {"model": "x"}}
    eval_harness.merge_results(merged, {"results": {"b": {"acc,none": 0}}, "config": {"model": "y"}, "date": 1})
    assert merged == {"results": {"a": {"acc,none": 1}, "b": {"acc,none": 0}}, "config": {"model": "x"}, "date": 1}


@pytest.mark.parametrize(("section", "message"), [
    ({"metadata": {"longbench2_path": None}}, "eval_harness.metadata.longbench2_path: the task longlora_longbench2"),
    ({"metadata": {"longbench2_path": "missing.jsonl"}}, "'missing.jsonl': no such file"),
    ({"include_path": "nowhere"}, "eval_harness.include_path 'nowhere': no such folder"),
    ({"tasks": ["no_such_task"]}, r"eval_harness.tasks: \['no_such_task'\] are neither lm-eval"),
])
def test_bad_input_stops_before_the_model_is_loaded(project, monkeypatch, section, message):
    def no_model(*_):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("stages._eval.load_model", no_model)
    with pytest.raises(InputError, match=message):
        eval_harness.run(_params(**section), "m")
    assert not (project / "data/eval_results/harness/m").exists()


def test_a_malformed_local_file_names_file_and_line(project):
    records = _records()
    records[2]["answer"] = "E"
    Path("lb2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(InputError, match="lb2.jsonl:3: 'answer' is 'E'"):
        eval_harness.run(_params(), "m")
