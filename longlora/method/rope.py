"""Position interpolation: scale RoPE so a model pre-trained at `original` tokens reads `target` tokens.

transformers computes rotary frequencies when the model is *constructed*, so the scaling must be written into the
config before `from_pretrained`/`from_config`; changing `model.config` afterwards does nothing. `interpolated_config`
returns such a config; `rotary_inv_freq` reads back what a built model actually uses, so callers can check.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers import PretrainedConfig

from longlora.recipe import ROPE_TYPES, RopeType

# Llama 3.1's published values; used only when a llama3 scaling is introduced on a model that has none.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def current_context_length(config: PretrainedConfig) -> int:
    """The context the model handles as configured now (`max_position_embeddings`)."""
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 0:
        raise ValueError(
            f"config of model_type={getattr(config, 'model_type', '?')!r} has no usable max_position_embeddings "
            f"({length!r}); set model.original_context in params.yaml"
        )
    return length


def interpolated_config(
    config: PretrainedConfig,
    target_length: int,
    rope_type: RopeType = "linear",
    original_length: int | None = None,
    headroom: float = 1.0,
) -> PretrainedConfig:
    """Return a copy of `config` whose RoPE is scaled from `original_length` to `target_length` tokens.

    The factor is `target_length / original_length × headroom` (not rounded up, unlike the reference code). An
    existing scaling of the same type is *multiplied*: a model already interpolated ×2 to 8k and extended to 32k from
    its 8k gets ×8 in total. Mixing types (e.g. linear on top of llama3) is refused rather than silently replaced.
    `original_length` defaults to the config's current `max_position_embeddings`.

    `headroom` > 1 scales positions as if the target were that many times longer, while `max_position_embeddings`
    still says `target_length`: a model reads the far end of the distances it was pre-trained on least well (they
    are the rarest in its training windows), and plain interpolation maps the target's longest distances exactly
    there; headroom moves them back into the well-trained range.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not one of {ROPE_TYPES}")
    original = original_length if original_length is not None else current_context_length(config)
    if original <= 0 or target_length <= 0:
        raise ValueError(f"context lengths must be positive, got original={original}, target={target_length}")
    if target_length < original:
        raise ValueError(f"target_length={target_length} is shorter than the original context {original}")
    if not math.isfinite(headroom) or headroom < 1:
        raise ValueError(f"headroom={headroom} must be a finite number of at least 1")

    new = copy.deepcopy(config)
    params = dict(getattr(new, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        # transformers 5 keeps rope_theta inside rope_parameters; older configs keep it at the top level.
        theta = getattr(new, "rope_theta", None) or getattr(new, "default_theta", 10000.0)
        params["rope_theta"] = float(theta)
    existing_type = params.get("rope_type", params.get("type", "default"))
    existing_factor = float(params.get("factor") or 1.0)
    if existing_type not in ("default", rope_type):
        raise ValueError(
            f"the model already uses rope_type={existing_type!r} (factor {existing_factor}); refusing to replace it "
            f"with {rope_type!r}. Extend it with rope_type={existing_type!r} instead."
        )

    params["rope_type"] = rope_type
    params.pop("type", None)
    params["factor"] = existing_factor * target_length / original * headroom
    if rope_type in ("yarn", "llama3"):
        # The pre-training length these types interpolate from: keep the oldest one known.
        params.setdefault("original_max_position_embeddings", original)
    if rope_type == "llama3":
        for key, value in _LLAMA3_DEFAULTS.items():
            params.setdefault(key, value)
    new.rope_parameters = params
    # Dynamic NTK rescales relative to max_position_embeddings at run time, so it must keep the original length.
    if rope_type != "dynamic":
        new.max_position_embeddings = target_length
    return new


def rotary_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The inverse frequencies of the first rotary embedding found in a built model (to verify scaling took)."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and isinstance(module.inv_freq, torch.Tensor):
            return module.inv_freq.detach().clone()
    raise ValueError(f"no rotary embedding (a module with `inv_freq`) found in {type(model).__name__}")
