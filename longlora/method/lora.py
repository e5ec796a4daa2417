"""LoRA+: PEFT LoRA on the attention projections *plus* trainable token embeddings and normalisation layers.

Without the embeddings and norms LoRA does not learn long context (paper, table 2: PG19 perplexity 11.4–12.0
against 8.12 with them). They are trained through PEFT's own `modules_to_save`, so they are written inside the
standard adapter folder and a plain `PeftModel.from_pretrained` restores them: no `trainable_params.bin`, no
`zero_to_fp32` step, and `merge_and_unload` folds everything into a plain model for serving stacks.

Tied input/output embeddings (`tie_word_embeddings`, common in small models): a `modules_to_save` copy of the input
embedding alone would train the input side only, while the output head kept the frozen original, and merging would
untie them. PEFT's `ensure_weight_tying` wraps the output head around the very same trainable copy, so the adapter
model, the reloaded adapter and the merged model all use the trained matrix on both sides, and the merged model
stays tied.

QLoRA (`method: qlora`) is this same adapter over a base whose Linear layers bitsandbytes holds in 4-bit
(`longlora.method.training.trainable_model`): embeddings and norms are not Linear layers, so they stay unquantised and
train exactly as here, and the adapter folder is the same.
"""

from __future__ import annotations

import logging
import math
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


def embeddings_tied(model: torch.nn.Module) -> bool:
    """Whether the output head uses the input embedding's own weight (what `tie_word_embeddings` produces)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def apply_lora_plus(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = PAPER_TARGET_MODULES,
    train_embeddings: bool = True,
    train_norms: bool = True,
) -> PeftModel:
    """Wrap `model` with LoRA on `target_modules` and make embeddings and norms trainable (paper defaults).

    With tied embeddings the output head trains with the input embedding, as one matrix (see the module docstring).
    """
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
        # Only when tied: on an untied model PEFT would warn that there is nothing to tie.
        ensure_weight_tying=train_embeddings and embeddings_tied(model),
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


def _numel(weight: torch.Tensor) -> int:
    """Parameters a weight stands for: a 4-bit bitsandbytes weight packs two per byte and keeps its own shape in
    its quantisation state."""
    shape = getattr(getattr(weight, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else weight.numel()


def trainable_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per group (lora, embeddings, norms, other) plus `trainable` and `total` (a 4-bit weight
    counted by its unpacked shape)."""
    embeddings = {_unwrapped(n) for n in embedding_module_names(model)}
    norms = {_unwrapped(n) for n in norm_module_names(model)}
    counts = {"lora": 0, "embeddings": 0, "norms": 0, "other": 0}
    total = 0
    for name, param in model.named_parameters():
        total += _numel(param)
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
