"""The pipeline under DVC, as a user drives it (docs/pipeline.md), in a temporary git repository on
the tiny model: one `dvc repro` of the whole chain, shared by every test here, then the follow-ups, each cheap: a
second repro does nothing; an evaluation parameter reruns that evaluation only; an `extend` parameter, as an
experiment, reruns extend and everything after it and nothing before; `dvc exp show`, `dvc metrics diff` and
`dvc plots diff` compare the two runs; the outputs round-trip through a local DVC remote.

The tests follow a user's session in this file's order: the first two leave the workspace as the baseline commit has
it; the experiment stays in the workspace for the ones after it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from longlora.io import PARAMS_FILE, run_log
from pipelines.longlora_flow import stage_order
from stages.params import load_params
from stages.registry import EVAL_STAGES
from tests._repo import DVC, final_outputs, make_repo, repo_env, run_checked, stages_run, stages_skipped
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

MODELS = ("base", "base_pi", "extended", "sft")
"""params.yaml's eval_models, whose curves and heatmaps dvc.yaml plots."""


class Repo:
    """The temporary repository and the commands run in it."""

    def __init__(self, path: Path, env: dict[str, str]):
        self.path, self.env = path, env

    def dvc(self, *args: str) -> str:
        return run_checked([DVC, *args], self.path, self.env)

    def git(self, *args: str) -> str:
        return run_checked(["git", *args], self.path, self.env)

    def set_param(self, dotted: str, value) -> None:
        """Edit params.yaml as a user would (no DVC command involved)."""
        params = yaml.safe_load((self.path / "params.yaml").read_text())
        *sections, key = dotted.split(".")
        section = params
        for name in sections:
            section = section[name]
        section[key] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _all_stages() -> set[str]:
    return set(stage_order(ROOT / "dvc.yaml"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """The whole tiny chain reproduced once, and committed with dvc.lock and the metrics: the baseline that
    docs/pipeline.md tells users to commit after their first run."""
    path = make_repo(tmp_path_factory.mktemp("dvc"))
    repo = Repo(path, repo_env(path.parent))
    repo.first_repro = repo.dvc("repro")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "baseline: dvc.lock and metrics")
    repo.baseline = repo.git("rev-parse", "HEAD").strip()
    return repo


def _back_to_baseline(repo: Repo) -> None:
    repo.git("checkout", "-q", "--", ".")
    repo.dvc("checkout", "--force")
    assert "Data and pipelines are up to date" in repo.dvc("status")


def test_repro_runs_every_stage_once_and_a_second_repro_does_nothing(repo):
    assert stages_run(repo.first_repro) == _all_stages()  # every evaluation instance too
    for out in final_outputs():
        assert (repo.path / out).exists(), f"dvc repro did not produce {out}"
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())
    assert set(lock["stages"]) == _all_stages()
    assert lock["stages"]["build_base_model"]["params"]["params.yaml"]["build_base_model"]["steps"] == 12

    again = repo.dvc("repro")
    assert stages_run(again) == set() and stages_skipped(again) == _all_stages()
    assert "Data and pipelines are up to date" in repo.dvc("status")
    # build_base_model builds only when model.name_or_path is its own output: switching models makes it stale.
    repo.set_param("model.name_or_path", "meta-llama/Llama-2-7b-hf")
    assert "model.name_or_path" in repo.dvc("status", "build_base_model")
    _back_to_baseline(repo)


def test_an_evaluation_parameter_reruns_that_evaluation_only(repo):
    passkey = {f"eval_passkey@{model}" for model in load_params(repo.path / "params.yaml").eval_models}
    repo.set_param("eval_passkey.trials", 2)
    rerun = passkey | {"report"}  # the report reads eval_passkey.trials too, and every evaluation's results
    assert set(json.loads(repo.dvc("status", "--json"))) == rerun
    changed = repo.dvc("repro")
    assert stages_run(changed) == rerun and stages_skipped(changed) == _all_stages() - rerun
    prompts = json.loads((repo.path / "data/metrics/eval_passkey/sft.json").read_text())["prompts"]
    assert prompts == 2 * 2 * 2  # lengths × depths × trials
    # And back: the same three, now restored from DVC's run-cache rather than run again.
    repo.git("checkout", "-q", "--", "params.yaml")
    back = repo.dvc("repro")
    assert stages_run(back) == rerun and stages_skipped(back) == _all_stages() - rerun
    assert "Data and pipelines are up to date" in repo.dvc("status")
    assert repo.git("status", "--porcelain") == "", "the baseline's metrics and dvc.lock came back byte for byte"


