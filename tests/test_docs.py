"""The documentation: every page reachable from the README, every link and cited file there, the README's stage
table in step with dvc.yaml, its Python snippet runnable, and docs/params.md generated from the current code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

# A path inside the project, as the docs, docstrings and YAML files cite it (`docs/data.md`, `longlora/io.py`).
PROJECT_PATH = re.compile(
    r"(?<![\w./-])(?:docs|configs|benchmarks|longlora|stages|pipelines|tests)/[\w./-]*\w\.(?:py|md|yaml|json|toml)\b"
)
# Tests are left out: they name the fixture files they create.
CITING = ["README.md", "Makefile", "dvc.yaml", "params.yaml", "pyproject.toml", "docs/*.md", "configs/*.yaml",
          "longlora/**/*.py", "stages/*.py", "pipelines/*.py", "benchmarks/*.py"]


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


def _readme_python() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) == 1, "the README has one Python snippet"
    return blocks[0]


def test_the_readmes_python_snippet_runs_on_a_tiny_model(tiny_tokenizer, tmp_path, monkeypatch, single_torch_thread):
    """The snippet as written, in a folder where data/base_model is a tiny Llama and data/extend an adapter folder
    saved as the extend stage saves it."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import longlora.method.s2attn as s2attn
    from longlora.embedded.tiny import tiny_llama_config
    from longlora.method.extension import describe, plain_config
    from longlora.method.lora import apply_lora_plus
    from longlora.method.rope import interpolated_config

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_layers=2,
                                              num_heads=4, num_kv_heads=2, context_length=256))
    base.save_pretrained("data/base_model")
    tiny_tokenizer.save_pretrained("data/base_model")
    config = interpolated_config(base.config, 1024, "yarn")
    adapter = apply_lora_plus(LlamaForCausalLM.from_pretrained("data/base_model", config=config))
    adapter.save_pretrained("data/extend")
    plain_config(config).save_pretrained("data/extend")
    describe("data/extend", {"base_model": "data/base_model", "method": "lora_plus"})

    calls = []
    real = s2attn.shifted_sparse_attention
    monkeypatch.setattr(s2attn, "shifted_sparse_attention", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    namespace: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), namespace)  # noqa: S102 - the project's own README

    assert calls == [256] * 2, "every layer trained with S²-Attn, groups of a quarter of 1024"
    assert all(p.grad is not None for p in namespace["model"].parameters() if p.requires_grad)
    extended = namespace["extended"]
    assert isinstance(extended, PeftModel) and not extended.training
    assert extended.config.max_position_embeddings == 1024
    assert extended.config.rope_parameters["factor"] == 4.0


PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md")])
# A Markdown link or image, `[text](target)`, outside code; the target up to the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a `[x](y)` is a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose_headings(page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _prose_headings(text: str) -> str:
    """Headings keep their inline code (GitHub's anchor keeps its text); fenced blocks are not headings."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#")[0] for target in LINK.findall(_prose(readme))}
    pages = {path.relative_to(ROOT).as_posix() for path in ROOT.glob("docs/*.md")}
    assert "docs/params.md" in pages and "docs/pipeline.md" in pages
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_every_relative_link_resolves_to_a_file_and_a_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append((page.name, target, "no such file"))
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append((page.name, target, "no such heading"))
    assert not broken, broken


def test_the_readme_table_gives_every_stages_module_params_and_test():
    """A newcomer finds any stage's module, params and test from the README in one step."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (stage := re.match(r"`(\w+)`", cells[0])) and "stages/" in cells[1]:
            rows[stage.group(1)] = cells
    from stages.params import Params

    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    assert list(rows) == stages, "one row per dvc.yaml stage, in its order"
    params_page = (ROOT / "docs/params.md").read_text(encoding="utf-8")
    for stage, (_, module, section, _, test) in rows.items():
        assert f"[stages/{stage}.py](stages/{stage}.py)" == module, stage
        name = re.fullmatch(r"\[`(\w+)`\]\(docs/params\.md#(\w+)\)", section)
        assert name and name.group(1) == name.group(2) == stage and stage in Params.model_fields, stage
        assert f"## `{stage}`" in params_page, stage
        test_file = re.fullmatch(r"\[(tests/test_\w+\.py)\]\(\1\)", test)
        assert test_file and (ROOT / test_file.group(1)).exists(), stage
