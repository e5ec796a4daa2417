"""LoRA+: exactly LoRA, embeddings and norms train, and the standard PEFT folder restores all of them; tied
input/output embeddings stay one trained matrix in the adapter, after reloading it and after merging."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.method.lora import apply_lora_plus, embeddings_tied, trainable_parameter_counts

HIDDEN, LAYERS, VOCAB, HEADS, KV_HEADS = 32, 2, 64, 4, 2


def _base(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        tie_word_embeddings=tied,
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


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _no_tying_warning(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build()
    assert not [w for w in caught if "tie" in str(w.message).lower()], [str(w.message) for w in caught]
    return model


def test_tied_embeddings_train_as_one_matrix_in_the_adapter_after_reload_and_after_merging(tmp_path):
    base = _base(tied=True)
    assert embeddings_tied(base) and base.config.tie_word_embeddings
    original = base.get_input_embeddings().weight.detach().clone()
    model = _no_tying_warning(lambda: apply_lora_plus(base))
    assert trainable_parameter_counts(model)["embeddings"] == VOCAB * HIDDEN  # one matrix, counted once
    _train_a_little(model)
    model.eval()
    ids = _ids(4)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    trained = model.get_input_embeddings().modules_to_save["default"].weight
    assert (trained - original).abs().max() > 1e-3  # the embedding did train
    # The adapter model's output head is the trained embedding, not the frozen original (what a plain
    # modules_to_save copy of embed_tokens gives).
    hidden = out.hidden_states[-1]
    torch.testing.assert_close(out.logits, hidden @ trained.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, hidden @ original.T, atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_base(tied=True), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, out.logits, rtol=1e-5, atol=1e-5)

    for name, adapter in (("trained", model), ("reloaded", reloaded)):
        merged = adapter.merge_and_unload()
        assert isinstance(merged, LlamaForCausalLM), name
        assert merged.lm_head.weight is merged.model.embed_tokens.weight, name
        assert merged.config.tie_word_embeddings, name
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, out.logits, rtol=1e-5, atol=1e-5, msg=name)

    merged.save_pretrained(tmp_path / "merged")
    with safe_open(tmp_path / "merged/model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert "lm_head.weight" not in saved  # saved once, as a tied model: no second vocabulary × hidden matrix
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, out.logits, rtol=1e-5, atol=1e-5)


def test_untied_embeddings_keep_their_own_output_head(tmp_path):
    base = _base(tied=False)
    assert not embeddings_tied(base)
    head = base.lm_head.weight.detach().clone()
    model = _no_tying_warning(lambda: apply_lora_plus(base))
    _train_a_little(model)
    model.eval()
    ids = _ids(5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert not merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert torch.equal(merged.lm_head.weight, head)  # the output head is not part of LoRA+: untouched
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
