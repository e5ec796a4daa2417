"""The report stage on the evaluation stages' outputs of three models, and the model cards
(longlora/method/modelcard.py):
what the report, the cards with results and the summary say, and that they say it the same way twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from longlora.evaluation.report import comparison_markdown, model_results, summary_text
from longlora.method.modelcard import CARD_FILE, EVALUATION_HEADING, merged_model_card, with_evaluation
from stages import report
from stages.params import load_params, parse_params
from tests.conftest import tiny_params_dict

LENGTHS = (32, 64, 128)
PERPLEXITY = {"base": (50.0, 80.0, 300.0), "base_pi": (90.0, 95.5, 140.25), "extended": (60.0, 58.5, 61.125),
              "sft": (70.0, 68.0, 72.0)}
PASSKEY = {"base": (1.0, 0.0, 0.0), "base_pi": (0.5, 0.0, 0.0), "extended": (1.0, 0.5, 0.5), "sft": (1.0, 1.0, 0.5)}
LONGQA = {"base": (0.0, 1.5), "base_pi": (0.0, 2.0), "extended": (3.125, 10.5), "sft": (25.0, 40.25)}
LONGBENCH = {"base": {"lcc": 5.0, "passage_count": 0.0}, "base_pi": {"lcc": 10.0, "passage_count": 0.0},
             "extended": {"lcc": 20.5, "passage_count": 5.0}, "sft": {"lcc": 30.0, "passage_count": 2.5}}
# RULER averages at 64 and 128 tokens and the effective length (0: not even the shortest clears the threshold).
RULER = {"base": ((10.0, 0.0), 0), "base_pi": ((20.0, 5.0), 0), "extended": ((90.0, 70.5), 64),
         "sft": ((95.0, 88.25), 128)}
# LongBench v2 accuracies (overall, easy, hard, short, medium, long; None: no question of that group) and lm-eval's acc.
LONGBENCH2 = {"base": (25.0, 50.0, 0.0, 25.0, None, 25.0), "base_pi": (12.5, 25.0, 0.0, 12.5, None, 0.0),
              "extended": (37.5, 50.0, 25.0, 50.0, None, 25.0), "sft": (50.0, 75.0, 25.0, 50.0, None, 50.0)}
HARNESS = {"base": 0.25, "base_pi": 0.125, "extended": 0.375, "sft": 0.5}
ROPE = {"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 128,
          "rope_parameters": ROPE, "tie_word_embeddings": True}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _step(stage: str, data: str, base: str) -> dict:
    """A training step as extension.json describes it (what extend and sft write, `training_data` added by merge)."""
    run = {"adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-08, "data": "data/packed", "deepspeed": None,
           "global_batch_size": 64, "gradient_checkpointing": True, "lr": 2e-05, "lr_schedule": "constant_with_warmup",
           "max_grad_norm": 1.0, "max_steps": 1000 if stage == "extend" else 560, "precision": "bf16", "seed": 0,
           "warmup_steps": 20, "weight_decay": 0.0}
    return {"attention_in_training": "s2", "base_model": base, "method": "lora_plus", "original_context": 32,
            "target_context": 128, "rope_parameters": ROPE, "s2attn_group_size": 32, "training_data": data,
            "params": {stage: run, "lora": {"alpha": 16, "r": 8, "target_modules": ["q_proj", "k_proj"]}}}


def _card(stages: list[str]) -> ModelCard:
    data = {"extend": "togethercomputer/RedPajama-Data-1T-Sample", "sft": "data/corpus/longqa.json"}
    steps = [(stage, _step(stage, data[stage], "meta-llama/Llama-2-7b-hf")) for stage in stages]
    return merged_model_card(steps, "meta-llama/Llama-2-7b-hf", CONFIG, parameters=1234567, dtype="bfloat16",
                             command=f"dvc repro merge@{stages[-1]}", license="llama2")


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A project whose three eval_models were evaluated (metrics files and heatmaps as the evaluation stages write
    them) and whose two merged folders carry merge's card; the tiny params; cwd is the project."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict()), encoding="utf-8")
    params = load_params("params.yaml")
    for name in params.eval_models:
        _write_json(params.destination(f"eval_perplexity@{name}")[2], {
            "ppl": {str(n): v for n, v in zip(LENGTHS, PERPLEXITY[name], strict=True)},
            "ppl_windowed": {str(n): v + 1 for n, v in zip(LENGTHS, PERPLEXITY[name], strict=True)}})
        _write_json(params.destination(f"eval_passkey@{name}")[2], {
            "accuracy": sum(PASSKEY[name]) / 3,
            "by_length": {str(n): v for n, v in zip(LENGTHS, PASSKEY[name], strict=True)}})
        _write_json(params.destination(f"eval_longqa@{name}")[2], {
            "exact_match": LONGQA[name][0], "f1": LONGQA[name][1], "questions": 64, "skipped": 0})
        _write_json(params.destination(f"longbench@{name}")[2], {
            "stage": f"longbench@{name}", "model": name, "scores": LONGBENCH[name],
            "categories": {"code": LONGBENCH[name]["lcc"]}})
        _write_json(params.destination(f"longbench2@{name}")[2], {
            **dict(zip(("overall", "easy", "hard", "short", "medium", "long"), LONGBENCH2[name], strict=True)),
            "questions": 8, "nulls": 2})
        _write_json(params.destination(f"eval_harness@{name}")[2], {
            "results": {"longlora_longbench2": {"acc": HARNESS[name]}}, "samples": {"longlora_longbench2": 8},
            "lm_eval_version": "0.4.13"})
        (low, high), effective = RULER[name]
        _write_json(params.destination(f"eval_ruler@{name}")[2], {
            "average": {"64": low, "128": high}, "effective_length": effective, "wavg_inc": 0.0, "wavg_dec": 0.0})
        for stage in ("eval_passkey", "eval_ruler"):
            heatmap = params.destination(f"{stage}@{name}")[0] / "heatmap.png"
            heatmap.parent.mkdir(parents=True)
            heatmap.write_bytes(f"{stage} png of {name}".encode())
    for source, stages in (("extend", ["extend"]), ("sft", ["extend", "sft"])):
        folder = params.section(f"merge@{source}").out_dir
        folder.mkdir(parents=True)
        _card(stages).save(folder / CARD_FILE)
    return params


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_report_puts_every_evaluation_side_by_side(evaluated, tmp_path, capsys):
    metrics = report.run(evaluated)
    out = Path("data/report")
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "| extended | 60.00 | 58.50 | 61.12 |" in text  # strided perplexity by length
    assert "| base_pi | 91.00 | 96.50 | 141.25 |" in text  # LongLoRA's own
    assert "| sft | 1.00 | 1.00 | 0.50 | 0.83 |" in text  # passkey by length, then overall
    assert "| model | lcc | passage_count | average |" in text and "| extended | 20.50 | 5.00 | 12.75 |" in text
    # The plot it drew and the heatmaps it copied are beside it, linked relatively.
    assert "![perplexity vs context length](perplexity.png)" in text
    png = (out / "perplexity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"atplotlib" not in png
    for name in evaluated.eval_models:
        assert f"![passkey retrieval: {name}](passkey/{name}.png)" in text
        assert (out / f"passkey/{name}.png").read_bytes() == f"eval_passkey png of {name}".encode()
        assert f"![RULER: {name}](ruler/{name}.png)" in text
        assert (out / f"ruler/{name}.png").read_bytes() == f"eval_ruler png of {name}".encode()
    assert "| model | 64 | 128 | effective length |" in text
    assert "| base | 10.00 | 0.00 | <64 |" in text and "| sft | 95.00 | 88.25 | 128 |" in text
    assert "cp data/report/models/sft/README.md /tmp/upload/README.md" in text

    summary = (out / "summary.txt").read_text(encoding="utf-8").splitlines()
    assert summary[:11] == [
        "model     ppl@32  ppl@64  ppl@128  passkey@32  passkey@64  passkey@128",
        "base       50.00   80.00   300.00        1.00        0.00         0.00",
        "base_pi    90.00   95.50   140.25        0.50        0.00         0.00",
        "extended   60.00   58.50    61.12        1.00        0.50         0.50",
        "sft        70.00   68.00    72.00        1.00        1.00         0.50",
        "",
        "model     LongQA EM  LongQA F1  LongBench  LongBench v2  RULER@64  RULER@128  RULER length",
        "base           0.00       1.50       2.50         25.00     10.00       0.00           <64",
        "base_pi        0.00       2.00       5.00         12.50     20.00       5.00           <64",
        "extended       3.12      10.50      12.75         37.50     90.00      70.50            64",
        "sft           25.00      40.25      16.25         50.00     95.00      88.25           128"]
    assert "\n".join(summary[:11]) in text
    assert "| sft | 25.00 | 40.25 |" in text  # the held-out questions' table
    assert "| model | overall | easy | hard | short | medium | long |" in text
    assert "| extended | 37.50 | 50.00 | 25.00 | 50.00 | - | 25.00 |" in text  # LongBench v2, as result.py
    assert "| model | longlora_longbench2 acc |" in text and "| base_pi | 0.1250 |" in text  # lm-eval's numbers
    assert report.main(["summary"]) == 0
    assert summary[10] in capsys.readouterr().out

    assert metrics["models"]["extended"] == {"evaluated": ["eval_perplexity", "eval_passkey", "eval_longqa",
                                                           "eval_ruler", "eval_harness", "longbench", "longbench2"],
                                             "longbench_average": 12.75}
    assert metrics["cards"] == {"extend": "data/report/models/extend/README.md",
                                "sft": "data/report/models/sft/README.md"}
    assert json.loads(Path("data/metrics/report.json").read_text()) == metrics


def test_the_cards_with_results_parse_and_carry_the_evaluated_models_numbers(evaluated):
    report.run(evaluated)
    card = ModelCard.load(Path("data/report/models/sft") / CARD_FILE)
    merged = ModelCard.load(Path("data/sft_model") / CARD_FILE)
    # Everything merge wrote is kept; the Evaluation section now holds the tables, the metadata the results.
    assert card.data.base_model == merged.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.license == "llama2" and card.data.pipeline_tag == "text-generation"
    assert card.text.split(EVALUATION_HEADING)[0] == merged.text.split(EVALUATION_HEADING)[0]
    assert card.text.endswith(merged.text[merged.text.index("## Reproduce"):])
    assert "This model is `sft` in the tables below" in card.text and "| sft | 70.00 | 68.00 | 72.00 |" in card.text
    results = {(r.task_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("Language modelling", "perplexity (strided) at 128 tokens")] == 72.0
    assert results[("Language modelling", "perplexity (LongLoRA eval.py) at 32 tokens")] == 71.0
    assert results[("Passkey retrieval", "passkey accuracy at 128 tokens")] == 0.5
    assert results[("LongBench", "LongBench lcc")] == 30.0
    assert {r.metric_type for r in card.data.eval_results if r.task_name == "LongBench"} == {"code_sim", "count"}
    assert card.data.model_name == "Llama-2-7b-hf-longlora-128-sft"
    extended = ModelCard.load(Path("data/report/models/extend") / CARD_FILE)
    assert "This model is `extended`" in extended.text and extended.data.model_name == "Llama-2-7b-hf-longlora-128"


def test_the_report_is_the_same_bytes_twice_and_says_what_was_not_evaluated(evaluated, tmp_path):
    report.run(evaluated)
    first = _snapshot(Path("data/report"))
    shutil.rmtree("data/report")
    Path("data/metrics/report.json").unlink()
    report.run(evaluated)
    assert _snapshot(Path("data/report")) == first

    Path("data/metrics/longbench/sft.json").unlink()
    metrics = report.run(evaluated)
    assert metrics["models"]["sft"] == {"evaluated": ["eval_perplexity", "eval_passkey", "eval_longqa", "eval_ruler",
                                                      "eval_harness", "longbench2"], "longbench_average": None}
    summary = Path("data/report/summary.txt").read_text(encoding="utf-8")
    assert "sft           25.00      40.25          -         50.00     95.00      88.25           128" in summary
    assert "not one answer could be read" not in summary  # 2 of 8 unread
    _write_json(Path("data/metrics/longbench2/base.json"), {"overall": 0.0, "questions": 8, "nulls": 8})
    report.run(evaluated)
    summary = Path("data/report/summary.txt").read_text(encoding="utf-8")
    assert "LongBench v2: not one answer could be read from base: a model that does not write" in summary
    text = Path("data/report/README.md").read_text(encoding="utf-8")
    assert "Not evaluated (left out; `dvc repro` runs them): longbench@sft (no data/metrics/longbench/sft.json)" in text
    assert "| sft | - | - | - |" in text


def test_a_merged_model_that_no_evaluation_names_is_left_out_and_the_report_says_so(evaluated):
    """The report reads the cards of evaluated merged folders only: dvc.yaml reaches those through their evaluations,
    and `dvc repro report` must not run a merge that nothing evaluates."""
    raw = tiny_params_dict()
    raw["eval_models"] = {"sft": {"path": "data/sft_model"}}
    metrics = report.run(parse_params(raw))
    assert not Path("data/report/models/extend").exists() and metrics["cards"] == {
        "sft": "data/report/models/sft/README.md"}
    text = Path("data/report/README.md").read_text(encoding="utf-8")
    assert "No card here for `data/extended_model` (merge@extend): no `eval_models` entry names it" in text
    assert "| base |" not in text


def test_merges_card_states_the_base_model_method_context_rope_data_recipe_and_command(tmp_path):
    card = _card(["extend", "sft"])
    card.save(tmp_path / CARD_FILE)
    loaded = ModelCard.load(tmp_path / CARD_FILE)
    assert loaded.data.base_model == "meta-llama/Llama-2-7b-hf" and loaded.data.library_name == "transformers"
    assert loaded.data.datasets == ["togethercomputer/RedPajama-Data-1T-Sample"]  # hub names only: local paths in text
    assert loaded.data.license == "llama2" and loaded.data.pipeline_tag == "text-generation"
    assert {"longlora", "long-context", "s2-attn", "lora", "rope-linear", "sft"} <= set(loaded.data.tags)
    text = loaded.text
    assert "| context length | 32 → 128 tokens (`max_position_embeddings` 128) |" in text
    assert '`{"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"}`' in text
    assert "1,234,567 parameters, bfloat16 weights" in text
    assert "### 1. Context extension (stage `extend`)" in text and "### 2. Supervised fine-tuning (stage `sft`)" in text
    assert "| training data | `data/corpus/longqa.json` |" in text
    assert "| steps and batch | 1000 steps, global batch 64 sequences |" in text
    assert "S²-Attn (shifted sparse attention), groups of 32 tokens" in text
    assert "LoRA on q_proj, k_proj, r=8, alpha=16" in text
    assert "```bash\ndvc repro merge@sft\n```" in text
    assert f"{EVALUATION_HEADING}\n\nNot in this folder" in text
    # A local base model is no hub reference: it is named in the text, not in the metadata the hub validates.
    steps = [("extend", _step("extend", "data/corpus/pretrain.jsonl", "data/base_model"))]
    (tmp_path / "data/base_model").mkdir(parents=True)
    local = merged_model_card(steps, str(tmp_path / "data/base_model"), CONFIG, parameters=1, dtype="float32",
                              command="dvc repro merge@extend")
    assert local.data.base_model is None and local.data.datasets is None and local.data.license is None
    assert "sft" not in local.data.tags


def test_with_evaluation_replaces_only_the_evaluation_section():
    card = with_evaluation(_card(["extend"]), "the tables", [])
    assert f"{EVALUATION_HEADING}\n\nthe tables\n\n## Reproduce" in card.text
    assert card.text.count("## ") == _card(["extend"]).text.count("## ")


def test_results_are_read_from_the_evaluation_metrics_and_shown_the_same_way_everywhere():
    """The report and the Prefect flow's comparison artifact share these tables."""
    results = {"a": model_results({"eval_perplexity": {"ppl": {"64": 2.5, "32": 3.0}},
                                   "longbench": {"scores": {"lcc": 40.0, "trec": 50.0}}}),
               "b": model_results({"eval_passkey": {"accuracy": 0.25, "by_length": {"32": 0.5, "64": 0.0}},
                                   "eval_ruler": {"average": {"64": 12.5}, "effective_length": 0},
                                   "longbench2": {"overall": 37.5, "easy": None},
                                   "eval_harness": {"results": {"t": {"acc": 0.75, "f1.strict": 0.5}},
                                                    "samples": {"t": 4}}})}
    assert results["b"].harness == {"t acc": 0.75, "t f1.strict": 0.5} and results["b"].longbench2["easy"] is None
    assert results["a"].perplexity == {32: 3.0, 64: 2.5} and results["a"].longbench_average == 45.0
    markdown = comparison_markdown(results)
    assert "| model | 32 | 64 |\n|---|---|---|\n| a | 3.00 | 2.50 |\n| b | - | - |" in markdown
    assert "| a | - | - | - |\n| b | 0.50 | 0.00 | 0.25 |" in markdown
    assert "| a | 40.00 | 50.00 | 45.00 |\n| b | - | - | - |" in markdown
    assert "| a | - | - |\n| b | 12.50 | <64 |" in markdown  # RULER at 64 tokens, below the threshold there
    assert summary_text(results).splitlines()[1:7] == [
        "a        3.00    2.50           -           -",
        "b           -       -        0.50        0.00",
        "",
        "model  LongQA EM  LongQA F1  LongBench  LongBench v2  RULER@64  RULER length",
        "a              -          -      45.00             -         -             -",
        "b              -          -          -         37.50     12.50           <64"]
    assert "| a | - | - |\n| b | 0.7500 | 0.5000 |" in markdown  # lm-eval's numbers
    assert "| b | 37.50 | - | - | - | - | - |" in markdown  # LongBench v2: a group without questions shows -


