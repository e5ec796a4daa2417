"""The same inputs and params give byte-identical stage outputs and metrics (what DVC hashes), so a rerun of the
pipeline leaves `dvc status` clean: the data stages and the tiny model's pre-training, the training stages on a CPU
with the same seed, and the evaluations. What differs from run to run (seconds, tokens/s, peak memory, dvclive's logs
of them) goes to the run log, data/logs/<stage>/, which no DVC output holds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from longlora.io import PARAMS_FILE, RUN_LOGS, TIMINGS_FILE, run_log
from stages import (
    build_base_model,
    eval_harness,
    eval_longqa,
    eval_passkey,
    eval_perplexity,
    eval_ruler,
    extend,
    longbench,
    longbench2,
    merge,
    prepare_corpus,
    prepare_eval,
    prepare_pretrain,
    prepare_sft,
    report,
    sft,
)
from stages.params import parse_params
from tests.conftest import HARNESS_TASKS, tiny_params_dict

# Each stage once, in the pipeline's order (merge@extend makes the model sft trains), the evaluations of one model, and
# the report of them.
RUNS = {
    "build_base_model": build_base_model.run,
    "prepare_corpus": prepare_corpus.run,
    "prepare_pretrain": prepare_pretrain.run,
    "prepare_sft": prepare_sft.run,
    "prepare_eval": prepare_eval.run,
    "extend": extend.run,
    "merge@extend": lambda params: merge.run(params, "extend"),
    "sft": sft.run,
    "eval_perplexity@extended": lambda params: eval_perplexity.run(params, "extended"),
    "eval_passkey@extended": lambda params: eval_passkey.run(params, "extended"),
    "eval_longqa@extended": lambda params: eval_longqa.run(params, "extended"),
    "eval_ruler@extended": lambda params: eval_ruler.run(params, "extended"),
    "eval_harness@extended": lambda params: eval_harness.run(params, "extended"),
    "longbench@extended": lambda params: longbench.run(params, "extended"),
    "longbench2@extended": lambda params: longbench2.run(params, "extended"),
    "report": report.run,
}


def _params():
    # Few steps: what matters is that two runs agree, not how far they train.
    return parse_params(tiny_params_dict(extend={"max_steps": 3}, sft={"max_steps": 2},
                                         eval_harness={"include_path": str(HARNESS_TASKS)}))


def _digests(path: Path) -> dict[str, str]:
    """md5 of every file under `path` (or of `path` itself), by relative path: what DVC's hash of it is made of."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(path).as_posix() if path.is_dir() else p.name: hashlib.md5(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, single_torch_thread):
    """The tiny pipeline, every stage run once."""
    root = tmp_path_factory.mktemp("first_run")
    with contextlib.chdir(root):
        params = _params()
        for run in RUNS.values():
            run(params)
    return root


@pytest.mark.parametrize("stage", RUNS)
def test_a_rerun_into_fresh_folders_writes_the_same_bytes(first_run, stage, tmp_path, monkeypatch):
    params = _params()
    out_dir, _, metrics_file, _ = params.destination(stage)
    # The same inputs (everything the first run wrote), this stage's outputs and run log not there yet.
    shutil.copytree(first_run / "data", tmp_path / "data")
    shutil.rmtree(tmp_path / out_dir)
    (tmp_path / metrics_file).unlink()
    shutil.rmtree(tmp_path / RUN_LOGS)
    monkeypatch.chdir(tmp_path)

    RUNS[stage](params)

    assert _digests(tmp_path / out_dir) == _digests(first_run / out_dir)
    assert (tmp_path / metrics_file).read_bytes() == (first_run / metrics_file).read_bytes()
    ran_with = run_log(stage) / PARAMS_FILE  # the parameters it ran with, in the run log but the same bytes too
    assert (tmp_path / ran_with).read_bytes() == (first_run / ran_with).read_bytes()
    timings = json.loads((tmp_path / run_log(stage) / TIMINGS_FILE).read_text(encoding="utf-8"))
    assert timings["stage"] == stage and timings["seconds"] > 0
    assert "seconds" not in json.loads((tmp_path / metrics_file).read_text(encoding="utf-8"))


