"""S²-aware sequence parallelism (longlora/method/context_parallel.py): a row cut into P shards gives exactly the
whole row's S²-Attn, loss and gradients, exchanging only the K/V that cross a shard boundary.

Reference: the one-rank S²-Attn (`shifted_sparse_attention`, itself checked against dense masked attention in
test_s2attn.py) and the one-rank model. First all shards in one process (`LocalLink`: autograd carries the halo's
gradients), then 2 and 4 processes on gloo (`HaloLink`: point-to-point sends, forward and backward).
"""

from __future__ import annotations

import json

import pytest
import torch

from longlora.method.context_parallel import (
    IGNORE_INDEX,
    LocalLink,
    halo_needs,
    plan_shards,
    shard_batch,
    sharded_s2_attention,
)
from longlora.method.s2attn import document_boundaries, grouped_causal_attention, shifted_sparse_attention

# Two rows of 64 tokens; the first packs documents of 13, 30 and 21 tokens, the second of 5 and 59: with G = 8 and
# 2 or 4 shards, documents cross shard boundaries at every offset class (inside a group, on a half-group, …).
PACKED = torch.stack([
    torch.cat([torch.arange(13), torch.arange(30), torch.arange(21)]),
    torch.cat([torch.arange(5), torch.arange(59)]),
])


def _whole_and_sharded(heads, heads_kv, shards, group_size=8, position_ids=None, shift=True, rows=2, length=64):
    torch.manual_seed(0)
    q = torch.randn(rows, heads, length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(rows, heads_kv, length, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(rows, heads_kv, length, 8, dtype=torch.float64, requires_grad=True)
    if shift:
        documents = None if position_ids is None else document_boundaries(rows, length, position_ids=position_ids)
        whole = shifted_sparse_attention(q, k, v, group_size, documents=documents)
    else:
        whole = grouped_causal_attention(q, k, v, group_size)
    weights = torch.randn_like(whole)
    whole_grads = torch.autograd.grad((whole * weights).sum(), (q, k, v))

    link, pieces, size = LocalLink(), [], length // shards
    batch = {"input_ids": torch.zeros(rows, length, dtype=torch.long)}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    for index in range(shards):
        shard = shard_batch(batch, shards, index, group_size, shift=shift, link=link)["sequence_shard"]
        cut = slice(index * size, (index + 1) * size)
        pieces.append(sharded_s2_attention(q[:, :, cut], k[:, :, cut], v[:, :, cut], shard))
        link.next_shard()
    sharded = torch.cat(pieces, dim=2)
    sharded_grads = torch.autograd.grad((sharded * weights).sum(), (q, k, v))
    return (whole, whole_grads), (sharded, sharded_grads), link.bytes_sent


@pytest.mark.parametrize("heads,heads_kv", [(9, 3), (8, 2), (4, 4), (15, 5), (6, 1), (1, 1)])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shards_give_the_whole_rows_attention_and_gradients(heads, heads_kv, shards):
    (whole, whole_grads), (sharded, sharded_grads), _ = _whole_and_sharded(heads, heads_kv, shards)
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-12)
    for got, want in zip(sharded_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("heads,heads_kv", [(9, 3), (8, 2)])
def test_packed_documents_crossing_shard_boundaries(heads, heads_kv, shards):
    (whole, whole_grads), (sharded, sharded_grads), _ = _whole_and_sharded(heads, heads_kv, shards,
                                                                           position_ids=PACKED)
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-12)
    for got, want in zip(sharded_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_without_the_shift_no_rank_sends_anything():
    (whole, _), (sharded, _), sent = _whole_and_sharded(9, 3, 4, shift=False)
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-12)
    assert sent == 0


@pytest.mark.parametrize("heads,heads_kv,shifted_kv_heads", [(8, 2, 1), (4, 4, 2), (9, 3, 2), (1, 1, 1)])
def test_only_the_shifted_heads_last_half_group_is_sent(heads, heads_kv, shifted_kv_heads):
    """Rows of one document: each boundary carries K and V of the shifted half's kv heads for G/2 positions (a kv
    head shared by both halves, as with 9 heads over 3, goes too), and nothing of the unshifted half."""
    shards, group_size, rows, head_dim, itemsize = 4, 8, 2, 8, 8
    *_, sent = _whole_and_sharded(heads, heads_kv, shards, group_size=group_size, rows=rows)
    per_boundary = 2 * rows * shifted_kv_heads * (group_size // 2) * head_dim * itemsize
    assert sent == (shards - 1) * per_boundary


def test_halo_needs_follow_the_document_a_shard_starts_in():
    positions = PACKED[:1]  # documents [0, 13), [13, 43), [43, 64)
    # Token 16 is 3 tokens into the document starting at 13: its unshifted group started 3 tokens before, its
    # shifted one (groups [13, 17), [17, 25), …) also 3 before.
    assert halo_needs(positions, 16, 8) == (3, 3)
    # Token 32 is 19 into that document: unshifted group [29, 37) starts 3 before; shifted [29, 37)… offset 19 − 4
    # = 15 → 15 mod 8 = 7 before.
    assert halo_needs(positions, 32, 8) == (3, 7)
    # A document starting exactly at the shard needs nothing; one row of a single document: 0 and G/2.
    assert halo_needs(torch.cat([torch.arange(16), torch.arange(48)])[None], 16, 8) == (0, 0)
    assert halo_needs(torch.arange(64)[None], 16, 8) == (0, 4)
    assert halo_needs(torch.arange(64)[None], 0, 8) == (0, 0)


def test_plan_refuses_rows_that_do_not_split_into_whole_groups():
    with pytest.raises(ValueError, match="a row of 48 tokens cannot be cut into 4 shards of whole S² groups of 8"):
        plan_shards(torch.arange(48)[None], 4, 8)


def test_shard_batch_cuts_every_row_tensor_and_shifts_labels_over_the_whole_row():
    ids = torch.arange(32).reshape(2, 16)
    labels = ids.clone()
    labels[1, 10:] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    first, second = (shard_batch(batch, 2, index, 4) for index in (0, 1))
    assert first["input_ids"].tolist() == [list(range(8)), list(range(16, 24))]
    assert second["position_ids"].tolist() == [list(range(8, 16))] * 2  # the row's positions, not the shard's
    # The first shard's last token predicts the second shard's first.
    assert first["shift_labels"][:, -1].tolist() == [8, 24]
    assert second["shift_labels"][:, -1].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert second["shift_labels"][1].tolist() == [25, IGNORE_INDEX, *[IGNORE_INDEX] * 6]
    shard = second["sequence_shard"]
    assert (shard.index, shard.shards, shard.start, shard.length, shard.recv, shard.send) == (1, 2, 8, 16, (0, 2),
                                                                                               (0, 0))


# --- the model: a tiny Llama's loss and gradients, sharded vs whole --------------------------------------------------


def _tiny_llama(heads, heads_kv, checkpointing=False, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    import longlora.method.s2attn as s2

    config = LlamaConfig(vocab_size=97, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads_kv, max_position_embeddings=128,
                         tie_word_embeddings=True)
    s2.configure_s2attn(config, group_size_ratio=0.25)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _batch(packed: bool) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 64))
    labels = ids.clone()
    labels[0, 40:] = IGNORE_INDEX  # a padded tail: the token average counts only real targets
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = PACKED
    return batch


def _whole_row(model, batch) -> tuple[float, dict]:
    items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=items).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_sharded_model_loss_and_gradients_equal_the_whole_rows(packed):
    model, batch = _tiny_llama(9, 3, dtype=torch.float64), _batch(packed)
    whole_loss, whole_grads = _whole_row(model, batch)
    items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    model.zero_grad()
    link, total = LocalLink(), 0.0
    for index in range(4):
        total = total + model(**shard_batch(batch, 4, index, 16, link=link), num_items_in_batch=items).loss
        link.next_shard()
    total.backward()
    assert total.item() == pytest.approx(whole_loss, rel=1e-6)  # the loss itself is computed in float32
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, whole_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_shard_in_eval_mode_is_refused():
    model = _tiny_llama(4, 2).eval()
    with pytest.raises(ValueError, match="runs S²-Attn in training only"):
        model(**shard_batch(_batch(False), 2, 0, 16, link=LocalLink()))