def test_merge_traces_every_training_step_back_to_the_first_base_model(tmp_path, monkeypatch):
    from longlora.method.extension import describe
    from stages import merge

    monkeypatch.chdir(tmp_path)
    describe("data/extended_model", _step("extend", "togethercomputer/RedPajama-Data-1T-Sample", "models/llama"))
    Path("models/llama").mkdir(parents=True)
    Path("models/llama/README.md").write_text("---\nlicense: llama2\n---\n# Llama\n", encoding="utf-8")
    _write_json(Path("data/sft_model/config.json"), CONFIG)
    sft = _step("sft", "Yukang/LongAlpaca-12k", "data/extended_model")
    card = merge._card(sft, "sft", Path("data/sft_model"), 7, "bfloat16")
    assert card.data.base_model is None and card.data.license == "llama2"  # a local base: its card's license
    assert card.data.datasets == ["togethercomputer/RedPajama-Data-1T-Sample", "Yukang/LongAlpaca-12k"]
    assert "`models/llama` with its context window extended from 32 to 128 tokens" in card.text
    assert "### 1. Context extension (stage `extend`)" in card.text
    assert "### 2. Supervised fine-tuning (stage `sft`)" in card.text
    assert "dvc repro merge@sft" in card.text
    # The training data the card names: the input of the data stage that prepared it, else the folder itself.
    params = parse_params(tiny_params_dict())
    assert merge._training_data(params, "extend", {"params": {"extend": {"data": "data/pretrain"}}}) == \
        "data/corpus/pretrain.jsonl"
    assert merge._training_data(params, "sft", {"params": {"sft": {"data": "mine/sft"}}}) == "mine/sft"