def _queue_done(repo: Repo, names: set[str], timeout: float = 900.0) -> dict[str, str]:
    """Wait for the queued experiments `names` to finish: {name: status} from `dvc queue status`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [line.split() for line in repo.dvc("queue", "status").splitlines()]
        status = {row[1]: row[-1] for row in rows if len(row) >= 4 and row[1] in names}
        if set(status) == names and not {"Queued", "Running"} & set(status.values()):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish: {status}"
        time.sleep(2)


def test_evaluations_fan_out_through_the_queue_and_come_back_from_the_run_cache(repo, tmp_path):
    """docs/full-size.md, scaling out: in a second clone sharing the first one's DVC cache (as a node would), evaluation
    instances queued as experiments, two queue workers (each started with its own CUDA_VISIBLE_DEVICES, as one per
    GPU) run them in temporary copies of the repository, and a plain `dvc repro` in the workspace then checks their
    results out of DVC's run-cache instead of running them; the instances not queued run there, and the report."""
    clone = Repo(tmp_path / "clone", repo.env)
    run_checked(["git", "clone", "-q", str(repo.path), str(clone.path)], tmp_path, repo.env)
    clone.dvc("cache", "dir", "--local", str(repo.path / ".dvc/cache"))
    clone.dvc("checkout")
    # Up to date but for the training checkpoints: persistent workspace state of the first clone, never cached.
    assert set(json.loads(clone.dvc("status", "--json"))) == {"extend", "sft"}
    passkey = sorted(f"eval_passkey@{model}" for model in load_params(clone.path / "params.yaml").eval_models)
    queued, not_queued = set(passkey[:2]), set(passkey[2:])
    clone.set_param("eval_passkey.trials", 3)
    names = {stage.replace("@", "-") for stage in queued}
    for stage in sorted(queued):
        clone.dvc("exp", "run", "--queue", "-n", stage.replace("@", "-"), stage)
    for workers in (1, 2):
        run_checked([DVC, "queue", "start", "-j", str(workers)], clone.path,
                    {**clone.env, "CUDA_VISIBLE_DEVICES": str(workers - 1)})
    assert set(_queue_done(clone, names).values()) == {"Success"}
    # --single-item: this clone lacks the first one's training checkpoints, which would make extend look stale.
    collected = clone.dvc("repro", "--single-item", *passkey, "report")
    assert set(re.findall(r"Stage '([^']+)' is cached - skipping run", collected)) == queued, collected
    assert set(re.findall(r"Running stage '([^']+)'", collected)) == not_queued | {"report"}, collected
    assert json.loads((clone.path / "data/metrics/eval_passkey/sft.json").read_text())["prompts"] == 2 * 2 * 3
    assert set(json.loads(clone.dvc("status", "--json"))) == {"extend", "sft"}


@pytest.fixture(scope="module")
def experiment(repo) -> tuple[str, str]:
    """`dvc exp run -S extend.max_steps=4` from the baseline: (its name, what it printed); the workspace keeps it."""
    printed = repo.dvc("exp", "run", "-S", "extend.max_steps=4")
    _, experiments = _exp_show(repo)
    assert len(experiments) == 1
    return experiments[0]["name"], printed


def _exp_show(repo: Repo) -> tuple[dict, list[dict]]:
    """`dvc exp show --json`: the baseline commit's row and its experiments' rows."""
    shown = json.loads(repo.dvc("exp", "show", "--json"))
    baseline = next(row for row in shown if row["rev"] == repo.baseline)
    return baseline, [rev for exp in baseline.get("experiments") or [] for rev in exp["revs"]]


