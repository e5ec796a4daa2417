"""The pipeline as a Prefect flow: the stages of dvc.yaml, each a Prefect task that runs it through DVC.

    .venv/bin/python -m pipelines.longlora_flow                      # whole pipeline, params.yaml (2 CPU cores)
    .venv/bin/python -m pipelines.longlora_flow -S extend.max_steps=10 --stages build_base_model extend

Run in the project's git+DVC repository. Each task runs `dvc repro --single-item <stage>`, so DVC alone decides what
is stale: after a flow run `dvc status` is clean, a rerun with nothing changed shows every task as `Skipped` (a
Completed state), and a `dvc repro` after it has nothing to do. The task graph comes from dvc.yaml (a `foreach` stage
becomes one task per instance, as DVC names them: `merge@extend`, `eval_perplexity@base`), each task waiting for the
stages whose outputs it reads, so the UI draws dvc.yaml's DAG. A stage's output lines (progress lines at most every
PROGRESS_EVERY_S) go to its task's log; a failing stage fails its task with the stage's own `stages.<name>: error:`
line, and the stages downstream of it are NotReady, their message naming it. Each task attaches its metrics as a
table artifact; the flow attaches one comparison table of the evaluated models, the evaluations' CSV plots and
heatmaps, and the report, images embedded. `-S key=value` (the flow's `set_params`) edits params.yaml as
`dvc exp run -S` does, after checking that the result is valid, rewriting only the lines of the values it changes:
the change stays in params.yaml, where `dvc status` sees it, and the run's log says so. docs/prefect.md: the UI.

With PREFECT_API_URL set (`make server`, then export what it prints), the run shows in that server's UI; without it,
Prefect starts a temporary local server for the run. `make serve` serves the flow as a deployment that the UI can run
with parameter overrides.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from prefect import allow_failure, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, Pending, State
from prefect.task_runners import ThreadPoolTaskRunner

from longlora.errors import InputError
from longlora.evaluation.report import comparison_markdown, markdown_table, model_results
from pipelines import overrides as params_overrides
from stages.params import ParamsError, load_params
from stages.registry import EVAL_STAGES, TRAINING_STAGES
from stages.report import REPORT_FILE

DVC_FILE = Path("dvc.yaml")
PARAMS_FILE = Path("params.yaml")  # what the stages' commands read: DVC runs them beside dvc.yaml
PROGRESS_EVERY_S = 5.0
_BIN = Path(sys.executable).parent  # the venv's bin: its dvc, and first on PATH so the stages' `python` is this one
_ERROR_LINE = re.compile(r"^stages\.[\w.]+: error: ")
_SKIPPED_LINE = re.compile(r"Stage '[^']+' didn't change, skipping")
_RESTORED_LINE = re.compile(r"Stage '[^']+' is cached - skipping run, checking out outputs")  # DVC's run-cache
_TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def _paths(entries: list) -> list[str]:
    """dvc.yaml lists entries as plain strings or as one-key mappings carrying options."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def _lookup(variables: dict, dotted: str):
    value = variables
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"dvc.yaml: ${{{dotted}}} names nothing in params.yaml")
        value = value[part]
    return value


def _fill(value, variables: dict):
    """`value` with every `${name}` / `${a.b}` replaced from `variables` (params.yaml, plus `key` and `item` inside a
    foreach), as DVC's templating does."""
    if isinstance(value, dict):
        return {_fill(k, variables): _fill(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, variables) for v in value]
    if not isinstance(value, str):
        return value
    whole = _TEMPLATE.fullmatch(value)
    if whole:  # a value that is one template keeps its type (a foreach over a params mapping)
        return _lookup(variables, whole.group(1))
    return _TEMPLATE.sub(lambda match: str(_lookup(variables, match.group(1))), value)


