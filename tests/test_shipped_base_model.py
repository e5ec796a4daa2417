"""The embedded default base model is shipped in git (data/base_model/): these tests hold it to its provenance record
(data/base_model.provenance.json, written by `make base-model`), to params.yaml and to dvc.lock, and check that
`dvc repro` can never rebuild it behind the user's back. Building it end to end on a small configuration is
tests/test_build_base_model.py's job (and tests/test_dvc.py's, whose temporary repository builds its own)."""

from __future__ import annotations

import hashlib
import json
import re

import yaml

from longlora.io import file_digests
from stages.build_base_model import provenance_path, shipped_params
from stages.params import load_params
from tests._repo import expanded_stages
from tests.conftest import ROOT


def _shipped():
    params = load_params(ROOT / "params.yaml")
    p = params.build_base_model
    return params, ROOT / p.out_dir, json.loads((ROOT / provenance_path(p)).read_text(encoding="utf-8"))


def test_the_shipped_files_are_the_ones_the_recorded_build_wrote():
    params, folder, record = _shipped()
    assert file_digests(folder) == record["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    # What shapes the model is what params.yaml says now: a changed parameter needs `make base-model`.
    assert record["params"] == shipped_params(params)
    assert record["command"] == "make base-model" and re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert record["seconds"] > 0 and record["software"]["torch"]
    assert record["metrics"] == json.loads((ROOT / params.build_base_model.metrics_file).read_text())


def test_dvc_lock_records_the_shipped_folder():
    """DVC 3's hash of a directory: the md5 of its sorted (relpath, md5) list as JSON, as dvc.lock holds it."""
    _, folder, _ = _shipped()
    entries = [{"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(folder).as_posix()}
               for f in sorted(folder.rglob("*"), key=lambda f: f.relative_to(folder).as_posix()) if f.is_file()]
    want = hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["build_base_model"]
    assert [o["md5"] for o in lock["outs"] if o["path"] == "data/base_model"] == [want]


def test_dvc_repro_never_rebuilds_the_shipped_model():
    """Frozen: `dvc repro` verifies its output and never runs it, whatever changed in its code; its output is
    git's (not DVC's cache), so a fresh clone has it."""
    stage = expanded_stages()["build_base_model"]
    assert stage["frozen"] is True
    assert stage["outs"] == [{"data/base_model": {"cache": False}}]
    ignored = (ROOT / "data/.gitignore").read_text().splitlines()
    assert "/base_model" not in ignored
