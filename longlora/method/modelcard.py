"""Hugging Face model cards (`huggingface_hub.ModelCard`, README.md with YAML metadata) for the merged models.

`merge` writes one into every merged folder with what is known then: the base model, the method (S²-Attn for
training, position interpolation, LoRA+), the context length before and after, the RoPE scaling, the training data
and recipe of every training step that led to the model, and the command that reproduces it. Its "Evaluation"
section only says where the results will be: the evaluations run after the merge, on the merged folder, so they
cannot be in it (a stage writing into another stage's output would make that output, and every evaluation of it,
stale). The `report` stage writes the same card with the results (`with_evaluation`: the section's tables, and
`model-index` metadata from `huggingface_hub.EvalResult`) under its own output folder, ready to be copied into the
model folder before it is uploaded.

Cards are byte-reproducible: no date, no version, nothing from the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from longlora.sources import is_hub_model_id, is_hub_name

CARD_FILE = "README.md"
EVALUATION_HEADING = "## Evaluation"
PAPER = "[LongLoRA](https://arxiv.org/abs/2309.12307) (Chen et al., 2023)"
_STEP_TITLES = {"extend": "Context extension", "sft": "Supervised fine-tuning"}
_METHODS = {
    "lora_plus": "LoRA+ (LoRA on {targets}, r={r}, alpha={alpha}; embeddings and normalisation layers trained too)",
    "lora": "LoRA on {targets}, r={r}, alpha={alpha} (adapter only)",
    "full": "full fine-tuning (every weight)",
    "qlora": "QLoRA (LoRA on {targets}, r={r}, alpha={alpha}, against the base quantised to 4-bit NF4; embeddings and "
             "normalisation layers trained too; merged into the full-precision base)",
}

_METHOD_NAMES = {"lora_plus": "LoRA+", "lora": "LoRA", "full": "full fine-tuning", "qlora": "QLoRA"}


def _pairs(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows) + "\n"


def _count(n, noun: str) -> str:
    """`1 step`, `20 steps` (whatever `n` is, as written)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _step_table(stage: str, step: dict) -> str:
    params = step.get("params") or {}
    run = params.get(stage) or {}
    lora = params.get("lora") or {}
    method = _METHODS.get(step.get("method"), str(step.get("method")))
    method = method.format(targets=", ".join(lora.get("target_modules") or ()), r=lora.get("r"),
                           alpha=lora.get("alpha"))
    attention = step.get("attention_in_training")
    attention = (f"S²-Attn (shifted sparse attention), groups of {step.get('s2attn_group_size')} tokens, half the "
                 "heads shifted by half a group; dense attention at inference" if attention == "s2"
                 else f"{attention} (dense causal attention)")
    rope = step.get("rope_parameters") or {}
    headroom = (params.get("model") or {}).get("rope_headroom", 1.0)
    scaled_as = f", scaled as for {round(step.get('target_context', 0) * headroom)} (headroom ×{headroom})" \
        if headroom != 1.0 and isinstance(step.get("target_context"), int) else ""
    rows = [
        ("training data", f"`{step.get('training_data', run.get('data'))}`"),
        ("method", method),
        ("attention in training", attention),
        ("position interpolation", f"{rope.get('rope_type')}, factor {rope.get('factor')}: "
                                   f"{step.get('original_context')} → {step.get('target_context')} tokens{scaled_as}"),
        ("optimiser", f"AdamW, betas ({run.get('adam_beta1')}, {run.get('adam_beta2')}), eps {run.get('adam_epsilon')}"
                      f", weight decay {run.get('weight_decay')}, gradient clipping {run.get('max_grad_norm')}"),
        ("learning rate", f"{run.get('lr')}, {run.get('lr_schedule')}, "
                          f"{_count(run.get('warmup_steps'), 'warm-up step')}"),
        ("steps and batch", f"{_count(run.get('max_steps'), 'step')}, global batch "
                            f"{_count(run.get('global_batch_size'), 'sequence')}"),
        ("precision", f"{run.get('precision')}; gradient checkpointing "
                      f"{'on' if run.get('gradient_checkpointing') else 'off'}; "
                      f"DeepSpeed {run.get('deepspeed') or 'none'}"),
        ("seed", run.get("seed")),
    ]
    return _pairs(rows)


