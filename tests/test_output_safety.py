"""No stage can be made to delete a file it did not write, whatever its parameters: the cases of issue #6, run
through the real stages and their command line in a stand-in project under tmp_path (never the real one)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from longlora.io import OUTPUT_MARKER, OutputBusyError, OutputError
from stages import _cli, build_base_model, prepare_eval, prepare_pretrain
from stages.params import parse_params
from stages.registry import FINAL_STAGES, STAGES, stage_key
from tests.conftest import tiny_params_dict

DOCS = ["def f():\n    return 1\n" * 40, "class A:\n    x = 2\n" * 60]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project checkout with uncommitted work, a data/.gitignore and a home folder of its own, as the cwd."""
    root = tmp_path / "home" / "project"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "data").mkdir()
    (root / "data" / ".gitignore").write_text("/base_model\n")
    (root / "notes.md").write_text("uncommitted work\n")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli_run(stage: str, raw: dict, capsys) -> tuple[int, str]:
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    name, _, key = stage.partition("@")  # an instance of a foreach stage (merge@extend): run(params, key)
    module = importlib.import_module(f"stages.{name}")
    run = (lambda params: module.run(params, key)) if key else module.run
    code = _cli.main(stage, run, ["--params", "params.yaml"])
    return code, capsys.readouterr().err


def _docs(folder: Path, texts=DOCS) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("stage", STAGES + FINAL_STAGES)
def test_out_dir_holding_an_unrelated_file_is_refused_and_the_file_stays(project, tiny_tokenizer_dir, stage, capsys):
    user = project / "my_results"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    section, _, instance = stage.partition("@")
    own = {"out_dir": "my_results"}
    overrides = {section: {instance: own} if instance else own, "model": {"name_or_path": str(tiny_tokenizer_dir)}}
    if stage == "build_base_model":
        overrides["model"] = {"name_or_path": "my_results"}
    before = _snapshot(project)
    code, err = _cli_run(stage, tiny_params_dict(**overrides), capsys)
    assert code == 2
    assert err.strip() == (f"stages.{stage}: error: {stage_key(stage)}.out_dir 'my_results' holds files that stage "
                           f"{stage} did not write (thesis.tex; no {OUTPUT_MARKER}); name another folder, or move them "
                           "away; nothing was written or deleted")
    assert _snapshot(project) == {**before, "params.yaml": (project / "params.yaml").read_bytes()}
    assert sorted(p.name for p in project.iterdir()) == [".git", "data", "my_results", "notes.md", "params.yaml"]


@pytest.mark.parametrize("out_dir", [".", "PROJECT", "..", "~", "data/.."])
def test_the_project_root_and_above_are_refused(project, capsys, out_dir):
    out_dir = str(project) if out_dir == "PROJECT" else out_dir
    before = _snapshot(project)
    code, err = _cli_run("prepare_eval", tiny_params_dict(prepare_eval={"out_dir": out_dir}), capsys)
    assert code == 2 and "Traceback" not in err
    assert "prepare_eval.out_dir: " in err and ("working directory" in err or "home folder" in err)
    assert _snapshot(project) == {**before, "params.yaml": (project / "params.yaml").read_bytes()}


def test_an_out_dir_containing_the_other_outputs_is_refused(project, capsys):
    (project / "data/base_model").mkdir()
    (project / "data/base_model/model.safetensors").write_bytes(b"weights")
    (project / "data/corpus").mkdir()
    (project / "data/corpus/pretrain.jsonl").write_text('{"text": "x"}\n')
    before = _snapshot(project)
    code, err = _cli_run("prepare_eval", tiny_params_dict(prepare_eval={"out_dir": "data"}), capsys)
    assert code == 2
    assert "params.yaml: prepare_eval.out_dir: 'data' contains build_base_model.out_dir 'data/base_model'" in err
    assert _snapshot(project) == {**before, "params.yaml": (project / "params.yaml").read_bytes()}


def test_pretrain_out_dir_on_the_base_model_is_refused(project, tiny_tokenizer_dir, capsys):
    code, err = _cli_run("prepare_pretrain", tiny_params_dict(prepare_pretrain={"out_dir": "data/base_model"}), capsys)
    assert code == 2
    assert "prepare_pretrain.out_dir: 'data/base_model' is the same place as build_base_model.out_dir" in err
    # Params cannot see it when build_base_model.out_dir moved since the model was built: the marker does.
    build_base_model.run(parse_params(tiny_params_dict(build_base_model={"out_dir": "models/base"},
                                                       model={"name_or_path": "meta-llama/Llama-2-7b-hf"})))
    built = _snapshot(project / "models/base")
    with pytest.raises(OutputError, match=r"prepare_pretrain\.out_dir 'models/base' is the output of stage "
                                          r"'build_base_model', not of prepare_pretrain"):
        prepare_pretrain.run(parse_params(tiny_params_dict(prepare_pretrain={"out_dir": "models/base"},
                                                           model={"name_or_path": str(tiny_tokenizer_dir)})))
    assert _snapshot(project / "models/base") == built


