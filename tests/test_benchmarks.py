"""benchmarks/train_step.py measures what it says: the same model and optimizer under each attention, and a
README-ready table from its smallest run (correctness only: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from stages.params import load_params
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks/train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register_no_attention()
    return module


@pytest.mark.parametrize("method", ["lora_plus", "full"])
def test_copies_differ_only_in_attention(train_step, method):
    params = load_params(ROOT / "params.yaml")
    trained = train_step.build(params, 256, method, checkpointing=False)
    assert {v: t.model.config._attn_implementation for v, t in trained.items()} == {
        "sdpa": "sdpa", "s2attn": "s2attn", "none": train_step.NO_ATTENTION}
    states = [t.model.state_dict() for t in trained.values()]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    counts = {sum(w.numel() for w in t.trainable) for t in trained.values()}
    total = sum(w.numel() for w in trained["sdpa"].model.parameters())
    assert len(counts) == 1
    assert (counts.pop() < total / 2) == (method == "lora_plus")


def test_s2_step_runs_shifted_sparse_attention(train_step, monkeypatch):
    import longlora.method.s2attn as s2

    params = load_params(ROOT / "params.yaml")
    trained = train_step.build(params, 256, "lora_plus", checkpointing=True, variants=("s2attn",))["s2attn"]
    calls = []
    original = s2.shifted_sparse_attention
    monkeypatch.setattr(s2, "shifted_sparse_attention", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    before = [w.detach().clone() for w in trained.trainable]
    loss = trained.step(train_step.tokens(params, 256, torch.device("cpu")))
    assert math.isfinite(loss)
    # Every layer ran S² with group = seq/4, twice with checkpointing (forward and recomputation), and the
    # optimizer moved the weights.
    assert calls == [64] * (2 * params.build_base_model.num_layers)
    assert any(not torch.equal(b, w) for b, w in zip(before, trained.trainable, strict=True))


def test_quick_run_prints_the_table(train_step, monkeypatch, capsys, tmp_path):
    out = tmp_path / "rows.json"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--quick", "--seqs", "256", "--threads", str(threads),
                                      "--clock", "cpu", "--json", str(out)])
    try:
        train_step.main()
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| method | ckpt | seq | sdpa | S² |" in printed
    rows = json.loads(out.read_text())
    assert [(r["method"], r["seq"]) for r in rows] == [("lora_plus", 256), ("full", 256)]
    for row in rows:
        assert f"| {row['method']} | off | 256 |" in printed
        assert all(math.isfinite(x) and x > 0 for x in row["ms"].values())
        assert all(math.isfinite(x) for x in row["first_losses"].values())
        # Random tokens from an untrained model: every variant starts near ln(vocab).
        assert all(abs(x - math.log(1024)) < 0.5 for x in row["first_losses"].values())
        assert row["bound"] == pytest.approx(1 / ((1 - row["attention_share"])
                                                  + row["attention_share"] / row["r_attn"]))


def test_s2attn_speed_packed_case_runs_on_a_real_packed_block(monkeypatch, capsys, single_torch_thread):
    """benchmarks/s2attn_speed.py's packed case: the block's document boundaries come from the embedded corpus, and
    the three variants run and print one row (no timing is asserted)."""
    spec = importlib.util.spec_from_file_location("s2attn_speed", ROOT / "benchmarks/s2attn_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    documents = module.packed_documents(16384).tolist()
    assert documents[0] == 0 and documents[-1] == 16384 and len(documents) > 2
    assert all(a < b for a, b in zip(documents, documents[1:], strict=False))
    monkeypatch.setattr(sys, "argv", ["s2attn_speed.py", "--seqs", "--repeats", "1", "--packed", "512"])
    module.main()
    printed = capsys.readouterr().out
    assert "packed block of 512 tokens" in printed and "S²/doc-S²" in printed
    row = printed.strip().splitlines()[-1].split()
    assert len(row) == 5 and all(float(x.rstrip("×")) > 0 for x in row)
# --- benchmarks/cost_model.py ----------------------------------------------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_cost_model_against_hand_computed_values():
    cm = _load("cost_model")
    # Llama-2-7B's published count: 32 × (4·4096² + 3·4096·11008 + 2·4096) + 2·32000·4096 + 4096.
    assert cm.LLAMA2_7B.parameters == 6_738_415_616
    assert sum(cm.LLAMA2_7B.lora_plus_trainable().values()) == 32 * 4 * 8 * 8192 + 32000 * 4096 + 65 * 4096
    # 8 tokens in groups of 2: unshifted heads 4 groups × 3 pairs = 12; shifted 3 groups × 3 + 2 half-groups × 1 = 11.
    assert cm.dense_pairs(8) == 36
    assert cm.s2_pairs(8, 2) == 11.5
    assert cm.s2_pairs(2**20, 2**18) / cm.dense_pairs(2**20) == pytest.approx(15 / 64, rel=1e-5)
    # A model small enough to count by hand: per layer 4·2² + 3·2·3 = 34 weights, head 10·2; 4 tokens, 10 pairs.
    toy = cm.Model(vocab=10, hidden=2, layers=1, heads=2, ff=3)
    assert cm.linear_flops_per_token(toy) == 2 * (34 + 20)
    assert cm.attention_flops(toy, 4, s2=False) == 4 * 2 * 10
    # LoRA+: frozen linears forward + activation gradients (2 × 108 × 4), attention 3 × 80; checkpointing adds the
    # layers' forward again (108 × 4 − the head's 2 × 10 × 2 × 4 = 272) and attention's (80).
    assert cm.training_flops(toy, 4, s2=False, checkpointing=False) == 864 + 240
    assert cm.training_flops(toy, 4, s2=False) == 864 + 240 + 272 + 80
    assert cm.training_flops(toy, 4, s2=False, method="full", checkpointing=False) == 3 * 432 + 240
    # ZeRO-3 shards the bf16 weights over the GPUs; ZeRO-2 keeps them whole.
    zero2, zero3 = (cm.memory_gib(cm.LLAMA2_7B, 8192, 8, zero) for zero in (2, 3))
    assert zero2["weights"] == pytest.approx(2 * 6_738_415_616 / 2**30)
    assert zero3["weights"] == pytest.approx(zero2["weights"] / 8)
    assert "| 100,000 |" in cm.tables()


def test_cost_model_memory_per_rank_under_sequence_parallelism_by_hand():
    cm = _load("cost_model")
    # Llama-2-7B LoRA+, ZeRO-3 over 8 GPUs, 262144 tokens over P = 4 ranks: 65536 tokens each, S² group 65536.
    weights = 2 * 6_738_415_616 / 8
    states = 14 * (32 * 4 * 8 * 8192 + 32000 * 4096 + 65 * 4096) / 8
    activations = 32 * 65536 * 4096 * 2 + 34 * 65536 * 4096 + 65536 * 32000 * (2 + 4)
    halo = 2 * 2 * 32768 * 16 * 128 * 2  # K and V, + gradients; G/2 tokens; 16 shifted kv heads × head dim; bf16
    m = cm.sequence_parallel_memory_gib(cm.LLAMA2_7B, 262144, 4, gpus=8, zero=3)
    assert m["halo"] == halo / 2**30 == 0.5
    assert m["total"] == pytest.approx((weights + states + activations + halo) / 2**30, rel=1e-12)
    assert m["total"] == pytest.approx(38.5, abs=0.05)
    # One rank is the existing model at the whole length, no halo; P = 8 takes groups of N/8, so half the halo.
    one = cm.sequence_parallel_memory_gib(cm.LLAMA2_7B, 262144, 1)
    assert one["total"] == cm.memory_gib(cm.LLAMA2_7B, 262144, 8, 3)["total"] and one["halo"] == 0
    assert cm.halo_bytes(cm.LLAMA2_7B, 262144, 8) == halo // 2
    # Grouped-query attention: 64 heads over 8 kv heads (Llama-2-70B's), the shifted half served by kv heads 4-7.
    assert cm.halo_bytes(cm.Model(hidden=8192, heads=64), 1024, 2, kv_heads=8) == 2 * 2 * 128 * 4 * 128 * 2
    assert [cm.fits(x) for x in (72.0, 72.1, 80.0, 80.1)] == ["yes", "tight", "tight", "no"]
    table = cm.sequence_parallel_table()
    assert "| 262,144 | 4 | 65,536 (N/4) | 1.6 + 0.2 + 36.2 + 0.50 = **38.5** | yes |" in table
    assert "| 262,144 | 1 |" in table and "| no |" in table
    assert "| 32,768 | 8 | 4,096 (N/8) |" in table


# --- benchmarks/context_parallel.py ----------------------------------------------------------------------------------


def test_context_parallel_bytes_against_hand_computed_values():
    cp = _load("context_parallel")
    llama = cp.LLAMA2_7B
    assert (llama.heads, llama.kv_heads, llama.head_dim, llama.itemsize, llama.shifted_kv_heads) == (32, 32, 128, 2, 16)
    # Query heads [h/2, h) are served by kv heads [(h/2) // (h/h_kv), h_kv): 9 over 3 → kv heads 1, 2 (kv head 1 serves
    # both halves); 8 over 2 → kv head 1; Llama-2-70B's 64 over 8 → kv heads 4-7.
    shapes = ((9, 3), (8, 2), (64, 8))
    assert [cp.AttentionShape(heads=h, kv_heads=kv).shifted_kv_heads for h, kv in shapes] == [2, 1, 4]
    # 32K tokens, P = 4, G = 8192: a boundary carries K and V of 16 kv heads × 128 for 4096 tokens in bf16 = 32 MiB.
    halo = 2 * 16 * 4096 * 128 * 2
    assert cp.s2_halo_bytes(llama, 8192) == halo == 32 * 2**20
    assert [cp.s2_rank_bytes(llama, 4, 8192, r) for r in range(4)] == [halo, 2 * halo, 2 * halo, halo]
    assert [cp.s2_rank_bytes(llama, 4, 8192, r, checkpointing=True) for r in range(4)] == [2 * halo, 3 * halo,
                                                                                             3 * halo, halo]
    assert cp.s2_bytes(llama, 32768, 4) == 2 * halo
    assert cp.s2_bytes(llama, 32768, 4, checkpointing=True) == 3 * halo
    assert (cp.s2_bytes(llama, 32768, 2), cp.s2_bytes(llama, 32768, 2, checkpointing=True)) == (halo, 2 * halo)
    # P = 8 takes groups of N/8: half the halo of P = 4.
    assert cp.group_size(32768, 8) == 4096 and cp.s2_bytes(llama, 32768, 8) == halo
    # Ring: the local K/V block, 2 × 8192 tokens × 32 kv heads × 128 × 2 bytes = 128 MiB, 3 × (P − 1) = 9 times.
    assert cp.ring_bytes(llama, 32768, 4) == 9 * 2 * 8192 * 32 * 128 * 2 == 1152 * 2**20
    # Ulysses: 3/4 of Q, K, V and the output (8192 × 4096 each, bf16), forward and backward.
    assert cp.ulysses_bytes(llama, 32768, 4) == 2 * 4 * 8192 * 4096 * 2 * 3 // 4 == 384 * 2**20
    with pytest.raises(ValueError, match="Ulysses needs P <= kv heads"):
        cp.ulysses_bytes(cp.AttentionShape(heads=64, kv_heads=8), 32768, 16)
    with pytest.raises(ValueError, match="do not split into 4 shards"):
        cp.s2_bytes(llama, 32768, 4, group=16384)
    table = cp.table()
    assert "| 32,768 | 4 | 8,192 (N/4) | 64 | 96 | 1,152 | 384 | 18× | 6× |" in table
    assert "| 262,144 | 8 | 32,768 (N/8) |" in table and "| 100,000 | 2 |" in table


def test_context_parallel_gloo_count_agrees_with_the_formula():
    cp = _load("context_parallel")
    rows = cp.count_on_gloo(2)
    assert len(rows) == 2 * len(cp.COUNT_CASES)
    assert all(row["counted"] == row["formula"] for row in rows), rows
    counted = {(row["case"], row["rank"]): row["counted"] for row in rows}
    # By hand, 9 heads over 3 (2 shifted kv heads): 2 layers × K and V × 2 rows × 2 kv heads × G/2 = 8 tokens × head
    # dim 8 × 4 bytes = 4096 bytes; rank 0 sends it forward (twice with checkpointing), rank 1 its gradient back.
    assert counted[("9 heads over 3", 0)] == counted[("9 heads over 3", 1)] == 4096
    assert counted[("9 heads over 3, checkpointing", 0)] == 8192
    assert counted[("8 heads over 2, checkpointing", 1)] == 2048


# --- benchmarks/replicate.py -----------------------------------------------------------------------------------------


def test_paired_differences_and_when_they_count_as_resolved():
    rp = _load("replicate")
    runs = [rp.Run("a", 0, {8: 10.0}), rp.Run("a", 1, {8: 12.0}), rp.Run("b", 0, {8: 11.0}),
            rp.Run("b", 1, {8: 14.0}), rp.Run("c", 0, {8: 20.0}), rp.Run("c", 1, {8: 21.0}),
            rp.Run("untrained", None, {8: 30.0})]
    ab = rp.paired(runs, "a", "b", 8)
    assert ab["diffs"] == [1.0, 2.0] and ab["mean"] == 1.5
    assert ab["spread"] == pytest.approx(math.sqrt(4.5))  # sd of 11 and 14, the larger of the two
    assert not ab["resolved"]  # same sign, but within the seed-to-seed spread
    assert rp.paired(runs, "a", "c", 8)["resolved"]
    # An untrained variant (no seed) stands against every seed of the other.
    assert rp.paired(runs, "untrained", "c", 8)["diffs"] == [-10.0, -9.0]


def save_tiny_model(folder, tokenizer, context: int) -> None:
    """A random 2-layer Llama (hidden 32, 4 heads over 2 kv heads, tied embeddings) and the tokenizer, as a folder."""
    from transformers import LlamaForCausalLM

    from longlora.embedded.tiny import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, context_length=context, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama (64 positions) with the tiny tokenizer, random blocks of 256 tokens, a random held-out
    stream, and params.yaml extending to 256: what the study reads, built in a second."""
    import numpy as np
    import yaml

    from longlora.data.packing import Packed, PackedBlocksWriter, TokenStreamWriter
    from tests.conftest import tiny_params_dict

    root = tmp_path_factory.mktemp("replicate")
    vocab = len(tiny_tokenizer)
    save_tiny_model(root / "base", tiny_tokenizer, context=64)
    rng = np.random.default_rng(0)
    (root / "blocks").mkdir()
    writer = PackedBlocksWriter(root / "blocks", 256, np.uint16)
    writer.write(Packed(rng.integers(4, vocab, size=(16, 256)).astype(np.uint16), np.zeros(16, np.int32),
                        np.ones(16, np.int64)))
    writer.close({"vocab_size": vocab, "padded_tokens": 0})
    (root / "eval").mkdir()
    writer = TokenStreamWriter(root / "eval", np.uint16)
    writer.write(rng.integers(4, vocab, size=4096).astype(np.uint16), np.array([4096]))
    writer.close()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(model={"target_context": 256})))
    return root