def test_an_extend_parameter_reruns_extend_and_everything_after_it_as_an_experiment(repo, experiment):
    _, printed = experiment
    downstream = {"extend", "merge@extend", "sft", "merge@sft", "report"} | {
        f"{stage}@{model}" for stage in EVAL_STAGES for model in ("extended", "sft")}
    assert stages_run(printed) == downstream
    assert stages_skipped(printed) == _all_stages() - downstream  # the data stages, the base model and its evals
    assert json.loads((repo.path / "data/metrics/extend.json").read_text())["steps"] == 4


def _metric(rev: dict, file: str, *keys: str):
    value = rev["data"]["metrics"][file]["data"]
    for key in keys:
        value = value[key]
    return value


def test_exp_show_lists_the_experiment_with_its_metrics_beside_the_baseline(repo, experiment):
    name, _ = experiment
    baseline, (exp,) = _exp_show(repo)
    assert _metric(baseline, "data/metrics/extend.json", "steps") == 6  # committed metrics: a baseline, not `!`
    assert exp["name"] == name and exp["data"]["params"]["params.yaml"]["data"]["extend"]["max_steps"] == 4
    assert _metric(exp, "data/metrics/extend.json", "steps") == 4
    for model in ("extended", "sft"):  # the models extend made score differently; the base model's are the same
        file = f"data/metrics/eval_perplexity/{model}.json"
        assert _metric(exp, file, "ppl") != _metric(baseline, file, "ppl")
    file = "data/metrics/eval_perplexity/base.json"
    assert _metric(exp, file, "ppl") == _metric(baseline, file, "ppl")
    # What a person reads: only what differs between the two, the one changed parameter and no settings echoed by
    # the metrics files; the changed results of the stages that reran, none of the others'.
    columns = repo.dvc("exp", "show", "--only-changed", "--csv").splitlines()[0].split(",")
    assert [c for c in columns if "/" not in c and "." in c] == ["extend.max_steps"], columns
    assert "data/metrics/extend.json:steps" in columns
    reran = {"data/metrics/extend.json", "data/metrics/sft.json", "data/metrics/report.json"} | {
        f"data/metrics/{stage}/{model}.json" for stage in EVAL_STAGES for model in ("extended", "sft")}
    # Metric columns are `file:key`; a bare path is a dependency's hash (the report's metrics folders), not a result.
    assert {c.split(":")[0] for c in columns if c.startswith("data/metrics/") and ":" in c} <= reran, columns
    assert not [c for c in columns if ":params." in c], columns


def test_metrics_and_plots_diff_compare_the_two_runs(repo, experiment):
    name, _ = experiment
    diff = json.loads(repo.dvc("metrics", "diff", repo.baseline, name, "--json"))
    assert diff["data/metrics/extend.json"]["steps"] == {"old": 6, "new": 4, "diff": -2}
    changed = diff["data/metrics/eval_perplexity/sft.json"]
    assert changed and all(set(entry) == {"old", "new", "diff"} for entry in changed.values())
    assert "data/metrics/eval_perplexity/base.json" not in diff  # unchanged: nothing to show
    plots = json.loads(repo.dvc("plots", "diff", repo.baseline, name, "--json", "--split"))["data"]
    curve = plots["perplexity (strided) vs context length"][0]
    assert curve["revisions"] == [repo.baseline, name]
    points = curve["anchor_definitions"]["<DVC_METRIC_DATA>"]
    by_rev = {(p["rev"], p["model"], p["length"]): float(p["perplexity"]) for p in points}
    assert len(by_rev) == 2 * len(MODELS) * 3  # two runs × the models × three lengths
    assert by_rev[(name, "sft", "128")] != by_rev[(repo.baseline, "sft", "128")]
    assert by_rev[(name, "base", "128")] == by_rev[(repo.baseline, "base", "128")]
    heatmap = plots["data/eval_results/passkey/sft/heatmap.png"]
    assert [image["revisions"] for image in heatmap] == [[repo.baseline], [name]]


