"""The orchestration: dvc.yaml's stages, deps, params and plots, and the Prefect flow under Prefect's test harness
running every stage on tiny parameters in a temporary git+DVC repository (`dvc repro` itself: tests/test_dvc.py)."""

from __future__ import annotations

import ast
import contextlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from longlora.io import run_log
from pipelines.longlora_flow import _paths, _under, expand_stages, stage_order
from stages.params import load_params
from stages.registry import EVAL_STAGES, STAGES, TRAINING_STAGES, stage_key
from tests._repo import DVC, expanded_stages, final_outputs, make_repo, repo_env, run_checked, write_tiny_params
from tests.conftest import ROOT, tiny_params_dict


def test_stage_order_follows_dependencies(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "evaluate": {"cmd": "python -m stages.evaluate", "deps": ["data/model"], "outs": ["data/scores"]},
        "train": {"cmd": "python -m stages.train", "deps": ["data/blocks/train.bin"], "outs": ["data/model"]},
        "pack": {"cmd": "python -m stages.pack", "outs": ["data/blocks"]},
        "report": {"cmd": "python -m stages.report", "deps": ["data/scores/a.json", "data/model"]},
    }}, sort_keys=False))
    assert stage_order(tmp_path / "dvc.yaml") == ["pack", "train", "evaluate", "report"]


def test_stage_order_rejects_foreign_commands(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"x": {"cmd": "bash run.sh"}}}))
    with pytest.raises(ValueError, match="stage 'x' must run `python -m stages.x`"):
        stage_order(tmp_path / "dvc.yaml")


def test_project_stage_order_starts_with_the_base_model():
    assert stage_order(ROOT / "dvc.yaml")[0] == "build_base_model"


def test_foreach_stages_become_one_stage_per_instance(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "merge": {"foreach": {"sft": {"src": "data/sft_adapter"}, "extend": {"src": "data/extend"}},
                  "do": {"cmd": "python -m stages.merge ${key}", "deps": ["${item.src}"], "outs": ["out/${key}"]}},
        "extend": {"cmd": "python -m stages.launch extend", "outs": ["data/extend"]},
        "sft": {"cmd": "python -m stages.launch sft", "deps": ["out/extend"], "outs": ["data/sft_adapter"]},
    }}, sort_keys=False))
    assert stage_order(tmp_path / "dvc.yaml") == ["extend", "merge@extend", "sft", "merge@sft"]
    assert expand_stages(yaml.safe_load((tmp_path / "dvc.yaml").read_text()))["merge@sft"] == {
        "cmd": "python -m stages.merge sft", "deps": ["data/sft_adapter"], "outs": ["out/sft"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "merge": {"foreach": ["extend"], "do": {"cmd": "python -m stages.merge"}}}}))
    with pytest.raises(ValueError, match=r"stage 'merge@extend' must run `python -m stages.merge extend`"):
        stage_order(tmp_path / "dvc.yaml")
    # A training stage starts through the launcher, so that the `launch` params decide how many processes run it.
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"extend": {"cmd": "python -m stages.extend"}}}))
    with pytest.raises(ValueError, match=r"stage 'extend' must run `python -m stages.launch extend`"):
        stage_order(tmp_path / "dvc.yaml")


# The stages that log a loss curve with dvclive: the base model's pre-training and the training stages.
TRAINING_CURVES = ("build_base_model", *TRAINING_STAGES)


def _module_file(name: str) -> Path | None:
    for path in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if path.exists():
            return path
    return None


