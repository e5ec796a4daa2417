"""The pipeline as a Prefect flow: the stages of dvc.yaml, in dependency order, each a Prefect task.

    .venv/bin/python -m pipelines.longlora_flow                      # whole pipeline, default params (2 CPU cores)
    .venv/bin/python -m pipelines.longlora_flow --stages build_base_model

With PREFECT_API_URL set, the run shows in that Prefect server's UI; without it, Prefect starts a temporary local
server for the run. The stage list and order come from dvc.yaml, so the DAG is written down once. Each task calls
the stage's `run(params)` — the same function `dvc repro` runs — and returns its small metrics dict. Prefect's
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
_STAGE_CMD = re.compile(r"^python -m stages\.(\w+)\b")


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def _paths(entries: list) -> list[str]:
    """dvc.yaml lists entries as plain strings or as one-key mappings carrying options."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def stage_order(dvc_file: Path = DVC_FILE) -> list[str]:
    """Stage names of dvc.yaml in dependency order (file order among independent stages)."""
    spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    stages = spec.get("stages") or {}
    for name, stage in stages.items():
        match = _STAGE_CMD.match(str(stage.get("cmd", "")))
        if not match or match.group(1) != name:
            raise ValueError(f"{dvc_file}: stage {name!r} must run `python -m stages.{name}`, got {stage.get('cmd')!r}")
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
    """Run one stage's `run(params)`; returns its metrics (small, JSON-able: safe to persist)."""
    module = importlib.import_module(f"stages.{stage}")
    metrics = module.run(load_params(params_file))
    get_run_logger().info("%s: %s", stage, metrics)
    return metrics


@flow(name="longlora", log_prints=True)
def longlora_flow(params_file: str = str(DEFAULT_PARAMS_FILE), stages: list[str] | None = None) -> dict[str, dict]:
    """Run the pipeline's stages (all, or the named ones in pipeline order); returns metrics per stage."""
    params = load_params(params_file)  # fail before any task starts if params.yaml is invalid
    order = stage_order()
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
