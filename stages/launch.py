"""Start a training stage as params.yaml's `launch` section says: in this process, or under torchrun or accelerate on
every device of one or several nodes.

    .venv/bin/python -m stages.launch extend     # or: dvc repro extend (dvc.yaml runs this command)

Expected: with the default `launcher: none`, exactly `python -m stages.extend` (same output, same metrics); with
`launcher: torchrun, nproc_per_node: 8` on an 8×A100 node, this process is replaced by
`python -m torch.distributed.run --nnodes 1 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint localhost:0
-m stages.extend --params params.yaml`, whose 8 processes train together (docs/full-size.md).

`command` builds the argument list, for every launcher, here and nowhere else; configs/slurm/multinode.sbatch runs
the same torchrun line on every node of a SLURM allocation (a test checks that they agree). torchrun and accelerate
are run as modules of this interpreter, so the processes use the project's environment whatever `torchrun` is first
on PATH. Nothing here distributes anything: each process runs the stage's own CLI, and the Trainer inside it reads
RANK and WORLD_SIZE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from longlora.errors import InputError
from stages import _cli
from stages.params import DEFAULT_PARAMS_FILE, load_params
from stages.registry import TRAINING_STAGES
from stages.sections import LaunchParams

log = logging.getLogger(__name__)


def command(stage: str, launch: LaunchParams, params_file: str | Path = DEFAULT_PARAMS_FILE) -> list[str]:
    """The argument list that runs training stage `stage` with `params_file` as `launch` says."""
    if stage not in TRAINING_STAGES:
        raise InputError(f"stages.launch: {stage!r} is not a training stage; one of {', '.join(TRAINING_STAGES)}")
    target = ["-m", f"stages.{stage}", "--params", str(params_file)]
    if launch.launcher == "none":
        return [sys.executable, *target]
    if launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(launch.nodes),
                "--nproc_per_node", str(launch.nproc_per_node), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", launch.rdzv_endpoint, *target]
    # accelerate counts processes over all machines. The Trainer sets precision and DeepSpeed from the stage's own
    # params; accelerate's precision and compiler are pinned to "no" so that its defaults (or a default config file
    # from `accelerate config`) cannot add their own.
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.world_size),
            "--num_machines", str(launch.nodes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if launch.world_size > 1:
        args.append("--multi_gpu")
    if launch.nodes > 1:
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        # The c10d rendezvous numbers the nodes as they join; accelerate still wants a machine rank to pass on.
        args += ["--rdzv_backend", "c10d", "--main_process_ip", host, "--main_process_port", port,
                 "--machine_rank", "0"]
    return [*args, *target]


def _metrics_of(stage: str, params_file: str | Path) -> dict:
    return json.loads(Path(load_params(params_file).section(stage).metrics_file).read_text(encoding="utf-8"))


def run_launched(stage: str, params_file: str | Path = DEFAULT_PARAMS_FILE) -> dict:
    """Run the stage as `python -m stages.launch <stage>` does, from a caller that must stay alive (the Prefect
    flow): in-process with launcher none, else the built command as a child process (torch.distributed is never
    initialised in the caller); returns the stage's metrics."""
    params = load_params(params_file)
    if params.launch.launcher == "none":
        return importlib.import_module(f"stages.{stage}").run(params)
    argv = command(stage, params.launch, params_file)
    log.info("%s: %s", stage, shlex.join(argv))
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{stage}: `{shlex.join(argv)}` exited with {result.returncode} (its output above says "
                           "why)")
    return _metrics_of(stage, params_file)


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.launch <training stage> [--params params.yaml]`."""
    parser = argparse.ArgumentParser(prog="python -m stages.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=TRAINING_STAGES)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="parameters file (params.yaml)")
    args = parser.parse_args(argv)
    try:
        launch = load_params(args.params).launch
    except InputError as err:
        print(f"stages.launch: error: {err}", file=sys.stderr)
        return 2
    if launch.launcher == "none":
        module = importlib.import_module(f"stages.{args.stage}")
        return _cli.main(args.stage, module.run, ["--params", str(args.params)])
    built = command(args.stage, launch, args.params)
    print(f"stages.launch: {shlex.join(built)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(built[0], built)  # replaced: the launcher's exit status is the command's


if __name__ == "__main__":
    raise SystemExit(main())
