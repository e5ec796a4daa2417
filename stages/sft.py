"""Stage `sft`: supervised fine-tuning of the extended model on long instructions (LongAlpaca / LongQA), LoRA+.

    .venv/bin/python -m stages.sft     # or: dvc repro sft

How to run it: docs/training.md; what the embedded recipe gives and how its learning rate was chosen: docs/sft.md.

Loads `sft.base_model` (default: the merged extended model of `merge@extend`; a chat model whose context is shorter
than model.target_context is interpolated to it at load time), selects S²-Attn with a fixed group size (the group
size extension trained with, `s2attn` at model.target_context), wraps it with LoRA+ and trains it on prepare_sft's
examples: loss on the answer tokens only (the prompt's labels are −100). `sft.padding_free` (default with shifted
S²-Attn): each batch's examples packed back to back into rows of up to the model's context, every example computed
as if alone by document-aware S²-Attn (position_ids restarting per example); otherwise right-padded batches whose
length is rounded up to a multiple of the group, so that each row computes exactly what it computes alone. When
prepare_sft stored the examples in length-grouped batches (order.json), they are read in that order, in batches of that
size; otherwise shuffled. Training, checkpoints and resume after a kill, dvclive and the saved folder are shared with
`extend` (stages/_training.py).

Output (`sft.out_dir`): a PEFT adapter folder over the base model with its config, the tokenizer (carrying
prepare_sft's prompt format as its chat template, so that evaluations and servers prompt it as it was trained) and
extension.json;
`merge@sft` folds it into the final model. Metrics: losses, padding share, trainable parameters per group; tokens/s
(real tokens), peak memory, seconds and the dvclive logs go to the run log, data/logs/sft/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from longlora.errors import InputError
from longlora.sources import check_model_source
from stages import _cli
from stages._training import Job, run_stage
from stages.params import Params

log = logging.getLogger(__name__)
PARAM = "sft.base_model"


def run(params: Params) -> dict:
    """Fine-tune on the instruction examples, write the self-describing adapter (or model) folder, return metrics."""
    return run_stage("sft", params, prepare_job)


def prepare_job(params: Params) -> Job:
    """What this stage trains, as `params` describe it, its inputs checked: the model's config with its RoPE scaling,
    the SFT examples and their padding-free or padded batches, the S²-Attn settings."""
    from longlora.data.sft import CHAT_TEMPLATE_FILE, PaddedBatches
    from longlora.data.tokenizing import load_tokenizer

    p = params.sft
    config, original_context = _base_config(params)
    tokenizer = load_tokenizer(p.base_model, params.model.trust_remote_code, PARAM)
    template = Path(p.data) / CHAT_TEMPLATE_FILE
    if template.is_file():  # the model is saved answering in the format it was trained in
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    group_size = params.s2attn.group_size_for(params.model.target_context) if p.attention == "s2" else None
    dataset, meta, grouped = _examples(params, config, group_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise InputError(f"{PARAM} {p.base_model!r}: the tokenizer has neither a pad nor an EOS token to pad with")
    # Padding-free rows hold up to the model's context (the longest a padded row may be; _examples checked that every
    # example fits): document-aware S² costs a row of several examples what those examples cost alone.
    collator = PaddedBatches(pad_id, group_size,
                             row_length=config.max_position_embeddings if p.padding_free else None)
    return Job(
        stage="sft", params=params, model_source=p.base_model, config=config, dataset=dataset, collator=collator,
        data_meta=meta, data_source=Path(p.data), s2attn={"group_size": group_size, "shift": params.s2attn.shift,
                                                                  "kernel": params.s2attn.kernel},
        sequential=grouped is not None, count_padding=True,
        tokenizer=tokenizer, extra_metrics=lambda: _padding(collator),
        description={
            "original_context": original_context,
            "target_context": config.max_position_embeddings,
            "s2attn_group_size": group_size,
            "params": {"model": params.model.model_dump(mode="json"), "s2attn": params.s2attn.model_dump(mode="json"),
                       "lora": params.lora.model_dump(mode="json"), "sft": p.model_dump(mode="json")},
        })


def _padding(collator) -> dict:
    total = collator.tokens + collator.padded_tokens
    return {"padding_share": round(collator.padded_tokens / total, 4) if total else None}


def _base_config(params: Params):
    """The base model's config, interpolated to model.target_context when its context is shorter, and the context
    its pre-training had (from the extension.json a merged extended model carries, else its own)."""
    from transformers import AutoConfig

    from longlora.method.extension import EXTENSION_FILE
    from longlora.method.rope import current_context_length, interpolated_config

    m, source = params.model, params.sft.base_model
    check_model_source(source, PARAM, need_config=True)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code)
        current = current_context_length(config)
    except (OSError, ValueError) as err:
        raise InputError(f"{PARAM} {source!r}: cannot read its config: {err}") from None
    original = current
    described = Path(source) / EXTENSION_FILE
    if described.is_file():
        original = json.loads(described.read_text(encoding="utf-8")).get("original_context") or current
    if current < m.target_context:
        log.info("%s has a context of %d tokens: interpolating its RoPE to %d", source, current, m.target_context)
        try:
            config = interpolated_config(config, m.target_context, m.rope_type, current, m.rope_headroom)
        except ValueError as err:
            raise InputError(f"{PARAM} {source!r}: {err}") from None
    return config, original


def _examples(params: Params, config, group_size: int | None):
    """prepare_sft's dataset, checked against the model (columns, vocabulary, length) and the batch size its
    length-grouped order was written for; (dataset, what identifies it, grouped batch size or None)."""
    import datasets
    import pyarrow.compute as pc

    from longlora.data.sft import ORDER_FILE, read_order

    p = params.sft
    folder = Path(p.data)
    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise InputError(f"sft.data {str(folder)!r}: no dataset there (run prepare_sft first)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"sft.data {str(folder)!r}: not a dataset prepare_sft wrote: {err}") from None
    if not isinstance(dataset, datasets.Dataset) or not {"input_ids", "labels"} <= set(dataset.column_names):
        raise InputError(f"sft.data {str(folder)!r}: expected prepare_sft's dataset with input_ids and labels "
                         f"columns, got {getattr(dataset, 'column_names', type(dataset).__name__)}")
    if len(dataset) == 0:
        raise InputError(f"sft.data {str(folder)!r}: holds no examples")
    table = dataset.data.table
    ids = pc.list_flatten(table.column("input_ids"))
    largest = pc.max(ids).as_py()
    if largest is not None and largest >= config.vocab_size:
        raise InputError(f"sft.data {str(folder)!r}: token id {largest} is outside the model's "
                         f"{config.vocab_size}-token vocabulary ({PARAM} {p.base_model!r}): tokenized for another "
                         "model")
    longest = pc.max(pc.list_value_length(table.column("input_ids"))).as_py()
    padded = -(-longest // group_size) * group_size if group_size else longest
    context = config.max_position_embeddings
    if padded > context:
        raise InputError(f"sft.data {str(folder)!r}: an example of {longest} tokens (padded to {padded} for S²-Attn "
                         f"groups of {group_size}) exceeds the model's context of {context} tokens; lower "
                         "prepare_sft.max_length")
    grouped = read_order(folder)
    if grouped is not None and grouped != p.per_device_batch_size:
        raise InputError(f"sft.per_device_batch_size {p.per_device_batch_size}: {str(folder / ORDER_FILE)!r} says the "
                         f"examples are stored in length-grouped batches of {grouped}; set it to {grouped} (or "
                         "prepare_sft.group_batch_size to match)")
    if grouped is not None and p.replay_share > 0:
        raise InputError(f"sft.replay_share {p.replay_share}: {str(folder / ORDER_FILE)!r} says the examples are "
                         "stored in length-grouped batches, read in that order, and replay is shuffled among them; "
                         "set sft.replay_share 0 or prepare_sft.group_by_length false")
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.arrow")):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    meta = {"rows": len(dataset), "tokens": len(ids), "longest": longest, "grouped_batch_size": grouped,
            "sha256": digest.hexdigest()}
    if p.replay_share > 0:
        dataset, meta["replay"] = _with_replay(params, dataset, config)
    return dataset, meta, grouped


def _with_replay(params: Params, dataset, config):
    """The examples with sft.replay_share of replay pieces shuffled in (their labels are their tokens: the loss
    covers every replayed token), and what identifies the replay."""
    import datasets
    import numpy as np

    from longlora.io import content_digest
    from longlora.method.training import open_blocks

    p = params.sft
    blocks = open_blocks(p.replay_data, params.model.target_context, config.vocab_size, "sft.replay_data")
    length = min(p.replay_length, blocks.block_length)
    per_block = blocks.block_length // length
    count = round(p.replay_share / (1 - p.replay_share) * len(dataset))
    available = len(blocks) * per_block
    picks = np.random.default_rng(p.seed).choice(available, size=count, replace=count > available)
    pieces = [np.asarray(blocks[int(k) // per_block][int(k) % per_block * length:][:length]).tolist() for k in picks]
    replay = datasets.Dataset.from_dict({"input_ids": pieces, "labels": pieces, "length": [length] * count},
                                        features=dataset.features)
    # In memory: a cached shuffle would write its index file into prepare_sft's output folder, changing that output.
    mixed = datasets.concatenate_datasets([dataset, replay]).shuffle(seed=p.seed, keep_in_memory=True)
    return mixed, {"pieces": count, "length": length, "sha256": content_digest(p.replay_data)}


if __name__ == "__main__":
    _cli.exit_process(_cli.main("sft", run))
