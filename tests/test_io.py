"""Outputs: a stage replaces only what it wrote itself, atomically, one run at a time; nothing half-written on
failure; usual permissions on success."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from longlora.errors import InputError
from longlora.io import (
    OUTPUT_MARKER,
    PARAMS_FILE,
    TIMINGS_FILE,
    OutputBusyError,
    OutputError,
    StageOutput,
    atomic_dir,
    atomic_file,
    protected_place,
    run_log,
    same_path,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _publish(path, files: dict[str, str], owner="stage_a", param="a.out_dir"):
    with StageOutput(owner, path, param) as out, out.publish() as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_dir_leaves_nothing_and_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final, "stage_a") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, "stage_a") as tmp:
        (tmp / "a.txt").write_text("new, half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"], "temporary folder or lock file left behind"


def test_failed_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "stats.json") as handle:
        handle.write("{")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model", "stage_a") as tmp:
            (tmp / "w").write_text("x")
            # What transformers' safetensors writer leaves: an owner-only file (mkstemp), here in a subfolder.
            (tmp / "sub").mkdir()
            fd, owner_only = tempfile.mkstemp(dir=tmp / "sub")
            os.close(fd)
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "model/sub") == 0o755
    assert _mode(tmp_path / "model/sub" / Path(owner_only).name) == 0o644
    assert _mode(tmp_path / "m.json") == 0o644
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


def test_a_published_folder_names_its_stage_and_files_and_a_rerun_replaces_it(tmp_path):
    out = tmp_path / "out"
    _publish(out, {"a.txt": "1", "sub/b.txt": "2"})
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker == {"stage": "stage_a", "files": ["a.txt", "sub/b.txt"]}
    _publish(out, {"c.txt": "3"})
    assert _names(out) == [OUTPUT_MARKER, "c.txt"]
    (out / "c.txt").unlink()  # a file of its own gone missing does not make it someone else's
    _publish(out, {"d.txt": "4"})
    assert _names(out) == [OUTPUT_MARKER, "d.txt"]
    assert _names(tmp_path) == ["out"]


def test_an_empty_folder_is_taken(tmp_path):
    (tmp_path / "out" / "empty_sub").mkdir(parents=True)
    _publish(tmp_path / "out", {"a.txt": "1"})
    assert _names(tmp_path / "out") == [OUTPUT_MARKER, "a.txt"]


def test_a_folder_with_a_file_the_stage_did_not_write_is_refused_before_any_work(tmp_path):
    user = tmp_path / "my_notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    worked = []
    with pytest.raises(OutputError) as err, StageOutput("stage_a", user, "prepare_eval.out_dir"):
        worked.append(True)
    message = str(err.value)
    assert message.startswith(f"prepare_eval.out_dir {str(user)!r} holds files that stage stage_a did not write")
    assert "thesis.tex" in message and isinstance(err.value, InputError)
    assert not worked
    assert (user / "thesis.tex").read_text() == "years of work"
    assert _names(tmp_path) == ["my_notes"], "nothing may be created beside it either (lock, temporary folder)"


def test_another_stages_output_is_refused(tmp_path):
    _publish(tmp_path / "out", {"model.bin": "weights"}, owner="build_base_model")
    with pytest.raises(OutputError, match=r"is the output of stage 'build_base_model', not of prepare_pretrain"):
        _publish(tmp_path / "out", {"tokens.bin": "x"}, owner="prepare_pretrain")
    assert (tmp_path / "out/model.bin").read_text() == "weights"


def test_a_file_added_to_an_output_is_never_deleted_with_it(tmp_path):
    out = tmp_path / "out"
    _publish(out, {"a.txt": "1"})
    (out / "my_analysis.ipynb").write_text("notes")
    with pytest.raises(OutputError, match=r"holds files that stage stage_a did not write \(my_analysis\.ipynb\)"):
        _publish(out, {"a.txt": "2"})
    assert (out / "my_analysis.ipynb").read_text() == "notes" and (out / "a.txt").read_text() == "1"


def test_a_file_added_while_the_stage_runs_stops_the_publication(tmp_path):
    out = tmp_path / "out"
    _publish(out, {"a.txt": "1"})
    claim = StageOutput("stage_a", out, "a.out_dir")
    with pytest.raises(OutputError, match="my_analysis"), claim, claim.publish() as tmp:
        (tmp / "a.txt").write_text("2")
        (out / "my_analysis.ipynb").write_text("notes")
    assert (out / "my_analysis.ipynb").read_text() == "notes" and (out / "a.txt").read_text() == "1"
    assert _names(tmp_path) == ["out"]


def test_an_existing_file_a_symlink_and_a_path_through_a_file_are_refused(tmp_path):
    (tmp_path / "report.pdf").write_text("pdf")
    with pytest.raises(OutputError, match=r"report\.pdf' is an existing file"):
        _publish(tmp_path / "report.pdf", {"a": "1"})
    assert (tmp_path / "report.pdf").read_text() == "pdf"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="is a symbolic link"):
        _publish(tmp_path / "link", {"a": "1"})
    with pytest.raises(OutputError, match=r"cannot be created: '.*report\.pdf' is a file, not a folder"):
        _publish(tmp_path / "report.pdf/out", {"a": "1"})
    assert (tmp_path / "link").is_symlink() and (tmp_path / "report.pdf").read_text() == "pdf"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A stand-in project (never the real one) as the working directory, with a home folder of its own."""
    root = tmp_path / "home" / "project"
    (root / ".git").mkdir(parents=True)
    (root / "params.yaml").write_text("model: {}\n")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


