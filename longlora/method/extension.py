"""Extended models that describe themselves: what `extend` writes, how to load it back, and the plain config of a
merged model.

An adapter carries no RoPE scaling: PEFT's `adapter_config.json` names the base model and nothing about its config,
so an adapter loaded onto its base folder the way PEFT documents it runs without the interpolation it was trained
with, and its logits are garbage past the original context. Every folder `extend` writes therefore holds, beside the
adapter (or the full weights):

- `config.json`: the extended config (RoPE scaling composed, `max_position_embeddings` = the target, no S²-Attn
  attribute: training-time attention is not part of the model);
- `extension.json`: the base model, the RoPE scaling, the S² group size, the method and the resolved params of the
  run;
- the tokenizer.

`load_extended(folder)` rebuilds the extended model from that folder alone. The other ways of loading, and what each
gives: docs/training.md ("Loading an extended model").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from longlora.errors import InputError
from longlora.io import write_json

EXTENSION_FILE = "extension.json"
EXTENSION_FORMAT = "longlora-extension-v1"
ADAPTER_CONFIG = "adapter_config.json"
# Attributes `longlora.method.s2attn.configure_s2attn` sets on a config: training machinery, never part of a saved
# model.
S2ATTN_ATTRIBUTES = ("s2attn_group_size", "s2attn_group_size_ratio", "s2attn_shift", "s2attn_kernel")


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config as it should be saved: no S²-Attn attributes, the default attention backend (so that a process
    that never imports this project, where no `s2attn` backend is registered, loads it)."""
    for name in S2ATTN_ATTRIBUTES:
        if hasattr(config, name):
            delattr(config, name)
    config._attn_implementation = None
    return config


def describe(folder: str | Path, description: dict) -> None:
    """Write `extension.json` (the format tag added) into `folder`."""
    write_json(Path(folder) / EXTENSION_FILE, {"format": EXTENSION_FORMAT, **description})


def read_description(folder: str | Path, param: str = "folder") -> dict:
    """The `extension.json` of a folder `extend` wrote; InputError naming `param` when it is not one."""
    path = Path(folder) / EXTENSION_FILE
    if not Path(folder).is_dir():
        raise InputError(f"{param} {str(folder)!r}: no such folder (run the extend stage first)")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{param} {str(folder)!r}: no {EXTENSION_FILE}; not a folder the extend stage wrote") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None
    if not isinstance(description, dict) or description.get("format") != EXTENSION_FORMAT:
        raise InputError(f"{path}: not a {EXTENSION_FORMAT} description")
    return description


def is_adapter(folder: str | Path) -> bool:
    """Whether `folder` holds a PEFT adapter (rather than full model weights)."""
    return (Path(folder) / ADAPTER_CONFIG).exists()


def load_extended(folder: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, param: str = "folder") -> torch.nn.Module:
    """The extended model, from a folder `extend` wrote, in eval mode with dense attention.

    An adapter folder gives a `PeftModel` (LoRA, embeddings and norms restored by `PeftModel.from_pretrained`) over
    its base built with the folder's extended config; a full-model folder gives the model itself. `base` replaces the
    base model the folder names (e.g. the same model in another place).
    """
    from longlora.method.weights import check_finite, check_weight_files

    description = read_description(folder, param)
    folder = Path(folder)
    check_weight_files(folder, param)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"{param} {str(folder)!r}: cannot read its config.json: {err}") from None
    if not is_adapter(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code).eval()
        check_finite(model, folder, param)
        return model
    from peft import PeftModel

    from longlora.sources import check_model_source

    base = str(base if base is not None else description["base_model"])
    check_model_source(base, f"{param}: base model", need_config=True)
    check_weight_files(base, f"{param}: base model")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"{param}: base model {base!r} cannot be loaded: {err}") from None
    model = PeftModel.from_pretrained(model, folder).eval()
    check_finite(model, folder, param)
    return model
