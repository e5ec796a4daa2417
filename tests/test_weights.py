"""Damaged and non-finite weights are named at load (longlora/method/weights.py), by every loader the stages use: a
truncated or emptied file by its path before anything is loaded, NaN values by the tensor once loaded."""

from __future__ import annotations

import shutil

import pytest
import torch

from longlora.errors import InputError, NonFiniteError
from longlora.evaluation.loading import load_for_evaluation
from longlora.method.extension import load_extended
from longlora.method.weights import damaged_file
from tests.test_benchmarks import save_tiny_model


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "model"
    save_tiny_model(folder, tiny_tokenizer, context=64)
    return folder


def _truncate(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(("keep", "problem"), [
    (0, "shorter than a safetensors header"),
    (4, "shorter than a safetensors header"),
    (100, "its header claims"),
    (-1000, "truncated or damaged"),  # the header whole, the data cut short
])
def test_a_truncated_safetensors_file_is_named_before_loading(model_dir, keep, problem):
    weights = model_dir / "model.safetensors"
    _truncate(weights, keep if keep >= 0 else weights.stat().st_size + keep)
    assert damaged_file(model_dir)[0] == weights
    with pytest.raises(InputError, match=rf"eval_models\.x\.path: '{weights}': .*{problem}.*rebuild it"):
        load_for_evaluation(str(model_dir), param="eval_models.x.path")


def test_nan_values_written_over_the_data_are_refused_once_loaded(model_dir):
    """64 KiB overwritten in place (the header intact): the file looks whole; its values do not."""
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 65536] = b"\xff" * min(65536, len(data) - start)
    weights.write_bytes(bytes(data))
    assert damaged_file(model_dir) is None
    with pytest.raises(NonFiniteError, match=r"eval_models\.x\.path '.*model': \d+ weight tensors hold NaN"):
        load_for_evaluation(str(model_dir), param="eval_models.x.path")


def test_a_damaged_torch_archive_is_named(model_dir):
    torch.save({"w": torch.zeros(1000)}, model_dir / "extra.pt")
    _truncate(model_dir / "extra.pt", 500)
    path, problem = damaged_file(model_dir)
    assert path.name == "extra.pt" and "not a whole torch archive" in problem


def test_an_empty_adapter_is_named_by_merge_s_loader(model_dir, tmp_path):
    """load_extended (merge's loader) checks the adapter folder's own files."""
    from longlora.method.extension import describe

    adapter = tmp_path / "adapter"
    shutil.copytree(model_dir, adapter)
    describe(adapter, {"base_model": str(model_dir)})
    (adapter / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"extend\.out_dir: '.*adapter/model\.safetensors': 0 bytes"):
        load_extended(adapter, param="extend.out_dir")