@pytest.mark.parametrize(("path", "reason"), [
    (".", "is the working directory"),
    ("PROJECT", "is the working directory"),
    ("..", "is a folder above the working directory"),
    ("~", "is a folder above the working directory"),
])
def test_the_project_and_the_folders_above_it_are_never_outputs(project, path, reason):
    path = str(project) if path == "PROJECT" else path
    with pytest.raises(OutputError, match=f"{reason}; nothing was written or deleted"):
        _publish(path, {"a": "1"})
    assert sorted(p.name for p in project.iterdir()) == [".git", "params.yaml"]


def test_the_filesystem_root_is_a_protected_place():
    # Only the pure check: no test ever hands a path outside tmp_path to code that writes.
    assert protected_place("/") in ("is a folder above the working directory", "is the filesystem root")
    assert protected_place(Path.cwd() / "data") is None


def test_the_home_folder_is_never_an_output(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputError, match="is the home folder or a folder above it"):
        _publish("~", {"a": "1"})


def test_metrics_file_is_replaced_only_when_this_stage_wrote_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run log, data/logs/, goes under the working directory
    mine, theirs = tmp_path / "m.json", tmp_path / "package.json"
    theirs.write_text('{"name": "not metrics"}')
    with StageOutput("stage_a", tmp_path / "out", "a.out_dir", mine, "a.metrics_file") as out:
        assert out.write_metrics({"loss": 1.5}) == {"stage": "stage_a", "loss": 1.5}
    with StageOutput("stage_a", tmp_path / "out", "a.out_dir", mine, "a.metrics_file") as out:
        out.write_metrics({"loss": 1.0})
    assert json.loads(mine.read_text()) == {"stage": "stage_a", "loss": 1.0}
    for other in (theirs, tmp_path / "out"):
        if other.name == "out":
            other.mkdir()
        with pytest.raises(OutputError, match=r"a\.metrics_file '.*' (exists and is not a metrics file of stage "
                                              r"stage_a|is a folder)"):
            StageOutput("stage_a", tmp_path / "o2", "a.out_dir", other, "a.metrics_file").check()
    with pytest.raises(OutputError, match="not a metrics file of stage stage_b"):
        StageOutput("stage_b", tmp_path / "o3", "b.out_dir", mine, "b.metrics_file").check()
    assert theirs.read_text() == '{"name": "not metrics"}'


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with StageOutput("stage_a", out, "a.out_dir") as first:
        with pytest.raises(OutputBusyError, match=r"a\.out_dir '.*out': another run of stage stage_a is writing"):
            StageOutput("stage_a", out, "a.out_dir").__enter__()
        with first.publish() as tmp:
            (tmp / "a.txt").write_text("1")
    assert _names(tmp_path) == ["out"], "the lock file is removed at the end"
    _publish(out, {"a.txt": "2"})  # and the output can be claimed again


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_lock_holds_across_processes(tmp_path):
    with StageOutput("stage_a", tmp_path / "out", "a.out_dir"):
        other = _python("""
            from longlora.io import StageOutput, OutputBusyError
            try:
                StageOutput("stage_a", "out", "a.out_dir").__enter__()
            except OutputBusyError as err:
                print("busy:", err)
        """, tmp_path)
    assert "busy: a.out_dir 'out': another run of stage stage_a is writing it" in other.stdout, other.stderr