def test_the_training_logs_and_timings_are_kept_out_of_the_outputs(first_run):
    for stage, out_dir in (("extend", "data/extend"), ("sft", "data/sft_adapter")):
        assert not (first_run / out_dir / "dvclive").exists()
        logged = (first_run / run_log(stage) / "dvclive/plots/metrics/loss.tsv").read_text().splitlines()
        assert logged[0].split("\t")[-2:] == ["step", "loss"] and len(logged) > 1
        timings = json.loads((first_run / run_log(stage) / TIMINGS_FILE).read_text(encoding="utf-8"))
        assert timings["tokens_per_second"] > 0 and timings["peak_memory_mib"] > 0
        assert timings["resumed_from_step"] is None
        metrics = json.loads((first_run / f"data/metrics/{stage}.json").read_text(encoding="utf-8"))
        assert not {"seconds", "tokens_per_second", "peak_memory_mib", "resumed_from_step"} & set(metrics)
    # The base model's pre-training curve too: in its run log, not in the model folder DVC caches.
    assert not list((first_run / "data/base_model").rglob("*.tsv"))
    logged = (first_run / run_log("build_base_model") / "dvclive/plots/metrics/loss.tsv").read_text().splitlines()
    assert logged[0] == "step\tloss" and len(logged) > 1


def test_the_deterministic_sft_folder_is_still_a_dataset_load_from_disk_reads(first_run):
    import datasets

    loaded = datasets.load_from_disk(str(first_run / "data/sft"))
    metrics = json.loads((first_run / "data/metrics/prepare_sft.json").read_text(encoding="utf-8"))
    assert loaded.column_names == ["input_ids", "labels", "length"] and len(loaded) == metrics["examples"] > 0
    assert sum(loaded["length"]) == metrics["tokens"]


def test_length_grouped_sft_data_is_written_the_same_way_twice(first_run, tmp_path, monkeypatch):
    grouped = parse_params(tiny_params_dict(prepare_sft={"group_by_length": True, "group_batch_size": 2},
                                            sft={"replay_share": 0}))
    written = []
    for attempt in ("a", "b"):
        (tmp_path / attempt / "data/corpus").mkdir(parents=True)
        shutil.copytree(first_run / "data/base_model", tmp_path / attempt / "data/base_model")
        shutil.copy(first_run / "data/corpus/longqa.json", tmp_path / attempt / "data/corpus/longqa.json")
        monkeypatch.chdir(tmp_path / attempt)
        prepare_sft.run(grouped)
        written.append((_digests(Path("data/sft")), Path("data/metrics/prepare_sft.json").read_bytes()))
    assert written[0] == written[1]
    assert (tmp_path / "a/data/sft/order.json").is_file()


def test_the_report_shows_the_numbers_the_real_evaluations_wrote(first_run):
    """The report reads the evaluation stages' metrics as they really write them (a change of their shape shows
    here), and the merged model's card carries them."""
    from huggingface_hub import ModelCard

    written = {stage: json.loads((first_run / f"data/metrics/{stage}/extended.json").read_text(encoding="utf-8"))
               for stage in ("eval_perplexity", "eval_passkey", "eval_longqa", "eval_ruler", "longbench", "longbench2")}
    perplexity = written["eval_perplexity"]["ppl"]
    passkey = written["eval_passkey"]["by_length"]
    longqa = written["eval_longqa"]
    ruler = written["eval_ruler"]
    scores = written["longbench"]["scores"]
    longbench2 = written["longbench2"]["overall"]
    summary = (first_run / "data/report/summary.txt").read_text(encoding="utf-8").splitlines()
    second = summary.index("") + 1  # the second table: the scored tasks
    assert summary[0].split() == ["model", *(f"ppl@{n}" for n in sorted(perplexity, key=int)),
                                  *(f"passkey@{n}" for n in sorted(passkey, key=int))]
    assert summary[second].split() == ["model", "LongQA", "EM", "LongQA", "F1", "LongBench", "LongBench", "v2",
                                       *(f"RULER@{n}" for n in sorted(ruler["average"], key=int)), "RULER", "length"]
    rows = [line.split() for line in summary if line.startswith("extended")]
    assert rows[0] == ["extended", *(f"{perplexity[n]:.2f}" for n in sorted(perplexity, key=int)),
                       *(f"{passkey[n]:.2f}" for n in sorted(passkey, key=int))]
    effective = ruler["effective_length"] or f"<{min(map(int, ruler['average']))}"
    assert rows[1] == ["extended", f"{longqa['exact_match']:.2f}", f"{longqa['f1']:.2f}",
                       f"{sum(scores.values()) / len(scores):.2f}", f"{longbench2:.2f}",
                       *(f"{ruler['average'][n]:.2f}" for n in sorted(ruler["average"], key=int)), str(effective)]
    card = ModelCard.load(first_run / "data/report/models/extend/README.md")
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert all(values[f"perplexity (strided) at {n} tokens"] == v for n, v in perplexity.items())
