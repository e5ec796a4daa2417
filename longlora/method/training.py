"""What the HF Trainer needs from this project, and nothing it already does: packed blocks as a dataset, the DeepSpeed
config checked before the model is loaded, the precision resolved, peak memory measured.

Mixed precision, gradient accumulation, distributed sampling, checkpoint/resume (weights, optimizer, scheduler, RNG
states and the position in the data), DeepSpeed and the tokens/s in the logs (`include_num_input_tokens_seen`) are the
Trainer's and accelerate's.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from longlora.data.packing import PackedBlocks
from longlora.errors import InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks (memory-mapped, read one block at a time) as causal-LM examples: labels = inputs, with the pad
    tokens that `remainder: pad` put at the end of the last block masked from the loss.

    By default documents inside a block attend to the documents before them, as in LongLoRA's training (it
    concatenates RedPajama documents the same way). With `document_attention` each example also carries
    `position_ids` restarting at 0 at every document start (`PackedBlocks.segments`), which makes the model's
    attention document-aware (document-aware S²-Attn in training, a block-diagonal mask with dense attention): every
    document is trained as if alone in its row, and the first token of a document is not a target (nothing before
    it in its document predicts it).
    """

    def __init__(self, blocks: PackedBlocks, document_attention: bool = False):
        self.blocks = blocks
        self.document_attention = document_attention
        self.padded = int(blocks.meta.get("padded_tokens") or 0)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        labels = ids.clone()
        if self.padded and i == len(self.blocks) - 1:
            labels[-self.padded:] = IGNORE_INDEX
        if not self.document_attention:
            return {"input_ids": ids, "labels": labels}
        bounds = self.blocks.segments(i)
        starts = torch.from_numpy(bounds[:-1].astype(np.int64))
        lengths = torch.from_numpy(np.diff(bounds).astype(np.int64))
        position_ids = torch.arange(len(ids)) - torch.repeat_interleave(starts, lengths)
        labels[starts[starts > 0]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def open_blocks(folder: str | Path, block_length: int, vocab_size: int, param: str = "data") -> PackedBlocks:
    """`PackedBlocks(folder)`, or an InputError naming `param` when they are missing, of another length than the
    context trained at, or from a larger vocabulary than the model's."""
    folder = Path(folder)
    try:
        blocks = PackedBlocks(folder)
    except FileNotFoundError as err:
        raise InputError(f"{param} {str(folder)!r}: {err} (run prepare_pretrain first)") from None
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{param} {str(folder)!r}: not readable packed blocks: {err}") from None
    meta = blocks.meta
    if blocks.block_length != block_length:
        raise InputError(f"{param} {str(folder / 'meta.json')!r}: blocks of {blocks.block_length} tokens, but "
                         f"model.target_context is {block_length}: extension trains on blocks of the target context "
                         "(rerun prepare_pretrain with block_length null)")
    if len(blocks) == 0:
        raise InputError(f"{param} {str(folder)!r}: holds no blocks")
    if int(meta.get("vocab_size") or 0) > vocab_size:
        raise InputError(f"{param} {str(folder / 'meta.json')!r}: tokenized with a {meta['vocab_size']}-token "
                         f"vocabulary, larger than the model's {vocab_size} (tokenizer {meta.get('tokenizer')!r})")
    return blocks


def resolve_precision(precision: str, param: str = "precision") -> str:
    """auto → bf16 on a GPU that has it, fp32 otherwise; an explicit choice the hardware lacks is an InputError
    naming `param`."""
    has_cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not has_cuda:
        raise InputError(f"{param} {precision}: mixed precision needs a GPU; this machine has none (use auto "
                         "or fp32)")
    return precision


def read_deepspeed_config(path: str | Path, param: str = "deepspeed") -> dict:
    """The DeepSpeed config as a dict; InputError naming the file (and the line) when it is missing or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{param} {str(path)!r}: cannot read the DeepSpeed config ({err.strerror})") from None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise InputError(f"{param} {str(path)!r}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InputError(f"{param} {str(path)!r}: expected a JSON object, got {type(config).__name__}")
    return config


def check_deepspeed_config(config: dict, args, param: str = "deepspeed") -> dict:
    """Run `config` through DeepSpeed's own config classes as the Trainer will, with its "auto" values filled in
    from the TrainingArguments `args`; return the filled config. InputError naming `param` when DeepSpeed rejects it
    or it contradicts the params."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    except ImportError as err:
        raise InputError(f"{param}: DeepSpeed is not installed ({err}); pip install deepspeed") from None
    try:
        filled = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
        filled.trainer_config_process(args)
        DeepSpeedConfig(filled.config)
    except Exception as err:  # DeepSpeed reports a bad config with ValueError, pydantic errors, AssertionError, …
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{param}: DeepSpeed rejects the config: {first[:300]}") from None
    return filled.config


QLORA_QUANT_TYPE = "nf4"
"""QLoRA's 4-bit data type (NormalFloat4, the paper's), with double quantisation of the block scales."""
QLORA_MIN_BITSANDBYTES = "0.46.1"
"""The oldest bitsandbytes transformers 5 quantises with (its BITSANDBYTES_MIN_VERSION)."""


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen weights are kept in (and a 4-bit base computes in) under a resolved `precision`."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def training_device() -> str:
    """The device this process trains on: its own GPU under torchrun/accelerate (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return "cpu"


def check_bitsandbytes(param: str = "extend.method", device: str | None = None) -> str:
    """The installed bitsandbytes version, once it quantised and dequantised a few numbers to 4-bit NF4 on `device`
    (default: `training_device()`); otherwise an InputError naming `param` (the `method` key that asked for qlora):
    not installed, older than transformers accepts, or without a 4-bit kernel for this device (bitsandbytes before
    its CPU backend). Imports bitsandbytes: call it only for `method: qlora`."""
    from importlib import metadata

    from packaging.version import Version

    device = device or training_device()
    install = (f"pip install -e '.[qlora]' (or pip install 'bitsandbytes>={QLORA_MIN_BITSANDBYTES}'), or use method "
               "lora_plus")
    try:
        installed = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise InputError(f"{param} qlora: bitsandbytes is not installed; {install}") from None
    if Version(installed) < Version(QLORA_MIN_BITSANDBYTES):
        raise InputError(f"{param} qlora: bitsandbytes {installed} is older than {QLORA_MIN_BITSANDBYTES}, the "
                         f"oldest transformers quantises with; {install}")
    try:
        import bitsandbytes.functional as bnb_functional

        probe = torch.linspace(-1, 1, 128, device=device)
        packed, state = bnb_functional.quantize_4bit(probe, quant_type=QLORA_QUANT_TYPE, compress_statistics=True)
        error = (bnb_functional.dequantize_4bit(packed, state).float() - probe).abs().max().item()
    except Exception as err:  # a missing kernel surfaces as RuntimeError, NotImplementedError, AttributeError, …
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(f"{param} qlora: bitsandbytes {installed} cannot quantise to 4-bit NF4 on {device} "
                         f"({first}); install a release with a kernel for it ({install})") from None
    if not error < 0.2:  # NF4 of numbers in [-1, 1] is off by at most half its widest step (about 0.15)
        raise InputError(f"{param} qlora: bitsandbytes {installed} quantises to 4-bit NF4 on {device} with an error "
                         f"of {error:g} on numbers in [-1, 1]; its kernel for this device is broken ({install})")
    return installed


def quantization_config(precision: str, param: str = "extend.method"):
    """The `BitsAndBytesConfig` of `method: qlora`: every Linear layer of the base (but the output head, which
    transformers leaves alone) stored in 4-bit NF4 with double quantisation, computing in the dtype of the resolved
    `precision` (bf16 on a GPU that has it, fp32 on a CPU). bitsandbytes is checked first (`check_bitsandbytes`)."""
    check_bitsandbytes(param)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QLORA_QUANT_TYPE, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(precision))


def _check_qlora(config, stage: str, source: str, param: str) -> None:
    """What `method: qlora` cannot be combined with, refused before any weight is read."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # set by the TrainingArguments built from `<stage>.deepspeed`
        raise InputError(f"{stage}.method qlora cannot be combined with a ZeRO-3 config in {stage}.deepspeed: ZeRO-3 "
                         "partitions the weights while they load, which 4-bit bitsandbytes layers support only in "
                         "particular versions and settings, not verified here; use configs/ds_zero2.json (the frozen "
                         "4-bit base replicated, the trained weights' optimizer state partitioned) or deepspeed null")
    quantized = getattr(config, "quantization_config", None)
    if quantized is not None:
        kind = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "")
        raise InputError(f"{param} {source!r} is already quantised ({kind}); {stage}.method qlora quantises a "
                         "full-precision base itself, and merge folds the adapter into that base's full-precision "
                         "weights: name the full-precision model")


