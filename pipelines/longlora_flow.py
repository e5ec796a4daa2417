"""The pipeline as a Prefect flow: the stages of dvc.yaml, in dependency order, each a Prefect task.

    .venv/bin/python -m pipelines.longlora_flow                      # whole pipeline, default params (2 CPU cores)
    .venv/bin/python -m pipelines.longlora_flow --stages build_base_model

With PREFECT_API_URL set, the run shows in that Prefect server's UI; without it, Prefect starts a temporary local
server for the run. The stage list and order come from dvc.yaml, so the DAG is written down once: a `foreach` stage
becomes one task per instance, as DVC names them (`merge@extend`; `eval_perplexity@base` for each model of
params.yaml's eval_models, which the flow reads from its params file). Each task calls the stage's `run(params)` (an
instance: `run(params, key)`) — the same function `dvc repro` runs — and returns its small metrics dict. A training
stage runs as `python -m stages.launch <stage>` does: in-process with `launch.launcher: none`, else the torchrun /
accelerate command it builds, as a child process of the task. Prefect's
result caching is off on purpose: it hashes arguments, not file contents, so it would serve stale results; `dvc
repro` is the tool that decides what is stale.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stages.launch import run_launched
from stages.params import DEFAULT_PARAMS_FILE, TRAINING_STAGES, load_params

DVC_FILE = Path("dvc.yaml")
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


def stage_order(dvc_file: Path = DVC_FILE, params_file: Path | None = None) -> list[str]:
    """Stage names of dvc.yaml in dependency order (file order among independent stages); a `foreach` over params
    (`${eval_models}`) expands from `params_file` (default: the params.yaml beside dvc.yaml, as DVC does)."""
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
    needs = {name: {o for o in stages for out in outs[o] for dep in deps[name] if _under(dep, out)} for name in stages}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            cycle = sorted(set(stages) - set(order))
            raise ValueError(f"{dvc_file}: the stages {cycle} depend on each other in a cycle")
        order.append(ready[0])
    return order


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, params_file: str) -> dict:
    """Run one stage's `run(params)` (an instance `name@key`: `run(params, key)`); returns its metrics (small,
    JSON-able: safe to persist)."""
    name, _, key = stage.partition("@")
    if launched_command(stage):
        # In this process with launcher none; a distributed launcher's command in child processes (torch.distributed
        # must never be initialised in the flow's own process).
        metrics = run_launched(stage, params_file)
    else:
        module = importlib.import_module(f"stages.{name}")
        params = load_params(params_file)
        metrics = module.run(params, key) if key else module.run(params)
    get_run_logger().info("%s: %s", stage, metrics)
    return metrics


@flow(name="longlora", log_prints=True)
def longlora_flow(params_file: str = str(DEFAULT_PARAMS_FILE), stages: list[str] | None = None) -> dict[str, dict]:
    """Run the pipeline's stages (all, or the named ones in pipeline order); returns metrics per stage."""
    params = load_params(params_file)  # fail before any task starts if params.yaml is invalid
    order = stage_order(DVC_FILE, Path(params_file))
    unknown = sorted(set(stages or ()) - set(order))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    for stage in selected:
        params.output(stage).check()  # an output a late stage may not write stops the flow before the first
    return {stage: run_stage(stage, params_file) for stage in selected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.longlora_flow", description=longlora_flow.__doc__)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE), help="parameters file (params.yaml)")
    parser.add_argument("--stages", nargs="*", help="run only these stages (default: all)")
    args = parser.parse_args(argv)
    longlora_flow(params_file=args.params, stages=args.stages)


if __name__ == "__main__":
    main()
