"""Stage `extend`: long-context extension, the LongLoRA way, with the HF Trainer.

    .venv/bin/python -m stages.extend     # one process; dvc repro extend runs `python -m stages.launch extend`,
                                          # which starts it as params.yaml's `launch` says (torchrun: 8 GPUs)

Expected with the tiny default on 2 CPU cores: 60 steps of 8 × 1024 tokens in about 70 s (7 k tokens/s), loss
3.89 → 3.08; after `merge@extend`, held-out perplexity at 1024 tokens 29.7 against 48.5 for the base model with
interpolation alone (README, "Extend and merge").

Loads the base model (`model.name_or_path`, a local folder or a hub id) with its RoPE interpolated to
`model.target_context` (written into the config before the model is built), selects S²-Attn (`extend.attention`),
wraps it with LoRA+ (`extend.method`), and trains it on the packed blocks of prepare_pretrain, read memory-mapped.
Under torchrun or accelerate (stages/launch.py) every process runs this module; the Trainer reads RANK and
WORLD_SIZE, and the main process alone claims and writes the outputs.
The Trainer does mixed precision, gradient accumulation, distributed sampling, DeepSpeed and checkpoint/resume;
dvclive records loss, learning rate and tokens/s (without touching dvc.yaml).

Checkpoints go to `extend.checkpoint_dir/<configuration hash>/` every `checkpoint_every` steps (outside the
DVC-cached output; dvc.yaml marks the folder persist): a rerun after a kill continues from the latest one with the
same data order, and ends with the weights an uninterrupted run gets. The configuration's checkpoints are removed
when the run completes.

Output (`extend.out_dir`): the standard PEFT adapter folder (LoRA + embeddings + norms), with the extended
config.json, the tokenizer, extension.json (base model, RoPE scaling, S² group size, the resolved params) and the
dvclive logs; `longlora.extension.load_extended(out_dir)` rebuilds the extended model from it. `method: full` writes
a full model folder instead. Metrics: first and final loss, tokens/s, peak memory, trainable parameters per group.

On 2 CPU cores the default params (the embedded base model, 256 → 1024 tokens) take about 3 minutes; see README.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

from longlora.errors import InputError
from longlora.io import StageOutput, write_json
from longlora.recipe import DEFAULT_GROUP_SIZE_RATIO
from longlora.sources import check_model_source
from stages import _cli
from stages.params import ExtendParams, Params

log = logging.getLogger(__name__)

CHECKPOINTS_MARKER = ".longlora-checkpoints.json"
RUN_FILE = "run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What does not change the trained weights: where things go, how often they are logged or saved, how to resume.
_NOT_SHAPING = ("out_dir", "metrics_file", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                "resume")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(params: Params) -> dict:
    """Train the extension, write the self-describing adapter (or model) folder, return metrics."""
    if _rank() != 0:  # one process claims and publishes the outputs; the others only train with it
        return _run(params, None)
    with params.output("extend") as out:  # checked and locked before any work
        return _run(params, out)


def _run(params: Params, out: StageOutput | None) -> dict:
    from transformers import Trainer, default_data_collator, set_seed

    from longlora.training import BlockDataset, open_blocks, peak_memory_mib, resolve_precision

    p = params.extend
    started = time.perf_counter()
    if _rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    # Every check that can fail on the input runs before the model is loaded, and nothing is written until then.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = p.gradient_accumulation(world_size)
    config, original_context = _extended_config(params)
    blocks = open_blocks(p.data, params.model.target_context, config.vocab_size, "extend.data")
    precision = resolve_precision(p.precision)
    deepspeed = _deepspeed_source(p)
    shaping = _shaping(params, blocks.meta, world_size, deepspeed)
    run_dir = p.checkpoint_dir / _fingerprint(shaping)
    resume_from = _resume_point(p, run_dir, shaping)
    _check_checkpoint_dir(p)
    args = _training_args(p, run_dir, accumulation, precision, deepspeed)
    tokenizer = _tokenizer(params)

    set_seed(p.seed)  # before LoRA's random initialisation, which happens outside the Trainer
    model = _model(params, config, precision)
    counts = _trainable_counts(model)
    _claim_checkpoints(p, run_dir, shaping)
    live = _live(run_dir, resumed=resume_from is not None)
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks), data_collator=default_data_collator,
                      callbacks=_dvclive_callbacks(live))
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)

    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    # The Trainer's own count for this session (a resumed run counts from where it resumed).
    speed = next((e["train_tokens_per_second"] for e in reversed(history) if "train_tokens_per_second" in e), None)
    if out is None:
        # Under ZeRO-3 gathering the weights to save is collective: every process takes part, the main one writes.
        trainer.save_model(str(run_dir))
        return {}
    with out.publish() as tmp:
        _save(trainer, model, tokenizer, config, original_context, params, tmp)
        if live is not None and live.dir and Path(live.dir).is_dir():
            shutil.copytree(live.dir, tmp / "dvclive")
    shutil.rmtree(run_dir, ignore_errors=True)  # this configuration is done: its checkpoints are no longer needed
    seconds = time.perf_counter() - started
    metrics = {
        "method": p.method,
        "attention": p.attention,
        "precision": precision,
        "world_size": world_size,
        "gradient_accumulation_steps": accumulation,
        "steps": trainer.state.global_step,
        "resumed_from_step": _step_of(resume_from) if resume_from is not None else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "losses": [round(loss, 4) for loss in losses],
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_second": speed,
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "trainable_parameters": counts,
        "rope_parameters": _rope(config),
        "s2attn_group_size": _group_size(params) if p.attention == "s2" else None,
        "seconds": round(seconds, 1),
    }
    if losses and not all(math.isfinite(loss) for loss in losses):
        log.warning("non-finite losses: %s", losses)
    return out.write_metrics(metrics)


# --- checks and settings, before any weight is loaded -----------------------------------------------------------


def _extended_config(params: Params):
    """The base config with RoPE interpolated to model.target_context (before the model is built), and the context
    it is extended from."""
    from transformers import AutoConfig

    from longlora.rope import current_context_length, interpolated_config

    m = params.model
    check_model_source(m.name_or_path, need_config=True)
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"model.name_or_path {m.name_or_path!r}: cannot read its config: {err}") from None
    try:
        original = m.original_context or current_context_length(config)
        return interpolated_config(config, m.target_context, m.rope_type, original), original
    except ValueError as err:
        raise InputError(f"model: {err}") from None


def _group_size(params: Params) -> int:
    return params.s2attn.group_size_for(params.model.target_context)


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


def _deepspeed_source(p: ExtendParams) -> dict | None:
    from longlora.training import read_deepspeed_config

    return None if p.deepspeed is None else read_deepspeed_config(p.deepspeed, "extend.deepspeed")


def _shaping(params: Params, data_meta: dict, world_size: int, deepspeed: dict | None) -> dict:
    """Everything that shapes the trained weights: a checkpoint resumes only a run where all of it is equal."""
    extend = {k: v for k, v in params.extend.model_dump(mode="json").items() if k not in _NOT_SHAPING}
    extend.pop("deepspeed")
    shaping = {"model": params.model.model_dump(mode="json"), "extend": extend, "world_size": world_size,
               "deepspeed": deepspeed, "data": data_meta}
    if params.extend.attention == "s2":
        shaping["s2attn_group_size"] = _group_size(params)
    if params.extend.method != "full":
        shaping["lora"] = params.lora.model_dump(mode="json")
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
    found = [c for c in run_dir.iterdir() if _CHECKPOINT.match(c.name) and _complete(c)] if run_dir.is_dir() else []
    return max(found, key=_step_of, default=None)


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


def _resume_point(p: ExtendParams, run_dir: Path, shaping: dict) -> Path | None:
    """The checkpoint to continue from: the latest of this configuration (resume: auto), none (never), or the one
    named, which must come from this configuration."""
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
        raise InputError(f"extend.resume {p.resume!r}: not a checkpoint folder of the extend stage "
                         "(…/checkpoint-<step> holding trainer_state.json)")
    try:
        written = json.loads((checkpoint.parent / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"extend.resume {p.resume!r}: no readable {RUN_FILE} beside it, so its configuration is "
                         "unknown; resume from a checkpoint this stage wrote") from None
    differences = _differences(written.get("shaping", {}), shaping)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; … ({len(differences)} in all)" if len(differences) > 4 else "")
        raise InputError(f"extend.resume {p.resume!r}: the checkpoint comes from another configuration ({shown}); "
                         "resume: auto picks this configuration's own checkpoints")
    return checkpoint


def _training_args(p: ExtendParams, run_dir: Path, accumulation: int, precision: str, deepspeed: dict | None):
    import torch
    from transformers import TrainingArguments

    from longlora.training import check_deepspeed_config

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
        logging_steps=p.log_every,
        logging_first_step=True,
        include_num_input_tokens_seen="all",
        save_strategy="steps",
        save_steps=p.checkpoint_every,
        save_total_limit=p.keep_checkpoints,
        report_to="none",  # dvclive is added as a callback with a Live that leaves dvc.yaml alone
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient; the search costs a graph walk
        remove_unused_columns=False,
        log_level_replica="warning",
    )
    if deepspeed is None:
        return TrainingArguments(**settings)
    filled = check_deepspeed_config(deepspeed, TrainingArguments(**settings), "extend.deepspeed")
    log.info("DeepSpeed config (auto values filled): %s", json.dumps(filled, sort_keys=True))
    return TrainingArguments(**settings, deepspeed=deepspeed)


def _tokenizer(params: Params):
    from longlora.tokenizing import load_tokenizer

    return load_tokenizer(params.model.name_or_path, params.model.trust_remote_code)


# --- the model -----------------------------------------------------------------------------------------------------


def _model(params: Params, config, precision: str):
    """The base model built with the extended config, S²-Attn or dense attention selected, LoRA(+) applied;
    trainable weights in fp32 (the master copy mixed precision updates)."""
    import torch
    from transformers import AutoModelForCausalLM

    from longlora.lora import apply_lora_plus
    from longlora.s2attn import configure_s2attn

    p, m = params.extend, params.model
    # Frozen weights may stay in the compute dtype; trained ones are cast to fp32 below.
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype = torch.float32 if p.method == "full" else frozen_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, config=config, dtype=dtype,
                                                     trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"model.name_or_path {m.name_or_path!r}: cannot load the model: {err}") from None
    model.config.use_cache = False
    if p.attention == "s2":
        s2 = params.s2attn
        configure_s2attn(model, group_size_ratio=s2.group_size_ratio or DEFAULT_GROUP_SIZE_RATIO,
                         group_size=s2.group_size)
    else:
        model.set_attn_implementation("sdpa")
    if p.method != "full":
        lora = params.lora
        plus = p.method == "lora_plus"
        model = apply_lora_plus(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                target_modules=lora.target_modules, train_embeddings=plus and lora.train_embeddings,
                                train_norms=plus and lora.train_norms)
    for weight in model.parameters():
        if weight.requires_grad and weight.dtype != torch.float32:
            weight.data = weight.data.float()
    return model


def _trainable_counts(model) -> dict:
    from longlora.lora import trainable_parameter_counts

    return trainable_parameter_counts(model)


# --- checkpoints and logs --------------------------------------------------------------------------------------


def _check_checkpoint_dir(p: ExtendParams) -> None:
    """checkpoint_dir must be absent, empty or this stage's: a run never writes among files it did not write."""
    root = p.checkpoint_dir
    if root.exists() or root.is_symlink():
        if not root.is_dir():
            raise InputError(f"extend.checkpoint_dir {str(root)!r} is a file, not a folder")
        entries = [e.name for e in root.iterdir()]
        if entries and CHECKPOINTS_MARKER not in entries:
            raise InputError(f"extend.checkpoint_dir {str(root)!r} holds files the extend stage did not write "
                             f"({', '.join(sorted(entries)[:5])}; no {CHECKPOINTS_MARKER}); name another folder")


