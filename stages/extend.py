"""Stage `extend`: long-context extension, the LongLoRA way, with the HF Trainer.

    .venv/bin/python -m stages.extend     # one process; dvc repro extend runs `python -m stages.launch extend`,
                                          # which starts it as params.yaml's `launch` says (torchrun: 8 GPUs)

What the embedded recipe gives and how it was chosen: docs/extension.md; how to run it: docs/training.md.

Loads the base model (`model.name_or_path`, a local folder or a hub id) with its RoPE interpolated to
`model.target_context` (written into the config before the model is built), selects S²-Attn (`extend.attention`),
wraps it with LoRA+ (`extend.method`), and trains it on the packed blocks of prepare_pretrain, read memory-mapped:
documents see the documents before them in their block (the paper's recipe), or, with `extend.document_attention`,
each only itself (document-aware S²-Attn, docs/method.md).
Under torchrun or accelerate (stages/launch.py) every process runs this module; the Trainer reads RANK and
WORLD_SIZE, and the main process alone claims and writes the outputs.
The training itself (Trainer, checkpoints and resume after a kill, dvclive, the saved folder) is shared with `sft`:
stages/_training.py.

Output (`extend.out_dir`): the standard PEFT adapter folder (LoRA + embeddings + norms), with the extended
config.json, the tokenizer and extension.json (base model, RoPE scaling, S² group size, the resolved params);
`longlora.method.extension.load_extended(out_dir)` rebuilds the extended model from it. `method: full` writes a full
model
folder instead. Metrics: first and final loss, trainable parameters per group; tokens/s, peak memory, seconds and the
dvclive logs go to the run log, data/logs/extend/.
"""

from __future__ import annotations

from longlora.errors import InputError
from longlora.recipe import DEFAULT_GROUP_SIZE_RATIO
from longlora.sources import check_model_source
from stages import _cli
from stages._training import Job, run_stage
from stages.params import Params


def run(params: Params) -> dict:
    """Train the extension, write the self-describing adapter (or model) folder, return metrics."""
    return run_stage("extend", params, prepare_job)


def prepare_job(params: Params) -> Job:
    """What this stage trains, as `params` describe it, its inputs checked: the model's config with its RoPE scaling,
    the packed blocks and the default collator, the S²-Attn settings."""
    from transformers import default_data_collator

    from longlora.method.training import BlockDataset, open_blocks

    config, original_context = _extended_config(params)
    blocks = open_blocks(params.extend.data, params.model.target_context, config.vocab_size, "extend.data")
    s2 = params.s2attn
    group_size = s2.group_size_for(params.model.target_context) if params.extend.attention == "s2" else None
    return Job(
        stage="extend", params=params, model_source=params.model.name_or_path, config=config,
        dataset=BlockDataset(blocks, params.extend.document_attention), collator=default_data_collator,
        data_meta=blocks.meta, data_source=params.extend.data,
        s2attn={"group_size_ratio": s2.group_size_ratio or DEFAULT_GROUP_SIZE_RATIO, "group_size": s2.group_size,
                "shift": s2.shift, "kernel": s2.kernel},
        description={
            "original_context": original_context,
            "target_context": params.model.target_context,
            "s2attn_group_size": group_size,
            "params": {"model": params.model.model_dump(mode="json"), "s2attn": s2.model_dump(mode="json"),
                       "lora": params.lora.model_dump(mode="json"), "extend": params.extend.model_dump(mode="json")},
        })


def _extended_config(params: Params):
    """The base config with RoPE interpolated to model.target_context (before the model is built), and the context
    it is extended from."""
    from transformers import AutoConfig

    from longlora.method.rope import current_context_length, interpolated_config

    m = params.model
    check_model_source(m.name_or_path, need_config=True)
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"model.name_or_path {m.name_or_path!r}: cannot read its config: {err}") from None
    try:
        original = m.original_context or current_context_length(config)
        return interpolated_config(config, m.target_context, m.rope_type, original, m.rope_headroom), original
    except ValueError as err:
        raise InputError(f"model: {err}") from None


if __name__ == "__main__":
    _cli.exit_process(_cli.main("extend", run))