# --- several processes (gloo) ------------------------------------------------------------------------------------

CASES = {
    "heads 9 over 3 kv heads": {"heads": 9, "heads_kv": 3, "packed": False, "checkpointing": False},
    "grouped-query 8 over 2, packed documents": {"heads": 8, "heads_kv": 2, "packed": True, "checkpointing": False},
    "heads 9 over 3, gradient checkpointing, packed": {"heads": 9, "heads_kv": 3, "packed": True,
                                                       "checkpointing": True},
}


def _rank(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from longlora.method.context_parallel import HaloLink

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        link = HaloLink(group, rank - 1 if rank else None, rank + 1 if rank + 1 < world else None)
        report = {}
        for name, case in CASES.items():
            model, batch = _tiny_llama(case["heads"], case["heads_kv"], case["checkpointing"]), _batch(case["packed"])
            whole_loss, whole_grads = _whole_row(model, batch)
            items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            model.zero_grad()
            link.bytes_sent = 0
            loss = model(**shard_batch(batch, world, rank, 16, link=link), num_items_in_batch=items).loss
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            errors = {}
            for param_name, param in model.named_parameters():
                grad = param.grad.clone()
                dist.all_reduce(grad, group=group)
                scale = whole_grads[param_name].abs().max().item()
                errors[param_name] = (grad - whole_grads[param_name]).abs().max().item() / max(scale, 1e-12)
            report[name] = {"loss": total.item(), "whole_loss": whole_loss, "worst_relative_grad_error":
                            max(errors.values()), "bytes_sent": link.bytes_sent}
        with open(f"{out_dir}/rank{rank}.json", "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_give_the_single_rank_loss_and_gradients(world, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    for name in CASES:
        for rank, report in enumerate(reports):
            got = report[name]
            assert got["loss"] == pytest.approx(got["whole_loss"], rel=1e-5), (name, rank)
            assert got["worst_relative_grad_error"] < 1e-5, (name, rank, got)
        # The last rank sends nothing forward; every other one sends (and receives gradients back).
        assert reports[-1][name]["bytes_sent"] > 0  # gradients of its halo, back to the previous rank
        assert all(report[name]["bytes_sent"] > 0 for report in reports[:-1])
    assert reports[0]["heads 9 over 3 kv heads"]["bytes_sent"] == 2 * 2 * (  # 2 layers × K and V
        2 * 2 * 8 * 8 * 4)  # rows × shifted kv heads × G/2 × head dim × fp32 bytes: rank 0 sends forward only