def _claim_checkpoints(p: ExtendParams, run_dir: Path, shaping: dict) -> None:
    """Mark checkpoint_dir as this stage's and describe the run's configuration in its subfolder."""
    root = p.checkpoint_dir
    _check_checkpoint_dir(p)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / CHECKPOINTS_MARKER, {"stage": "extend", "note": "one subfolder per training configuration; "
                                           "a run removes its own when it completes"})
    run_dir.mkdir(exist_ok=True)
    write_json(run_dir / RUN_FILE, {"stage": "extend", "shaping": shaping})


def _live(run_dir: Path, resumed: bool):
    """dvclive's logger, on the main process only, writing beside the checkpoints (so that a resumed run continues
    its logs); `dvcyaml=None`: it must not rewrite dvc.yaml in the middle of `dvc repro`."""
    if _rank() != 0:
        return None
    from dvclive import Live

    return Live(str(run_dir / "dvclive"), dvcyaml=None, save_dvc_exp=False, resume=resumed, report=None)


def _dvclive_callbacks(live) -> list:
    from transformers.integrations import DVCLiveCallback

    # On other ranks the callback holds no Live and logs nothing (it logs on the world's main process only).
    return [DVCLiveCallback(live=live, log_model=False)]


def _save(trainer, model, tokenizer, config, original_context: int, params: Params, folder: Path) -> None:
    """The adapter (or full model) folder, with the extended config, the tokenizer and extension.json."""
    from longlora.extension import describe, plain_config

    p = params.extend
    if p.method == "full":
        model.config = plain_config(model.config)
    else:
        # PEFT writes base_model_name_or_path from the config it sees: the base as named in params.
        model.peft_config["default"].base_model_name_or_path = params.model.name_or_path
    # The Trainer's save gathers ZeRO-3-partitioned weights; its pickled TrainingArguments are not part of a model.
    trainer.save_model(str(folder))
    (folder / "training_args.bin").unlink(missing_ok=True)
    if p.method != "full":
        plain_config(copy.deepcopy(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    describe(folder, {
        "base_model": params.model.name_or_path,
        "method": p.method,
        "original_context": original_context,
        "target_context": params.model.target_context,
        "rope_parameters": _rope(config),
        "max_position_embeddings": config.max_position_embeddings,
        "s2attn_group_size": _group_size(params) if p.attention == "s2" else None,
        "attention_in_training": p.attention,
        "params": {"model": params.model.model_dump(mode="json"), "s2attn": params.s2attn.model_dump(mode="json"),
                   "lora": params.lora.model_dump(mode="json"), "extend": p.model_dump(mode="json")},
    })


if __name__ == "__main__":
    raise SystemExit(_cli.main("extend", run))