def _project_imports(module: str) -> set[str]:
    """Files of this project that `module` imports, directly or through another (function-level imports too)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen or name.split(".")[0] not in ("longlora", "stages"):
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return {path.relative_to(ROOT).as_posix() for path in seen if path.name != "__init__.py"}


def test_params_validation_pulls_in_no_stage_machinery():
    """Every stage depends on what stages/params.py imports: the readers, packers, tokenizers and the method's
    torch code must not be among them, or an edit to one reruns every stage."""
    light = {"stages/params.py", "stages/registry.py", "stages/sections.py", "longlora/choices.py",
             "longlora/embedded/corpus.py", "longlora/errors.py", "longlora/io.py", "longlora/recipe.py",
             "longlora/sources.py"}
    assert _project_imports("stages.params") == light


def _has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_every_stage_declares_the_code_params_and_data_it_reads():
    """dvc.yaml's deps and params are what each stage really reads, so that `dvc repro` reruns exactly when needed."""
    spec = expanded_stages()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert stage_order(ROOT / "dvc.yaml") == list(params.stages), "the Prefect flow and params.py must know the " \
                                                                  "same stages"
    assert list(params.stages[:len(STAGES)]) == list(STAGES)
    produced = [out for stage in spec.values() for out in _paths(stage.get("outs"))]
    for name, stage in spec.items():
        module = name.split("@")[0]  # an instance of a foreach stage runs the stage's module
        deps, declared = _paths(stage["deps"]), stage["params"]
        assert deps[:3] == [f"stages/{module}.py", "stages/_cli.py", "stages/params.py"], name
        imported = _project_imports(f"stages.{module}")
        if stage["cmd"].split()[:3] == ["python", "-m", "stages.launch"]:  # a training stage, started by the launcher
            imported |= _project_imports("stages.launch")
            assert "stages/launch.py" in deps and "launch" in declared, f"{name}: declare the launcher and its params"
        missing = sorted(imported - set(deps))
        assert not missing, f"{name} imports {missing}: list them in its deps"
        extra = sorted({dep for dep in deps if dep.endswith(".py")} - imported)
        assert not extra, f"{name} does not import {extra}: an edit there must not rerun it"
        for dep in deps:
            assert (ROOT / dep).exists() or any(_under(dep, out) for out in produced), f"{name}: no such dep {dep}"
        for key in declared:
            assert _has_key(raw, key), f"{name} declares params {key!r}, which params.yaml does not have"
        # Every section a stage's code reads (`params.<section>.<key>`) is declared, whole or key by key.
        source = (ROOT / f"stages/{module}.py").read_text(encoding="utf-8")
        read = set(re.findall(r"\bparams\.(\w+)\.(\w+)", source)) | {(stage_key(name), "")}
        for section, key in read:
            assert section in declared or f"{section}.{key}" in declared, f"{name} reads {section}.{key}"
        own = params.section(name)
        out_dir, _, metrics_file, _ = params.destination(name)
        persistent = [str(own.checkpoint_dir)] if hasattr(own, "checkpoint_dir") else []
        assert _paths(stage["outs"]) == [str(out_dir), *persistent]
        assert _paths(stage["metrics"]) == [str(metrics_file)]
    # A merge instance reads the folder its training stage wrote, and declares it.
    for source in (name.split("@")[1] for name in spec if name.startswith("merge@")):
        assert str(params.section(source).out_dir) in _paths(spec[f"merge@{source}"]["deps"])
        assert f"{source}.out_dir" in spec[f"merge@{source}"]["params"]
    # An evaluation instance reads its model's folder and entry; perplexity reads prepare_eval's stream too.
    for name in params.eval_models:
        for stage in EVAL_STAGES:
            assert params.eval_models[name].path in _paths(spec[f"{stage}@{name}"]["deps"])
            assert {f"eval_models.{name}", "model"} <= set(spec[f"{stage}@{name}"]["params"])
        assert str(params.prepare_eval.out_dir) in _paths(spec[f"eval_perplexity@{name}"]["deps"])
        assert "prepare_eval.lengths" in spec[f"eval_perplexity@{name}"]["params"]


