"""What the evaluation stages share: their instance command line and loading the model of an `eval_models` entry."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from longlora.evaluation.loading import Interpolation, load_for_evaluation
from longlora.sources import check_model_source
from stages import _cli
from stages.params import Params


def load_tokenizer(params: Params, name: str):
    """The tokenizer of `eval_models.<name>` alone: checks that need it run before any weights are loaded."""
    from longlora.data.tokenizing import load_tokenizer

    check_model_source(params.eval_models[name].path, f"eval_models.{name}.path", need_config=True)
    return load_tokenizer(params.eval_models[name].path, params.model.trust_remote_code, f"eval_models.{name}.path")


def check_positions(params: Params, name: str, longest: int, what: str) -> None:
    """Stop before loading any weights when `longest` tokens (what `what` asks of the model) exceed the positions
    of `eval_models.<name>` (after interpolation) and the entry does not say `extrapolate: true`: a number measured
    past them is an extrapolation study, not a result, and must be asked for."""
    from transformers import AutoConfig

    from longlora.errors import InputError

    entry = params.eval_models[name]
    check_model_source(entry.path, f"eval_models.{name}.path", need_config=True)
    if entry.extrapolate:
        return
    if entry.interpolate:
        positions = params.model.target_context
    else:
        try:
            config = AutoConfig.from_pretrained(entry.path, trust_remote_code=params.model.trust_remote_code)
        except (OSError, ValueError) as err:
            raise InputError(f"eval_models.{name}.path {entry.path!r}: cannot read its config: {err}") from None
        positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and longest > positions:
        raise InputError(f"{what}: {longest} tokens, beyond the {positions} positions of eval_models.{name} "
                         f"({entry.path}); evaluate within them, or set eval_models.{name}.extrapolate: true to "
                         "measure past them on purpose")


def load_model(params: Params, name: str, dtype_choice: str):
    """(model, tokenizer) of `eval_models.<name>` on the GPU when there is one: RoPE interpolated to
    model.target_context when the entry says so, dense attention, eval mode."""
    import torch

    entry = params.eval_models[name]
    interpolation = None
    if entry.interpolate:
        m = params.model
        interpolation = Interpolation(m.target_context, m.rope_type, m.original_context, m.rope_headroom)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype_choice == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, dtype_choice)
    model, tokenizer = load_for_evaluation(entry.path, interpolation, dtype=dtype,
                                           trust_remote_code=params.model.trust_remote_code,
                                           param=f"eval_models.{name}.path")
    return model.to(device), tokenizer


def is_chat(params: Params, name: str, tokenizer) -> bool:
    """Whether `eval_models.<name>` is prompted as a chat (its `chat` flag), which its tokenizer must then allow."""
    from longlora.errors import InputError

    if not params.eval_models[name].chat:
        return False
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"eval_models.{name}.chat: true, but the tokenizer of {params.eval_models[name].path!r} has "
                         "no chat template (a model the sft stage fine-tuned carries one; a base model is not a chat "
                         "model: set chat false)")
    return True


def main(stage: str, run: Callable[[Params, str], dict], argv: list[str] | None = None) -> int:
    """`python -m stages.<stage> <model name> [--params params.yaml]`: one instance, `<stage>@<model name>`."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", add_help=False)
    parser.add_argument("model", help="a name of params.yaml's eval_models")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return _cli.main(f"{stage}@{known.model}", lambda params: run(params, known.model), rest)