def trainable_model(source: str, config, *, method: str, attention: str, precision: str, s2attn: dict | None = None,
                    lora: dict | None = None, trust_remote_code: bool = False, param: str = "model",
                    stage: str | None = None):
    """The model a training stage trains: `source`'s weights loaded with `config` (RoPE scaling already in it) and
    checked, S²-Attn (`configure_s2attn(**s2attn)`) or dense attention, then LoRA (`method: lora`) or LoRA+
    (`lora_plus` and `qlora`, `apply_lora_plus(**lora)`) unless `method: full`; trainable weights in fp32 (the master
    copy mixed precision updates), frozen ones in the compute dtype of `precision` (bf16, fp16 or fp32). `param` names
    the parameter that chose `source` in errors, `stage` the training stage whose keys they name (default: the one
    `param` belongs to, `sft.base_model` → sft, otherwise extend).

    `qlora` loads the frozen base's Linear layers in 4-bit NF4 (`quantization_config`) on this process' device;
    the embeddings and norms are not Linear layers, and transformers keeps the output head out of quantisation (a
    tied head is the input embedding), so they load in the compute dtype, and the trained copies of the embeddings
    and norms are fp32, as for `lora_plus`. PEFT's `prepare_model_for_kbit_training` is deliberately not called: of
    what it does, freezing the base is `get_peft_model`'s, fp32 for the trained weights is the loop below, and
    gradient checkpointing is the Trainer's (non-reentrant, so no input-gradient hook is needed); what it would add
    is an fp32 copy of every frozen non-4-bit weight (the original embedding PEFT keeps beside its trained copy, an
    untied output head) and a reentrant checkpointing the Trainer then replaces."""
    from transformers import AutoModelForCausalLM

    from longlora.method.lora import apply_lora_plus
    from longlora.method.s2attn import configure_s2attn
    from longlora.method.weights import check_finite, check_weight_files

    stage = stage or ("sft" if param.startswith("sft.") else "extend")
    frozen_dtype = compute_dtype(precision)
    dtype = torch.float32 if method == "full" else frozen_dtype
    quantized = {}
    if method == "qlora":
        _check_qlora(config, stage, source, param)
        quantized = {"quantization_config": quantization_config(precision, f"{stage}.method"),
                     "device_map": {"": training_device()}}
    check_weight_files(source, param)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **quantized)
    except (OSError, ValueError) as err:
        raise InputError(f"{param} {source!r}: cannot load the model: {err}") from None
    check_finite(model, source, param)
    model.config.use_cache = False
    if attention == "s2":
        configure_s2attn(model, **(s2attn or {}))
    else:
        model.set_attn_implementation("sdpa")
    if method != "full":
        lora = dict(lora or {})
        if method == "lora":  # plain LoRA: the embeddings and norms stay frozen
            lora.update(train_embeddings=False, train_norms=False)
        model = apply_lora_plus(model, **lora)
    for weight in model.parameters():
        if weight.requires_grad and weight.dtype != torch.float32:
            weight.data = weight.data.float()
    return model


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch on a GPU; the process' peak resident memory on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
