"""Model-level tests of the "s2attn" transformers backend on tiny Llama, Mistral, Qwen2, Qwen3, Gemma and Phi-3 models.

The families differ where it matters to an attention backend: Qwen3 normalises queries and keys per head, Gemma
scales queries by its own rule and ties its embeddings, Phi-3 projects q, k and v with one fused matrix, Mistral and
Qwen2 pass a sliding window. All of them reach S²-Attn through transformers' attention interface alone.
"""

import warnings

import pytest
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import longlora.method.s2attn as s2
from tests.test_s2attn import reference

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
VOCAB = 128
HEAD_DIM = 16


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny(arch, attn="s2attn", group_size=8, seed=0, heads=4, kv_heads=2, **overrides):
    config_cls, model_cls = ARCHS[arch]
    fields = dict(
        hidden_size=heads * HEAD_DIM,
        head_dim=HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = config_cls(**{**fields, **overrides})
    if attn == "s2attn":
        s2.configure_s2attn(config, group_size=group_size)
    else:
        config.s2attn_group_size = group_size  # read by the reference backend below
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Dense attention with an explicit S² mask per head (tests/test_s2attn.py's float64 reference), as a backend."""
    assert attention_mask is None and dropout == 0.0  # what the comparison below feeds it
    group_size = s2.s2attn_group_size(module.config, query.shape[2])
    return reference(query, key, value, group_size, scale=scaling).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("s2_reference", _reference_attention)


def twin(model, arch, attn="sdpa", **overrides):
    """Same weights, another attention backend."""
    other = tiny(arch, attn=attn, **overrides)
    other.load_state_dict(model.state_dict())
    other.train(model.training)
    return other


def tokens(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def count_s2_calls(monkeypatch):
    calls = []
    original = s2.shifted_sparse_attention

    def counting(*args, **kwargs):
        calls.append(args[3])  # group size
        return original(*args, **kwargs)

    monkeypatch.setattr(s2, "shifted_sparse_attention", counting)
    return calls


HEAD_SHAPES = [(4, 2), (9, 3)]  # (attention heads, key/value heads): even, and odd with grouped-query attention
ODD_HEADS = [(15, 5), (3, 1), (9, 9), (5, 1)]  # more odd counts: grouped-query, multi-query, multi-head


@pytest.mark.parametrize(("arch", "heads", "kv_heads"),
                         [(arch, h, kv) for arch in ARCHS for h, kv in HEAD_SHAPES]
                         + [("llama", h, kv) for h, kv in ODD_HEADS])
def test_training_forward_and_gradients_equal_the_reference(arch, heads, kv_heads):
    """The whole model in float64, S²-Attn against a dense backend masked head by head: logits and every gradient.
    With an odd count, heads [0, h//2) are unshifted and [h//2, h) shifted."""
    model = tiny(arch, heads=heads, kv_heads=kv_heads).double().train()
    expected = tiny(arch, attn="s2_reference", heads=heads, kv_heads=kv_heads).double().train()
    expected.load_state_dict(model.state_dict())
    dense = tiny(arch, attn="sdpa", heads=heads, kv_heads=kv_heads).double().train()
    dense.load_state_dict(model.state_dict())
    ids = tokens(2, 32)
    out, want = model(ids, labels=ids), expected(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-9, atol=1e-9)
    # Not vacuous: at 32 tokens in groups of 8, S² attends differently from dense attention.
    assert (out.logits - dense(ids).logits).abs().max() > 1e-3
    out.loss.backward()
    want.loss.backward()
    grads = dict(expected.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize(("heads", "kv_heads"), HEAD_SHAPES)
def test_without_shift_each_group_trains_as_if_alone(heads, kv_heads):
    """configure_s2attn(shift=False): no information crosses a group boundary in training, so the logits of each
    group of 8 equal the dense model's on those 8 tokens alone (RoPE depends on relative positions only)."""
    model = tiny("llama", heads=heads, kv_heads=kv_heads).double().train()
    s2.configure_s2attn(model, group_size=8, shift=False)
    dense = twin(model, "llama", heads=heads, kv_heads=kv_heads).double().train()
    ids = tokens(2, 32)
    alone = torch.cat([dense(ids[:, start:start + 8]).logits for start in range(0, 32, 8)], dim=1)
    # 1e-6, not 1e-9: transformers computes the rotary angles in float32, so positions 8k… round differently.
    torch.testing.assert_close(model(ids).logits, alone, rtol=1e-6, atol=1e-6)
    s2.configure_s2attn(model, group_size=8)  # the method: the shifted half reaches across the boundaries
    assert (model(ids).logits - alone).abs().max() > 1e-3


def test_attention_score_terms_s2_cannot_apply_are_refused():
    """Gemma 2 soft-caps its attention logits: S² (and SDPA) would silently leave that out."""
    config = Gemma2Config(hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0,
                          attn_logit_softcapping=50.0)
    s2.configure_s2attn(config, group_size=8)
    model = Gemma2ForCausalLM(config).train()
    with pytest.raises(ValueError, match=r"soft-capping .*: Gemma2Attention passes softcap=50\.0"):
        model(tokens(1, 32), use_cache=False)
    config.attn_logit_softcapping = None
    assert Gemma2ForCausalLM(config).train()(tokens(1, 32), use_cache=False).logits.shape == (1, 32, VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_with_s2attn_lowers_the_loss(arch):
    model = tiny(arch).train()
    ids = tokens(2, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_s2_is_active_in_training_and_dense_in_eval(arch, count_s2_calls):
    model = tiny(arch).train()
    dense = twin(model, arch)
    ids = tokens(2, 32)

    train_logits = model(ids).logits
    assert count_s2_calls == [8, 8]  # once per layer, with the configured group size
    # S² restricts attention when seq > G: the training forward must differ from dense attention.
    assert (train_logits - dense(ids).logits).abs().max() > 1e-3

    model.eval()
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    assert len(count_s2_calls) == 2  # eval never ran S²


@pytest.mark.parametrize(("arch", "heads", "kv_heads"), [(arch, 4, 2) for arch in ARCHS] + [("llama", 9, 3)])
def test_right_padded_rows_equal_rows_alone(arch, heads, kv_heads):
    model = tiny(arch, heads=heads, kv_heads=kv_heads).train()
    lengths = [64, 32, 16]  # multiples of the group size 8
    rows = [tokens(1, length, seed=i)[0] for i, length in enumerate(lengths)]
    ids = torch.zeros(3, 64, dtype=torch.long)
    mask = torch.zeros(3, 64, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    batched = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched[i, : len(row)], alone, rtol=0, atol=1e-5)


def test_left_padding_in_training_raises():
    model = tiny("llama").train()
    ids = tokens(2, 32)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, :8] = 0
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_equals_sdpa(arch):
    model = tiny(arch).eval()
    dense = twin(model, arch)
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding is fine for dense generation
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (2, 18)
    assert torch.equal(out, dense.generate(ids, **kwargs))

    with torch.no_grad():
        first = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
        expected = dense(ids).logits[:, 8:]
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-5)


def test_sliding_window_is_respected_in_eval():
    model = tiny("mistral", sliding_window=8).eval()
    dense = twin(model, "mistral", sliding_window=8)
    full = twin(model, "mistral", sliding_window=None)
    ids = tokens(2, 32)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, dense(ids).logits, rtol=0, atol=1e-5)
        assert (logits - full(ids).logits).abs().max() > 1e-3  # the window matters at this length


def test_group_larger_than_sliding_window_warns():
    model = tiny("mistral", group_size=16, sliding_window=8).train()
    s2._warned.clear()
    with pytest.warns(UserWarning, match="sliding window 8"):
        model(tokens(1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(tokens(1, 32))  # once is enough


def test_custom_4d_mask_in_training_falls_back_to_dense():
    """A 4D mask is a pattern S² cannot honour (packed documents come as position_ids instead, see
    tests/test_s2attn_documents.py): dense attention with that mask, not silently wrong."""
    model = tiny("llama").train()
    dense = twin(model, "llama")
    ids = tokens(1, 32)
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    mask[16:, :16] = False  # two independent halves
    s2._warned.clear()
    with pytest.warns(UserWarning, match="4D attention mask"):
        logits = model(ids, attention_mask=mask[None, None], use_cache=False).logits
    expected = dense(ids, attention_mask=mask[None, None], use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # Not vacuous: the mask was applied (the result differs from S² on the same row).
    assert (logits - model(ids, use_cache=False).logits).abs().max() > 1e-3


def test_group_size_from_ratio(count_s2_calls):
    model = tiny("llama", group_size=None).train()
    model(tokens(1, 32))
    assert count_s2_calls == [8, 8]  # default ratio 0.25 × 32
    for length in (36, 34):  # group 9 is odd, 8.5 is no integer
        with pytest.raises(ValueError, match=rf"ratio 0.25 .*sequence length {length}"):
            model(tokens(1, length))
    s2.configure_s2attn(model, group_size_ratio=0.5)
    model(tokens(1, 32))
    assert count_s2_calls[2:] == [16, 16]


def test_gradient_checkpointing_gives_the_same_gradients():
    """LongLoRA trains with activation checkpointing: the recomputed forward must run the same S² attention."""
    model = tiny("llama").train()
    ids = tokens(2, 32)
    model(ids, labels=ids, use_cache=False).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=1e-6, msg=name)


def test_configure_on_a_built_model_and_validation(count_s2_calls):
    model = tiny("qwen2", attn="sdpa").train()
    s2.configure_s2attn(model, group_size=16)
    assert model.config._attn_implementation == s2.S2ATTN
    assert model.config.s2attn_group_size == 16
    model(tokens(1, 32))
    assert count_s2_calls == [16, 16]
    with pytest.raises(ValueError, match="not an even integer"):
        s2.configure_s2attn(model.config, group_size=7)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        s2.configure_s2attn(model.config, group_size_ratio=1.5)
