"""params.yaml validation: every bad input names the file, the key path and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, load_params, parse_params
from tests.conftest import ROOT, tiny_params_dict


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.lora.r == 8 and params.lora.alpha == 16
    assert params.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert params.s2attn.group_size_for(params.model.target_context) == params.model.target_context // 4


def test_derived_defaults_are_resolved_once_from_the_target_context():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["model"]["target_context"] == 1024 and raw["prepare_pretrain"]["block_length"] is None
    corpus = params.prepare_corpus
    assert (corpus.eval_min_tokens, corpus.longqa_min_tokens, corpus.longqa_max_tokens) == (2048, 512, 870)
    assert params.prepare_pretrain.block_length == 1024
    assert params.prepare_sft.max_length == 1024
    assert params.prepare_eval.lengths == (256, 512, 1024)
    explicit = parse_params(tiny_params_dict(prepare_pretrain={"block_length": 64}, prepare_eval={"lengths": [100]},
                                             prepare_corpus={"eval_min_tokens": 300}))
    assert explicit.prepare_pretrain.block_length == 64 and explicit.prepare_eval.lengths == (100,)
    assert explicit.prepare_corpus.eval_min_tokens == 300
    assert explicit.prepare_sft.max_length == explicit.model.target_context == 128


def test_extend_trains_on_prepare_pretrains_blocks_by_default():
    params = load_params(ROOT / "params.yaml")
    assert params.extend.data == params.prepare_pretrain.out_dir
    assert parse_params(tiny_params_dict(extend={"data": "blocks/128"})).extend.data == Path("blocks/128")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"extend": {"checkpoint_dir": "data/extend/checkpoints"}},
     "extend.checkpoint_dir: 'data/extend/checkpoints' is inside extend.out_dir 'data/extend'"),
    ({"merge": {"extend": {"out_dir": "data/extend"}}},
     "merge.extend.out_dir: 'data/extend' is the same place as extend.out_dir 'data/extend'"),
    ({"extend": {"data": "data/extend/blocks"}},
     "extend.data: 'data/extend/blocks' is inside extend.out_dir 'data/extend': the stage would read from the folder"),
    ({"extend": {"resume": " "}}, "extend.resume: empty"),
])
def test_extend_and_merge_paths_are_checked_with_the_others(overrides, message):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(**overrides))
    assert str(err.value).startswith(f"params.yaml: {message}"), str(err.value)


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ParamsError, match=r"params\.yaml: build_base_model\.stepz: Extra inputs are not permitted"):
        parse_params(tiny_params_dict(build_base_model={"stepz": 3}))


def test_wrong_type_names_the_key():
    with pytest.raises(ParamsError, match=r"build_base_model\.steps: .*integer.*'many'"):
        parse_params(tiny_params_dict(build_base_model={"steps": "many"}))


@pytest.mark.parametrize(("section", "key", "value", "reason"), [
    ("extend", "lr", float("inf"), "Input should be a finite number"),
    ("sft", "lr", "1e309", "Input should be a finite number"),  # YAML reads 1e309 as a string; float() makes it inf
    ("build_base_model", "lr", float("nan"), "Input should be a finite number"),
    ("extend", "max_grad_norm", float("inf"), "Input should be a finite number"),
    ("extend", "max_steps", True, "a number is needed here, not the boolean true"),
    ("eval_passkey", "trials", False, "a number is needed here, not the boolean false"),
])
def test_non_finite_numbers_and_booleans_for_numbers_are_rejected_at_their_key(section, key, value, reason):
    with pytest.raises(ParamsError, match=rf"params\.yaml: {section}\.{key}: {reason}"):
        parse_params(tiny_params_dict(**{section: {key: value}}))
    # Booleans stay booleans, and YAML's exponent strings stay numbers.
    parse_params(tiny_params_dict(extend={"gradient_checkpointing": True, "lr": "2e-5"}))


def test_target_not_divisible_by_group_size():
    raw = tiny_params_dict(model={"target_context": 1000}, s2attn={"group_size": 256})
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value) == (
        "params.yaml: (top level): s2attn vs model.target_context: "
        "sequence length 1000 is not divisible by S²-Attn group size 256"
    )


def test_ratio_that_does_not_give_whole_groups():
    with pytest.raises(ParamsError, match="ratio 0.25 gives group size 250.5 for sequence length 1002"):
        parse_params(tiny_params_dict(model={"target_context": 1002}))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"group_size": 7}, "params.yaml: s2attn.group_size: S²-Attn group size 7 is not an even integer >= 2"),
    ({"group_size": 0}, "params.yaml: s2attn.group_size: S²-Attn group size 0 is not an even integer >= 2"),
    ({"group_size_ratio": 1.5}, "params.yaml: s2attn.group_size_ratio: S²-Attn group size ratio 1.5 is not in (0, 1]"),
    ({"group_size_ratio": None, "group_size": None}, "params.yaml: s2attn: set group_size_ratio or group_size"),
])
def test_bad_group_size_names_the_key(overrides, message):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(s2attn=overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_loading_params_imports_neither_torch_nor_transformers():
    """Every stage validates all of params.yaml first: that must not cost the seconds torch and transformers take."""
    code = (
        "import sys\n"
        "from stages.params import load_params\n"
        "params = load_params('params.yaml')\n"
        "assert params.model.target_context > 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    # `-c` puts the working directory first on sys.path: this checkout's modules are the ones imported.
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"


def test_heads_must_divide_hidden_size():
    with pytest.raises(ParamsError, match="hidden_size 30 is not divisible by num_heads 4"):
        parse_params(tiny_params_dict(build_base_model={"hidden_size": 30}))


def test_target_shorter_than_original():
    with pytest.raises(ParamsError, match="target_context 128 is shorter than original_context 512"):
        parse_params(tiny_params_dict(model={"original_context": 512}))


@pytest.mark.parametrize(("headroom", "reason"), [(0.5, "greater than or equal to 1"),
                                                  (float("inf"), "finite number")])
def test_rope_headroom_below_one_or_not_finite_is_refused_at_its_key(headroom, reason):
    with pytest.raises(ParamsError, match=rf"params\.yaml: model\.rope_headroom: .*{reason}"):
        parse_params(tiny_params_dict(model={"rope_headroom": headroom}))


def test_invalid_yaml_reports_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  target_context: [1, 2\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"params\.yaml:3:\d+: invalid YAML"):
        load_params(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot read parameters"):
        load_params(tmp_path / "absent.yaml")


def test_top_level_must_be_a_mapping():
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params([1, 2])


FREE_FORM = ("eval_harness.metadata", "eval_harness.task_metadata")
"""Mappings passed to lm-eval as they are: their keys are its tasks' business, not a params schema."""


