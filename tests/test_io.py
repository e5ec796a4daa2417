"""Atomic outputs: nothing half-written on failure, usual permissions on success."""

from __future__ import annotations

import json
import os
import stat

import pytest

from longlora.io import atomic_dir, atomic_file, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_failed_dir_leaves_nothing_and_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new, half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "stats.json") as handle:
        handle.write("{")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w").write_text("x")
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "m.json") == 0o644
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
