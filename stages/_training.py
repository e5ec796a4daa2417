"""What the training stages (`extend`, `sft`) share: one HF Trainer run, resumable, writing a self-describing folder.

A stage checks its own input (its data, the model's config), then hands `train` the dataset, the collator and what
to write into extension.json. `train` does the rest the same way for both:

- checks that can fail on the input (world size against the global batch, precision, the DeepSpeed config, the
  checkpoint folder, the `resume` checkpoint) before the model is loaded, and nothing is written until then;
- builds the model with the given config (RoPE scaling already in it), S²-Attn or dense attention, LoRA(+) or full;
- trains with the Trainer (mixed precision, gradient accumulation, distributed sampling, DeepSpeed, checkpoints),
  dvclive logging loss, learning rate and tokens/s without touching dvc.yaml, into the stage's run log
  (`data/logs/<stage>/dvclive/`, not the cached output: its speeds and run times differ from run to run);
- checkpoints into `<checkpoint_dir>/<configuration hash>/`: a rerun after a kill continues from the latest one
  with the same data order and ends with the weights an uninterrupted run gets; removed when the run completes;
- writes the PEFT adapter folder (or a full model folder) with the config, the tokenizer and extension.json.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from longlora.errors import InputError, diverged, raise_if_diverged
from longlora.io import StageOutput, content_digest, write_json
from stages.params import Params
from stages.sections import TrainingParams, sequence_parallel_problem

log = logging.getLogger(__name__)

CHECKPOINTS_MARKER = ".longlora-checkpoints.json"
RUN_FILE = "run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What does not change the trained weights: where things go, how often they are logged or saved, how to resume.
_NOT_SHAPING = ("out_dir", "metrics_file", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                "resume", "deepspeed")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Job:
    """One training stage's run, as the stage prepared it."""

    stage: str
    """The stage's name, which is also its params section (`extend`, `sft`)."""
    params: Params
    model_source: str
    """Folder or hub id of the model to train; its weights are loaded with `config`."""
    config: object
    """The model's config, RoPE scaling already written in (transformers builds the rotary frequencies from it)."""
    dataset: object
    collator: object
    data_meta: dict
    """What describes the data (part of the configuration a checkpoint must match)."""
    data_source: Path | None = None
    """The data folder, whose content identifies the data (with the model's: a checkpoint of another model or other
    data is never resumed)."""
    s2attn: dict = field(default_factory=dict)
    """`configure_s2attn` keyword arguments when the stage's attention is s2."""
    sequential: bool = False
    """Read the data in its stored order (length-grouped batches) instead of shuffled."""
    count_padding: bool = False
    """Count tokens/s over non-padding tokens (batches carry an attention_mask)."""
    description: dict = field(default_factory=dict)
    """What extension.json says beside the weights (base model, RoPE scaling, S² group size, …)."""
    tokenizer: object = None
    """The model's tokenizer, when the stage already loaded it (else loaded from model_source)."""
    extra_metrics: Callable[[], dict] | None = None
    """Stage-specific metrics, gathered once training is done."""

    @property
    def section(self) -> TrainingParams:
        return self.params.section(self.stage)


