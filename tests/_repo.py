"""A temporary git+DVC repository holding this project's code and the tiny params (tests/test_dvc.py,
tests/test_pipeline.py), and the commands run in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.longlora_flow import expand_stages
from tests.conftest import ROOT, tiny_params_dict

PROJECT_FILES = ["dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]
PROJECT_DIRS = ["longlora", "stages", "pipelines"]
DVC = str(Path(sys.executable).parent / "dvc")


def expanded_stages() -> dict[str, dict]:
    """The project's dvc.yaml with every foreach expanded, `${…}` filled from params.yaml as DVC does."""
    return expand_stages(yaml.safe_load((ROOT / "dvc.yaml").read_text()),
                         yaml.safe_load((ROOT / "params.yaml").read_text()))


def final_outputs() -> list[Path]:
    """Every output and metrics file dvc.yaml declares."""
    return [Path(next(iter(o)) if isinstance(o, dict) else o)
            for stage in expanded_stages().values() for o in stage.get("outs", []) + stage.get("metrics", [])]


SHIPPED_BASE_MODEL = """    frozen: true
"""
"""What makes the project's build_base_model stage take the base model shipped in git as it is (with its output's
`cache: false`): a temporary repository builds its own tiny base model instead, a DVC output like any other."""


def unfrozen_dvc_yaml() -> str:
    """The project's dvc.yaml with build_base_model as an ordinary stage."""
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    for shipped, built in ((SHIPPED_BASE_MODEL, ""), ("      - ${build_base_model.out_dir}:\n          cache: false\n",
                                                      "      - ${build_base_model.out_dir}\n")):
        assert text.count(shipped) == 1, f"dvc.yaml no longer has {shipped!r} once"
        text = text.replace(shipped, built)
    return text


def write_tiny_params(where: Path) -> None:
    (where / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()), encoding="utf-8")


def run_checked(cmd: list[str], cwd: Path, env: dict) -> str:
    """Run `cmd` in `cwd`; return its stdout, or fail the test with both streams' ends."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def repo_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        # The stages' `python` must be this interpreter, whatever else is on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }


def make_repo(tmp_path: Path) -> Path:
    """A git+DVC repository with the project's code and dvc.yaml and the tiny params.yaml, committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    (repo / "dvc.yaml").write_text(unfrozen_dvc_yaml(), encoding="utf-8")
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_tiny_params(repo)
    env = repo_env(tmp_path)
    run_checked(["git", "init", "-q"], repo, env)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-q", "-m", "init"], repo, env)
    return repo


def stages_run(repro_output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, or restored from DVC's run-cache instead of running them."""
    return set(re.findall(r"Running stage '([^']+)'", repro_output)) | set(
        re.findall(r"Stage '([^']+)' is cached - skipping run", repro_output))


def stages_skipped(repro_output: str) -> set[str]:
    """The stages a `dvc repro` found up to date."""
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", repro_output))