def test_an_out_dir_holding_another_stages_input_is_refused(project, tiny_tokenizer_dir):
    docs = _docs(project / "corpora/pg19")
    params = parse_params(tiny_params_dict(model={"name_or_path": str(tiny_tokenizer_dir)},
                                           prepare_eval={"input": docs}, prepare_sft={"out_dir": "corpora"}))
    from stages import prepare_sft

    with pytest.raises(OutputError, match=r"prepare_sft\.out_dir 'corpora' holds files that stage prepare_sft did not "
                                          r"write \(pg19/doc0\.txt, pg19/doc1\.txt;"):
        prepare_sft.run(params)
    assert sorted(p.name for p in (project / "corpora/pg19").iterdir()) == ["doc0.txt", "doc1.txt"]


def test_metrics_file_on_a_users_file_or_an_input_is_refused(project, tiny_tokenizer_dir, capsys):
    docs = _docs(project / "docs")
    (project / "package.json").write_text('{"name": "my-app"}')
    code, err = _cli_run("prepare_eval", tiny_params_dict(
        model={"name_or_path": str(tiny_tokenizer_dir)},
        prepare_eval={"input": docs, "metrics_file": "package.json"}), capsys)
    assert code == 2 and "prepare_eval.metrics_file 'package.json' exists and is not a metrics file" in err
    assert (project / "package.json").read_text() == '{"name": "my-app"}'
    assert not (project / "data/eval").exists(), "refused before any work"
    code, err = _cli_run("prepare_eval", tiny_params_dict(
        model={"name_or_path": str(tiny_tokenizer_dir)},
        prepare_eval={"input": f"{docs}/doc0.txt", "metrics_file": f"{docs}/doc0.txt"}), capsys)
    assert code == 2 and "prepare_eval.metrics_file: " in err and "is the same place as prepare_eval.input" in err
    assert (project / "docs/doc0.txt").read_text() == DOCS[0]


def test_a_rerun_replaces_its_own_output_and_nothing_else(project, tiny_tokenizer_dir):
    def params(texts):
        return parse_params(tiny_params_dict(model={"name_or_path": str(tiny_tokenizer_dir)},
                                             prepare_eval={"input": _docs(project / f"docs{len(texts)}", texts)}))

    assert prepare_eval.run(params(DOCS))["documents"] == 2
    out = project / "data/eval"
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker == {"stage": "prepare_eval", "files": ["doc_offsets.npy", "meta.json", "tokens.bin"]}
    assert prepare_eval.run(params(DOCS[:1]))["documents"] == 1
    assert json.loads((out / "meta.json").read_text())["documents"] == 1
    (out / "my_plot.png").write_bytes(b"png")
    with pytest.raises(OutputError, match=r"holds files that stage prepare_eval did not write \(my_plot\.png\)"):
        prepare_eval.run(params(DOCS))
    assert (out / "my_plot.png").read_bytes() == b"png"
    assert json.loads((out / "meta.json").read_text())["documents"] == 1
    assert json.loads((project / "data/metrics/prepare_eval.json").read_text())["stage"] == "prepare_eval"


def test_a_second_run_of_a_stage_on_the_same_output_fails_at_once(project, tiny_tokenizer_dir, capsys):
    raw = tiny_params_dict(model={"name_or_path": str(tiny_tokenizer_dir)},
                           prepare_eval={"input": _docs(project / "docs")})
    with parse_params(raw).output("prepare_eval"):  # the first run, still writing
        with pytest.raises(OutputBusyError, match="another run of stage prepare_eval is writing it"):
            prepare_eval.run(parse_params(raw))
        code, err = _cli_run("prepare_eval", raw, capsys)
        assert code == 2 and "prepare_eval.out_dir 'data/eval': another run of stage prepare_eval is writing it" in err
        assert not (project / "data/eval").exists()
    assert prepare_eval.run(parse_params(raw))["documents"] == 2


def test_a_killed_runs_temporary_folders_are_removed_by_the_next_run(project, tiny_tokenizer_dir):
    killed = project / "data/.eval.tmp-k1ll3d"
    killed.mkdir()
    (killed / OUTPUT_MARKER).write_text(json.dumps({"stage": "prepare_eval", "files": None}))
    (killed / "tokens.bin").write_bytes(b"\0" * 1_000_000)
    other = project / "data/.eval.tmp-notes"  # the same pattern, not the stage's: kept
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    prepare_eval.run(parse_params(tiny_params_dict(model={"name_or_path": str(tiny_tokenizer_dir)},
                                                   prepare_eval={"input": _docs(project / "docs")})))
    assert sorted(p.name for p in (project / "data").iterdir()) == [".eval.tmp-notes", ".gitignore", "eval", "logs",
                                                                     "metrics"]
    assert (other / "mine.txt").read_text() == "mine"
