"""LoRA+: PEFT LoRA on the attention projections *plus* trainable token embeddings and normalisation layers.

Without the embeddings and norms LoRA does not learn long context (paper, table 2: PG19 perplexity 11.4–12.0
against 8.12 with them). They are trained through PEFT's own `modules_to_save`, so they are written inside the
standard adapter folder and a plain `PeftModel.from_pretrained` restores them: no `trainable_params.bin`, no
`zero_to_fp32` step, and `merge_and_unload` folds everything into a plain model for serving stacks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from longlora.recipe import PAPER_TARGET_MODULES

log = logging.getLogger(__name__)


def norm_module_names(model: torch.nn.Module) -> list[str]:
    """Names of every normalisation layer (LayerNorm, RMSNorm and the models' own *Norm classes)."""
    names = []
    for name, module in model.named_modules():
        is_norm = isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm) or type(module).__name__.endswith("Norm")
        if name and is_norm:
            names.append(name)
    return names


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """The name of the input token embedding."""
    embedding = model.get_input_embeddings()
    return [name for name, module in model.named_modules() if module is embedding]


def _check_targets(model: torch.nn.Module, target_modules: Sequence[str]) -> None:
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"available: {sorted(linear_names)}"
        )


def apply_lora_plus(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = PAPER_TARGET_MODULES,
    train_embeddings: bool = True,
    train_norms: bool = True,
) -> PeftModel:
    """Wrap `model` with LoRA on `target_modules` and make embeddings and norms trainable (paper defaults)."""
    _check_targets(model, target_modules)
    modules_to_save = []
    if train_embeddings:
        modules_to_save += embedding_module_names(model)
    if train_norms:
        modules_to_save += norm_module_names(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    counts = trainable_parameter_counts(peft_model)
    log.info("trainable parameters: %s", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return peft_model


def _unwrapped(name: str) -> str:
    """The name of the module a PEFT wrapper stands for ("x.modules_to_save.default.weight" -> "x.weight")."""
    for wrapper in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(wrapper, "")
    return name


def trainable_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per group (lora, embeddings, norms, other) plus `trainable` and `total`."""
    embeddings = {_unwrapped(n) for n in embedding_module_names(model)}
    norms = {_unwrapped(n) for n in norm_module_names(model)}
    counts = {"lora": 0, "embeddings": 0, "norms": 0, "other": 0}
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if not param.requires_grad:
            continue
        owner = _unwrapped(name).rsplit(".", 1)[0]
        if "lora_" in name:
            group = "lora"
        elif owner in embeddings:
            group = "embeddings"
        elif owner in norms:
            group = "norms"
        else:
            group = "other"
        counts[group] += param.numel()
    counts["trainable"] = sum(counts.values())
    counts["total"] = total
    return counts
