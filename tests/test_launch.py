"""The launcher: the command each `launch.launcher` builds (checked by torchrun's and accelerate's own argument
parsers), what `python -m stages.launch` does with it, the `launch` params' checks, and the profiles that cannot run
here — Llama-2-7B → 32k and → 100k, Llama-2-70B → 32k on one 8×A100 node, and the SLURM template for several nodes:
their params load, their DeepSpeed config passes DeepSpeed's own config classes with the values the stage would give
it, their batch arithmetic makes 64, and the SLURM script's torchrun line is the launcher's."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import _training, launch
from stages._training import Job
from stages.params import ParamsError, load_params, parse_params
from stages.sections import LaunchParams
from tests.conftest import ROOT, tiny_params_dict

PY = sys.executable
TARGET = ["-m", "stages.extend", "--params", "p.yaml"]


def _launch(**fields) -> LaunchParams:
    return LaunchParams(**fields)


# --- the command, per launcher -------------------------------------------------------------------------------------


def test_launcher_none_is_the_stage_itself():
    assert launch.command("extend", _launch(), "p.yaml") == [PY, *TARGET]


def test_torchrun_on_one_node_and_on_several():
    import torch.distributed.run

    one = launch.command("extend", _launch(launcher="torchrun", nproc_per_node=8), "p.yaml")
    assert one == [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "8", "--rdzv_backend",
                   "c10d", "--rdzv_endpoint", "localhost:0", *TARGET]
    many = launch.command("extend", _launch(launcher="torchrun", nproc_per_node=8, nodes=4,
                                            rdzv_endpoint="node001:29500"), "p.yaml")
    # What torchrun itself makes of it.
    args = torch.distributed.run.get_args_parser().parse_args(many[3:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("4", "8", "c10d",
                                                                                         "node001:29500")
    assert args.module and (args.training_script, args.training_script_args) == ("stages.extend", TARGET[2:])


def test_accelerate_on_one_node_and_on_several():
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    one = launch.command("extend", _launch(launcher="accelerate", nproc_per_node=8), "p.yaml")
    assert one == [PY, "-m", "accelerate.commands.launch", "--num_processes", "8", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", *TARGET]
    many = launch.command("extend", _launch(launcher="accelerate", nproc_per_node=8, nodes=2,
                                            rdzv_endpoint="node001:29533"), "p.yaml")
    args = launch_command_parser().parse_args(many[3:])
    assert args.module and (args.training_script, args.training_script_args) == ("stages.extend", TARGET[2:])
    # What accelerate hands torchrun: 8 processes on each of 2 nodes, meeting at the endpoint.
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("2", "8", "c10d",
                                                                                         "node001:29533")


def test_only_training_stages_are_launched():
    with pytest.raises(Exception, match="'prepare_eval' is not a training stage; one of extend"):
        launch.command("prepare_eval", _launch(), "p.yaml")


# --- python -m stages.launch ---------------------------------------------------------------------------------------


def test_launcher_none_runs_the_stage_in_this_process(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(model={"name_or_path": "./models/missing"})))
    assert launch.main(["extend", "--params", "params.yaml"]) == 2
    # The stage's own CLI answered: its one-line error, nothing written.
    assert capsys.readouterr().err.strip() == ("stages.extend: error: model.name_or_path './models/missing': no such "
                                               "folder (a local path, so the hub was not asked)")
    assert [p.name for p in tmp_path.rglob("*") if not p.is_dir()] == ["params.yaml"]


def test_a_distributed_launcher_replaces_the_process_with_the_built_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(launch={"launcher": "torchrun",
                                                                           "nproc_per_node": 2})))
    replaced = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: replaced.append((path, argv)))
    launch.main(["extend", "--params", "params.yaml"])
    expected = launch.command("extend", load_params("params.yaml").launch, Path("params.yaml"))
    assert replaced == [(PY, expected)]
    assert capsys.readouterr().err.strip() == f"stages.launch: {shlex.join(expected)}"


def test_bad_params_stop_the_launcher_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("launch:\n  launcher: mpirun\n")
    assert launch.main(["extend", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stages.launch: error: params.yaml: launch.launcher: Input should be 'none', 'torchrun' or "
                          "'accelerate'") and len(err.splitlines()) == 1


# --- the launch params' checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"launch": {"nproc_per_node": 2}},
     "launch: launcher none runs one process, but nodes 1 × nproc_per_node 2 asks for 2: use torchrun or accelerate"),
    ({"launch": {"launcher": "torchrun", "nodes": 2, "nproc_per_node": 2}},
     "launch.rdzv_endpoint: 'localhost:0' cannot be reached by the other 1 node(s): name the first node and a port"),
    ({"launch": {"launcher": "torchrun", "nodes": 2, "nproc_per_node": 2, "rdzv_endpoint": "node001:0"}},
     "launch.rdzv_endpoint: 'node001:0' cannot be reached"),
    ({"launch": {"rdzv_endpoint": "node001"}},
     "launch.rdzv_endpoint: 'node001' is not host:port"),
    # The global batch split over the processes launch starts: refused when loading the params, before training.
    ({"launch": {"launcher": "torchrun", "nproc_per_node": 3}},
     "extend.global_batch_size: 4 is not divisible by per_device_batch_size 2 × 3 processes (launch.nodes 1 × "
     "launch.nproc_per_node 3) = 6; change one of them"),
    # Sequence parallelism: P processes per row, the rest data parallel.
    ({"launch": {"launcher": "torchrun", "nproc_per_node": 2, "sequence_parallel": 4}},
     "launch.sequence_parallel: 4 does not divide the world size, nodes 1 × nproc_per_node 2 = 2"),
    ({"launch": {"launcher": "torchrun", "nproc_per_node": 4, "sequence_parallel": 2},
      "extend": {"global_batch_size": 6, "per_device_batch_size": 2}},
     "extend.global_batch_size: 6 is not divisible by per_device_batch_size 2 × 2 processes (launch.nodes 1 × "
     "launch.nproc_per_node 4 / launch.sequence_parallel 2) = 4"),
    ({"launch": {"launcher": "torchrun", "nproc_per_node": 2, "sequence_parallel": 2},
      "extend": {"attention": "dense"}},
     "launch.sequence_parallel: 2 shares rows between processes through S²-Attn's halo: it needs attention s2, not "
     "dense (extend)"),
    # The tiny target, 128 tokens, has S² groups of 32: 8 shards of whole groups would need 256.
    ({"launch": {"launcher": "torchrun", "nproc_per_node": 8, "sequence_parallel": 8},
      "extend": {"global_batch_size": 2, "per_device_batch_size": 2},
      "sft": {"global_batch_size": 2, "per_device_batch_size": 2}},
     "launch.sequence_parallel: 8 × S² group size 32 = 256 does not divide the rows' 128 tokens "
     "(model.target_context): lower it, or set a smaller s2attn.group_size_ratio (extend)"),
])
def test_launch_params_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(tiny_params_dict(**overrides))


def test_sequence_parallel_processes_count_once_in_the_batch_split():
    params = parse_params(tiny_params_dict(launch={"launcher": "torchrun", "nproc_per_node": 4,
                                                   "sequence_parallel": 2}))
    assert (params.launch.world_size, params.launch.data_parallel) == (4, 2)
    assert params.extend.gradient_accumulation(params.launch.data_parallel, "extend") == 1


def test_a_global_batch_the_world_size_divides_is_accepted():
    params = parse_params(tiny_params_dict(launch={"launcher": "accelerate", "nproc_per_node": 2}))
    assert params.extend.gradient_accumulation(params.launch.world_size, "extend") == 1


# --- the profiles --------------------------------------------------------------------------------------------------

PROFILES = {
    # profile: (base model, target context, DeepSpeed config, ZeRO stage, lr, processes per row)
    "llama2-7b-32k.yaml": ("meta-llama/Llama-2-7b-hf", 32768, "configs/ds_zero2.json", 2, 2e-5, 1),
    "llama2-7b-100k.yaml": ("meta-llama/Llama-2-7b-hf", 100000, "configs/ds_zero3.json", 3, 2e-5, 1),
    "llama2-7b-256k.yaml": ("meta-llama/Llama-2-7b-hf", 262144, "configs/ds_zero3.json", 3, 2e-5, 4),
    "llama2-70b-32k.yaml": ("meta-llama/Llama-2-70b-hf", 32768, "configs/ds_zero3.json", 3, 1e-5, 1),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_recipe_batch_arithmetic_and_deepspeed_config(profile):
    from longlora.method.training import check_deepspeed_config, read_deepspeed_config

    model, target, deepspeed, zero, lr, shards = PROFILES[profile]
    params = load_params(ROOT / "configs" / profile)
    p, m = params.extend, params.model
    assert (m.name_or_path, m.original_context, m.target_context, m.rope_type) == (model, 4096, target, "linear")
    assert params.s2attn.group_size_for(target) == target // 4
    assert (params.lora.r, params.lora.alpha, params.lora.train_embeddings, params.lora.train_norms) == (8, 16, True,
                                                                                                         True)
    # One 8-GPU node: 8 processes × per-device batch 1 × accumulation 8 = 64 sequences per step, 1000 steps; with
    # `shards` processes sharing each row, 8 / shards data-parallel replicas × accumulation 8 × shards.
    assert params.launch == LaunchParams(launcher="torchrun", nproc_per_node=8, nodes=1, sequence_parallel=shards)
    world, replicas = params.launch.world_size, params.launch.data_parallel
    accumulation = p.gradient_accumulation(replicas, "extend")
    assert (p.per_device_batch_size, accumulation, world, replicas) == (1, 8 * shards, 8, 8 // shards)
    assert p.per_device_batch_size * accumulation * replicas == p.global_batch_size == 64
    # Every process's shard holds whole S² groups.
    assert target % (shards * params.s2attn.group_size_for(target)) == 0
    assert (p.max_steps, p.lr, p.adam_beta2, p.weight_decay, p.warmup_steps) == (1000, lr, 0.95, 0.0, 20)
    assert p.lr_schedule == "constant_with_warmup" and p.gradient_checkpointing and p.precision == "auto"
    assert p.method == "lora_plus" and p.attention == "s2"
    assert p.deepspeed == Path(deepspeed)
    # The DeepSpeed config through DeepSpeed's own classes, with the "auto" values filled from the TrainingArguments
    # the stage builds from these params (bf16, as on the A100s).
    job = Job(stage="extend", params=params, model_source=m.name_or_path, config=None, dataset=None, collator=None,
              data_meta={})
    args = _training._training_args(job, Path("unused"), accumulation, "bf16", None)
    config = check_deepspeed_config(read_deepspeed_config(ROOT / p.deepspeed), args)
    assert config["zero_optimization"]["stage"] == zero and config["bf16"]["enabled"] is True
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95] and config["optimizer"]["params"]["lr"] == lr
    assert config["gradient_accumulation_steps"] == accumulation and config["train_micro_batch_size_per_gpu"] == 1
    # No DeepSpeed scheduler: the Trainer's constant_with_warmup runs under ZeRO-2 and ZeRO-3 alike.
    assert "scheduler" not in config
    if zero == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # SFT after it, on the same node with the same ZeRO stage and learning rate, from the merged extended model.
    s = params.sft
    assert s.per_device_batch_size * s.gradient_accumulation(replicas, "sft") * replicas == s.global_batch_size == 64
    assert (s.lr, s.deepspeed, s.base_model) == (lr, Path(deepspeed), str(params.merge.extend.out_dir))
    # The command DVC runs for it on the node.
    assert launch.command("extend", params.launch, "params.yaml")[3:] == [
        "--nnodes", "1", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "-m", "stages.extend", "--params", "params.yaml"]


SLURM = ROOT / "configs/slurm/multinode.sbatch"


def _fake_slurm_tools(folder: Path) -> None:
    """`scontrol show hostnames` listing the allocation's nodes, and an `srun` that writes the command it was given,
    one argument per line, instead of starting it on every node."""
    folder.mkdir()
    (folder / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "node001\\nnode002\\n"\n')
    (folder / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for tool in ("scontrol", "srun"):
        (folder / tool).chmod(0o755)


@pytest.mark.parametrize("nodes", [2, 4])
def test_slurm_template_runs_the_launchers_torchrun_line_on_every_node(nodes, tmp_path):
    script = SLURM.read_text(encoding="utf-8")
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script and "set -euo pipefail" in script
    _fake_slurm_tools(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "srun.txt"),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "node[001-002]", "PYTHON": PY,
           "PARAMS": "configs/llama2-70b-32k.yaml"}
    result = subprocess.run(["bash", str(SLURM)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ran = (tmp_path / "srun.txt").read_text().splitlines()
    # The launcher's command for the profile's launch section with SLURM's node count and first node.
    profile = load_params(ROOT / "configs/llama2-70b-32k.yaml")
    on_slurm = LaunchParams.model_validate({**profile.launch.model_dump(), "nodes": nodes,
                                            "rdzv_endpoint": "node001:29500"})
    assert ran == launch.command("extend", on_slurm, "configs/llama2-70b-32k.yaml")
    # 8 × nodes divides the global batch for the node counts the script documents.
    assert profile.extend.gradient_accumulation(on_slurm.world_size, "extend") == 64 // (8 * nodes)
