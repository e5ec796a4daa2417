"""params.yaml validation: every bad input names the file, the key path and the reason."""

from __future__ import annotations

import pytest

from stages.params import ParamsError, load_params, parse_params
from tests.conftest import ROOT, tiny_params_dict


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.lora.r == 8 and params.lora.alpha == 16
    assert params.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert params.s2attn.group_size_for(params.model.target_context) == params.model.target_context // 4


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ParamsError, match=r"params\.yaml: base_model\.stepz: Extra inputs are not permitted"):
        parse_params(tiny_params_dict(base_model={"stepz": 3}))


def test_wrong_type_names_the_key():
    with pytest.raises(ParamsError, match=r"base_model\.steps: .*integer.*'many'"):
        parse_params(tiny_params_dict(base_model={"steps": "many"}))


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


def test_odd_group_size():
    with pytest.raises(ParamsError, match=r"s2attn: group_size 7 must be even"):
        parse_params(tiny_params_dict(s2attn={"group_size": 7}))


def test_heads_must_divide_hidden_size():
    with pytest.raises(ParamsError, match="hidden_size 30 is not divisible by num_heads 4"):
        parse_params(tiny_params_dict(base_model={"hidden_size": 30}))


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


def test_full_size_profile_is_valid_and_in_step_with_params_yaml():
    import yaml

    full_raw = yaml.safe_load((ROOT / "configs/llama2-7b-32k.yaml").read_text())
    default_raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _keys(full_raw) == _keys(default_raw), "configs/llama2-7b-32k.yaml drifted from params.yaml"
    full = load_params(ROOT / "configs/llama2-7b-32k.yaml")
    assert full.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert full.model.target_context / full.model.original_context == 8
    assert full.s2attn.group_size_for(full.model.target_context) == 8192
    assert (full.lora.r, full.lora.alpha, full.lora.train_embeddings, full.lora.train_norms) == (8, 16, True, True)
