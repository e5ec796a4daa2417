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