def merged_model_card(steps: list[tuple[str, dict]], base_model: str, config: dict, *, parameters: int, dtype: str,
                      command: str, license: str | None = None) -> ModelCard:
    """The card of a merged model.

    steps: (training stage, its extension.json description with `training_data` added) for every training step from
    the base model to this one, in order (`extend`, then `sft`); base_model: the model the first step started from;
    config: the merged folder's config.json; command: the command that reproduces the folder.
    """
    last = steps[-1][1]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    target = config.get("max_position_embeddings", last.get("target_context"))
    original = steps[0][1].get("original_context")
    hub_data = [str(step.get("training_data")) for _, step in steps if is_hub_name(str(step.get("training_data")))]
    methods = {step.get("method") for _, step in steps}
    tags = ["longlora", "long-context", "position-interpolation", f"rope-{rope.get('rope_type', 'default')}"]
    if any(step.get("attention_in_training") == "s2" for _, step in steps):
        tags.append("s2-attn")
    if methods & {"lora", "lora_plus", "qlora"}:
        tags.append("lora")
    if "qlora" in methods:
        tags.append("qlora")
    if "sft" in (stage for stage, _ in steps):
        tags.append("sft")
    data = ModelCardData(
        base_model=base_model if is_hub_model_id(base_model) else None,
        datasets=list(dict.fromkeys(hub_data)) or None,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name(base_model, target, [stage for stage, _ in steps]),
    )
    done = ", then ".join(_STEP_TITLES.get(stage, stage).lower() for stage, _ in steps)
    architecture = ", ".join(config.get("architectures") or [config.get("model_type", "?")])
    model_rows = [
        ("base model", f"`{base_model}`"),
        ("architecture", f"{architecture} ({config.get('model_type')}), {parameters:,} parameters, {dtype} weights "
                         "(safetensors)" + (", tied input and output embeddings"
                                            if config.get("tie_word_embeddings") else "")),
        ("context length", f"{original} → {target} tokens (`max_position_embeddings` {target})"),
        ("RoPE scaling", f"`{json.dumps(rope, sort_keys=True)}` (in config.json: plain transformers applies it)"),
        ("method", f"{PAPER}: " + ", ".join([f"position interpolation ({rope.get('rope_type')})",
                                            *(["S²-Attn for training only"] if "s2-attn" in tags else []),
                                            *(_METHOD_NAMES.get(m, str(m)) for m in dict.fromkeys(
                                                step.get("method") for _, step in steps))])),
    ]
    body = [
        f"# {data.model_name}",
        "",
        f"`{base_model}` with its context window extended from {original} to {target} tokens the LongLoRA way "
        f"({PAPER}): {done}. The folder is a plain Hugging Face model: the RoPE scaling is in its config, the "
        "adapter is merged into the weights, and inference uses ordinary dense attention, so "
        "`AutoModelForCausalLM.from_pretrained(folder)` loads it with no remote code and no patch.",
        "",
        "## Model",
        "",
        _pairs(model_rows),
        "## Training",
        "",
    ]
    for number, (stage, step) in enumerate(steps, 1):
        body += [f"### {number}. {_STEP_TITLES.get(stage, stage)} (stage `{stage}`)", "", _step_table(stage, step)]
    body += [
        EVALUATION_HEADING,
        "",
        "Not in this folder: the evaluations run on the merged model after it is written. `dvc repro report` writes "
        "this card with the results (perplexity by context length, passkey retrieval, LongBench) into the report "
        "folder (`data/report/` by default), ready to replace this file before the folder is uploaded.",
        "",
        "## Reproduce",
        "",
        "In a clone of the longlora project with the run's params.yaml (the training parameters are also in this "
        "folder's extension.json):",
        "",
        "```bash",
        f"{command}",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def model_name(base_model: str, target: int, stages: list[str]) -> str:
    """`<base name>-longlora-<target>` (`-sft` after fine-tuning): the model-index name and the card's title."""
    name = f"{Path(base_model.rstrip('/')).name}-longlora-{target}"
    return f"{name}-sft" if "sft" in stages else name


def with_evaluation(card: ModelCard, section: str, results: list[EvalResult]) -> ModelCard:
    """The card with its Evaluation section's text replaced by `section` (markdown) and `results` as its
    `model-index` metadata."""
    text = card.text
    start = text.find(EVALUATION_HEADING + "\n")
    if start < 0:
        raise ValueError(f"the card has no {EVALUATION_HEADING!r} section")
    end = text.find("\n## ", start + len(EVALUATION_HEADING))
    rest = text[end + 1:] if end >= 0 else ""
    text = f"{text[:start]}{EVALUATION_HEADING}\n\n{section.strip()}\n\n{rest}"
    data = card.data.to_dict()
    data["eval_results"] = results or None
    return ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{text}")