def test_outputs_round_trip_through_a_local_remote(repo, experiment, tmp_path):
    """Pushed to a remote, deleted from the workspace and the cache, pulled back: the same bytes, `dvc status`
    clean. (After the experiment tests: the workspace holds the experiment, which must round-trip as well.)"""
    outputs = [out for out in final_outputs() if (repo.path / out).is_dir() and "checkpoints" not in out.parts]

    def digest() -> dict[str, str]:
        return {str(f.relative_to(repo.path)): hashlib.md5(f.read_bytes()).hexdigest()
                for out in outputs for f in sorted((repo.path / out).rglob("*")) if f.is_file()}

    before = digest()
    repo.dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    pushed = repo.dvc("push")
    assert "pushed" in pushed, pushed
    for out in outputs:
        shutil.rmtree(repo.path / out)
    shutil.rmtree(repo.path / ".dvc/cache")
    assert "deleted" in repo.dvc("status")
    pulled = repo.dvc("pull")
    assert "added" in pulled or "fetched" in pulled, pulled
    assert "Data and pipelines are up to date" in repo.dvc("status")
    assert digest() == before
    repo.git("checkout", "-q", "--", ".dvc/config")


def test_a_killed_evaluation_does_not_make_the_stages_after_it_stale(repo):
    """An evaluation killed with SIGKILL (no handler runs) leaves its lock, and at publication its temporary folder,
    beside its output, inside the folder report reads: .dvcignore keeps them out of what DVC hashes, so report is not
    stale until the next real run."""
    import signal
    import subprocess
    import sys

    results = repo.path / "data/eval_results/passkey"
    before = json.loads(repo.dvc("status", "--json"))
    lock = results / ".extended.lock"
    child = subprocess.Popen([sys.executable, "-m", "stages.eval_passkey", "extended"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not lock.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL and lock.exists(), "killed while it held its lock"
    leftover = results / ".extended.tmp-k1ll3d"  # what a kill during publication leaves too
    leftover.mkdir()
    (leftover / "passkey.csv").write_text("half written")
    try:
        assert json.loads(repo.dvc("status", "--json")) == before
    finally:
        shutil.rmtree(leftover)
        lock.unlink()


def test_metrics_show_groups_results_without_the_settings(repo):
    """`dvc metrics show <folder>` of an evaluation is a model-by-length table; the parameters each stage ran with
    (derived defaults resolved) are in its run log, not in its metrics."""
    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    for metrics in shown[""]["data"].values():
        assert "params" not in metrics["data"]
    table = repo.dvc("metrics", "show", "data/metrics/eval_perplexity").splitlines()
    assert table[0].split() == ["Path", "ppl.128", "ppl.32", "ppl.64", "ppl_windowed.128", "ppl_windowed.32",
                                "ppl_windowed.64", "stage"]
    assert len(table) == 1 + len(MODELS) and max(len(line) for line in table) <= 160
    ran_with = json.loads((repo.path / run_log("prepare_pretrain") / PARAMS_FILE).read_text())
    assert ran_with["params"]["block_length"] == 128  # prepare_pretrain.block_length: null → model.target_context
    for stage in stage_order(ROOT / "dvc.yaml"):
        assert (repo.path / run_log(stage) / PARAMS_FILE).exists(), stage


def test_plots_show_draws_every_curve_and_the_heatmaps(repo):
    plots = json.loads(repo.dvc("plots", "show", "--json", "--split"))["data"]

    def points(plot_id: str) -> list[dict]:
        assert plot_id in plots, f"`dvc plots show` has no {plot_id}: {sorted(plots)}"
        return plots[plot_id][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]

    for stage in ("build_base_model", "extend", "sft"):
        curve = points(f"{run_log(stage).as_posix()}/dvclive/plots/metrics/loss.tsv")
        assert len(curve) >= 2 and all(float(p["loss"]) > 0 for p in curve), stage
    for title in ("perplexity (strided) vs context length", "perplexity (LongLoRA eval.py) vs context length"):
        assert {(p["model"], p["length"]) for p in points(title)} == {
            (model, length) for model in MODELS for length in ("32", "64", "128")}, title
    for model in MODELS:
        assert plots[f"data/eval_results/passkey/{model}/heatmap.png"][0]["type"] == "image"