def test_every_path_of_a_stage_comes_from_params_yaml_alone():
    """dvc.yaml names no data path of its own: an `out_dir` (or an input) changed in params.yaml moves in DVC's eyes
    too, instead of DVC deleting the old output and the stage then writing elsewhere."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        for path in _paths(body.get("deps")) + _paths(body.get("outs")) + _paths(body.get("metrics")):
            assert path.endswith(".py") or path.startswith("${"), f"{name}: {path!r} is written in dvc.yaml"
        for item in (stage.get("foreach") or {}).values() if isinstance(stage.get("foreach"), dict) else ():
            for key in ("from", "base", "out", "metrics"):
                assert str(item[key]).startswith("${"), f"{name}: {key} {item[key]!r} is written in dvc.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["extend"]["out_dir"] = "runs/extend"
    moved = expand_stages(spec, raw)
    assert _paths(moved["extend"]["outs"])[0] == "runs/extend"
    assert "runs/extend" in _paths(moved["merge@extend"]["deps"])


def test_plots_show_every_training_curve_and_every_evaluated_model():
    """The loss curves of the three training stages (dvclive's logs in their run logs), and the evaluations: top-level
    plots cannot loop over eval_models, so they must name each model's files (one line per model in the perplexity
    plots, one heatmap per model)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    plots = {next(iter(entry)) if isinstance(entry, dict) else entry: (entry or {}) for entry in spec["plots"]}
    for stage in TRAINING_CURVES:
        curves = f"{run_log(stage).as_posix()}/dvclive/plots/metrics"
        assert plots[curves] == {curves: {"x": "step"}}, stage
    perplexity = {str(params.destination(f"eval_perplexity@{name}")[0] / "perplexity.csv")
                  for name in params.eval_models}
    for title, field in (("perplexity (strided) vs context length", "perplexity"),
                         ("perplexity (LongLoRA eval.py) vs context length", "windowed_perplexity")):
        definition = plots[title][title]
        assert definition["x"] == "length" and definition["y"] == dict.fromkeys(sorted(perplexity), field)
    heatmaps = {str(params.destination(f"{stage}@{name}")[0] / "heatmap.png") for name in params.eval_models
                for stage in ("eval_passkey", "eval_ruler")}
    assert heatmaps <= set(plots)


def test_foreach_over_params_expands_from_the_params_file(tmp_path):
    """`foreach: ${eval_models}` (a mapping in params.yaml) and `${section.key}` anywhere, as DVC templates them."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make": {"cmd": "python -m stages.make", "outs": ["${make.out}"]},
        "score": {"foreach": "${models}", "do": {
            "cmd": "python -m stages.score ${key}", "deps": ["${item.path}", "data/made"],
            "outs": ["${score.out_dir}/${key}"]}},
    }}, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "make": {"out": "data/made"}, "score": {"out_dir": "results"},
        "models": {"big": {"path": "m/big"}, "small": {"path": "m/small"}}}))
    assert stage_order(tmp_path / "dvc.yaml") == ["make", "score@big", "score@small"]
    spec = expand_stages(yaml.safe_load((tmp_path / "dvc.yaml").read_text()),
                         yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert spec["score@small"] == {"cmd": "python -m stages.score small", "deps": ["m/small", "data/made"],
                                   "outs": ["results/small"]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"make": {"out": "x"}, "score": {"out_dir": "r"},
                                                         "models": {"one": {"path": "p"}}}))
    assert stage_order(tmp_path / "dvc.yaml", tmp_path / "other.yaml") == ["make", "score@one"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"make": {"out": "x"}}))
    with pytest.raises(ValueError, match=r"\$\{models\} names nothing in params.yaml"):
        stage_order(tmp_path / "dvc.yaml")


def test_flow_overrides_edit_params_like_dvc_exp_run(tmp_path, monkeypatch):
    """`-S key=value` changes params.yaml as `dvc exp run -S` does, comments kept; an invalid result changes nothing."""
    from pipelines.longlora_flow import apply_overrides
    from stages.params import ParamsError

    monkeypatch.chdir(tmp_path)
    write_tiny_params(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("# mine\n" + params_file.read_text())
    apply_overrides(["build_base_model.steps=6", "model.target_context=256"])
    assert params_file.read_text().startswith("# mine\n")
    params = load_params(params_file)
    assert (params.build_base_model.steps, params.model.target_context) == (6, 256)
    before = params_file.read_text()
    with pytest.raises(ParamsError, match=r"^params\.yaml with -S model\.target_context=1002: .*1002"):
        apply_overrides(["model.target_context=1002"])
    assert params_file.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextlib.contextmanager
def _in_repo(repo: Path):
    """Run in `repo` with the env DVC and git need there (the flow runs `dvc repro` in the current directory)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in repo_env(repo.parent).items():
            if key != "PATH":  # the flow puts the interpreter's bin first itself
                patch.setenv(key, value)
        patch.chdir(repo)
        yield


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def _logs(task_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines travel to the server in batches
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))]


@pytest.fixture(scope="module")
def flow_runs(prefect_harness, tmp_path_factory):
    """The tiny pipeline run twice by the flow in a fresh git+DVC repository: (repo, first state, second state)."""
    from pipelines.longlora_flow import longlora_flow

    repo = make_repo(tmp_path_factory.mktemp("flow"))
    with _in_repo(repo):
        first = longlora_flow(retry_delay_seconds=0, return_state=True)
        second = longlora_flow(retry_delay_seconds=0, return_state=True)
    return repo, first, second


