"""The documentation and configuration never point at a file of this project that does not exist."""

from __future__ import annotations

import re

from tests.conftest import ROOT

# A path inside the project, as the docs, docstrings and YAML files cite it (`docs/data.md`, `longlora/io.py`).
PROJECT_PATH = re.compile(
    r"(?<![\w./-])(?:docs|configs|benchmarks|longlora|stages|pipelines|tests)/[\w./-]*\w\.(?:py|md|yaml|json|toml)\b"
)
# Tests are left out: they name the fixture files they create.
CITING = ["README.md", "Makefile", "dvc.yaml", "params.yaml", "pyproject.toml", "docs/*.md", "configs/*.yaml",
          "longlora/*.py", "stages/*.py", "pipelines/*.py", "benchmarks/*.py"]


def test_every_cited_project_file_exists():
    citing = sorted({path for pattern in CITING for path in ROOT.glob(pattern)})
    assert ROOT / "docs/data.md" in citing
    cited = {(path.relative_to(ROOT).as_posix(), ref) for path in citing
             for ref in PROJECT_PATH.findall(path.read_text(encoding="utf-8"))}
    assert ("dvc.yaml", "docs/data.md") in cited  # the pattern finds what it is meant to find
    missing = sorted((where, ref) for where, ref in cited if not (ROOT / ref).exists())
    assert not missing, f"(citing file, missing file): {missing}"


def test_the_parameters_page_is_generated_from_the_current_code_and_params():
    from stages.params_doc import markdown

    committed = (ROOT / "docs/params.md").read_text(encoding="utf-8")
    assert committed == markdown(ROOT / "params.yaml"), "docs/params.md is out of date: run `make docs`"
    # Every key of every section is on the page, with its default and params.yaml's value.
    assert "| `lr` | float > 0 | `2e-05` | `0.003` |" in committed
    assert "| `extend.out_dir` | path (written) | `data/extended_model` |" in committed
