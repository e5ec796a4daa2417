"""The model a training stage trains (`longlora.method.training.trainable_model`): which weights train for each method,
the attention it selects, fp32 master weights under bf16, and a clear error for a folder holding no model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.errors import InputError
from longlora.method.s2attn import S2ATTN
from longlora.method.training import trainable_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "train_embeddings": True, "train_norms": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GQA Llama with 9 heads (an odd count) and tied embeddings, saved as safetensors."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=72, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _build(folder, **kwargs):
    config = LlamaConfig.from_pretrained(folder)
    return trainable_model(str(folder), config, **{"attention": "dense", "precision": "fp32", "lora": LORA} | kwargs)


def _trained(model) -> set[str]:
    return {name for name, weight in model.named_parameters() if weight.requires_grad}


def test_each_method_trains_what_it_says(model_dir):
    full = _trained(_build(model_dir, method="full"))
    lora = _trained(_build(model_dir, method="lora"))
    plus = _trained(_build(model_dir, method="lora_plus"))
    assert all("lora_" in name for name in lora) and len(lora) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    extra = plus - lora
    assert lora < plus and extra and all("embed_tokens" in name or "norm" in name for name in extra)
    assert {name for name in extra if "norm" in name} and {name for name in extra if "embed_tokens" in name}
    assert not any("lora_" in name for name in full)
    assert len(full) == len(list(LlamaForCausalLM.from_pretrained(model_dir).parameters()))


def test_attention_is_selected_and_bf16_keeps_fp32_masters(model_dir):
    s2 = _build(model_dir, method="lora_plus", attention="s2", precision="bf16", s2attn={"group_size": 16})
    assert s2.config._attn_implementation == S2ATTN and s2.config.use_cache is False
    dtypes = {weight.requires_grad: set() for weight in s2.parameters()}
    for weight in s2.parameters():
        dtypes[weight.requires_grad].add(weight.dtype)
    assert dtypes[True] == {torch.float32} and dtypes[False] == {torch.bfloat16}
    dense = _build(model_dir, method="lora_plus")
    assert dense.config._attn_implementation == "sdpa"


def test_a_folder_without_weights_is_named(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(InputError, match=r"sft\.base_model '.*': "):
        _build(tmp_path, method="lora_plus", param="sft.base_model")
