"""Stage `merge`: a training stage's output → one plain Hugging Face model folder, for serving stacks.

    .venv/bin/python -m stages.merge extend     # or: dvc repro merge@extend
    .venv/bin/python -m stages.merge sft        # or: dvc repro merge@sft

One instance per training stage whose output it merges (dvc.yaml's `foreach`: `merge@extend`, `merge@sft`), each
writing where its `merge.<stage>` params say. The folder the training stage wrote describes
itself (extension.json: base model, RoPE scaling), so the merge needs nothing else: the extended model is rebuilt
with `longlora.method.extension.load_extended` (fp32), the adapter folded in (`merge_and_unload`: LoRA, embeddings,
norms;
tied embeddings stay one matrix) and the result saved with safetensors, the tokenizer, a generation config and the
source's extension.json (base model, RoPE scaling, the training run's params; `merged_from` and `training_data`
added), and a Hugging Face model card, README.md (longlora/method/modelcard.py: base model, method, context length, RoPE
scaling, data and recipe of every training step, the reproducing command; `dvc repro report` adds the results). Its
config carries the composed RoPE scaling and the new `max_position_embeddings` and names no S²-Attn attribute or
backend: plain `AutoModelForCausalLM.from_pretrained(folder)` loads it, in a process that never imports this project.

A `method: qlora` adapter (trained over the base held in 4-bit NF4) is merged the same way, into the base loaded in
full precision: the merged weights are the base's own + ΔW, not the dequantised 4-bit weights + ΔW. The adapter was
trained against the quantised base, so the merged model differs from the one training saw by the 4-bit rounding of
the frozen Linear weights. The reference does the same: its one merge script (merge_lora_weights_and_save_hf_model.py)
loads the base in fp16, never in 4-bit, and its inference-qlora.py quantises the merged model to NF4 again when
loading it. The alternative, folding ΔW into dequantised weights, would ship the quantisation error in a full-size
model. docs/training.md ("QLoRA").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from longlora.errors import InputError
from longlora.io import StageOutput, same_path
from longlora.method.extension import (
    EXTENSION_FILE,
    describe,
    is_adapter,
    load_extended,
    plain_config,
    read_description,
)
from longlora.method.modelcard import CARD_FILE, merged_model_card
from stages import _cli
from stages.params import Params
from stages.registry import MERGE_SOURCES, TRAINING_STAGES

PREPARED_BY = {"extend": "prepare_pretrain", "sft": "prepare_sft"}
"""The data stage that prepares each training stage's default data (its `input` is where that data came from)."""

log = logging.getLogger(__name__)


def run(params: Params, source: str = "extend") -> dict:
    """Merge the output of training stage `source` into a plain model folder; return metrics."""
    if source not in MERGE_SOURCES:
        raise InputError(f"merge: unknown source stage {source!r}; one of {', '.join(MERGE_SOURCES)}")
    with params.output(f"merge@{source}") as out:  # checked and locked before any work
        return _merge(params, source, out)


def _merge(params: Params, source: str, out: StageOutput) -> dict:
    from transformers import GenerationConfig

    from longlora.data.tokenizing import load_tokenizer

    folder = Path(params.section(source).out_dir)
    param = f"{source}.out_dir"
    description = read_description(folder, param)  # before loading anything: is it a folder the stage wrote?
    trust = params.model.trust_remote_code
    model = load_extended(folder, trust_remote_code=trust, param=param)
    adapter = is_adapter(folder)
    if adapter:
        if description.get("method") == "qlora":
            log.info("%s: a qlora adapter, trained over the 4-bit base, merged into the full-precision base %s",
                     folder, description.get("base_model"))
        model = model.merge_and_unload()
    model.config = plain_config(model.config)
    dtype = _dtype(params.merge.dtype, folder)
    model = model.to(dtype)
    tokenizer = load_tokenizer(str(folder), trust)
    described = {**{k: v for k, v in description.items() if k != "format"}, "merged_from": str(folder),
                 "training_data": _training_data(params, source, description)}
    config = model.config
    parameters = sum(t.numel() for t in model.parameters())
    with out.publish() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation = model.generation_config if model.generation_config is not None else GenerationConfig()
        generation.save_pretrained(tmp)
        # Where it came from travels with it: the base model, the RoPE scaling, the training run's params.
        describe(tmp, described)
        _card(described, source, tmp, parameters, str(dtype).removeprefix("torch.")).save(tmp / CARD_FILE)
    metrics = {
        "source": source,
        "merged_adapter": adapter,
        "base_model": description["base_model"],
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": dict(getattr(config, "rope_parameters", None) or {}),
        "tied_embeddings": model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight,
    }
    return out.write_metrics(metrics)


def _training_data(params: Params, source: str, description: dict) -> str:
    """What the training run learned from: the `input` of the data stage that prepared its data (a hub name or a
    local file), or the data folder itself when it was not that stage's output."""
    data = str((description.get("params") or {}).get(source, {}).get("data") or params.section(source).data)
    prepare = params.section(PREPARED_BY[source])
    return str(prepare.input) if same_path(data, prepare.out_dir) else data


def _card(description: dict, source: str, folder: Path, parameters: int, dtype: str):
    """The model card: every training step from the first base model to this one (a base model that is itself a
    merged folder carries its own steps in its extension.json), the merged config's facts, the base's license."""
    steps = [(source, description)]
    base = str(description["base_model"])
    while (Path(base) / EXTENSION_FILE).is_file():  # a longlora-merged model (the extended model under sft)
        earlier = read_description(base, f"{source}: base model")
        stage = next((name for name in earlier.get("params") or {} if name in TRAINING_STAGES), "extend")
        steps.insert(0, (stage, earlier))
        base = str(earlier["base_model"])
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return merged_model_card(steps, base, config, parameters=parameters, dtype=dtype,
                             command=f"dvc repro merge@{source}    # or: make repro (the whole pipeline)",
                             license=_license(base))


def _license(model: str) -> str | None:
    """The license a local base model's own card declares (README.md metadata), which derived weights inherit."""
    from huggingface_hub import ModelCard

    card = Path(model) / CARD_FILE
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except (ValueError, OSError):  # a README without (valid) metadata: no license stated
        return None


def _dtype(choice: str, folder: Path):
    """The dtype to save in: the one named, or (auto) the base model's own as the extended config.json names it
    (the model in memory is fp32 whatever the base was: loading with a dtype rewrites its config's)."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(named), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.merge <source stage> [--params params.yaml]`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("source", choices=MERGE_SOURCES)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return _cli.main(f"merge@{known.source}", lambda params: run(params, known.source), rest)


if __name__ == "__main__":
    _cli.exit_process(main())
