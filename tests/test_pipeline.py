"""The orchestration: `dvc repro` in a temporary git repository and the Prefect flow under Prefect's test harness
both run every stage of dvc.yaml on tiny parameters and write the artifacts."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.longlora_flow import _paths, _under, expand_stages, stage_order
from stages.params import load_params, stage_key
from tests.conftest import ROOT, tiny_params_dict

PROJECT_FILES = ["dvc.yaml", ".dvc/config", ".dvcignore", "pyproject.toml"]
PROJECT_DIRS = ["longlora", "stages", "pipelines"]


def _project_stages() -> dict[str, dict]:
    """dvc.yaml's stages, foreach instances expanded with params.yaml's values."""
    return expand_stages(yaml.safe_load((ROOT / "dvc.yaml").read_text()),
                         yaml.safe_load((ROOT / "params.yaml").read_text()))


def _final_outputs() -> list[Path]:
    stages = _project_stages()
    return [Path(next(iter(o)) if isinstance(o, dict) else o)
            for stage in stages.values() for o in stage.get("outs", []) + stage.get("metrics", [])]


def _write_tiny_params(where: Path) -> None:
    (where / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()), encoding="utf-8")


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
        "extend": {"cmd": "python -m stages.extend", "outs": ["data/extend"]},
        "sft": {"cmd": "python -m stages.sft", "deps": ["out/extend"], "outs": ["data/sft_adapter"]},
    }}, sort_keys=False))
    assert stage_order(tmp_path / "dvc.yaml") == ["extend", "merge@extend", "sft", "merge@sft"]
    assert expand_stages(yaml.safe_load((tmp_path / "dvc.yaml").read_text()))["merge@sft"] == {
        "cmd": "python -m stages.merge sft", "deps": ["data/sft_adapter"], "outs": ["out/sft"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "merge": {"foreach": ["extend"], "do": {"cmd": "python -m stages.merge"}}}}))
    with pytest.raises(ValueError, match=r"stage 'merge@extend' must run `python -m stages.merge extend`"):
        stage_order(tmp_path / "dvc.yaml")


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
    torch code must not be among them, or an edit to one reruns every stage (the 6.5-minute base model too)."""
    light = {"stages/params.py", "longlora/choices.py", "longlora/corpus.py", "longlora/errors.py", "longlora/io.py",
             "longlora/recipe.py", "longlora/sources.py"}
    assert _project_imports("stages.params") == light


def _has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_every_stage_declares_the_code_params_and_data_it_reads():
    """dvc.yaml's deps and params are what each stage really reads, so that `dvc repro` reruns exactly when needed."""
    spec = _project_stages()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert stage_order(ROOT / "dvc.yaml") == list(params.stages()), "the flow and params.py must know the same stages"
    produced = [out for stage in spec.values() for out in _paths(stage.get("outs"))]
    for name, stage in spec.items():
        module = name.split("@")[0]  # an instance of a foreach stage runs the stage's module
        deps, declared = _paths(stage["deps"]), stage["params"]
        assert deps[:3] == [f"stages/{module}.py", "stages/_cli.py", "stages/params.py"], name
        imported = _project_imports(f"stages.{module}")
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
        persistent = [str(own.checkpoint_dir)] if hasattr(own, "checkpoint_dir") else []
        assert _paths(stage["outs"]) == [str(own.out_dir), *persistent]
        assert _paths(stage["metrics"]) == [str(own.metrics_file)]
    # A merge instance reads the folder its training stage wrote, and declares it.
    for source in (name.split("@")[1] for name in spec if name.startswith("merge@")):
        assert str(params.section(source).out_dir) in _paths(spec[f"merge@{source}"]["deps"])
        assert f"{source}.out_dir" in spec[f"merge@{source}"]["params"]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_in_a_fresh_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    _write_tiny_params(repo)
    env = {
        **os.environ,
        # The stages' `python` must be this interpreter, whatever else is on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [str(Path(sys.executable).parent / "dvc")]
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "init"], repo, env)

    _run([*dvc, "repro"], repo, env)
    for out in _final_outputs():
        assert (repo / out).exists(), f"dvc repro did not produce {out}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stage_order(ROOT / "dvc.yaml"))
    assert lock["stages"]["build_base_model"]["params"]["params.yaml"]["build_base_model"]["steps"] == 12

    assert "Data and pipelines are up to date" in _run([*dvc, "status"], repo, env)
    changed = _run([*dvc, "repro", "--dry", "build_base_model"], repo, env)
    assert "didn't change, skipping" in changed
    # build_base_model builds only when model.name_or_path is its own output: switching models makes it stale.
    params_text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params_text.replace("name_or_path: data/base_model",
                                                          "name_or_path: meta-llama/Llama-2-7b-hf"))
    assert "model.name_or_path" in _run([*dvc, "status", "build_base_model"], repo, env)
    (repo / "params.yaml").write_text(params_text)
    # Every stage's metrics report the parameters it ran with, derived defaults resolved.
    shown = _run([*dvc, "metrics", "show", "--json"], repo, env)
    assert '"block_length": 128' in shown  # prepare_pretrain.block_length: null, model.target_context 128

    # An experiment with one parameter changed reruns what depends on it and records the new value.
    _run([*dvc, "exp", "run", "-S", "build_base_model.steps=6"], repo, env)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["build_base_model"]["params"]["params.yaml"]["build_base_model"]["steps"] == 6


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_prefect_flow_runs_the_same_stages(prefect_harness, tmp_path, monkeypatch):
    from pipelines.longlora_flow import longlora_flow

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    _write_tiny_params(tmp_path)
    results = longlora_flow(params_file="params.yaml")
    assert list(results) == stage_order(ROOT / "dvc.yaml")
    assert results["build_base_model"]["heldout_loss"] < results["build_base_model"]["initial_heldout_loss"]
    for out in _final_outputs():
        assert (tmp_path / out).exists(), f"the flow did not produce {out}"


@pytest.mark.slow
def test_prefect_flow_rejects_bad_params_before_any_stage(prefect_harness, tmp_path, monkeypatch):
    from pipelines.longlora_flow import longlora_flow
    from stages.params import ParamsError

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("model:\n  target_context: 1002\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="1002"):
        longlora_flow(params_file="params.yaml")
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
        longlora_flow(params_file="params.yaml")
    assert not (tmp_path / "data").exists(), "the last stage's output is checked before the first stage runs"
    assert (tmp_path / "results/keep.txt").read_text() == "mine"
