"""model.name_or_path: a local-looking name is never sent to the hub."""

from __future__ import annotations

import pytest

from longlora.sources import is_hub_model_id, looks_local


@pytest.mark.parametrize(("name", "local"), [
    ("meta-llama/Llama-2-7b-hf", False),
    ("gpt2", False),
    ("Qwen/Qwen2-0.5B", False),
    ("/models/llama", True),
    ("./base_model", True),
    ("../models/x", True),
    ("~/models/x", True),
    ("models/llama/7b", True),
    ("my model", True),
    ("EXISTING_PARENT/name", True),
    ("EXISTING", True),
])
def test_local_or_hub(tmp_path, monkeypatch, name, local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EXISTING_PARENT").mkdir()
    (tmp_path / "EXISTING").mkdir()
    assert looks_local(name) is local
    assert is_hub_model_id(name) is not local