@pytest.mark.slow
def test_prefect_flow_runs_every_stage_through_dvc(flow_runs):
    repo, first, second = flow_runs
    assert first.is_completed(), first.message
    results = first.result()
    assert list(results) == stage_order(ROOT / "dvc.yaml")
    assert results["build_base_model"]["heldout_loss"] < results["build_base_model"]["initial_heldout_loss"]
    for out in final_outputs():
        assert (repo / out).exists(), f"the flow did not produce {out}"
    runs = _task_runs(first.state_details.flow_run_id)
    assert {name: run.state.name for name, run in runs.items()} == dict.fromkeys(results, "Completed")
    # DVC ran every stage: it agrees that nothing is stale.
    env = repo_env(repo.parent)
    assert "Data and pipelines are up to date" in run_checked([DVC, "status"], repo, env)
    # Nothing changed: the second run skips every stage, and returns the same metrics.
    assert second.is_completed(), second.message
    assert second.result() == results
    runs = _task_runs(second.state_details.flow_run_id)
    assert {name: run.state.name for name, run in runs.items()} == dict.fromkeys(results, "Skipped")


@pytest.mark.slow
def test_prefect_task_runs_have_the_edges_of_dvc_yaml(flow_runs):
    from pipelines.longlora_flow import stage_graph

    _, first, _ = flow_runs
    runs = _task_runs(first.state_details.flow_run_id)
    names = {run.id: name for name, run in runs.items()}
    graph = stage_graph(ROOT / "dvc.yaml", flow_runs[0] / "params.yaml")
    assert any(graph.values()), "the project's stages depend on each other"
    for name, run in runs.items():
        assert {names[ref.id] for ref in run.task_inputs.get("wait_for", [])} == graph[name], name


@pytest.mark.slow
def test_prefect_run_attaches_logs_and_artifacts(flow_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    repo, first, _ = flow_runs
    runs = _task_runs(first.state_details.flow_run_id)
    logs = _logs(runs["build_base_model"].id)
    assert "Running stage 'build_base_model':" in logs  # DVC's own line
    assert any('"heldout_loss"' in line for line in logs)  # the stage's own output
    assert any("'loss':" in line for line in _logs(runs["extend"].id)), "the Trainer's loss lines reach the log"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))
    by_key = {artifact.key: artifact.data for artifact in artifacts}
    assert "| heldout_loss |" in by_key["build-base-model-metrics"]
    # Keys have dashes for every other character (base_pi → base-pi).
    assert {f"eval-perplexity-{m.replace('_', '-')}-metrics"
            for m in load_params(repo / "params.yaml").eval_models} <= set(by_key)
    assert "### eval_passkey" in by_key["model-comparison"]
    assert "perplexity.csv" in by_key["plots"] and "heatmap.png](data:image/png;base64," in by_key["plots"]
    # The report as the UI shows it: its plot and heatmaps embedded, no link to a file beside it.
    report = by_key["report"]
    # The perplexity plot, and a passkey and a RULER heatmap per model.
    assert report.count("](data:image/png;base64,") == 1 + 2 * len(load_params(repo / "params.yaml").eval_models)
    assert not re.search(r"\]\((?!data:|https?:)", report), "no relative link or image is left"


@pytest.mark.slow
def test_prefect_failing_stage_fails_its_task_with_its_message(flow_runs):
    from pipelines.longlora_flow import StageFailed, longlora_flow

    repo, _, _ = flow_runs
    config = repo / "data/base_model/config.json"
    kept = config.read_text()
    config.write_text("{not json")
    try:
        with _in_repo(repo), pytest.raises(StageFailed, match=r"stages\.prepare_corpus: error: .*config\.json"):
            longlora_flow(stages=["prepare_corpus"], retry_delay_seconds=0)
    finally:
        config.write_text(kept)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        latest = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert latest.state.is_failed()
    task_run = _task_runs(latest.id)["prepare_corpus"]
    assert task_run.state.is_failed()
    assert "stages.prepare_corpus: error:" in task_run.state.message
    assert any(line.startswith("stages.prepare_corpus: error:") for line in _logs(task_run.id))
    # The stage's error line is logged as an error; Prefect's own line about the failed state has no stray
    # `NoneType: None` (a traceback of no exception).
    logs = _flow_logs(latest.id)
    assert {level for level, message, _ in logs if message.startswith("stages.prepare_corpus: error:")} == {40}
    assert not any("NoneType: None" in message for _, message, _ in logs), logs