def test_the_report_waits_for_every_evaluation_and_merge():
    """Its deps are the evaluations' folders (whatever eval_models holds): the flow links it, as DVC does, to every
    stage writing inside them, and through them to the merges they evaluate."""
    from pipelines.longlora_flow import stage_graph
    from stages.registry import EVAL_STAGES
    from tests.conftest import ROOT

    graph = stage_graph(ROOT / "dvc.yaml")
    names = load_params(ROOT / "params.yaml").eval_models
    assert graph["report"] == {f"{stage}@{name}" for stage in EVAL_STAGES for name in names}
    assert {"merge@extend", "merge@sft", "sft"} <= _upstream(graph, "report")
    assert list(graph)[-1] == "report"


def _upstream(graph: dict[str, set[str]], stage: str) -> set[str]:
    """Every stage `stage` waits for, directly or through another."""
    seen, todo = set(), [stage]
    while todo:
        for before in graph[todo.pop()] - seen:
            seen.add(before)
            todo.append(before)
    return seen


def test_dvc_repro_report_runs_no_sft_when_eval_models_does_not_evaluate_it(tmp_path):
    """Issue #20: `dvc repro report` forced sft and merge@sft whatever eval_models held."""
    from pipelines.longlora_flow import stage_graph
    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    del raw["eval_models"]["sft"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    upstream = _upstream(stage_graph(ROOT / "dvc.yaml", tmp_path / "params.yaml"), "report")
    assert "merge@extend" in upstream and not upstream & {"sft", "merge@sft", "prepare_sft"}


def test_the_card_counts_one_step_in_the_singular():
    """The tiny default's sft warms up for 5 steps; one of 1 step read "1 warm-up steps"."""
    step = _step("extend", "data/corpus/pretrain.jsonl", "meta-llama/Llama-2-7b-hf")
    step["params"]["extend"].update(warmup_steps=1, max_steps=1, global_batch_size=1)
    text = merged_model_card([("extend", step)], "meta-llama/Llama-2-7b-hf", CONFIG, parameters=1, dtype="float32",
                             command="dvc repro merge@extend").text
    assert "| learning rate | 2e-05, constant_with_warmup, 1 warm-up step |" in text
    assert "| steps and batch | 1 step, global batch 1 sequence |" in text
    assert "20 warm-up steps |" in _card(["extend"]).text