def test_a_killed_runs_temporary_folders_are_removed_by_the_next_run(tmp_path, caplog):
    killed = _python("""
        import os
        from longlora.io import StageOutput
        with StageOutput("stage_a", "out", "a.out_dir") as out, out.publish() as tmp, out.scratch() as scratch:
            (tmp / "big.bin").write_bytes(b"x" * 100_000)
            (scratch / "raw.arrow").write_bytes(b"y" * 100_000)
            os._exit(9)  # no cleanup, as with SIGKILL
    """, tmp_path)
    assert killed.returncode == 9, killed.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len([n for n in left if n.startswith(".out.tmp-")]) == 2 and ".out.lock" in left
    foreign = tmp_path / ".out.tmp-mine"  # same pattern, but not the stage's: kept
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (tmp_path / ".out.tmp-empty").mkdir()  # killed before it was marked: empty, removed

    with caplog.at_level("WARNING"):
        _publish(tmp_path / "out", {"a.txt": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-mine", "out"]
    assert (foreign / "keep.txt").read_text() == "mine"
    assert f"left {foreign} alone: it looks like a temporary folder of stage stage_a" in caplog.text


def test_same_path_sees_through_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert same_path("data/base_model", tmp_path / "data/base_model")
    assert same_path("./data/../data/base_model/", "data/base_model")
    assert not same_path("data/base_model", "data/base_model2")


def test_a_folder_that_cannot_be_listed_is_not_taken_for_an_empty_one(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()

    def unreadable(top, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(top)))
        return iter(())

    monkeypatch.setattr("longlora.io.os.walk", unreadable)
    with pytest.raises(OutputError, match=r"cannot be read to check what it holds \(Permission denied\)"):
        _publish(tmp_path / "out", {"a": "1"})


def test_timings_go_to_the_run_log_and_the_metrics_stay_the_same_from_run_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = []
    for speed in (100.0, 120.0):
        with StageOutput("stage_a@x", "out", "a.out_dir", "m.json", "a.metrics_file", params={"n": 1}) as out:
            with out.publish() as tmp:
                (tmp / "data.txt").write_text("same")
            assert out.write_metrics({"loss": 1.5}, timings={"tokens_per_second": speed}) == {
                "stage": "stage_a@x", "loss": 1.5}
        # The parameters go to the run log, not into the metrics (dvc metrics/exp show list results, not settings).
        assert json.loads((out.log_dir / PARAMS_FILE).read_text()) == {"stage": "stage_a@x", "params": {"n": 1}}
        written.append((Path("m.json").read_bytes(), (tmp_path / "out/data.txt").read_bytes()))
        timings = json.loads((tmp_path / "data/logs/stage_a@x" / TIMINGS_FILE).read_text())
        assert timings["stage"] == "stage_a@x" and timings["tokens_per_second"] == speed and timings["seconds"] >= 0
        assert out.log_dir == run_log("stage_a@x") == Path("data/logs/stage_a@x")
    assert written[0] == written[1]



def test_non_finite_metrics_fail_the_stage_and_take_its_results_with_them(tmp_path, monkeypatch):
    """A NaN is no result (and not JSON): the stage fails naming the metric, and what it published is removed, so no
    later stage reads results of a diverged model."""
    from longlora.errors import NonFiniteError

    monkeypatch.chdir(tmp_path)
    with StageOutput("stage_a@x", "out", "a.out_dir", "m.json", "a.metrics_file") as out:
        with out.publish() as tmp:
            (tmp / "data.txt").write_text("scores")
        with pytest.raises(NonFiniteError, match=r"stage stage_a@x: non-finite metrics \(ppl\.256, by_length\[1\]\)"):
            out.write_metrics({"ppl": {"256": float("nan"), "512": 3.0}, "by_length": [1.0, float("inf")]})
    assert not Path("out").exists() and not Path("m.json").exists()