def test_quick_study_runs_the_extend_stage_per_variant_and_writes_the_table(study_inputs, tmp_path, monkeypatch):
    import csv

    from transformers import AutoTokenizer

    from longlora.evaluation.passkey import shortest_trial_length

    rp = _load("replicate")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory: each run works in its own folder
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--quick", "--variants", "pi", "no_shift", "--threads", "1", "--params", str(study_inputs / "params.yaml"),
            "--base", str(study_inputs / "base"), "--pretrain", str(study_inputs / "blocks"),
            "--eval", str(study_inputs / "eval"), "--out", str(out), "--work", str(work)]
    threads = torch.get_num_threads()
    try:
        runs = rp.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert [(r.variant, r.seed) for r in runs] == [("pi", None), ("no_shift", 0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "work"]
    # The trained variant went through the extend stage with its overrides: S² without the shift, 2 steps.
    described = json.loads((work / "no_shift-seed0/extend/extension.json").read_text())
    assert described["params"]["s2attn"]["shift"] is False
    assert described["params"]["extend"]["max_steps"] == 2
    assert described["attention_in_training"] == "s2" and described["method"] == "lora_plus"
    assert (work / "no_shift-seed0/data/logs/extend/timings.json").is_file()
    trained = runs[1]
    assert trained.cpu_seconds > 0 and trained.peak_memory_mib > 0 and trained.tokens_per_second > 0
    shortest = shortest_trial_length(AutoTokenizer.from_pretrained(study_inputs / "base"), range(1))
    assert 64 < shortest <= 256
    with open(out / "replication.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("pi", ""), ("no_shift", "0")]
    for row in rows:
        # An untrained model on random tokens: about the vocabulary size, finite, at every length.
        assert all(100 < float(row[f"ppl_{n}"]) < 1000 for n in (64, 128, 256))
        # Passkey where its prompt fits (the tiny tokenizer needs many tokens for it), left empty where it does not.
        for n in (64, 128, 256):
            assert (row[f"passkey_{n}"] == "") is (n < shortest), (n, shortest)
            assert row[f"passkey_{n}"] == "" or 0 <= float(row[f"passkey_{n}"]) <= 1
    table = (out / "replication.md").read_text()
    assert f"Command: `python benchmarks/replicate.py {' '.join(argv)}`" in table
    assert "| 2. PI only |" in table and "| 7. PI + LoRA+, S²-Attn without shift |" in table
    assert (out / "replication.png").stat().st_size > 1000


def test_stage_exit_times_both_ways_of_ending_a_real_child_process(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("stage_exit", ROOT / "benchmarks/stage_exit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--rounds", "1", "--json", str(tmp_path / "exit.json")])
    seconds = json.loads((tmp_path / "exit.json").read_text())
    assert set(seconds) == {"plain", "exit_process"}
    assert all(len(values) == 1 and 0 < values[0] < 60 for values in seconds.values()), seconds
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| exit_process |" in printed and "exit_process / plain:" in printed


# --- benchmarks/sft_padding.py ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with the project's context (1024) and prepare_sft-shaped examples of 100–700 tokens (the
    first half prompt, label −100): what the benchmark reads, built in a second."""
    import datasets
    import numpy as np

    root = tmp_path_factory.mktemp("sft_padding")
    vocab = len(tiny_tokenizer)
    save_tiny_model(root / "model", tiny_tokenizer, context=1024)
    rng = np.random.default_rng(0)
    rows = []
    for length in rng.integers(100, 700, size=12).tolist():
        ids = rng.integers(4, vocab, size=length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "sft"))
    return root


def test_sft_padding_measures_the_stage_collator_both_ways(sft_inputs, tmp_path, capsys, single_torch_thread):
    import datasets

    sp = _load("sft_padding")
    out = tmp_path / "result.json"
    result = sp.main(["--model", str(sft_inputs / "model"), "--data", str(sft_inputs / "sft"), "--batches", "2",
                      "--rounds", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    batches = sp.draw_examples(datasets.load_from_disk(str(sft_inputs / "sft")), 2, 4, crop=0)
    lengths = [[len(e["input_ids"]) for e in batch] for batch in batches]
    padded, free = result["ways"]["padded"], result["ways"]["padding-free"]
    # Both ways train on the same real tokens; padded rows are the longest example rounded up to the group (256).
    assert padded["real_tokens"] == free["real_tokens"] == sum(map(sum, lengths))
    assert padded["padded_tokens"] == sum(4 * -(-max(b) // 256) * 256 - sum(b) for b in lengths)
    assert padded["rows"] == 8 and free["rows"] < 8  # several of these examples share a 1024-token row
    assert free["padding_share"] < padded["padding_share"]
    # The same targets through the same model: the losses agree to float32 rounding.
    assert result["max_loss_difference"] < 1e-5
    printed = capsys.readouterr().out
    assert "| padded | 8 |" in printed and "| padding-free |" in printed
    assert "padding-free / padded tokens/s:" in printed


def test_sft_padding_crop_keeps_each_example_end(sft_inputs):
    import datasets

    sp = _load("sft_padding")
    dataset = datasets.load_from_disk(str(sft_inputs / "sft"))
    full = sp.draw_examples(dataset, 2, 4, crop=0)
    cropped = sp.draw_examples(dataset, 2, 4, crop=96)
    assert len(dataset) == 12
    for whole, cut in zip(sum(full, []), sum(cropped, []), strict=True):
        n = len(cut["input_ids"])
        assert sp.MIN_CROP <= n <= 96
        assert cut["input_ids"] == whole["input_ids"][-n:] and cut["labels"] == whole["labels"][-n:]
    with pytest.raises(SystemExit, match="fewer than 4 × 4"):
        sp.draw_examples(dataset, 4, 4, crop=0)


def test_sft_padding_refuses_a_missing_dataset_naming_the_parameter(sft_inputs, tmp_path, capsys):
    sp = _load("sft_padding")
    with pytest.raises(SystemExit) as exit_info:
        sp.main(["--model", str(sft_inputs / "model"), "--data", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert f"sft.data {str(tmp_path / 'nothing')!r}: no dataset there" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_rope_headroom_loads_the_factor_asked_for_and_prints_one_row_per_factor_and_length(tmp_path, capsys,
                                                                                            single_torch_thread):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from longlora.method.rope import interpolated_config, rotary_inv_freq

    rh = _load("rope_headroom")
    base = ROOT / "data/base_model"
    scaled = interpolated_config(AutoConfig.from_pretrained(base), 1024, "yarn")  # factor 4
    AutoModelForCausalLM.from_pretrained(base, config=scaled).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "m")
    six = AutoModelForCausalLM.from_pretrained(base, config=interpolated_config(AutoConfig.from_pretrained(base),
                                                                                  1536, "yarn"))
    torch.testing.assert_close(rotary_inv_freq(rh.load_with_factor(str(tmp_path / "m"), 6.0)), rotary_inv_freq(six))

    rh.main(["--model", str(tmp_path / "m"), "--factors", "4", "6", "--lengths", "256", "--trials", "1",
             "--eval", str(tmp_path / "none"), "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:3] for row in rows] == [["| 4", "256", "—"], ["| 6", "256", "—"]]
    for row in rows:
        correct = [int(n) for n in row.split(" | ")[4].rstrip(" |").split(" / ")]
        assert len(correct) == 5 and all(n in (0, 1) for n in correct)
        assert row.split(" | ")[3] == f"{sum(correct) / 5:.0%}"

    AutoModelForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit, match="no RoPE scaling"):
        rh.load_with_factor(str(tmp_path / "plain"), 6.0)


# --- benchmarks/gpu_check.py (make gpu-check) ------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_0(capsys, tmp_path):
    check = _load("gpu_check")
    assert check.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no CUDA device here")
    assert not any(tmp_path.iterdir())  # nothing written without a GPU


def test_gpu_check_page_shows_every_row_and_every_failure():
    check = _load("gpu_check")
    env = {"card": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "torch": "2.13.0", "cuda": "12.8", "cudnn": 91000,
           "flash_attn": None, "python": "3.11.7", "auto": "varlen",
           "kernels": {"flash_attn": "flash-attn is not installed", "varlen": "runs", "flex": "runs", "sdpa": "runs"}}
    attention = [{"seq": 16384, "attention": "dense (SDPA flash)", "ms": 40.0, "speedup": 1.0, "peak_gib": 0.5},
                 {"seq": 16384, "attention": "S² varlen", "ms": 10.0, "speedup": 4.0, "peak_gib": 0.6},
                 {"seq": 16384, "attention": "S² flex", "error": "RuntimeError: boom"}]
    training = [{"seq": 16384, "attention": "S² (auto)", "s_per_step": 2.0, "tokens_per_s": 8192.0, "peak_gib": 30.0,
                 "parameters_b": 1.1}]
    page = check.markdown(env, (False, "1 failed, 3 passed"), attention, training)
    assert page.startswith("# GPU check: NVIDIA H100 80GB HBM3\n")
    assert "flash-attn absent" in page and "| auto picks | varlen |" in page
    assert "`pytest -m gpu`: FAILED — 1 failed, 3 passed" in page
    assert "| 16,384 | S² varlen | 10.0 | 4.00× | 0.60 |" in page
    assert "| 16,384 | S² flex | error: RuntimeError: boom | | |" in page
    assert "| 16,384 | S² (auto) | 2.00 | 8,192 | 30.0 |" in page
    assert check._slug(env["card"]) == "nvidia-h100-80gb-hbm3"
