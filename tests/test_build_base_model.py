"""Stage build_base_model end to end on a 2-layer model: artifacts, determinism, resume after a kill."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from longlora.io import OUTPUT_MARKER
from stages import build_base_model
from stages.params import parse_params
from tests.conftest import tiny_params_dict


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_writes_a_loadable_hf_model_that_learned(in_tmp):
    metrics = build_base_model.run(parse_params(tiny_params_dict()))
    out = in_tmp / "data/base_model"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    saved = json.loads((in_tmp / "data/metrics/build_base_model.json").read_text())
    assert saved == metrics
    assert metrics["heldout_loss"] < metrics["initial_heldout_loss"] - 0.25
    # The loss curve (mean of every LOG_EVERY steps and of the last stretch), where `dvc plots show` finds it.
    curve = (in_tmp / "data/logs/build_base_model/dvclive/plots/metrics/loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tloss" and [int(line.split()[0]) for line in curve[1:]] == [10, 12]
    assert float(curve[-1].split()[1]) < float(curve[1].split()[1])  # the last stretch below the first ten steps
    assert (in_tmp / "data/logs/build_base_model/dvclive/plots/metrics/learning_rate.tsv").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 32
    assert model.config.num_key_value_heads == 2 and len(tokenizer) == model.config.vocab_size == 400
    ids = tokenizer("def main():\n    return 0\n")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def main():\n    return 0\n"
    assert not list(in_tmp.glob("data/.base_model*")), "temporary folders or checkpoints left behind"


def test_reports_how_the_model_uses_its_context(in_tmp):
    """A context long enough for every probe: loss by position, recall, passkey; the head stays tied on disk."""
    params = parse_params(tiny_params_dict(build_base_model={"context_length": 320, "batch_size": 2, "steps": 4,
                                                             "warmup_steps": 1, "eval_blocks": 2,
                                                             "passkey_trials": 1}))
    metrics = build_base_model.run(params)
    assert list(metrics["loss_by_position"]) == ["0-8", "8-32", "32-64", "64-128", "128-256"]
    assert metrics["context_gain"] == pytest.approx(
        metrics["loss_by_position"]["8-32"] - metrics["loss_by_position"]["128-256"], abs=2e-4)
    assert 0 <= metrics["recall_accuracy"] <= 1 and 0 <= metrics["passkey_accuracy"] <= 1
    assert 0 < metrics["heldout_bits_per_byte"] < metrics["heldout_loss"] / 0.69
    assert metrics["tokens_seen"] == 4 * 2 * 320
    model = AutoModelForCausalLM.from_pretrained(in_tmp / "data/base_model")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_resumes_after_a_kill_and_matches_an_uninterrupted_run(in_tmp, monkeypatch):
    params = parse_params(tiny_params_dict())
    build_base_model.run(params)
    uninterrupted = load_file(in_tmp / "data/base_model/model.safetensors")

    monkeypatch.setattr(build_base_model, "CHECKPOINT_EVERY", 4)
    save = build_base_model._save_checkpoint

    def save_then_die(path, p, step, *args):
        save(path, p, step, *args)
        if step == 8:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop

    shutil.rmtree(in_tmp / "data")
    monkeypatch.setattr(build_base_model, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_base_model.run(params)
    assert not (in_tmp / "data/base_model").exists(), "a killed run must not leave a finished-looking model"
    assert (in_tmp / "data/.base_model.checkpoint.pt").exists()

    monkeypatch.setattr(build_base_model, "_save_checkpoint", save)
    build_base_model.run(params)
    resumed = load_file(in_tmp / "data/base_model/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_checkpoint_of_other_params_is_ignored(in_tmp, caplog):
    other = parse_params(tiny_params_dict(build_base_model={"lr": 0.02}))
    p = other.build_base_model
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = in_tmp / "data/.base_model.checkpoint.pt"
    build_base_model._save_checkpoint(path, p, 4, model, optimizer, schedule)
    params = parse_params(tiny_params_dict())
    with caplog.at_level("INFO"):
        build_base_model.run(params)
    assert "written with other parameters" in caplog.text


def test_cli_reports_bad_params_in_one_line(in_tmp, capsys):
    (in_tmp / "params.yaml").write_text("build_base_model:\n  steps: -1\n", encoding="utf-8")
    assert build_base_model._cli.main("build_base_model", build_base_model.run, ["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml: build_base_model.steps: Input should be greater than 0" in err
    assert "Traceback" not in err
    assert not (in_tmp / "data").exists()


def test_a_diverging_build_stops_naming_the_step_and_publishes_nothing(in_tmp):
    from longlora.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"build_base_model: training diverged at step \d+: .*nothing was "
                                             r"published\. Lower build_base_model\.lr"):
        build_base_model.run(parse_params(tiny_params_dict(build_base_model={"lr": 1.0e10, "warmup_steps": 0})))
    assert not (in_tmp / "data/base_model").exists()
    assert not (in_tmp / "data/metrics/build_base_model.json").exists()


def test_another_base_model_means_nothing_to_build(in_tmp):
    params = parse_params(tiny_params_dict(model={"name_or_path": "meta-llama/Llama-2-7b-hf"}))
    metrics = build_base_model.run(params)
    assert metrics == {"stage": "build_base_model", "built": False, "base_model": "meta-llama/Llama-2-7b-hf"}
    assert json.loads((in_tmp / "data/logs/build_base_model/params.json").read_text()) == {
        "stage": "build_base_model", "params": params.build_base_model.model_dump(mode="json")}
    assert sorted(p.name for p in (in_tmp / "data/base_model").iterdir()) == [OUTPUT_MARKER, "NOT_BUILT.txt"]
    assert json.loads((in_tmp / "data/metrics/build_base_model.json").read_text()) == metrics


QUICK = {"steps": 4, "warmup_steps": 1}


def test_its_own_output_given_as_an_absolute_path_is_built_not_deleted(in_tmp):
    absolute = str(in_tmp / "data/base_model")
    for spelling in (absolute, "./data/base_model/", "data/../data/base_model"):
        assert build_base_model.same_path(spelling, "data/base_model"), spelling
    metrics = build_base_model.run(parse_params(tiny_params_dict(build_base_model=QUICK,
                                                                 model={"name_or_path": absolute})))
    assert metrics["built"] is True
    assert (in_tmp / "data/base_model/model.safetensors").exists()
    assert not (in_tmp / "data/base_model/NOT_BUILT.txt").exists()


def test_a_corrupt_checkpoint_is_set_aside_and_the_run_starts_over(in_tmp, caplog):
    # What a kill during a copy, or a full disk, leaves: before, every rerun raised UnpicklingError.
    p = parse_params(tiny_params_dict()).build_base_model
    checkpoint = build_base_model._checkpoint_path(p)
    assert checkpoint == Path("data/.base_model.checkpoint.pt")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"\x80\x04this is not a checkpoint" * 10)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with caplog.at_level("WARNING"):
        assert build_base_model._resume(checkpoint, p, model, optimizer, schedule) == 0
    assert "checkpoint data/.base_model.checkpoint.pt is unreadable" in caplog.text
    assert "moved it to data/.base_model.checkpoint.pt.corrupt and starting over" in caplog.text
    assert not checkpoint.exists() and checkpoint.with_name(checkpoint.name + ".corrupt").exists()
    build_base_model._save_checkpoint(checkpoint, p, 4, model, optimizer, schedule)
    assert build_base_model._resume(checkpoint, p, model, optimizer, schedule) == 4


def test_provenance_records_the_build_and_refuses_without_one(in_tmp, capsys):
    """`python -m stages.build_base_model provenance` (make base-model's second step): the sha256 of every file
    built, the params that shaped it, the build's seconds; before a build, one clear line and nothing written."""
    params = parse_params(tiny_params_dict(build_base_model=QUICK))
    assert build_base_model.main(["provenance"]) == 2  # no params.yaml here: the stage's own clear error
    assert "Traceback" not in capsys.readouterr().err
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(build_base_model=QUICK)), encoding="utf-8")
    assert build_base_model.main(["provenance"]) == 2
    assert "no base model built here to record" in capsys.readouterr().err
    assert not (in_tmp / "data/base_model.provenance.json").exists()

    build_base_model.run(params)
    assert build_base_model.main(["provenance"]) == 0
    record = json.loads((in_tmp / "data/base_model.provenance.json").read_text())
    folder = in_tmp / "data/base_model"
    assert record["files"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                               for f in sorted(folder.iterdir()) if f.is_file()}
    assert record["params"]["build_base_model"] == params.build_base_model.model_dump(mode="json")
    assert record["seconds"] > 0 and record["metrics"]["built"] is True
    assert record["command"] == "make base-model"
