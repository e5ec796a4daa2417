"""LoRA+: exactly LoRA, embeddings and norms train, and the standard PEFT folder restores all of them."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.lora import apply_lora_plus, trainable_parameter_counts

HIDDEN, LAYERS, VOCAB, HEADS, KV_HEADS = 32, 2, 64, 4, 2


def _base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
    ))


def _train_a_little(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_trainable_groups_and_counts():
    model = apply_lora_plus(_base(), r=8, alpha=16)
    counts = trainable_parameter_counts(model)
    head_dim = HIDDEN // HEADS
    q_o = 2 * (8 * HIDDEN + HIDDEN * 8)
    k_v = 2 * (8 * HIDDEN + KV_HEADS * head_dim * 8)
    assert counts["lora"] == LAYERS * (q_o + k_v)
    assert counts["embeddings"] == VOCAB * HIDDEN
    assert counts["norms"] == (2 * LAYERS + 1) * HIDDEN
    assert counts["other"] == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n or "mlp" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_plain_lora_when_embeddings_and_norms_are_off():
    counts = trainable_parameter_counts(apply_lora_plus(_base(), train_embeddings=False, train_norms=False))
    assert counts["embeddings"] == counts["norms"] == 0 and counts["lora"] > 0


def test_adapter_folder_restores_lora_embeddings_and_norms(tmp_path):
    model = apply_lora_plus(_base())
    _train_a_little(model)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "adapter_model.safetensors" in files and "trainable_params.bin" not in files
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("embed_tokens" in k for k in keys) and any("layernorm" in k for k in keys)
    assert any(k.endswith("model.norm.weight") for k in keys)

    restored = PeftModel.from_pretrained(_base(), tmp_path).eval()
    model.eval()
    ids = torch.randint(VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(restored(input_ids=ids).logits, expected)
    # Without the saved embeddings and norms the output would differ: the check above is not vacuous.
    lora_only = apply_lora_plus(_base(), train_embeddings=False, train_norms=False)
    lora_only.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    assert not torch.allclose(lora_only.eval()(input_ids=ids).logits, expected, atol=1e-4)


def test_merged_model_equals_unmerged_adapter():
    model = apply_lora_plus(_base())
    _train_a_little(model)
    model.eval()
    ids = torch.randint(VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    unmerged = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lora\.target_modules \['query'\] match no linear layer"):
        apply_lora_plus(_base(), target_modules=("q_proj", "query"))