@pytest.mark.slow
def test_prefect_flow_rejects_bad_params_before_any_stage(prefect_harness, tmp_path, monkeypatch):
    from pipelines.longlora_flow import longlora_flow
    from stages.params import ParamsError

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("model:\n  target_context: 1002\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="1002"):
        longlora_flow()
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_prefect_flow_checks_every_output_before_the_first_stage(prefect_harness, tmp_path, monkeypatch):
    from longlora.io import OutputError
    from pipelines.longlora_flow import longlora_flow

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(prepare_eval={"out_dir": "results"})))
    (tmp_path / "results").mkdir()
    (tmp_path / "results/keep.txt").write_text("mine")
    with pytest.raises(OutputError,
                       match=r"prepare_eval\.out_dir 'results' holds files that stage prepare_eval did not"):
        longlora_flow()
    assert not (tmp_path / "data").exists(), "the last stage's output is checked before the first stage runs"
    assert (tmp_path / "results/keep.txt").read_text() == "mine"


def test_flow_overrides_keep_params_yaml_formatting(tmp_path, monkeypatch):
    """`-S` rewrites only the lines of the values it changes: `null` stays `null`, block lists keep their indentation,
    long lines stay whole, comments stay where they are (DVC's own writer changes all of that)."""
    from pipelines.longlora_flow import apply_overrides

    monkeypatch.chdir(tmp_path)
    original = (ROOT / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(original, encoding="utf-8")
    changed, rewritten = apply_overrides(["extend.max_steps=10", "eval_passkey.lengths=[256,512]",
                                          "eval_passkey.depths=[0.0,1.0]"])
    assert not rewritten
    assert [str(c) for c in changed] == ["extend.max_steps: 200 -> 10", "eval_passkey.lengths: null -> [256, 512]",
                                         "eval_passkey.depths: [0.0, 0.25, 0.5, 0.75, 1.0] -> [0.0, 1.0]"]
    edited = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    expected = (original.replace("  max_steps: 200\n", "  max_steps: 10\n", 1)
                .replace("  lengths: null\n  depths:\n    - 0.0\n    - 0.25\n    - 0.5\n    - 0.75\n    - 1.0\n",
                         "  lengths:\n    - 256\n    - 512\n  depths:\n    - 0.0\n    - 1.0\n", 1))
    assert edited == expected
    assert apply_overrides(["extend.max_steps=10"]) == ([], False)
    assert (tmp_path / "params.yaml").read_text(encoding="utf-8") == expected


def test_override_editor_replaces_values_in_place():
    from pipelines.overrides import edit_in_place

    text = ("a:\n  n: 1  # one\n  s: x # y\n  l:\n  - 1\n  - 2\n\n# b's\nb:\n  m: {k: 1}\n  e: null\n")
    data = yaml.safe_load(text)
    data["a"].update(n=2, s="p: #q", l=None)
    data["b"].update(m={"k": 2}, e=[1])
    edited, changed = edit_in_place(text, data)
    assert edited == "a:\n  n: 2  # one\n  s: 'p: #q' # y\n  l: null\n\n# b's\nb:\n  m: {k: 2}\n  e:\n    - 1\n"
    assert yaml.safe_load(edited) == data
    assert [c.key for c in changed] == ["a.n", "a.s", "a.l", "b.m.k", "b.e"]
    data["a"]["new"] = 1  # a key added or removed: DVC's writer does it
    assert edit_in_place(text, data) is None


def test_flow_parameters_are_described_and_stages_are_choices():
    """The deployment's run form: a description for each parameter (the flow's docstring), the stage names to pick
    from."""
    from pipelines.longlora_flow import longlora_flow

    schema = longlora_flow.parameters.model_dump()["properties"]
    assert set(schema) == {"set_params", "stages", "training_retries", "retry_delay_seconds"}
    assert all(field.get("description") for field in schema.values()), schema
    choices = next(option["items"]["enum"] for option in schema["stages"]["anyOf"] if option.get("type") == "array")
    assert choices == stage_order(ROOT / "dvc.yaml")


def test_report_artifact_embeds_its_images_and_unlinks_its_files(tmp_path):
    """The report's README.md is written to be read beside its files; as an artifact it must stand alone."""
    import base64

    from pipelines.longlora_flow import self_contained

    (tmp_path / "passkey").mkdir()
    (tmp_path / "perplexity.png").write_bytes(b"\x89PNG one")
    (tmp_path / "passkey/base.png").write_bytes(b"\x89PNG two")
    markdown = ("![perplexity vs context length](perplexity.png)\n\n![passkey: base](passkey/base.png)\n"
                "| [models/sft/README.md](models/sft/README.md) | [card](models/x.md) | [hub](https://hf.co) |\n"
                "![gone](missing.png)\n")
    shown = self_contained(markdown, tmp_path)
    one, two = (base64.b64encode(data).decode() for data in (b"\x89PNG one", b"\x89PNG two"))
    assert f"![perplexity vs context length](data:image/png;base64,{one})" in shown
    assert f"![passkey: base](data:image/png;base64,{two})" in shown
    assert f"| `{tmp_path}/models/sft/README.md` | card (`{tmp_path}/models/x.md`) | [hub](https://hf.co) |" in shown
    assert f"*gone: no `{tmp_path}/missing.png`*" in shown
    assert not re.search(r"\]\((?!data:|https:)", shown), "no relative link or image is left"


def _flow_logs(flow_run_id) -> list[tuple[int, str, object]]:
    """(level, message, task run id) of every log line of a flow run, its tasks' too."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.level, log.message, log.task_run_id) for log in logs]


@pytest.mark.slow
def test_prefect_run_is_tagged_logs_overrides_and_names_held_back_stages(prefect_harness, tmp_path, monkeypatch):
    """With the stages replaced by a stub (no DVC): the run's tags, its log of what -S changed, and a stage held back
    by a failed one is NotReady with a message naming that stage (Prefect's names a task run id), and no stray
    `NoneType: None` in the log."""
    from prefect import task
    from prefect.states import Failed

    import pipelines.longlora_flow as module

    @task(task_run_name="{stage}")
    def stub(stage: str, metrics_file: str):
        return Failed(message=f"{stage} failed: boom") if stage == "prepare_corpus" else {}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "run_stage", stub)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    write_tiny_params(tmp_path)
    state = module.longlora_flow(set_params=["extend.max_steps=10"], stages=["prepare_corpus", "prepare_eval"],
                                 return_state=True)
    assert state.is_failed() and state.message == "prepare_corpus failed: boom"
    run_id = state.state_details.flow_run_id
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert {"model:base_model", "target_context:128"} <= set(client.read_flow_run(run_id).tags)
    runs = _task_runs(run_id)
    held = runs["prepare_eval"].state
    assert held.name == "NotReady"
    assert held.message == "prepare_eval did not run: its upstream stage prepare_corpus failed"
    logs = _flow_logs(run_id)
    assert any(level == 30 and "-S changed params.yaml" in message and "extend.max_steps: 6 -> 10" in message
               for level, message, _ in logs), logs
    assert not any("NoneType: None" in message for _, message, _ in logs), logs
    assert not any(re.search(r"task run '[0-9a-f-]{36}'", message) for _, message, _ in logs), logs
    assert {name: {ref.id for ref in run.task_inputs.get("wait_for", [])} for name, run in runs.items()} == {
        "prepare_corpus": set(), "prepare_eval": {runs["prepare_corpus"].id}}, "the graph keeps its edge"


@pytest.mark.slow
def test_prefect_flow_reports_a_bad_override_in_one_line(prefect_harness, tmp_path, monkeypatch, capsys):
    """An invalid `-S` (Hydra cannot parse it, or params.yaml would be invalid): one line and exit status 2, as a
    failing stage gives, no traceback; params.yaml untouched."""
    from pipelines.longlora_flow import main

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    write_tiny_params(tmp_path)
    before = (tmp_path / "params.yaml").read_text()
    for override, reason in (("extend.max_steps", "missing EQUAL"), ("model.target_context=1002", "1002")):
        assert main(["-S", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longlora_flow: error: ") and reason in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert (tmp_path / "params.yaml").read_text() == before
    # A target shorter than the local base model's own context: refused before any stage, as each stage's CLI does.
    (tmp_path / "data/base_model").mkdir(parents=True)
    (tmp_path / "data/base_model/config.json").write_text('{"max_position_embeddings": 256}')
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "model.target_context 128 is shorter than the context of model.name_or_path, 256" in err, err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["base_model"]
