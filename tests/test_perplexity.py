"""Both perplexities against direct, token-by-token loops on a small stream; short streams are clear errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.evaluation.perplexity import strided_perplexity, windowed_perplexity

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 61, size=203).astype(np.uint16)


def direct_strided(model, tokens, seq_len, stride):
    """Every full window from 0 every `stride` tokens; each token scored the first time a window predicts it."""
    scored, nll = set(), []
    for start in range(0, len(tokens) - seq_len + 1, stride):
        window = torch.tensor(tokens[start:start + seq_len], dtype=torch.long)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        for j in range(1, seq_len):
            if start + j not in scored:
                scored.add(start + j)
                nll.append(-log_probs[j - 1, window[j]].item())
    return math.exp(sum(nll) / len(nll)), len(nll)


def direct_windowed(model, tokens, seq_len, step):
    """LongLoRA eval.py: starts range(0, N - seq_len, step) minus the last; labels = inputs; exp(mean of means)."""
    starts = list(range(0, len(tokens) - seq_len, step))
    starts.pop()
    losses = []
    for start in starts:
        window = torch.tensor(tokens[start:start + seq_len], dtype=torch.long)[None]
        with torch.no_grad():
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses)), len(losses)


@pytest.mark.parametrize(("seq_len", "stride", "batch_size"), [(32, None, 1), (32, 32, 3), (32, 12, 2), (48, 1, 16),
                                                                (64, 40, 4)])
def test_strided_matches_the_direct_loop(model, tokens, seq_len, stride, batch_size):
    got = strided_perplexity(model, tokens, seq_len, stride, batch_size=batch_size, progress=False)
    want, scored = direct_strided(model, tokens, seq_len, stride or seq_len)
    assert got["tokens_scored"] == scored
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


def test_strided_with_stride_equal_to_seq_len_skips_each_windows_first_token(model, tokens):
    got = strided_perplexity(model, tokens, 50, progress=False)
    assert got["windows"] == 4 and got["tokens_scored"] == 4 * 49  # 203 tokens: 4 whole windows, 3 left unscored
    overlapping = strided_perplexity(model, tokens, 50, 10, progress=False)
    assert overlapping["tokens_scored"] == 200 - 1  # windows up to 150 cover tokens 1…199


@pytest.mark.parametrize(("seq_len", "step", "batch_size"), [(32, 16, 1), (32, 16, 5), (64, 7, 8), (100, 50, 2)])
def test_windowed_matches_longloras_loop(model, tokens, seq_len, step, batch_size):
    got = windowed_perplexity(model, tokens, seq_len, step, batch_size=batch_size, progress=False)
    want, windows = direct_windowed(model, tokens, seq_len, step)
    assert got["windows"] == windows
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


def test_the_two_numbers_differ_and_both_exceed_one(model, tokens):
    strided = strided_perplexity(model, tokens, 32, progress=False)["perplexity"]
    windowed = windowed_perplexity(model, tokens, 32, 16, progress=False)["perplexity"]
    assert strided > 1 and windowed > 1 and strided != pytest.approx(windowed, rel=1e-6)


def test_short_streams_are_clear_errors(model, tokens):
    with pytest.raises(ValueError, match="203 tokens, fewer than one window of seq_len 256"):
        strided_perplexity(model, tokens, 256, progress=False)
    with pytest.raises(ValueError, match="203 tokens, fewer than one window of seq_len 256"):
        windowed_perplexity(model, tokens, 256, progress=False)
    # LongLoRA's loop drops its last window: one window's worth plus one step is not enough.
    with pytest.raises(ValueError, match=r"need more than seq_len \+ step = 296"):
        windowed_perplexity(model, tokens, 40, step=256, progress=False)
    with pytest.raises(ValueError, match="stride must lie"):
        strided_perplexity(model, tokens, 32, 33, progress=False)
    with pytest.raises(ValueError, match="1-D integer"):
        strided_perplexity(model, tokens.astype(np.float32), 32, progress=False)


def test_s2attn_at_evaluation_is_an_option_and_leaves_the_model_dense(model, tokens):
    from longlora.method.s2attn import configure_s2attn

    dense = strided_perplexity(model, tokens, 64, progress=False)["perplexity"]
    s2 = strided_perplexity(model, tokens, 64, attention="s2", group_size_ratio=0.25, progress=False)["perplexity"]
    assert model.config._attn_implementation == "sdpa" and not getattr(model.config, "s2attn_in_eval", False)
    assert strided_perplexity(model, tokens, 64, progress=False)["perplexity"] == pytest.approx(dense, rel=1e-6)
    # The reference: the same model in training mode (no dropout) runs S²-Attn.
    reference = LlamaForCausalLM(copy.deepcopy(model.config))
    reference.load_state_dict(model.state_dict())
    configure_s2attn(reference, group_size_ratio=0.25)
    reference.train()
    want, _ = direct_strided(reference, tokens, 64, 64)
    assert s2 == pytest.approx(want, rel=1e-5)
    assert s2 != pytest.approx(dense, rel=1e-4)


def test_nll_computed_in_chunks_of_positions_is_the_same(model, tokens, monkeypatch):
    import longlora.evaluation.perplexity

    whole = strided_perplexity(model, tokens, 64, 16, batch_size=2, progress=False)["perplexity"]
    monkeypatch.setattr(longlora.evaluation.perplexity, "_NLL_CHUNK", 7)  # 63 predictions: 9 chunks
    assert strided_perplexity(model, tokens, 64, 16, batch_size=2, progress=False)["perplexity"] == \
        pytest.approx(whole, rel=1e-6)
    want, _ = direct_windowed(model, tokens, 64, 16)
    assert windowed_perplexity(model, tokens, 64, 16, progress=False)["perplexity"] == pytest.approx(want, rel=1e-5)
