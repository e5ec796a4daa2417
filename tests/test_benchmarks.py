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
    import longlora.s2attn as s2

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
