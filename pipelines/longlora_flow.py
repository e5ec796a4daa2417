"""The pipeline as a Prefect flow: the stages of dvc.yaml, in dependency order, each a Prefect task.

    .venv/bin/python -m pipelines.longlora_flow                      # whole pipeline, default params (2 CPU cores)
    .venv/bin/python -m pipelines.longlora_flow --stages build_base_model

With PREFECT_API_URL set, the run shows in that Prefect server's UI; without it, Prefect starts a temporary local
server for the run. The stage list and order come from dvc.yaml, so the DAG is written down once (a `foreach`
stage such as `merge` becomes one task per instance, `merge@extend`, as DVC names them). Each task calls the stage's
`run(params)` (an instance: `run(params, key)`) — the same function `dvc repro` runs — and returns its small metrics
dict. Prefect's
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

from stages.params import DEFAULT_PARAMS_FILE, load_params

DVC_FILE = Path("dvc.yaml")
_TEMPLATE = re.compile(r"\$\{(key|item(?:\.\w+)?)\}")
_VARIABLE = re.compile(r"^\$\{([\w.]+)\}$")


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def _paths(entries: list) -> list[str]:
    """dvc.yaml lists entries as plain strings or as one-key mappings carrying options."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def _fill(value, key: str, item):
    """`value` with `${key}`, `${item}` and `${item.<field>}` replaced, as DVC's foreach does."""
    if isinstance(value, dict):
        return {_fill(k, key, item): _fill(v, key, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, key, item) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name == "key":
            return key
        return str(item if name == "item" else item[name.split(".", 1)[1]])

    return _TEMPLATE.sub(lookup, value)


def _variable(reference: str, variables: dict | None, stage: str):
    """The params.yaml value a `foreach: ${a.b}` names (DVC templates from params.yaml)."""
    match = _VARIABLE.match(reference)
    if match is None or variables is None:
        raise ValueError(f"dvc.yaml: stage {stage!r}: foreach {reference!r} needs params.yaml's values")
    value = variables
    for part in match.group(1).split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"dvc.yaml: stage {stage!r}: foreach {reference!r}: params.yaml has no {match.group(1)}")
        value = value[part]
    return value


def expand_stages(spec: dict, variables: dict | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with every `foreach` expanded into its instances (`name@key`), in file order; a `foreach`
    over a params.yaml value (`${eval_models}`) takes it from `variables`, params.yaml's contents."""
    expanded: dict[str, dict] = {}
    for name, stage in (spec.get("stages") or {}).items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        items = stage["foreach"]
        if isinstance(items, str):
            items = _variable(items, variables, name)
        pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
        for key, item in pairs:
            expanded[f"{name}@{key}"] = _fill(stage["do"], str(key), item)
    return expanded


def stage_order(dvc_file: Path = DVC_FILE, params_file: Path | None = None) -> list[str]:
    """Stage names of dvc.yaml in dependency order (file order among independent stages); `foreach` over params
    values reads `params_file` (default: the params.yaml beside dvc.yaml, as DVC does)."""
    spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    params_file = params_file or dvc_file.parent / DEFAULT_PARAMS_FILE
    variables = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.exists() else None
    stages = expand_stages(spec, variables)
    for name, stage in stages.items():
        module, _, key = name.partition("@")
        expected = f"python -m stages.{module}" + (f" {key}" if key else "")
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
