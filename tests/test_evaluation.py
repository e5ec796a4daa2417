"""Loading models for evaluation: interpolation at load time, dense attention, clear errors."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.errors import InputError
from longlora.evaluation.loading import Interpolation, load_for_evaluation
from longlora.method.rope import rotary_inv_freq
from stages.params import parse_params


@pytest.fixture
def base_folder(tmp_path, tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_interpolation_is_applied_before_the_model_is_built(base_folder):
    plain, _ = load_for_evaluation(str(base_folder))
    scaled, tokenizer = load_for_evaluation(str(base_folder), Interpolation(target_context=256))
    assert scaled.config.max_position_embeddings == 256
    assert scaled.config.rope_parameters["factor"] == pytest.approx(4.0)
    # Linear interpolation divides every rotary frequency by the factor: the built model must use the scaled ones.
    torch.testing.assert_close(rotary_inv_freq(scaled), rotary_inv_freq(plain) / 4)
    assert not scaled.training and scaled.config._attn_implementation == "sdpa"
    assert tokenizer is not None


def test_missing_model_names_the_parameter(tmp_path):
    with pytest.raises(InputError, match=r"eval_models\.extended .*no such folder"):
        load_for_evaluation(str(tmp_path / "absent"), param="eval_models.extended")


def test_eval_model_names_are_checked():
    params = parse_params({"eval_models": {"mine": {"path": "some/folder"}}})
    assert params.eval_models["mine"].interpolate is False
    with pytest.raises(InputError, match="eval_models: .*model name 'a b'"):
        parse_params({"eval_models": {"a b": {"path": "x"}}})