def run_stage(stage: str, params: Params, prepare) -> dict:
    """Claim the stage's outputs on the main process, `prepare(params) -> Job`, train, return metrics."""
    try:
        if rank() != 0:  # one process claims and publishes the outputs; the others only train with it
            return train(prepare(params), None)
        with params.output(stage) as out:  # checked and locked before any work
            return train(prepare(params), out)
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Tear down the process group the Trainer started: a process that exits with gloo's threads still running can
    abort at exit ("terminate called without an active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train(job: Job, out: StageOutput | None) -> dict:
    """Train `job`, publish its folder into `out` (None on the other processes), return the metrics."""
    from transformers import set_seed

    from longlora.method.training import peak_memory_mib, resolve_precision

    p = job.section
    if rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    # Every check that can fail on the input runs before the model is loaded, and nothing is written until then.
    processes = world_size()
    shards = _sequence_parallel(job, processes)
    accumulation = p.gradient_accumulation(processes // shards, job.stage)
    precision = resolve_precision(p.precision, f"{job.stage}.precision")
    deepspeed = _deepspeed_source(job)
    shaping = _shaping(job, processes, deepspeed)
    run_dir = p.checkpoint_dir / _fingerprint(shaping)
    resume_from = _resume_point(job, run_dir, shaping)
    _check_checkpoint_dir(job)
    args = _training_args(job, run_dir, accumulation, precision, deepspeed)
    tokenizer = job.tokenizer if job.tokenizer is not None else _tokenizer(job)

    set_seed(p.seed)  # before LoRA's random initialisation, which happens outside the Trainer
    model = _model(job, precision)
    counts = _trainable_counts(model)
    _claim_checkpoints(job, run_dir, shaping)
    live = _live(run_dir, resumed=resume_from is not None)
    collator = job.collator if shards == 1 else ShardedBatches(job.collator, shards, rank() % shards, job.s2attn)
    trainer = _checked_trainer(job.stage, shards)(model=model, args=args, train_dataset=job.dataset,
                                                  data_collator=collator, callbacks=_dvclive_callbacks(live))
    if shards > 1:
        collator.link = _halo_link(shards)  # the process group exists once the Trainer's accelerator does
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)

    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    # The Trainer's own count for this session (a resumed run counts from where it resumed).
    speed = next((e["train_tokens_per_second"] for e in reversed(history) if "train_tokens_per_second" in e), None)
    raise_if_diverged(job.stage, model, trainer.state.global_step)
    if out is None:
        # Under ZeRO-3 gathering the weights to save is collective: every process takes part, the main one writes.
        trainer.save_model(str(run_dir))
        return {}
    with out.publish() as tmp:
        _save(job, trainer, model, tokenizer, tmp)
    if live is not None and live.dir and Path(live.dir).is_dir():
        _keep_logs(Path(live.dir), out.log_dir / "dvclive")
    shutil.rmtree(run_dir, ignore_errors=True)  # this configuration is done: its checkpoints are no longer needed
    metrics = {
        "method": p.method,
        "attention": p.attention,
        "precision": precision,
        "world_size": processes,
        "sequence_parallel": shards,
        "gradient_accumulation_steps": accumulation,
        "steps": trainer.state.global_step,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "losses": [round(loss, 4) for loss in losses],
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "trainable_parameters": counts,
        "rope_parameters": rope_parameters(job.config),
        "s2attn_group_size": job.description.get("s2attn_group_size"),
        **(job.extra_metrics() if job.extra_metrics is not None else {}),
    }
    # Where a run resumed says how it ran, not what it made (the weights of an uninterrupted run): the run log's.
    timings = {"tokens_per_second": speed, "peak_memory_mib": round(peak_memory_mib(), 1),
               "resumed_from_step": _step_of(resume_from) if resume_from is not None else None}
    return out.write_metrics(metrics, timings=timings)


def _checked_trainer(stage: str, shards: int = 1):
    """The Trainer, stopped at the first non-finite loss or gradient norm. The Trainer itself goes on: with its
    default `logging_nan_inf_filter` a NaN loss is logged as the average of the finite ones (or 0), and NaN weights
    would be saved as the result. With `shards` > 1 (sequence parallelism) the ranks sharing a row get the same
    batches (`RepeatedBatches`)."""
    import torch
    from transformers import Trainer, TrainerCallback

    class StopOnNonFiniteGradNorm(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            norm = (logs or {}).get("grad_norm")
            if norm is not None and not math.isfinite(norm):
                raise diverged(stage, state.global_step, f"the gradient norm is {norm}")

    class CheckedTrainer(Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), StopOnNonFiniteGradNorm()], **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if shards == 1 or sampler is None:
                return sampler
            return RepeatedBatches(_seedable(sampler, self.args.data_seed), self.args.per_device_train_batch_size,
                                   shards)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # One host sync per micro-batch: the Trainer's own NaN filter does the same.
            if not torch.isfinite(loss).all():
                raise diverged(stage, self.state.global_step + 1, f"the loss is {loss.item()}")
            return loss

    return CheckedTrainer


# --- sequence parallelism (launch.sequence_parallel) ------------------------------------------------------------


def _sequence_parallel(job: Job, processes: int) -> int:
    """launch.sequence_parallel, checked against the world this stage really runs in and against its rows."""
    shards = job.params.launch.sequence_parallel
    if shards == 1:
        return 1
    if processes % shards:
        raise InputError(f"launch.sequence_parallel {shards} does not divide the {processes} processes this "
                         f"{job.stage} run has (WORLD_SIZE)")
    problem = sequence_parallel_problem(shards, job.section.attention, job.description.get("s2attn_group_size"),
                                        job.params.model.target_context if job.stage == "extend" else None)
    if problem:
        raise InputError(f"launch.sequence_parallel {problem}")
    return shards


class ShardedBatches:
    """The stage's collator, then this rank's shard of every row (`longlora.method.context_parallel.shard_batch`):
    rows of a fixed S² group (SFT) right-padded to a whole number of shards of whole groups first."""

    def __init__(self, inner, shards: int, index: int, s2attn: dict):
        self.inner, self.shards, self.index = inner, shards, index
        self.group_size, self.ratio = s2attn.get("group_size"), s2attn.get("group_size_ratio")
        self.shift = s2attn.get("shift", True)
        self.link = None

    def __call__(self, examples):
        from longlora.method.context_parallel import shard_batch
        from longlora.recipe import group_size_for

        batch = self.inner(examples)
        length = batch["input_ids"].shape[1]
        if self.group_size is not None:
            batch = _pad_right(batch, -length % (self.shards * self.group_size))
        group_size = group_size_for(batch["input_ids"].shape[1], self.group_size, self.ratio, whole_groups=False)
        return shard_batch(batch, self.shards, self.index, group_size, shift=self.shift, link=self.link)


def _pad_right(batch: dict, extra: int) -> dict:
    """`extra` more tokens at the end of every row: no target, masked, positions continuing."""
    import torch

    if not extra:
        return batch
    ids = batch["input_ids"]
    fill = {"labels": -100, "attention_mask": 0}
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            if key == "position_ids":
                tail = value[:, -1:] + torch.arange(1, extra + 1)
            else:
                tail = value.new_full((value.shape[0], extra), fill.get(key, 0))
            value = torch.cat((value, tail), dim=1)
        out[key] = value
    if "attention_mask" not in out:
        mask = torch.ones_like(ids)
        out["attention_mask"] = torch.cat((mask, mask.new_zeros(mask.shape[0], extra)), dim=1)
    return out


class RepeatedBatches:
    """Each batch of `base` `shards` times in a row. accelerate hands process k the k-th of every world-size batches,
    so the `shards` consecutive ranks sharing rows get the same batch, and the data order is the one-process run's."""

    def __init__(self, base, batch_size: int, shards: int):
        self.base, self.batch_size, self.shards = base, batch_size, shards

    def __iter__(self):
        batch = []
        for index in self.base:
            batch.append(index)
            if len(batch) == self.batch_size:
                for _ in range(self.shards):
                    yield from batch
                batch = []
        for _ in range(self.shards if batch else 0):
            yield from batch

    def __len__(self) -> int:
        return len(self.base) * self.shards

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


def _seedable(sampler, data_seed):
    """The sampler accelerate would make of the Trainer's (a RandomSampler becomes its SeedableRandomSampler): the
    same order as without sequence parallelism."""
    from accelerate.data_loader import SeedableRandomSampler
    from torch.utils.data import RandomSampler

    if type(sampler) is RandomSampler:
        return SeedableRandomSampler(data_source=sampler.data_source, replacement=sampler.replacement,
                                     num_samples=sampler._num_samples, generator=sampler.generator,
                                     data_seed=data_seed)
    return sampler


def _halo_link(shards: int):
    """This rank's link to its neighbours in its row: the process groups of `shards` consecutive ranks (every rank
    creates every group, in the same order, as torch.distributed requires)."""
    import torch.distributed as dist

    from longlora.method.context_parallel import HaloLink

    world, me = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(first, first + shards))) for first in range(0, world, shards)]
    group, first = groups[me // shards], me - me % shards
    # NCCL wants every rank of a group in its first call; a rank with no halo to move would skip the first exchange.
    dist.barrier(group=group)
    return HaloLink(group, me - 1 if me > first else None, me + 1 if me + 1 < first + shards else None)


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


# --- checks and settings, before any weight is loaded -----------------------------------------------------------


def _deepspeed_source(job: Job) -> dict | None:
    from longlora.method.training import read_deepspeed_config

    p = job.section
    return None if p.deepspeed is None else read_deepspeed_config(p.deepspeed, f"{job.stage}.deepspeed")


def _shaping(job: Job, processes: int, deepspeed: dict | None) -> dict:
    """Everything that shapes the trained weights: a checkpoint resumes only a run where all of it is equal."""
    p = job.section
    section = {k: v for k, v in p.model_dump(mode="json").items() if k not in _NOT_SHAPING}
    # By content, not by name: the same `data/base_model` rebuilt, or other blocks in the same folder, are another
    # configuration (hashing reads them once per run: seconds per GB).
    identity = {"model": content_digest(job.model_source),
                "data": content_digest(job.data_source) if job.data_source is not None else None}
    shaping = {"model": job.params.model.model_dump(mode="json"), job.stage: section, "world_size": processes,
               "deepspeed": deepspeed, "data": job.data_meta, "content": identity}
    if p.attention == "s2":
        # The kernel changes the speed, not the sums: a run may resume on another one (another card, flash-attn).
        shaping["s2attn"] = {key: value for key, value in job.s2attn.items() if key != "kernel"}
    if job.params.launch.sequence_parallel > 1:  # absent otherwise: earlier runs' checkpoints keep their hash
        shaping["sequence_parallel"] = job.params.launch.sequence_parallel
    if p.method != "full":
        shaping["lora"] = job.params.lora.model_dump(mode="json")
    return shaping


def _fingerprint(shaping: dict) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _step_of(checkpoint: Path) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state reads back was saved whole (a kill during
    the save leaves one without it, or with it cut short)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The latest whole checkpoint of `run_dir`. One whose files cannot be read (truncated, damaged) would fail every
    rerun: it is moved aside to `corrupt-checkpoint-<step>` (a name the Trainer's rotation never deletes), with a
    warning, and the one before it is taken."""
    from longlora.method.weights import damaged_file

    found = [c for c in run_dir.iterdir() if _CHECKPOINT.match(c.name) and _complete(c)] if run_dir.is_dir() else []
    for checkpoint in sorted(found, key=_step_of, reverse=True):
        damaged = damaged_file(checkpoint, recursive=True)
        if damaged is None:
            return checkpoint
        aside = _aside(checkpoint)
        with contextlib.suppress(FileNotFoundError):  # another process of the same run moved it first
            checkpoint.rename(aside)
        earlier = [c for c in found if _step_of(c) < _step_of(checkpoint)]
        log.warning("checkpoint %s is unreadable (%s: %s): moved it to %s (it goes with this configuration's other "
                    "checkpoints when the run completes); %s",
                    checkpoint, damaged[0].name, damaged[1], aside,
                    f"resuming from the one before it, {max(earlier, key=_step_of)}" if earlier else "starting over")
    return None


def _aside(checkpoint: Path) -> Path:
    aside, number = checkpoint.with_name(f"corrupt-{checkpoint.name}"), 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = checkpoint.with_name(f"corrupt-{checkpoint.name}-{number}")
    return aside


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    found = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            found.append(f"{prefix}{key} {x!r} → {y!r}")
    return found


def _resume_point(job: Job, run_dir: Path, shaping: dict) -> Path | None:
    """The checkpoint to continue from: the latest of this configuration (resume: auto), none (never), or the one
    named, which must come from this configuration."""
    p, stage = job.section, job.stage
    if p.resume == "never":
        return None
    if p.resume == "auto":
        others = sorted(d.name for d in p.checkpoint_dir.glob("*/") if d.is_dir() and d != run_dir) \
            if p.checkpoint_dir.is_dir() else []
        if others:
            log.info("%s also holds checkpoints of other configurations (%s): delete those you no longer need",
                     p.checkpoint_dir, ", ".join(others))
        return _latest_checkpoint(run_dir)
    checkpoint = Path(p.resume)
    if not _CHECKPOINT.match(checkpoint.name) or not (checkpoint / "trainer_state.json").is_file():
        raise InputError(f"{stage}.resume {p.resume!r}: not a checkpoint folder of the {stage} stage "
                         "(…/checkpoint-<step> holding trainer_state.json)")
    try:
        written = json.loads((checkpoint.parent / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{stage}.resume {p.resume!r}: no readable {RUN_FILE} beside it, so its configuration is "
                         "unknown; resume from a checkpoint this stage wrote") from None
    differences = _differences(written.get("shaping", {}), shaping)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; … ({len(differences)} in all)" if len(differences) > 4 else "")
        raise InputError(f"{stage}.resume {p.resume!r}: the checkpoint comes from another configuration ({shown}); "
                         "resume: auto picks this configuration's own checkpoints")
    return checkpoint


def _training_args(job: Job, run_dir: Path, accumulation: int, precision: str, deepspeed: dict | None):
    import torch
    from transformers import TrainingArguments

    from longlora.method.training import check_deepspeed_config

    p = job.section
    settings = dict(
        output_dir=str(run_dir),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=p.lr,
        adam_beta1=p.adam_beta1,
        adam_beta2=p.adam_beta2,
        adam_epsilon=p.adam_epsilon,
        weight_decay=p.weight_decay,
        lr_scheduler_type=p.lr_schedule,
        warmup_steps=p.warmup_steps,
        max_grad_norm=p.max_grad_norm,
        optim="adamw_torch",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=p.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=p.seed,
        data_seed=p.seed,
        train_sampling_strategy="sequential" if job.sequential else "random",
        logging_steps=p.log_every,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding" if job.count_padding else "all",
        save_strategy="steps",
        save_steps=p.checkpoint_every,
        save_total_limit=p.keep_checkpoints,
        report_to="none",  # dvclive is added as a callback with a Live that leaves dvc.yaml alone
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient; the search costs a graph walk
        remove_unused_columns=False,
        log_level_replica="warning",
        logging_nan_inf_filter=False,  # log a NaN as NaN (a diverged run stops anyway: _checked_trainer)
    )
    if deepspeed is None:
        return TrainingArguments(**settings)
    filled = check_deepspeed_config(deepspeed, TrainingArguments(**settings), f"{job.stage}.deepspeed")
    log.info("DeepSpeed config (auto values filled): %s", json.dumps(filled, sort_keys=True))
    return TrainingArguments(**settings, deepspeed=deepspeed)


def _tokenizer(job: Job):
    from longlora.data.tokenizing import load_tokenizer

    return load_tokenizer(job.model_source, job.params.model.trust_remote_code, _source_param(job))


def _source_param(job: Job) -> str:
    return "model.name_or_path" if job.stage == "extend" else f"{job.stage}.base_model"


# --- the model -----------------------------------------------------------------------------------------------------


def _model(job: Job, precision: str):
    from longlora.method.training import trainable_model

    p = job.section
    # The lora section's keys are apply_lora_plus's keyword arguments.
    return trainable_model(
        job.model_source, job.config, method=p.method, attention=p.attention, precision=precision, s2attn=job.s2attn,
        lora=job.params.lora.model_dump(), trust_remote_code=job.params.model.trust_remote_code,
        param=_source_param(job))


def _trainable_counts(model) -> dict:
    from longlora.method.lora import trainable_parameter_counts

    return trainable_parameter_counts(model)


# --- checkpoints and logs --------------------------------------------------------------------------------------


def _check_checkpoint_dir(job: Job) -> None:
    """checkpoint_dir must be absent, empty or this stage's: a run never writes among files it did not write."""
    root, stage = job.section.checkpoint_dir, job.stage
    if root.exists() or root.is_symlink():
        if not root.is_dir():
            raise InputError(f"{stage}.checkpoint_dir {str(root)!r} is a file, not a folder")
        # Another process of the same run may be writing the marker (atomically: a temporary file, then renamed).
        entries = [e.name for e in root.iterdir() if not e.name.startswith(f".{CHECKPOINTS_MARKER}.tmp-")]
        if entries and CHECKPOINTS_MARKER not in entries:
            raise InputError(f"{stage}.checkpoint_dir {str(root)!r} holds files the {stage} stage did not write "
                             f"({', '.join(sorted(entries)[:5])}; no {CHECKPOINTS_MARKER}); name another folder")


def _claim_checkpoints(job: Job, run_dir: Path, shaping: dict) -> None:
    """Mark checkpoint_dir as this stage's and describe the run's configuration in its subfolder."""
    root = job.section.checkpoint_dir
    _check_checkpoint_dir(job)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / CHECKPOINTS_MARKER, {"stage": job.stage, "note": "one subfolder per training configuration; "
                                           "a run removes its own when it completes"})
    run_dir.mkdir(exist_ok=True)
    write_json(run_dir / RUN_FILE, {"stage": job.stage, "shaping": shaping})


def _live(run_dir: Path, resumed: bool):
    """dvclive's logger, on the main process only, writing beside the checkpoints (so that a resumed run continues
    its logs); `dvcyaml=None`: it must not rewrite dvc.yaml in the middle of `dvc repro`."""
    if rank() != 0:
        return None
    from dvclive import Live

    return Live(str(run_dir / "dvclive"), dvcyaml=None, save_dvc_exp=False, resume=resumed, report=None)


def _dvclive_callbacks(live) -> list:
    from transformers.integrations import DVCLiveCallback

    # On other ranks the callback holds no Live and logs nothing (it logs on the world's main process only).
    return [DVCLiveCallback(live=live, log_model=False)]


def _keep_logs(source: Path, kept: Path) -> None:
    """Replace the run log's dvclive folder with this run's (copied whole first, so a failed copy keeps the old)."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    staging = kept.with_name(f".{kept.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(kept, ignore_errors=True)
    staging.rename(kept)


def _stable_adapter_config(folder: Path) -> None:
    """PEFT writes `target_modules` from a set, in an order that follows the process's hash seed: the same adapter
    would get a different hash on every rerun, and DVC would rerun everything after it. Sorted, it does not."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return
    settings = json.loads(config.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(settings.get(key), list):
            settings[key] = sorted(settings[key])
    write_json(config, settings)


def _save(job: Job, trainer, model, tokenizer, folder: Path) -> None:
    """The adapter (or full model) folder, with the model's config, the tokenizer and extension.json."""
    from longlora.method.extension import describe, plain_config

    p = job.section
    if p.method == "full":
        model.config = plain_config(model.config)
    else:
        # PEFT writes base_model_name_or_path from the config it sees: the base as named in params.
        model.peft_config["default"].base_model_name_or_path = job.model_source
    # The Trainer's save gathers ZeRO-3-partitioned weights; its pickled TrainingArguments are not part of a model.
    trainer.save_model(str(folder))
    (folder / "training_args.bin").unlink(missing_ok=True)
    _stable_adapter_config(folder)
    if p.method != "full":
        plain_config(copy.deepcopy(job.config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    describe(folder, {
        "base_model": job.model_source,
        "method": p.method,
        "rope_parameters": rope_parameters(job.config),
        "max_position_embeddings": job.config.max_position_embeddings,
        "attention_in_training": p.attention,
        **job.description,
    })