def _keys(tree: dict, prefix: str = "") -> set[str]:
    return {f"{prefix}{k}" for k in tree} | {
        key for k, v in tree.items() if isinstance(v, dict) and f"{prefix}{k}" not in FREE_FORM
        for key in _keys(v, f"{prefix}{k}.")
    }


PROFILES = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))


def test_the_profiles_are_there():
    assert PROFILES == ["llama2-70b-32k.yaml", "llama2-7b-100k.yaml", "llama2-7b-256k.yaml", "llama2-7b-32k.yaml"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid_and_in_step_with_params_yaml(profile):
    raw = yaml.safe_load((ROOT / "configs" / profile).read_text())
    default_raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _keys(raw) == _keys(default_raw), f"configs/{profile} drifted from params.yaml"
    load_params(ROOT / "configs" / profile)


def test_full_size_profile_is_valid_and_in_step_with_params_yaml():
    full = load_params(ROOT / "configs/llama2-7b-32k.yaml")
    assert full.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert full.model.target_context / full.model.original_context == 8
    assert full.s2attn.group_size_for(full.model.target_context) == 8192
    assert (full.lora.r, full.lora.alpha, full.lora.train_embeddings, full.lora.train_norms) == (8, 16, True, True)


# --- paths: every output has a place of its own, away from every input ----------------------------------------

def test_duplicate_key_is_an_error_with_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("build_base_model:\n  steps: 400\n  lr: 0.004\n  steps: 40\nmodel: {}\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"params\.yaml:4:3: invalid YAML: duplicate key 'steps' \(first at line 2\)"):
        load_params(path)
    path.write_text("model: {}\nbase_model: {}\nmodel: {target_context: 2048}\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"params\.yaml:3:1: invalid YAML: duplicate key 'model' \(first at line 1\)"):
        load_params(path)
    path.write_text("model: {target_context: 2048, target_context: 4096}\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="duplicate key 'target_context'"):
        load_params(path)


@pytest.mark.parametrize(("section", "key", "value", "reason"), [
    ("prepare_pretrain", "input", "", "empty path"),
    ("prepare_eval", "input", "  ", "empty path"),
    ("model", "name_or_path", "", "empty path"),
    ("prepare_eval", "out_dir", "", "empty path"),
    ("prepare_sft", "metrics_file", "", "empty path"),
    ("prepare_eval", "out_dir", ".", "'.' is the working directory"),
    ("prepare_eval", "out_dir", "./", "'.' is the working directory"),
    ("prepare_pretrain", "out_dir", "..", "'..' is a folder above the working directory"),
    ("build_base_model", "out_dir", "data/..", "'data/..' is the working directory"),
])
def test_empty_and_protected_paths_are_rejected_at_their_key(section, key, value, reason):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(**{section: {key: value}}))
    assert str(err.value).startswith(f"params.yaml: {section}.{key}: {reason}")


def test_home_is_expanded_and_never_an_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    params = parse_params(tiny_params_dict(prepare_eval={"out_dir": "~/runs/eval", "input": "~/pg19"}))
    assert params.prepare_eval.out_dir == tmp_path / "runs/eval" and params.prepare_eval.input == str(tmp_path / "pg19")
    with pytest.raises(ParamsError, match=r"params\.yaml: prepare_eval\.out_dir: '.*' is the home folder"):
        parse_params(tiny_params_dict(prepare_eval={"out_dir": "~"}))


@pytest.mark.parametrize(("overrides", "message"), [
    # the probe: every other output and data/.gitignore were deleted
    ({"prepare_eval": {"out_dir": "data"}},
     "prepare_eval.out_dir: 'data' contains build_base_model.out_dir 'data/base_model': every stage output needs a "
     "place"),
    ({"prepare_pretrain": {"out_dir": "data/base_model"}},
     "prepare_pretrain.out_dir: 'data/base_model' is the same place as build_base_model.out_dir 'data/base_model'"),
    ({"prepare_sft": {"out_dir": "./data//pretrain/"}},
     "prepare_sft.out_dir: 'data/pretrain' is the same place as prepare_pretrain.out_dir 'data/pretrain'"),
    ({"prepare_eval": {"out_dir": "data/corpus/eval_tokens"}},
     "prepare_eval.out_dir: 'data/corpus/eval_tokens' is inside prepare_corpus.out_dir 'data/corpus'"),
    ({"prepare_pretrain": {"metrics_file": "data/pretrain/metrics.json"}},
     "prepare_pretrain.metrics_file: 'data/pretrain/metrics.json' is inside prepare_pretrain.out_dir 'data/pretrain'"),
    ({"prepare_sft": {"metrics_file": "data/metrics/prepare_pretrain.json"}},
     "prepare_sft.metrics_file: 'data/metrics/prepare_pretrain.json' is the same place as "
     "prepare_pretrain.metrics_file"),
    # inputs: never written, never written around, never read from a stage's own output
    ({"prepare_pretrain": {"input": "raw/redpajama.jsonl", "metrics_file": "raw/redpajama.jsonl"}},
     "prepare_pretrain.metrics_file: 'raw/redpajama.jsonl' is the same place as prepare_pretrain.input"),
    ({"prepare_eval": {"input": "raw/pg19/test", "out_dir": "raw"}},
     "prepare_eval.input: 'raw/pg19/test' is inside prepare_eval.out_dir 'raw': the stage would read from the "
     "folder it replaces"),
    ({"prepare_eval": {"input": "raw/pg19/test"}, "prepare_sft": {"out_dir": "raw/pg19/test/sft"}},
     "prepare_sft.out_dir: 'raw/pg19/test/sft' is inside prepare_eval.input 'raw/pg19/test'"),
    ({"prepare_eval": {"input": "data/eval/old_docs"}},
     "prepare_eval.input: 'data/eval/old_docs' is inside prepare_eval.out_dir 'data/eval': the stage would read from"),
    ({"model": {"name_or_path": "data/base_model/checkpoint-100"}},
     "model.name_or_path: 'data/base_model/checkpoint-100' is inside build_base_model.out_dir 'data/base_model'"),
    ({"model": {"name_or_path": "/models/llama"}, "prepare_sft": {"out_dir": "/models"}},
     "model.name_or_path: '/models/llama' is inside prepare_sft.out_dir '/models': the stage would read from the "
     "folder"),
    ({"model": {"name_or_path": "/models/llama"}, "build_base_model": {"out_dir": "/models"}},
     "model.name_or_path: '/models/llama' is inside build_base_model.out_dir '/models': name the folder itself"),
])
def test_outputs_that_would_replace_each_other_or_an_input_are_rejected(overrides, message):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(**overrides))
    assert str(err.value).startswith(f"params.yaml: {message}"), str(err.value)


def test_the_default_chain_and_hub_names_are_fine(tmp_path):
    parse_params(tiny_params_dict())  # inputs inside prepare_corpus.out_dir are its products, read by other stages
    same = parse_params(tiny_params_dict(model={"name_or_path": str(ROOT / "data/base_model")}))
    assert same.model.name_or_path == str(ROOT / "data/base_model")
    # Another model: the base models evaluated follow it (path null), not the embedded one in data/base_model.
    hub = parse_params(tiny_params_dict(model={"name_or_path": "meta-llama/Llama-2-7b-hf"},
                                        prepare_pretrain={"input": "togethercomputer/RedPajama-Data-1T-Sample"},
                                        eval_models={"base": {"path": None}, "base_pi": {"path": None}}))
    assert hub.prepare_pretrain.input == "togethercomputer/RedPajama-Data-1T-Sample"
    assert hub.eval_models["base"].path == hub.eval_models["base_pi"].path == "meta-llama/Llama-2-7b-hf"
    assert hub.prepare_pretrain.bos == hub.prepare_eval.bos == "auto"  # the stage resolves it from the tokenizer


@pytest.mark.parametrize(("text", "message"), [
    ("", r"params\.yaml: empty: every stage reads the whole file"),
    ("model:\n  target_context: 1024\n", r"params\.yaml: no section embedded_corpus, build_base_model, s2attn, lora, "
                                         r"prepare_corpus, prepare_pretrain, … \(21 in all\)"),
])
def test_an_empty_or_partial_file_is_refused_rather_than_run_as_the_paper_s_7b_recipe(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_a_target_shorter_than_the_base_model_s_context_stops_every_stage_before_it_runs(tmp_path, monkeypatch,
                                                                                        capsys):
    """Not only extend (which used to find out after the data stages had run): every stage's command line."""
    import json

    from stages import _cli, prepare_corpus
    from tests.conftest import tiny_params_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/base_model").mkdir(parents=True)
    (tmp_path / "data/base_model/config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()), encoding="utf-8")  # target 128
    assert _cli.main("prepare_corpus", prepare_corpus.run, ["--params", "params.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        "stages.prepare_corpus: error: params.yaml: model.target_context 128 is shorter than the context of "
        "model.name_or_path, 256 (data/base_model/config.json): extension needs a longer target")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["base_model"]


# --- bring your own model: the defaults follow it, what contradicts it is refused when params.yaml loads ----------


def _own_model_params(tmp_path: Path, folder: Path, **sections: dict) -> Path:
    """The project's params.yaml as a new user edits it for a model of their own (model.name_or_path), with
    `sections` merged in."""
    from tests.conftest import _merge

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")),
                 {"model": {"name_or_path": str(folder)}, **sections})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def test_the_project_s_defaults_resolve_to_what_they_always_ran_with():
    """bos: auto is `document` for the embedded model's plain `<s>`; the evaluated models are the ones named."""
    params = load_params(ROOT / "params.yaml")
    assert params.prepare_pretrain.bos == params.prepare_eval.bos == "document"
    assert {name: model.path for name, model in params.eval_models.items()} == {
        "base": "data/base_model", "base_pi": "data/base_model", "extended": "data/extended_model",
        "sft": "data/sft_model"}


def test_a_smollm2_like_model_of_one_s_own_loads_with_defaults_that_follow_it(tmp_path, monkeypatch,
                                                                              smol_chat_model_dir):
    """The issue's run: SmolLM2-135M-Instruct (9/3 heads, tied embeddings, ChatML BOS) named in model.name_or_path.
    No error at load, `bos: auto` resolved to none (its BOS is a chat marker) and the base models evaluated are it,
    whether named (as dvc.yaml needs) or left null."""
    monkeypatch.chdir(tmp_path)
    folder = str(smol_chat_model_dir)
    named = load_params(_own_model_params(tmp_path, smol_chat_model_dir, eval_models={
        "base": {"path": folder}, "base_pi": {"path": folder}}))
    assert named.prepare_pretrain.bos == named.prepare_eval.bos == "none"
    null = load_params(_own_model_params(tmp_path, smol_chat_model_dir, eval_models={
        "base": {"path": None}, "base_pi": {"path": None}, "extended": {"path": None}, "sft": {"path": None}}))
    assert {name: model.path for name, model in null.eval_models.items()} == {
        "base": folder, "base_pi": folder, "extended": "data/extended_model", "sft": "data/sft_model"}
    assert null.prepare_pretrain.bos == null.prepare_eval.bos == "none"
    null.check_base_context()  # 1024 > its 64 tokens
    # A model with a plain start-of-sequence BOS keeps `document`.
    plain = parse_params(tiny_params_dict(model={"name_or_path": str(ROOT / "data/base_model")}))
    assert plain.prepare_pretrain.bos == plain.prepare_eval.bos == "document"


@pytest.mark.parametrize("holds", ["NOT_BUILT.txt", "the embedded model"])
def test_an_evaluated_base_left_at_data_base_model_is_refused_at_load(tmp_path, monkeypatch, smol_chat_model_dir,
                                                                       holds):
    """params.yaml names data/base_model for the base models; with another model.name_or_path no model of the user's
    is there: refused when params.yaml loads (it was found by eval_perplexity@base, after training)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/base_model").mkdir(parents=True)
    if holds == "NOT_BUILT.txt":
        (tmp_path / "data/base_model/NOT_BUILT.txt").write_text("No embedded base model was built")
    else:
        (tmp_path / "data/base_model/config.json").write_text("{}")
    with pytest.raises(ParamsError, match=rf"^{tmp_path / 'params.yaml'}: eval_models.base.path: 'data/base_model' "
                                          r"is build_base_model.out_dir, which holds no model of yours: "
                                          r"model.name_or_path is '.*SmolLM2-tiny-Instruct' .*; set it to"):
        load_params(_own_model_params(tmp_path, smol_chat_model_dir))
    # A folder elsewhere holding only NOT_BUILT.txt is no model either.
    (tmp_path / "old").mkdir()
    (tmp_path / "old/NOT_BUILT.txt").write_text("No embedded base model was built")
    with pytest.raises(ParamsError, match=r"eval_models.extended.path: 'old' holds only NOT_BUILT.txt"):
        parse_params(tiny_params_dict(eval_models={"extended": {"path": "old"}}))


@pytest.mark.parametrize("section", ["prepare_pretrain", "prepare_eval"])
def test_bos_document_for_a_chat_marker_bos_is_refused_at_load(tmp_path, monkeypatch, smol_chat_model_dir, section):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=rf"{section}.bos: document, but the tokenizer's BOS '<\|im_start\|>' opens "
                                          r"every turn of its chat template .*; use auto or none"):
        parse_params(tiny_params_dict(model={"name_or_path": str(smol_chat_model_dir)},
                                      **{section: {"bos": "document"}},
                                      eval_models={"base": {"path": None}, "base_pi": {"path": None}}))
    explicit = parse_params(tiny_params_dict(model={"name_or_path": str(smol_chat_model_dir)},
                                             **{section: {"bos": "none"}},
                                             eval_models={"base": {"path": None}, "base_pi": {"path": None}}))
    assert explicit.section(section).bos == "none"


@pytest.mark.parametrize("stage", ["extend", "sft"])
def test_more_warmup_steps_than_steps_are_refused(stage):
    with pytest.raises(ParamsError, match=rf"params.yaml: {stage}.warmup_steps: 50 exceeds {stage}.max_steps 40: the "
                                          "learning rate would never reach lr"):
        parse_params(tiny_params_dict(**{stage: {"max_steps": 40, "warmup_steps": 50}}))
    assert parse_params(tiny_params_dict(**{stage: {"max_steps": 40, "warmup_steps": 40}})).section(stage)


@pytest.mark.parametrize(("section", "lengths"), [("prepare_eval", [0, 5]), ("prepare_eval", []),
                                                 ("eval_passkey", [128, -1]), ("eval_passkey", [])])
def test_lengths_must_be_positive_token_counts_in_either_section(section, lengths):
    """One rule, written once (stages.sections._check_positive_lengths), for both sections' `lengths`."""
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(**{section: {"lengths": lengths}}))
    assert str(err.value) == f"params.yaml: {section}: lengths must be positive token counts, got {lengths}"


def test_the_global_batch_rule_is_one_rule_at_load_and_at_run_time():
    """TrainingParams.batch_split_problem: checked at load against launch's world size (naming it), and by the stage
    against the world size it runs with."""
    from longlora.errors import InputError

    reason = "4 is not divisible by per_device_batch_size 2 × 3 processes{} = 6; change one of them"
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(launch={"launcher": "torchrun", "nproc_per_node": 3}))
    assert str(err.value) == "params.yaml: extend.global_batch_size: " + reason.format(
        " (launch.nodes 1 × launch.nproc_per_node 3)")
    sft = parse_params(tiny_params_dict()).sft
    assert sft.gradient_accumulation(2, "sft") == 1
    with pytest.raises(InputError) as err:
        sft.gradient_accumulation(3, "sft")
    assert str(err.value) == "sft.global_batch_size " + reason.format("")


# --- S²-Attn variants: document-aware attention needs the shift, refused when params.yaml loads ----------------------

NO_SHIFT = {"s2attn": {"shift": False}}


@pytest.mark.parametrize(("overrides", "message"), [
    ({**NO_SHIFT, "extend": {"document_attention": True}, "sft": {"padding_free": False}},
     "extend.document_attention: document-aware attention needs the shifted S²-Attn; with s2attn.shift false (the "
     "short-attention ablation) set extend.document_attention false"),
    ({"sft": {"attention": "dense", "padding_free": True}},
     "sft.padding_free: packed rows need document-aware S²-Attn (sft.attention s2); with sft.attention dense set "
     "sft.padding_free false"),
    ({**NO_SHIFT, "sft": {"padding_free": True}},
     "sft.padding_free: packed rows need the shifted S²-Attn; with s2attn.shift false (the short-attention ablation) "
     "set sft.padding_free false"),
])
def test_document_aware_attention_without_the_shifted_s2attn_is_refused_at_its_key(overrides, message):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params_dict(**overrides))
    assert str(err.value) == f"params.yaml: {message}"


@pytest.mark.parametrize("stage", ["extend", "sft"])
def test_an_impossible_s2attn_variant_stops_either_training_stage_before_it_runs(tmp_path, monkeypatch, capsys,
                                                                                  stage):
    """Each training stage reads the whole file: a no-shift extend with sft's padding-free rows left on stops both."""
    from stages import _cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**NO_SHIFT)), encoding="utf-8")
    assert _cli.main(stage, lambda params: pytest.fail("the stage ran"), ["--params", "params.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"stages.{stage}: error: params.yaml: sft.padding_free: packed rows need the shifted S²-Attn; with "
        "s2attn.shift false (the short-attention ablation) set sft.padding_free false")
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def test_padding_free_defaults_to_on_exactly_where_it_can_be():
    assert load_params(ROOT / "params.yaml").sft.padding_free is True
    unset = {"sft": {"padding_free": None}}
    assert parse_params(tiny_params_dict(**unset)).sft.padding_free is True
    assert parse_params(tiny_params_dict(**unset, **NO_SHIFT)).sft.padding_free is False
    assert parse_params(tiny_params_dict(sft={"padding_free": None, "attention": "dense"})).sft.padding_free is False
    assert parse_params(tiny_params_dict(sft={"padding_free": False})).sft.padding_free is False
    # document-aware extension with dense attention has no S² groups to lay out: allowed, as before
    dense = parse_params(tiny_params_dict(**NO_SHIFT, extend={"document_attention": True, "attention": "dense"},
                                          sft={"padding_free": False}))
    assert dense.extend.document_attention is True


def test_an_original_context_below_the_model_s_own_is_refused_where_its_config_is_local(tmp_path, monkeypatch,
                                                                                      smol_chat_model_dir):
    monkeypatch.chdir(tmp_path)
    own = {"eval_models": {"base": {"path": None}, "base_pi": {"path": None}}}
    with pytest.raises(ParamsError, match=r"params.yaml: model.original_context: 32 is below the context of "
                                          r"model.name_or_path, 64 \(max_position_embeddings in .*config.json\)"):
        parse_params(tiny_params_dict(model={"name_or_path": str(smol_chat_model_dir), "original_context": 32}, **own))
    assert parse_params(tiny_params_dict(model={"name_or_path": str(smol_chat_model_dir), "original_context": 64},
                                         **own)).model.original_context == 64
    # A hub id's config is not read when params.yaml loads (no network): its stage checks it.
    hub = parse_params(tiny_params_dict(model={"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                               "original_context": 32}, **own))
    assert hub.model.original_context == 32 and hub.prepare_pretrain.bos == "auto"
