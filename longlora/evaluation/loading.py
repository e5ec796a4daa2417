"""Models as the evaluation stages load them: any Hugging Face causal-LM folder or hub id, dense attention, eval mode.

The evaluations compare the models of params.yaml's `eval_models` (the base model with position interpolation only,
the extended model, the fine-tuned one). A merged model's config already carries its RoPE scaling; the base model's
baseline, "interpolation without training", gets the same scaling written into its config before it is built
(transformers computes the rotary frequencies at construction, so changing the config afterwards would do nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlora.data.tokenizing import load_tokenizer
from longlora.errors import InputError
from longlora.recipe import RopeType
from longlora.sources import check_model_source


@dataclass(frozen=True)
class Interpolation:
    """Position interpolation applied at load time: RoPE scaled from `original_context` (None: the config's
    max_position_embeddings) to `target_context` tokens, with `headroom`
    (`longlora.method.rope.interpolated_config`)."""

    target_context: int
    rope_type: RopeType = "linear"
    original_context: int | None = None
    headroom: float = 1.0


def load_for_evaluation(name_or_path: str, interpolation: Interpolation | None = None, *,
                        dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        param: str = "eval_models"):
    """(model, tokenizer): the causal LM at `name_or_path` in eval mode with dense (SDPA) attention, its RoPE
    interpolated first when `interpolation` is given. Errors are InputErrors naming `param`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longlora.method.rope import current_context_length, interpolated_config
    from longlora.method.weights import check_finite, check_weight_files

    check_model_source(name_or_path, param, need_config=True)
    check_weight_files(name_or_path, param)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"{param} {name_or_path!r}: cannot read its config: {err}") from None
    if interpolation is not None:
        try:
            original = interpolation.original_context or current_context_length(config)
            config = interpolated_config(config, interpolation.target_context, interpolation.rope_type, original,
                                         interpolation.headroom)
        except ValueError as err:
            raise InputError(f"{param} {name_or_path!r}: {err}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise InputError(f"{param} {name_or_path!r}: cannot load the model: {err}") from None
    check_finite(model, name_or_path, param)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code, param)
    return model.eval(), tokenizer

