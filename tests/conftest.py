"""Shared fixtures: tiny models and tokenizers built locally (tests never touch the network)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Overrides that shrink the default pipeline to seconds: merged into the project's params.yaml by `tiny_params`.
HARNESS_TASKS = ROOT / "longlora/evaluation/harness_tasks"
"""The project's local lm-eval tasks: params.yaml names the folder relative to the project, which tests leave."""

TINY_OVERRIDES = {
    "embedded_corpus": {"max_documents": 24},
    "build_base_model": {
        "vocab_size": 400,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "context_length": 32,
        "batch_size": 4,
        "steps": 12,
        "lr": 0.01,
        "warmup_steps": 2,
        "eval_blocks": 4,
    },
    "model": {"target_context": 128},
    # The tiny tokenizer (vocab 400) spends ~190 tokens on the LongQA preamble and question alone: LongQA
    # instructions longer than the 128-token context, cut in the middle by prepare_sft, keep the pipeline whole.
    "prepare_corpus": {"longqa_min_tokens": 240, "longqa_max_tokens": 400, "longqa_examples": 16,
                      "longqa_heldout_examples": 8, "eval_documents": 4, "longbench_examples": 2,
                      "longbench2_examples": 4},
    "prepare_sft": {"truncation": "truncate_middle"},
    # Synthetic extension sequences of 32 to 128 tokens, the tiny context.
    "prepare_pretrain": {"synthetic_min_length": 32},
    # The tiny tokenizer spends ~160 tokens on the passkey prompt's fixed lines: 32-token prompts cannot hold them.
    "eval_perplexity": {"windowed_step": 32},
    "eval_passkey": {"lengths": [200, 256], "depths": [0.0, 1.0], "trials": 1},
    # RULER's fixed text takes most of 600 of these tokens: fwe fits 400 and 600, niah_multikey_2 only 600.
    "eval_ruler": {"lengths": [400, 600], "tasks": ["niah_multikey_2", "fwe"], "samples": 1},
    # … so every model is evaluated past the tiny 128 positions, on purpose.
    "eval_models": {name: {"extrapolate": True} for name in ("base", "base_pi", "extended", "sft")},
    "longbench": {"max_examples": 2, "max_new_tokens": 4},
    "longbench2": {"max_examples": 2, "max_new_tokens": 4},
    "eval_harness": {"limit": 2},
    "extend": {"max_steps": 6, "global_batch_size": 4, "per_device_batch_size": 2, "lr": 0.003, "warmup_steps": 1,
               "log_every": 1, "checkpoint_every": 2},
    "sft": {"max_steps": 4, "global_batch_size": 4, "per_device_batch_size": 2, "lr": 0.003, "warmup_steps": 1,
            "log_every": 1, "checkpoint_every": 2},
}


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny_params_dict(**overrides: dict) -> dict:
    """The project's params.yaml with TINY_OVERRIDES (and then `overrides`) applied."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return _merge(_merge(raw, TINY_OVERRIDES), overrides)


@pytest.fixture
def tiny_params():
    """Validated tiny Params (paths relative to the current directory: chdir to tmp_path first)."""
    from stages.params import parse_params

    return parse_params(tiny_params_dict())


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in a fraction of a second on a few standard-library files."""
    from longlora.embedded.corpus import stdlib_documents
    from longlora.embedded.tiny import train_bpe_tokenizer

    texts = [d.text for d in stdlib_documents("base", max_documents=20)]
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    """`tiny_tokenizer` saved as a folder, for stages that load `model.name_or_path` with AutoTokenizer."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine every parallel op can stall for
    a scheduler quantum: one thread keeps such tests fast whatever else runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""SmolLM2-135M-Instruct's chat template (ChatML, a default system turn)."""


@pytest.fixture(scope="session")
def smol_chat_model_dir(tmp_path_factory):
    """A stand-in for SmolLM2-135M-Instruct, brought as one's own model: a Llama with 9 query and 3 key-value heads,
    tied embeddings, a 64-token context, and a tokenizer whose BOS is the ChatML marker `<|im_start|>` (EOS
    `<|im_end|>`, no BOS added when encoding) with SmolLM2's chat template; saved as a local folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from longlora.embedded.corpus import stdlib_documents

    specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>"}
    backend = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [d.text for d in stdlib_documents("base", max_documents=10)],
        trainer=trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = SMOL_CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("models") / "SmolLM2-tiny-Instruct"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
