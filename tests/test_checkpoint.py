"""Checkpoints: written atomically; one that cannot be read is set aside with a warning instead of failing every
rerun."""

from __future__ import annotations

import pytest
import torch

from longlora.checkpoint import corrupt_path, load_checkpoint, save_checkpoint

STATE = {"step": 8, "model": {"w": torch.arange(6.0).reshape(2, 3)}}


def test_round_trip_and_no_checkpoint(tmp_path):
    path = tmp_path / "run/.train.checkpoint.pt"
    assert load_checkpoint(path) is None
    save_checkpoint(path, STATE)
    loaded = load_checkpoint(path, required=("step", "model"))
    assert loaded["step"] == 8 and torch.equal(loaded["model"]["w"], STATE["model"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temporary file left behind"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_dict", "missing_key"])
def test_an_unreadable_checkpoint_is_set_aside_with_a_warning(tmp_path, caplog, damage):
    path = tmp_path / ".train.checkpoint.pt"
    save_checkpoint(path, STATE if damage != "not_a_dict" else [1, 2, 3])
    raw = path.read_bytes()
    if damage == "truncated":  # a copy or a disk that stopped half way
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a pickle at all" * 20)
    elif damage == "empty":
        path.write_bytes(b"")
    bad = path.read_bytes()
    with caplog.at_level("WARNING"):
        assert load_checkpoint(path, required=("step", "model", "optimizer")) is None
    aside = tmp_path / ".train.checkpoint.pt.corrupt"
    assert f"checkpoint {path} is unreadable" in caplog.text
    assert f"moved it to {aside} and starting over" in caplog.text
    assert not path.exists() and aside.read_bytes() == bad, "set aside, not deleted"
    assert corrupt_path(path) == tmp_path / ".train.checkpoint.pt.corrupt-2"
    assert load_checkpoint(path) is None  # the next run starts over quietly


def test_an_earlier_corrupt_checkpoint_is_never_overwritten(tmp_path):
    path = tmp_path / ".train.checkpoint.pt"
    for attempt in (b"first", b"second"):
        path.write_bytes(attempt)
        assert load_checkpoint(path) is None
    assert (tmp_path / ".train.checkpoint.pt.corrupt").read_bytes() == b"first"
    assert (tmp_path / ".train.checkpoint.pt.corrupt-2").read_bytes() == b"second"