def expand_stages(spec: dict, params: dict | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with every `foreach` expanded into its instances (`name@key`), in file order; `${…}` is
    filled from `params` (params.yaml, which DVC reads as its template variables) and the foreach's key and item."""
    params = params or {}
    expanded: dict[str, dict] = {}
    for name, stage in (spec.get("stages") or {}).items():
        if "foreach" not in stage:
            expanded[name] = _fill(stage, params)
            continue
        items = _fill(stage["foreach"], params)
        pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
        for key, item in pairs:
            expanded[f"{name}@{key}"] = _fill(stage["do"], {**params, "key": str(key), "item": item})
    return expanded


def launched_command(stage: str) -> str | None:
    """dvc.yaml's command for a training stage (started by stages.launch as the `launch` params say); None for the
    others, which run as `python -m stages.<name>`."""
    return f"python -m stages.launch {stage}" if stage in TRAINING_STAGES else None


def stage_graph(dvc_file: Path = DVC_FILE, params_file: Path | None = None) -> dict[str, set[str]]:
    """Stage names of dvc.yaml in dependency order (file order among independent stages), each with the stages whose
    outputs it reads; a `foreach` over params (`${eval_models}`) expands from `params_file` (default: the params.yaml
    beside dvc.yaml, as DVC does)."""
    spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    params_file = Path(params_file) if params_file is not None else dvc_file.parent / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.exists() else {}
    stages = expand_stages(spec, params or {})
    for name, stage in stages.items():
        module, _, key = name.partition("@")
        expected = launched_command(name) or f"python -m stages.{module}" + (f" {key}" if key else "")
        words = str(stage.get("cmd", "")).split()
        if words[:len(expected.split())] != expected.split():
            raise ValueError(f"{dvc_file}: stage {name!r} must run `{expected}`, got {stage.get('cmd')!r}")
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    deps = {name: _paths(stage.get("deps")) for name, stage in stages.items()}
    # A dep inside another stage's output, or a folder holding other stages' outputs (the report's evaluation
    # folders), as DVC links them.
    needs = {name: {o for o in stages for out in outs[o] for dep in deps[name] if _under(dep, out) or _under(out, dep)}
             for name in stages}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            cycle = sorted(set(stages) - set(order))
            raise ValueError(f"{dvc_file}: the stages {cycle} depend on each other in a cycle")
        order.append(ready[0])
    return {name: needs[name] for name in order}


def stage_order(dvc_file: Path = DVC_FILE, params_file: Path | None = None) -> list[str]:
    """dvc.yaml's stage names in dependency order (see stage_graph)."""
    return list(stage_graph(dvc_file, params_file))


class StageFailed(RuntimeError):
    """A stage's command failed; the message is the stage's own error line."""


def _flatten(metrics: dict, prefix: str = "") -> dict[str, object]:
    """The scalar entries of a nested metrics dict, keys dotted (lists and tables left out: they belong in plots)."""
    flat: dict[str, object] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[f"{prefix}{key}"] = value
    return flat


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _attach_metrics(stage: str, metrics: dict) -> None:
    rows = [[key, value] for key, value in _flatten(metrics).items()]
    create_markdown_artifact(key=_artifact_key(f"{stage}-metrics"), description=f"{stage}: metrics",
                             markdown=f"### {stage}\n\n" + markdown_table(["metric", "value"], rows))


def _attach_comparison(results: dict[str, dict], models: list[str]) -> None:
    """The evaluations of every model side by side (perplexity by length, passkey accuracy, LongBench scores): the
    report stage's tables (longlora/evaluation/report.py), from the metrics the evaluation tasks returned."""
    compared = {m: model_results({stage: results.get(f"{stage}@{m}") for stage in EVAL_STAGES}) for m in models
                if any(f"{stage}@{m}" in results for stage in EVAL_STAGES)}
    markdown = comparison_markdown(compared)
    if markdown:
        create_markdown_artifact(key="model-comparison", description="evaluation metrics per model", markdown=markdown)


_MARKDOWN_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#)", re.IGNORECASE)


def _embedded_image(path: Path, alt: str) -> str:
    """A markdown image holding the file itself (a data URI): the UI shows it without access to the file."""
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"![{alt}](data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"


def self_contained(markdown: str, folder: Path) -> str:
    """`markdown` written to be read beside its files (folder), made whole for an artifact: each relative image
    embedded as a data URI, each relative link written as the file's path (a link the UI could not follow)."""

    def replace(match: re.Match) -> str:
        bang, text, target = match.groups()
        if _URL.match(target):
            return match.group(0)
        path = folder / target
        if bang:
            return _embedded_image(path, text) if path.is_file() else f"*{text}: no `{path}`*"
        return f"`{path}`" if text in (target, f"`{target}`") else f"{text} (`{path}`)"

    return _MARKDOWN_LINK.sub(replace, markdown)


def _attach_report(report: Path) -> None:
    """The report stage's README.md, its plots and heatmaps embedded (report.py writes them beside it)."""
    if report.is_file():
        create_markdown_artifact(key="report", description=f"the report ({report})",
                                 markdown=self_contained(report.read_text(encoding="utf-8"), report.parent))


def _attach_plots(folders: list[Path], max_rows: int = 50) -> None:
    """The evaluations' plot data: each CSV as a table, each image embedded (`dvc plots show` renders them too)."""
    sections = []
    for folder in folders:
        for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
            lines = path.read_text(encoding="utf-8").splitlines()
            if not lines:
                continue
            header = lines[0].split(",")
            rows = [line.split(",") for line in lines[1:max_rows]]
            sections.append(f"### {path}\n\n" + markdown_table(header, rows))
        for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            sections.append(f"### {path}\n\n{_embedded_image(path, str(path))}\n")
    if sections:
        create_markdown_artifact(key="plots", description="the evaluations' plots", markdown="\n".join(sections))


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, metrics_file: str) -> dict | State:
    """`dvc repro --single-item <stage>` in the current repository, its output lines streamed into this task's log;
    returns the stage's metrics (read from its metrics file), as a `Skipped` (Completed) state when DVC found nothing
    changed, `Restored` when it checked the outputs out of its run-cache instead of running the stage."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "PYTHONUNBUFFERED": "1"}  # the stages' lines reach the log as they are printed
    command = [str(_BIN / "dvc"), "repro", "--single-item", stage]
    logger.info("%s", " ".join(command))
    error_lines: list[str] = []
    tail: list[str] = []
    skipped = restored = False
    last_progress = 0.0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        pending = b""
        while chunk := process.stdout.read1(65536):
            *lines, pending = re.split(rb"(\r\n|\r|\n)", pending + chunk)
            # re.split keeps the separators: pairs of (text, separator).
            for text, separator in zip(lines[::2], lines[1::2], strict=True):
                line = text.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                if separator == b"\r":  # a progress bar redrawing its line: one log line every few seconds
                    if time.monotonic() - last_progress < PROGRESS_EVERY_S:
                        continue
                    last_progress = time.monotonic()
                is_error = bool(_ERROR_LINE.match(line) or line.startswith("ERROR: "))
                logger.log(logging.ERROR if is_error else logging.INFO, "%s", line)
                tail = [*tail[-19:], line]
                if is_error:
                    error_lines.append(line)
                skipped = skipped or bool(_SKIPPED_LINE.search(line))
                restored = restored or bool(_RESTORED_LINE.search(line))
        if pending.strip():
            line = pending.decode("utf-8", "replace").rstrip()
            is_error = bool(_ERROR_LINE.match(line) or line.startswith("ERROR: "))
            logger.log(logging.ERROR if is_error else logging.INFO, "%s", line)
            tail.append(line)
            if is_error:
                error_lines.append(line)
    if process.returncode != 0:
        # The stage's own `stages.<name>: error: …` line when it printed one, else DVC's own ERROR line (a missing
        # dependency, a locked repository), else the last lines (a crash).
        own = [line for line in error_lines if _ERROR_LINE.match(line)]
        message = (own or error_lines or ["\n".join(tail[-5:])])[-1]
        # A Failed state rather than a raise: Prefect retries it all the same, without logging a traceback that
        # would only show this function.
        return Failed(message=f"{stage} failed: {message}", data=StageFailed(f"{stage} failed: {message}"))
    metrics = json.loads(Path(metrics_file).read_text(encoding="utf-8")) if Path(metrics_file).exists() else {}
    _attach_metrics(stage, metrics)
    if skipped:
        return Completed(name="Skipped", message=f"{stage}: dvc.lock is up to date, nothing to run", data=metrics)
    if restored:
        return Completed(name="Restored", message=f"{stage}: outputs restored from DVC's run-cache", data=metrics)
    return metrics


def _run_name() -> str:
    """`<model> <context> [overrides] <time>`: which profile ran, with what changed, when."""
    from prefect.runtime import flow_run

    overrides = flow_run.parameters.get("set_params") or []
    try:
        model = (yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8")) or {}).get("model") or {}
        profile = f"{Path(str(model.get('name_or_path', '?'))).name} {model.get('target_context', '?')}"
    except (OSError, yaml.YAMLError, AttributeError):
        profile = "longlora"
    return " ".join([profile, *overrides, f"{datetime.now():%Y-%m-%d %H:%M:%S}"])


def apply_overrides(overrides: list[str]) -> tuple[list[params_overrides.Change], bool]:
    """Apply `key=value` overrides to params.yaml as `dvc exp run -S` does (DVC's own Hydra-syntax parser), after
    checking on a copy that the result is valid: a bad override leaves params.yaml untouched. Only the lines of the
    values that changed are rewritten (pipelines/overrides.py); returns the changes, and whether DVC's writer had to
    rewrite the whole file instead (an override that adds or removes a key: formatting not kept)."""
    from dvc.exceptions import InvalidArgumentError

    trial = PARAMS_FILE.with_name(".params-overrides.yaml")  # beside params.yaml: relative paths resolve the same
    trial.write_bytes(PARAMS_FILE.read_bytes())
    try:
        try:
            changed, rewritten = params_overrides.apply(trial, list(overrides))
        except InvalidArgumentError as err:  # Hydra's reason, on one line
            reason = "; ".join(line.strip() for line in str(err.__cause__ or err).splitlines() if line.strip())
            raise ParamsError(f"-S {' '.join(overrides)}: {reason}") from None
        try:
            load_params(trial)
        except ParamsError as err:  # name the file the user knows, and what changed it
            raise ParamsError(str(err).replace(trial.name, f"{PARAMS_FILE} with -S {' '.join(overrides)}", 1)) from None
        trial.replace(PARAMS_FILE)
    finally:
        trial.unlink(missing_ok=True)
    return changed, rewritten


def _log_overrides(logger, changed: list[params_overrides.Change], rewritten: bool) -> None:
    """Say in the run's log what `-S` changed in params.yaml, and that it stays there."""
    if not changed:
        logger.info("-S: %s already has these values; nothing changed", PARAMS_FILE)
        return
    logger.warning("-S changed %s, and the change stays there (DVC and the next runs see it; `git diff %s` shows it, "
                   "`git checkout %s` undoes it): %s", PARAMS_FILE, PARAMS_FILE, PARAMS_FILE,
                   "; ".join(map(str, changed)))
    if rewritten:
        logger.warning("-S added or removed a key: DVC's YAML writer rewrote all of %s (null values written empty, "
                       "lists re-indented, long lines folded); its comments are kept", PARAMS_FILE)


def _known_stages() -> tuple[str, ...]:
    """The stage names the run form offers: those of the dvc.yaml in the current directory (the repository the flow
    runs in), else of the one beside this package; none when neither can be read."""
    for dvc_file in (DVC_FILE, Path(__file__).resolve().parents[1] / DVC_FILE):
        try:
            return tuple(stage_order(dvc_file))
        except (OSError, ValueError, yaml.YAMLError):
            continue
    return ()


KNOWN_STAGES = _known_stages()
StageName = Literal[KNOWN_STAGES] if KNOWN_STAGES else str  # the run form's choices (a Literal is an enum there)

class _PrefectLogFilter(logging.Filter):
    """A failed state returned by a task (a stage that failed, see run_stage) is logged by Prefect's engine with
    `exc_info=True` outside any exception, which appends a stray `NoneType: None` to the line: dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def _install_log_filter() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PrefectLogFilter) for f in logger.filters):
            logger.addFilter(_PrefectLogFilter())


_install_log_filter()


def _tag_run(params) -> None:
    """Tag this flow run with the model and the target context (the UI filters runs by tag)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    tags = [f"model:{Path(str(params.model.name_or_path)).name}", f"target_context:{params.model.target_context}"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=list(dict.fromkeys([*run.tags, *tags])))


@task(name="run_stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def hold_stage(stage: str, reason: str) -> State:
    """A stage that cannot run because a stage it reads did not complete: NotReady, as Prefect's own check makes it,
    but its message names that stage (Prefect's names the upstream task run by its id)."""
    message = f"{stage} did not run: {reason}"
    get_run_logger().warning("%s", message)
    return Pending(name="NotReady", message=message)


def _held_back(upstream: list[str], states: dict[str, State]) -> str | None:
    """Why a stage cannot run (its upstream stages that did not complete), or None."""
    held = [up for up in upstream if not states[up].is_completed()]
    if not held:
        return None
    return "its upstream stage " + ", ".join(f"{up} {'failed' if states[up].is_failed() else 'did not run'}"
                                             for up in held)


# One stage at a time: `dvc repro` holds the repository's lock while it runs, so a second one would fail to start.
@flow(name="longlora", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=1))
def longlora_flow(set_params: list[str] | None = None, stages: list[StageName] | None = None,
                  training_retries: int = 2, retry_delay_seconds: float = 60.0) -> dict[str, dict]:
    """Run the pipeline's stages through `dvc repro --single-item`; returns the metrics per stage.

    Args:
        set_params: params.yaml overrides, `key=value` as `dvc exp run -S` takes them (`extend.max_steps=10`,
            `model.target_context=2048`). They are written into params.yaml, and stay there.
        stages: The stages to run, in pipeline order; empty: every stage. DVC skips a stage whose inputs have not
            changed since it last ran.
        training_retries: How many times a training stage (extend, sft) that fails is retried; it resumes from its
            checkpoint_dir.
        retry_delay_seconds: Seconds to wait before such a retry.
    """
    logger = get_run_logger()
    try:
        if set_params:
            _log_overrides(logger, *apply_overrides(set_params))
        params = load_params(PARAMS_FILE)  # fail before any task starts if params.yaml is invalid
        params.check_base_context(str(PARAMS_FILE))  # as every stage's command line does
        graph = stage_graph(DVC_FILE, PARAMS_FILE)
        unknown = sorted(set(stages or ()) - set(graph))
        if unknown:
            raise InputError(f"unknown stages {unknown}; dvc.yaml has {list(graph)}")
        selected = [s for s in graph if not stages or s in stages]
        for stage in selected:
            params.output(stage).check()  # an output a late stage may not write stops the flow before the first
    except InputError as err:  # bad input: one line, as a failing stage gives, no traceback
        logger.error("%s", err)
        return Failed(message=str(err), data=err)
    _tag_run(params)
    futures = {}
    states: dict[str, State] = {}
    for stage in selected:
        upstream = [up for up in graph[stage] if up in futures]
        for up in upstream:  # one stage at a time in any case (see the task runner): wait for those it reads
            if up not in states:
                futures[up].wait()
                states[up] = futures[up].state
        reason = _held_back(upstream, states)
        if reason:  # the graph keeps its edges: the upstream runs are still waited for, their failure allowed
            futures[stage] = hold_stage.submit(stage, reason, wait_for=[allow_failure(futures[up]) for up in upstream])
            continue
        runner = run_stage
        if stage in TRAINING_STAGES:
            runner = run_stage.with_options(retries=training_retries, retry_delay_seconds=retry_delay_seconds)
        futures[stage] = runner.submit(stage, str(params.destination(stage)[2]),
                                       wait_for=[futures[up] for up in upstream])
    states = {stage: future.wait() or future.state for stage, future in futures.items()}
    failed = [state for state in states.values() if state.is_failed()]
    if failed:  # the first failed stage's own message, as the flow's; no second traceback in the flow's log
        return Failed(message=failed[0].message, data=failed[0].result(raise_on_failure=False))
    results = {stage: state.result() for stage, state in states.items()}
    models = list(params.eval_models)
    _attach_comparison(results, models)
    _attach_plots([params.destination(f"{stage}@{m}")[0] for stage in EVAL_STAGES for m in models
                   if f"{stage}@{m}" in results])
    if "report" in results:
        _attach_report(Path(params.report.out_dir) / REPORT_FILE)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.longlora_flow", description=__doc__.split("\n\n")[0],
                                     epilog="The Prefect UI shows the run's logs, its task graph and its artifacts.")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value, as `dvc exp run -S` (repeatable); the change stays in "
                             "params.yaml")
    parser.add_argument("--stages", nargs="*", metavar="STAGE", choices=KNOWN_STAGES or None,
                        help=f"run only these stages (default: all): {', '.join(KNOWN_STAGES)}")
    parser.add_argument("--serve", metavar="NAME", help="serve the flow as deployment NAME (runs from the UI)")
    args = parser.parse_args(argv)
    if args.serve:
        longlora_flow.serve(name=args.serve, parameters={"set_params": args.set_param, "stages": args.stages},
                            tags=["longlora"])
        return 0
    try:
        longlora_flow(set_params=args.set_param, stages=args.stages)
    except (StageFailed, InputError) as err:  # the run's log has the details; here one line, no traceback
        print(f"longlora_flow: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
