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


def _keys(tree: dict, prefix: str = "") -> set[str]:
    return {f"{prefix}{k}" for k in tree} | {
        key for k, v in tree.items() if isinstance(v, dict) for key in _keys(v, f"{prefix}{k}.")
    }


PROFILES = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))


def test_the_profiles_are_there():
    assert PROFILES == ["llama2-70b-32k.yaml", "llama2-7b-100k.yaml", "llama2-7b-32k.yaml"]


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
    hub = parse_params(tiny_params_dict(model={"name_or_path": "meta-llama/Llama-2-7b-hf"},
                                        prepare_pretrain={"input": "togethercomputer/RedPajama-Data-1T-Sample"}))
    assert hub.prepare_pretrain.input == "togethercomputer/RedPajama-Data-1T-Sample"


@pytest.mark.parametrize(("text", "message"), [
    ("", r"params\.yaml: empty: every stage reads the whole file"),
    ("model:\n  target_context: 1024\n", r"params\.yaml: no section embedded_corpus, build_base_model, s2attn, lora, "
                                         r"prepare_corpus, prepare_pretrain, … \(18 in all\)"),
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
