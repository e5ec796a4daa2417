"""Position interpolation: the built model's rotary frequencies change, and configs keep the scaling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from longlora.method.rope import interpolated_config, rotary_inv_freq


def _llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **kw,
    )


def test_linear_factor_is_exact_ratio_and_divides_frequencies():
    config = interpolated_config(_llama_config(), 1000)  # 1000/256 is not an integer: no rounding up
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == pytest.approx(1000 / 256)
    assert config.max_position_embeddings == 1000
    base, scaled = rotary_inv_freq(LlamaForCausalLM(_llama_config())), rotary_inv_freq(LlamaForCausalLM(config))
    torch.testing.assert_close(scaled, base / (1000 / 256))


def test_existing_factor_is_multiplied_not_replaced():
    once = interpolated_config(_llama_config(), 1024)  # x4, now 1024 tokens
    twice = interpolated_config(once, 4096)  # x4 again from its current 1024
    assert twice.rope_parameters["factor"] == pytest.approx(16.0)
    base, scaled = rotary_inv_freq(LlamaForCausalLM(_llama_config())), rotary_inv_freq(LlamaForCausalLM(twice))
    torch.testing.assert_close(scaled, base / 16)


def test_headroom_scales_further_but_keeps_the_target_context():
    config = interpolated_config(_llama_config(), 1024, "yarn", headroom=1.5)
    assert config.rope_parameters["factor"] == pytest.approx(6.0)
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    assert config.max_position_embeddings == 1024  # trained and evaluated to the target, not to 1536
    six = interpolated_config(_llama_config(), 1536, "yarn")  # the same frequencies as a plain ×6
    torch.testing.assert_close(rotary_inv_freq(LlamaForCausalLM(config)), rotary_inv_freq(LlamaForCausalLM(six)))
    again = interpolated_config(config, 2048, "yarn", headroom=1.5)  # multiplied, like any existing factor
    assert again.rope_parameters["factor"] == pytest.approx(6.0 * 2 * 1.5)


@pytest.mark.parametrize("headroom", [0.5, float("inf"), float("nan")])
def test_headroom_below_one_or_not_finite_is_refused(headroom):
    with pytest.raises(ValueError, match="headroom"):
        interpolated_config(_llama_config(), 1024, headroom=headroom)


def test_original_length_override():
    config = interpolated_config(_llama_config(), 1024, original_length=128)
    assert config.rope_parameters["factor"] == pytest.approx(8.0)


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_frequency_dependent_types_change_low_frequencies(rope_type):
    config = interpolated_config(_llama_config(), 1024, rope_type)
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    base, scaled = rotary_inv_freq(LlamaForCausalLM(_llama_config())), rotary_inv_freq(LlamaForCausalLM(config))
    assert torch.all(scaled <= base + 1e-12)
    assert scaled[-1] < base[-1] * 0.5  # the lowest frequency is interpolated
    assert scaled[0] == pytest.approx(base[0].item(), rel=0.1)  # the highest is (nearly) kept


def test_dynamic_rescales_at_run_time_beyond_original_length():
    config = interpolated_config(_llama_config(), 1024, "dynamic")
    assert config.max_position_embeddings == 256  # dynamic NTK scales relative to the original length
    model = LlamaForCausalLM(config).eval()
    before = rotary_inv_freq(model)
    model(input_ids=torch.zeros(1, 600, dtype=torch.long))
    assert not torch.allclose(before, rotary_inv_freq(model))


def test_mistral_frequencies_change_too():
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    scaled = rotary_inv_freq(MistralForCausalLM(interpolated_config(MistralConfig(**kw), 512)))
    torch.testing.assert_close(scaled, rotary_inv_freq(MistralForCausalLM(MistralConfig(**kw))) / 2)


def test_saved_and_reloaded_config_keeps_scaling(tmp_path):
    interpolated_config(_llama_config(), 1000).save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.rope_parameters["rope_type"] == "linear"
    assert reloaded.rope_parameters["factor"] == pytest.approx(1000 / 256)
    assert reloaded.max_position_embeddings == 1000
    base = rotary_inv_freq(LlamaForCausalLM(_llama_config()))
    torch.testing.assert_close(rotary_inv_freq(LlamaForCausalLM(reloaded)), base / (1000 / 256))


def test_mixing_rope_types_is_refused():
    llama3 = interpolated_config(_llama_config(), 1024, "llama3")
    with pytest.raises(ValueError, match="already uses rope_type='llama3'"):
        interpolated_config(llama3, 4096, "linear")


def test_shrinking_is_refused():
    with pytest.raises(ValueError, match="shorter than the original context 256"):
        interpolated_config(_llama_config(), 128)


def test_input_config_is_not_modified():
    config = _llama_config()
    interpolated_config(config, 1024)
    assert config.rope_parameters["rope_type"] == "default" and config.max_position_embeddings == 256
