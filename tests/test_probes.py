"""Context-use probes against direct computations on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.embedded.probes import bucket_means, loss_by_position, masked_accuracy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40)
    return LlamaForCausalLM(config)


def test_loss_by_position_matches_a_direct_loop(model):
    blocks = torch.randint(50, (5, 40), generator=torch.Generator().manual_seed(1))
    per_position = loss_by_position(model, blocks, batch_size=2)
    assert per_position.shape == (39,)
    with torch.no_grad():
        for p in (0, 17, 38):
            direct = np.mean([torch.nn.functional.cross_entropy(model(input_ids=row[None, : p + 1]).logits[0, -1],
                                                                row[p + 1]).item() for row in blocks])
            assert per_position[p] == pytest.approx(direct, abs=1e-5)
        assert per_position.mean() == pytest.approx(model(input_ids=blocks, labels=blocks).loss.item(), abs=1e-5)
    assert model.training


def test_bucket_means_cover_only_reached_positions():
    values = np.arange(100, dtype=float)
    buckets = bucket_means(values)
    assert buckets == {"0-8": 3.5, "8-32": 19.5, "32-64": 47.5, "64-128": 81.5}


def test_masked_accuracy_counts_greedy_hits_on_masked_tokens_only(model):
    ids = torch.randint(50, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in range(1, 11):  # tokens 1..10 become what the model predicts from their prefix
            ids[:, i] = model(input_ids=ids[:, :i]).logits[:, -1].argmax(-1)
        predicted = model(input_ids=ids).logits.argmax(-1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1:11] = True
    assert masked_accuracy(model, ids, mask) == 1.0
    mask[:, 30] = True
    hits = int((predicted[:, 29] == ids[:, 30]).sum())
    assert masked_accuracy(model, ids, mask) == pytest.approx((30 + hits) / 33)
    with pytest.raises(ValueError, match="selects no predicted token"):
        masked_accuracy(model, ids, torch.zeros_like(mask))
