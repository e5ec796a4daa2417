"""Stages extend and merge end to end on a 2-layer tiny model (pre-trained at 32 tokens, extended to 128): what they
write, that it learned, that a run killed with SIGKILL resumes to the same weights, that two processes under torchrun
train as one with the same global batch, that a chat model whose BOS is a chat marker goes through, that every way of
loading the result gives what docs/training.md says, and that every bad input stops before training with one line naming
the parameter or file."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from longlora.data.packing import Packed, PackedBlocksWriter
from longlora.data.tokenizing import bos_opens_chat_turns
from longlora.errors import InputError
from longlora.io import TIMINGS_FILE, run_log
from longlora.method.extension import EXTENSION_FILE, load_extended
from longlora.method.modelcard import CARD_FILE
from longlora.method.rope import rotary_inv_freq
from stages import _cli, _training, build_base_model, extend, merge, prepare_pretrain
from stages.params import parse_params
from tests.conftest import ROOT, _merge, tiny_params_dict

TARGET, ORIGINAL = 128, 32  # tiny_params_dict: model.target_context, build_base_model.context_length


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny base model (build_base_model) and packed blocks of the extend split (prepare_pretrain), built once."""
    from longlora.embedded.corpus import stdlib_documents

    root = tmp_path_factory.mktemp("extend_inputs")
    with contextlib.chdir(root):
        with open("corpus.jsonl", "w", encoding="utf-8") as f:
            for doc in stdlib_documents("extend", max_documents=16):
                f.write(json.dumps({"text": doc.text}) + "\n")
        params = parse_params(tiny_params_dict(prepare_pretrain={"input": "corpus.jsonl"}))
        build_base_model.run(params)
        prepare_pretrain.run(params)
    return root


@pytest.fixture
def project(inputs, tmp_path, monkeypatch, single_torch_thread):
    """A fresh working directory holding copies of the base model and the blocks."""
    for name in ("data/base_model", "data/pretrain"):
        shutil.copytree(inputs / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(**sections):
    return parse_params(tiny_params_dict(**sections))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ids(length: int = TARGET, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 400, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- extend, then merge ------------------------------------------------------------------------------------------


def test_headroom_scales_positions_further_and_the_folders_say_so(project):
    params = _params(extend={"max_steps": 1}, model={"rope_type": "yarn", "rope_headroom": 1.5})
    metrics = extend.run(params)
    assert metrics["rope_parameters"]["factor"] == TARGET / ORIGINAL * 1.5
    merge.run(params, "extend")
    config = json.loads((project / "data/extended_model/config.json").read_text())
    # Scaled as for 1.5 × the target, but trained for, and claiming, the target context only.
    assert config["max_position_embeddings"] == TARGET and config["rope_parameters"]["factor"] == 6
    card = ModelCard.load(project / "data/extended_model" / CARD_FILE)
    assert f"{ORIGINAL} → {TARGET} tokens, scaled as for {TARGET * 3 // 2} (headroom ×1.5)" in card.text


def test_extend_learns_and_writes_a_self_describing_adapter_that_merge_folds_into_a_plain_model(project):
    # Linear interpolation (the paper's, no headroom): its inverse frequencies are exactly the base's divided by the
    # factor.
    params = _params(extend={"max_steps": 12}, model={"rope_type": "linear", "rope_headroom": 1.0})
    metrics = extend.run(params)

    # It learned: the last logged losses are below the first ones.
    losses = metrics["losses"]
    assert len(losses) == 12 and metrics["steps"] == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    assert metrics["tokens_seen"] == 12 * 4 * TARGET and metrics["gradient_accumulation_steps"] == 2
    timings = json.loads((run_log("extend") / TIMINGS_FILE).read_text())
    assert timings["tokens_per_second"] > 0 and timings["peak_memory_mib"] > 0 and timings["seconds"] > 0
    counts = metrics["trainable_parameters"]
    assert counts["lora"] > 0 and counts["embeddings"] == 400 * 32 and counts["norms"] == 5 * 32
    assert metrics["rope_parameters"]["factor"] == TARGET / ORIGINAL and metrics["s2attn_group_size"] == TARGET // 4
    assert json.loads(Path("data/metrics/extend.json").read_text()) == metrics

    out = project / "data/extend"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", EXTENSION_FILE,
            "tokenizer.json"} <= names
    config_text = (out / "config.json").read_text()
    config = json.loads(config_text)
    assert config["max_position_embeddings"] == TARGET and config["rope_parameters"]["factor"] == 4
    assert "s2attn" not in config_text
    described = json.loads((out / EXTENSION_FILE).read_text())
    assert described["base_model"] == "data/base_model" and described["original_context"] == ORIGINAL
    assert described["rope_parameters"]["rope_type"] == "linear" and described["s2attn_group_size"] == 32
    assert described["params"]["extend"]["max_steps"] == 12 and described["params"]["lora"]["r"] == 8
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "data/base_model"
    # dvclive's logs (tokens/s: not the same twice) went to the run log, out of the cached output.
    logs = run_log("extend") / "dvclive"
    assert "dvclive" not in names
    logged = (logs / "plots/metrics/loss.tsv").read_text().splitlines()
    assert logged[0] == "step\tloss" and len(logged) == 13
    assert len((logs / "plots/metrics/train/tokens_per_second.tsv").read_text().splitlines()) == 13
    # The run's checkpoints went when it completed; the folder (persist in dvc.yaml) and its marker stay.
    assert [p.name for p in (project / "data/checkpoints/extend").iterdir()] == [_training.CHECKPOINTS_MARKER]

    # The documented call rebuilds the extended model from the folder alone: interpolated RoPE, adapter applied.
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = load_extended(out)
    base = AutoModelForCausalLM.from_pretrained("data/base_model")
    torch.testing.assert_close(rotary_inv_freq(adapter), rotary_inv_freq(base) / 4)
    ids = _ids()
    expected = _logits(adapter, ids)
    # The plain PEFT way with the config saved beside the adapter gives the same model ...
    with_config = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained("data/base_model", config=AutoConfig.from_pretrained(out)), out).eval()
    torch.testing.assert_close(_logits(with_config, ids), expected)
    # ... the PEFT ways without it run without interpolation (what docs/training.md warns about) ...
    for unscaled in (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("data/base_model"), out),
                     AutoPeftModelForCausalLM.from_pretrained(out)):
        assert (_logits(unscaled.eval(), ids) - expected).abs().max() > 1e-3
    # ... and transformers' own adapter loading fails loudly instead, because config.json is there.
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)

    merged_metrics = merge.run(params, "extend")
    merged = project / "data/extended_model"
    assert merged_metrics["merged_adapter"] and merged_metrics["tied_embeddings"]
    assert merged_metrics["max_position_embeddings"] == TARGET
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in merged.iterdir()}
    assert "s2attn" not in (merged / "config.json").read_text()
    provenance = json.loads((merged / EXTENSION_FILE).read_text())
    assert provenance["base_model"] == "data/base_model" and provenance["merged_from"] == "data/extend"
    assert provenance["training_data"] == "data/corpus/pretrain.jsonl"  # prepare_pretrain.input made data/pretrain
    # Its model card states the facts of the folder it sits in.
    card = ModelCard.load(merged / CARD_FILE)
    config = json.loads((merged / "config.json").read_text())
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.data.base_model is None  # a local base model: named in the text, not as a hub reference
    assert {"longlora", "s2-attn", "lora", "rope-linear"} <= set(card.data.tags)
    assert f"| context length | {ORIGINAL} → {TARGET} tokens (`max_position_embeddings` {TARGET}) |" in card.text
    assert config["max_position_embeddings"] == TARGET and config["rope_parameters"]["factor"] == TARGET / ORIGINAL
    assert f"| RoPE scaling | `{json.dumps(config['rope_parameters'], sort_keys=True)}`" in card.text
    assert f"{merged_metrics['parameters']:,} parameters" in card.text
    assert "| training data | `data/corpus/pretrain.jsonl` |" in card.text and "12 steps, global batch 4" in card.text
    assert "dvc repro merge@extend" in card.text
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in list(f.keys())  # tied: one matrix
    # Loaded by a process that never imports this project, on an input longer than the original context.
    torch.save(ids, project / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert model.lm_head.weight is model.model.embed_tokens.weight, 'untied'\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "mine = sorted(m for m in sys.modules if m.split('.')[0] in ('longlora', 'stages', 'pipelines'))\n"
        "print('project modules:', mine)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(merged), "ids.pt", "merged.pt"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("project modules: []")
    torch.testing.assert_close(torch.load(project / "merged.pt"), expected, atol=1e-4, rtol=0)


def test_full_fine_tuning_with_dense_attention_writes_a_model_folder(project):
    params = _params(extend={"max_steps": 3, "method": "full", "attention": "dense", "log_every": 3})
    metrics = extend.run(params)
    counts = metrics["trainable_parameters"]
    assert counts["trainable"] == counts["total"] and metrics["s2attn_group_size"] is None
    out = project / "data/extend"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert "s2attn" not in (out / "config.json").read_text()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.max_position_embeddings == TARGET
    merge.run(params, "extend")
    merged = AutoModelForCausalLM.from_pretrained(project / "data/extended_model").eval()
    torch.testing.assert_close(_logits(merged, _ids()), _logits(plain, _ids()))


def test_plain_lora_trains_the_adapter_only(project):
    metrics = extend.run(_params(extend={"max_steps": 2, "method": "lora"}))
    counts = metrics["trainable_parameters"]
    assert counts["lora"] > 0 and counts["embeddings"] == counts["norms"] == 0


def test_document_attention_trains_every_document_as_if_alone(project, monkeypatch):
    """extend.document_attention: position_ids restart at each document start of the block, a document's first token
    is no target, and every S² call gets the documents."""
    from longlora.data.packing import PackedBlocks
    from longlora.method import s2attn
    from longlora.method.training import BlockDataset

    # The tiny corpus' documents (whole source files) span many blocks: write blocks of short documents (shorter
    # than half a group, a group, several groups) from its tokens.
    source = PackedBlocks("data/pretrain")
    doc_starts = [0, 5, 37, 64, 100]
    (project / "short_docs").mkdir()
    writer = PackedBlocksWriter(project / "short_docs", TARGET, source.tokens.dtype)
    writer.write(Packed(np.asarray(source.tokens[:8]), np.tile(np.array(doc_starts, np.int32), 8),
                        np.full(8, len(doc_starts), np.int64)))
    writer.close({k: v for k, v in source.meta.items() if k not in ("format", "dtype", "block_length", "blocks")})
    blocks = PackedBlocks(project / "short_docs")
    plain, aware = BlockDataset(blocks)[3], BlockDataset(blocks, document_attention=True)[3]
    assert "position_ids" not in plain and torch.equal(plain["input_ids"], aware["input_ids"])
    bounds = [*doc_starts, TARGET]
    for start, end in zip(bounds, bounds[1:], strict=False):
        assert aware["position_ids"][start:end].tolist() == list(range(end - start))
    starts = doc_starts[1:]
    assert (aware["labels"][starts] == -100).all()
    keep = torch.ones(TARGET, dtype=torch.bool)
    keep[starts] = False
    assert torch.equal(aware["labels"][keep], plain["labels"][keep])

    seen = []
    original = s2attn.shifted_sparse_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("documents"))
        return original(*args, **kwargs)

    monkeypatch.setattr(s2attn, "shifted_sparse_attention", recording)
    metrics = extend.run(_params(extend={"max_steps": 2, "document_attention": True, "log_every": 1,
                                         "data": str(project / "short_docs")}))
    assert metrics["steps"] == 2 and all(np.isfinite(metrics["losses"]))
    assert seen and all(d is not None for d in seen)
    described = json.loads((project / "data/extend" / EXTENSION_FILE).read_text())
    assert described["params"]["extend"]["document_attention"] is True
def test_s2attn_shift_false_trains_every_head_in_plain_groups(project, monkeypatch):
    """The paper's no-shift ablation reaches the attention through params alone (benchmarks/replicate.py's variant)."""
    import longlora.method.s2attn as s2

    grouped = []
    original = s2.grouped_causal_attention
    monkeypatch.setattr(s2, "grouped_causal_attention", lambda *a, **k: grouped.append(a[3]) or original(*a, **k))
    monkeypatch.setattr(s2, "shifted_sparse_attention", lambda *a, **k: pytest.fail("the shifted kernel ran"))
    extend.run(_params(extend={"max_steps": 1, "log_every": 1}, s2attn={"shift": False}, sft={"padding_free": False}))
    assert grouped and set(grouped) == {TARGET // 4}
    described = json.loads((project / "data/extend/extension.json").read_text())
    assert described["params"]["s2attn"]["shift"] is False
    assert "s2attn" not in (project / "data/extend/config.json").read_text()


CHAT_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                 "unk_token": "<|unk|>"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_model(folder: Path) -> None:
    """A tiny Qwen2-shaped chat model (GQA, tied embeddings) whose tokenizer's BOS is the chat marker <|im_start|>,
    prepended to every encoded text, as some chat fine-tunes ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from longlora.embedded.corpus import stdlib_documents

    backend = Tokenizer(models.BPE(unk_token=CHAT_SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [d.text for d in stdlib_documents("base", max_documents=10)],
        trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=list(CHAT_SPECIALS.values()),
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bos = CHAT_SPECIALS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
        (bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **CHAT_SPECIALS)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_chat_model_whose_bos_is_a_chat_marker_extends_and_merges(project):
    _chat_model(project / "models/chat")
    with open("chat.jsonl", "w", encoding="utf-8") as f:
        for text in ("def f(x):\n    return x + 1\n" * 40, "class A:\n    pass\n" * 60):
            f.write(json.dumps({"text": text}) + "\n")
    # A chat marker is no document start: pre-training text goes in without it (`bos: auto` resolves to none). The
    # base models evaluated follow model.name_or_path (data/base_model holds the embedded model, not this one).
    raw = tiny_params_dict(model={"name_or_path": "models/chat"},
                           prepare_pretrain={"input": "chat.jsonl", "out_dir": "data/chat_blocks", "remainder": "pad"},
                           extend={"max_steps": 2}, eval_models={"base": {"path": None}, "base_pi": {"path": None}})
    params = parse_params(raw)
    assert params.prepare_pretrain.bos == "none" and params.eval_models["base"].path == "models/chat"
    # With `bos: document` the chat marker would open every document: refused before anything is written.
    with pytest.raises(InputError, match=r"prepare_pretrain.bos: document, but the tokenizer's BOS '<\|im_start\|>' "
                                         "opens every turn of its chat template"):
        prepare_pretrain.run(parse_params(_merge(raw, {"prepare_pretrain": {"bos": "document"}})))
    assert not Path("data/chat_blocks").exists()
    prepare_pretrain.run(params)
    extend.run(params)
    merge.run(params, "extend")

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged = project / "data/extended_model"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE and bos_opens_chat_turns(tokenizer)
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id
    # A BOS that starts the sequence once (Llama 2 and 3 templates) is a document start, not a turn marker.
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert not bos_opens_chat_turns(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    generation = GenerationConfig.from_pretrained(merged)
    assert (generation.bos_token_id, generation.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert model.config.max_position_embeddings == TARGET and type(model).__name__ == "Qwen2ForCausalLM"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    ids = torch.cat([prompt["input_ids"], _ids(TARGET - prompt["input_ids"].shape[1])[:1] % len(tokenizer)], 1)
    torch.testing.assert_close(_logits(model, ids), _logits(load_extended(project / "data/extend").eval(), ids),
                               atol=1e-4, rtol=0)


# --- kill and resume -----------------------------------------------------------------------------------------------


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)


def _stage_env(*path_first: Path) -> dict[str, str]:
    """The environment of a stage run as a child process: this project importable, one thread per process."""
    python_path = [str(p) for p in path_first] + [str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(python_path), "OMP_NUM_THREADS": "1"}


def _complete_checkpoints(project: Path) -> list[Path]:
    return [c for c in (project / "data/checkpoints/extend").glob("*/checkpoint-*") if _training._complete(c)]


def test_a_rerun_after_a_kill_resumes_and_ends_with_the_uninterrupted_weights(project):
    """SIGKILL, as the out-of-memory killer or a preempted node delivers it: no handler runs, nothing is cleaned up."""
    raw = tiny_params_dict(extend={"max_steps": 12, "checkpoint_every": 2})
    params = parse_params(raw)
    uninterrupted = extend.run(params)
    expected = _adapter_weights(project / "data/extend")
    shutil.rmtree(project / "data/extend")
    Path("data/metrics/extend.json").unlink()

    # The stage in a process of its own (forked: this one has imported everything already, which takes a fresh
    # interpreter half a minute on a busy machine), killed as soon as its first checkpoint is whole.
    child = multiprocessing.get_context("fork").Process(target=extend.run, args=(params,))
    child.start()
    try:
        deadline = time.monotonic() + 240
        while not _complete_checkpoints(project) and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    finally:
        child.kill()
    assert child.exitcode == -signal.SIGKILL, f"the run ended before it was killed (exit code {child.exitcode})"
    assert not (project / "data/extend").exists() and not Path("data/metrics/extend.json").exists()
    killed_at = max(_training._step_of(c) for c in _complete_checkpoints(project))
    assert killed_at < 12

    resumed = extend.run(params)
    assert json.loads((run_log("extend") / TIMINGS_FILE).read_text())["resumed_from_step"] == killed_at
    assert resumed["steps"] == 12 and "resumed_from_step" not in resumed
    _assert_same_weights(_adapter_weights(project / "data/extend"), expected, atol=1e-6)
    tail = 12 - killed_at
    assert resumed["losses"][-tail:] == pytest.approx(uninterrupted["losses"][-tail:], abs=1e-5)


# --- several processes: torchrun through the launcher -------------------------------------------------------------

# Loaded by every Python process started with this folder first on PYTHONPATH; in the processes torchrun starts
# (RANK set), it saves each rank's trainable weights once training ends, for the test to compare.
_RANK_DUMP = """
import os
if "RANK" in os.environ and os.environ.get("LONGLORA_TEST_DUMP"):
    from safetensors.torch import save_file
    from transformers import Trainer

    _train = Trainer.train

    def _train_and_dump(self, *args, **kwargs):
        result = _train(self, *args, **kwargs)
        weights = {n: w.detach().contiguous() for n, w in self.model.named_parameters() if w.requires_grad}
        save_file(weights, os.path.join(os.environ["LONGLORA_TEST_DUMP"], f"rank{os.environ['RANK']}.safetensors"))
        return result

    Trainer.train = _train_and_dump
"""


def _torchrun_unavailable() -> str | None:
    import importlib.util

    import torch.distributed

    if importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_available():
        return "torch.distributed (torchrun) is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend, which CPU processes communicate with"
    return None


def launched_pair(project: Path, tmp_path_factory, stage: str, raw: dict, out_dir: str) -> tuple[dict, dict, str]:
    """`python -m stages.launch <stage>` with the params `raw` (a 2-process launch), as dvc.yaml runs it. Checks that
    it succeeded and that both ranks end with bit-identical trained weights; moves the stage's output folder
    `out_dir` aside (so that a one-process run can write its own) and removes its metrics. Returns the pair's metrics,
    its written adapter weights and the launcher's stderr."""
    hooks, dumps = tmp_path_factory.mktemp("hooks"), tmp_path_factory.mktemp("rank_weights")
    (hooks / "sitecustomize.py").write_text(_RANK_DUMP, encoding="utf-8")
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    # dvc.yaml's command: the launcher replaces itself with the torchrun (accelerate) command it builds.
    result = subprocess.run([sys.executable, "-m", "stages.launch", stage, "--params", "params.yaml"],
                            cwd=project, env={**_stage_env(hooks), "LONGLORA_TEST_DUMP": str(dumps)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_file = Path(f"data/metrics/{stage}.json")
    pair = json.loads(metrics_file.read_text())
    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "the ranks' weights differ"
    written = _adapter_weights(project / out_dir)
    shutil.move(project / out_dir, project / "pair")
    metrics_file.unlink()
    return pair, written, result.stderr


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_processes_train_as_one_with_the_same_global_batch(project, tmp_path_factory, launcher):
    """`launch: torchrun` (or accelerate), `nproc_per_node 2` on the CPU (gloo): per-device batch 2 × 2 processes ×
    accumulation 1 against one process × accumulation 2, global batch 4 both. Both ranks end with bit-identical
    weights, and the loss curve of the pair matches the single process within 1e-4 (the metrics' rounding; the two
    differ only in the order of a few fp32 sums), the adapters within 1e-5."""
    from stages.launch import command

    raw = tiny_params_dict(launch={"launcher": launcher, "nproc_per_node": 2})
    pair, written, stderr = launched_pair(project, tmp_path_factory, "extend", raw, "data/extend")
    built = command("extend", parse_params(raw).launch, "params.yaml")
    assert f"stages.launch: {shlex.join(built)}\n" in stderr
    assert (pair["world_size"], pair["gradient_accumulation_steps"], pair["steps"]) == (2, 1, 6)
    assert pair["tokens_seen"] == 6 * 4 * TARGET  # counted over both processes

    single = extend.run(parse_params(tiny_params_dict()))
    assert (single["world_size"], single["gradient_accumulation_steps"]) == (1, 2)
    assert pair["losses"] == pytest.approx(single["losses"], abs=1e-4)
    _assert_same_weights(written, _adapter_weights(project / "data/extend"), atol=1e-5)


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
@pytest.mark.parametrize("document_attention", [False, True])
def test_two_processes_sharing_every_row_train_as_one(project, tmp_path_factory, document_attention):
    """`launch.sequence_parallel 2` under torchrun with 2 processes (gloo): each process holds half of every row
    (S²-aware sequence parallelism), data parallel 1, so accumulation 2 as in one process. Same data order, the
    whole row's loss as a token average over both halves, gradients summed over the pair: the loss curve and the
    adapter of one process, within fp32 summation order. With document_attention, packed documents cross the
    halves' boundary."""
    extend_section = {"document_attention": document_attention}
    raw = tiny_params_dict(launch={"launcher": "torchrun", "nproc_per_node": 2, "sequence_parallel": 2},
                           extend=extend_section)
    pair, written, _ = launched_pair(project, tmp_path_factory, "extend", raw, "data/extend")
    assert (pair["world_size"], pair["sequence_parallel"], pair["gradient_accumulation_steps"], pair["steps"]) == (
        2, 2, 2, 6)
    assert pair["tokens_seen"] == 6 * 4 * TARGET  # each process counts its half of every row

    single = extend.run(parse_params(tiny_params_dict(extend=extend_section)))
    assert (single["world_size"], single["sequence_parallel"], single["gradient_accumulation_steps"]) == (1, 1, 2)
    assert pair["losses"] == pytest.approx(single["losses"], abs=1e-4)
    _assert_same_weights(written, _adapter_weights(project / "data/extend"), atol=1e-5)


def test_a_world_that_sequence_parallel_does_not_divide_is_refused_before_training(project):
    """Under a launcher other than `launch`'s (a SLURM allocation of another size), the stage checks the world it
    really has."""
    job = extend.prepare_job(_params(launch={"launcher": "torchrun", "nproc_per_node": 2, "sequence_parallel": 2}))
    with pytest.raises(InputError, match=re.escape("launch.sequence_parallel 2 does not divide the 3 processes this "
                                                   "extend run has (WORLD_SIZE)")):
        _training._sequence_parallel(job, 3)
    assert _training._sequence_parallel(job, 4) == 2


# --- bad input: one line, exit 2, nothing written --------------------------------------------------------------


def _cli_run(stage: str, raw: dict, capsys) -> tuple[int, str]:
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    if stage == "merge":
        code = merge.main(["extend", "--params", "params.yaml"])
    else:
        code = _cli.main(stage, extend.run, ["--params", "params.yaml"])
    return code, capsys.readouterr().err.strip()


def _blocks(folder: Path, length: int) -> str:
    folder.mkdir(parents=True)
    writer = PackedBlocksWriter(folder, length, np.uint16)
    rows = np.random.default_rng(0).integers(4, 400, size=(8, length)).astype(np.uint16)
    writer.write(Packed(rows, np.zeros(8, np.int32), np.ones(8, np.int64)))
    writer.close({"vocab_size": 400, "padded_tokens": 0})
    return str(folder)


def _fake_checkpoint(project: Path, shaping_params) -> str:
    """A checkpoint folder as the stage writes it, from the configuration `shaping_params` describes."""
    run_dir = project / "elsewhere/run"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    (run_dir / "checkpoint-4/trainer_state.json").write_text("{}")
    shaping = _training._shaping(extend.prepare_job(shaping_params), 1, None)
    (run_dir / _training.RUN_FILE).write_text(json.dumps({"stage": "extend", "shaping": shaping}))
    return str(run_dir / "checkpoint-4")


def _bad_inputs(project: Path) -> dict[str, tuple[dict, str]]:
    broken = project / "models/broken"
    shutil.copytree(project / "data/base_model", broken)
    (broken / "config.json").write_text("{not json")
    (project / "bad_ds.json").write_text('{"zero_optimization": {"stage": 2,}}')
    (project / "runs/old").mkdir(parents=True)
    (project / "runs/old/.longlora-output.json").write_text(json.dumps({"stage": "merge@extend", "files": ["x"]}))
    (project / "runs/old/x").write_text("an earlier run's model")
    (project / "my_checkpoints").mkdir()
    (project / "my_checkpoints/notes.txt").write_text("mine")
    other = _fake_checkpoint(project, _params(extend={"lr": 0.01}))
    return {
        "missing model": ({"model": {"name_or_path": "models/missing"}},
                          "model.name_or_path 'models/missing': no such folder"),
        "unreadable model": ({"model": {"name_or_path": str(broken)}},
                             f"model.name_or_path {str(broken)!r}: cannot read its config"),
        "blocks of another length": ({"extend": {"data": _blocks(project / "short_blocks", 64)}},
                                     "extend.data '"),
        "group size": ({"s2attn": {"group_size": 48}},
                       "sequence length 128 is not divisible by S²-Attn group size 48"),
        "deepspeed config": ({"extend": {"deepspeed": "bad_ds.json"}},
                             "extend.deepspeed 'bad_ds.json': not valid JSON"),
        "batch": ({"extend": {"global_batch_size": 5}},
                  "extend.global_batch_size: 5 is not divisible by per_device_batch_size 2 × 1 processes"),
        "output of another run": ({"extend": {"out_dir": "runs/old"}},
                                  "extend.out_dir 'runs/old' is the output of stage 'merge@extend', not of extend"),
        "checkpoint folder of the user": ({"extend": {"checkpoint_dir": "my_checkpoints"}},
                                          "extend.checkpoint_dir 'my_checkpoints' holds files the extend stage did "
                                          "not write"),
        "resume from another configuration": ({"extend": {"resume": other}},
                                              f"extend.resume {other!r}: the checkpoint comes from another "
                                              "configuration (extend.lr 0.01 → 0.003)"),
        "resume from a folder that is no checkpoint": ({"extend": {"resume": "data/base_model"}},
                                                       "extend.resume 'data/base_model': not a checkpoint folder"),
    }


CASES = ["missing model", "unreadable model", "blocks of another length", "group size", "deepspeed config", "batch",
         "output of another run", "checkpoint folder of the user", "resume from another configuration",
         "resume from a folder that is no checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_extend_before_training_naming_the_parameter(project, capsys, case):
    overrides, message = _bad_inputs(project)[case]
    before = _snapshot(project)
    code, err = _cli_run("extend", tiny_params_dict(**overrides), capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err
    assert _snapshot(project) == {**before, "params.yaml": (project / "params.yaml").read_bytes()}
    assert not (project / "data/extend").exists() and not (project / "data/checkpoints").exists()


def test_blocks_of_another_length_name_the_file_and_the_context(project, capsys):
    short = _blocks(project / "short_blocks", 64)
    code, err = _cli_run("extend", tiny_params_dict(extend={"data": short}), capsys)
    assert code == 2
    assert err == (f"stages.extend: error: extend.data '{short}/meta.json': blocks of 64 tokens, but "
                   "model.target_context is 128: extension trains on blocks of the target context (rerun "
                   "prepare_pretrain with block_length null)")


def test_a_global_batch_the_world_size_does_not_divide_is_refused(project, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = _cli_run("extend", tiny_params_dict(), capsys)
    assert code == 2 and not Path("data/extend").exists()
    assert err == ("stages.extend: error: extend.global_batch_size 4 is not divisible by per_device_batch_size 2 × "
                   "3 processes = 6; change one of them")


def test_a_deepspeed_config_deepspeed_rejects_is_refused(project, capsys):
    Path("ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "no_such_option": 1}}))
    code, err = _cli_run("extend", tiny_params_dict(extend={"deepspeed": "ds.json"}), capsys)
    assert code == 2 and err.startswith("stages.extend: error: extend.deepspeed: DeepSpeed rejects the config"), err
    assert not Path("data/extend").exists() and not Path("data/checkpoints").exists()


def test_merge_without_an_extended_folder_names_it(project, capsys):
    code, err = _cli_run("merge", tiny_params_dict(), capsys)
    assert code == 2
    assert err == ("stages.merge@extend: error: extend.out_dir 'data/extend': no such folder (run the extend stage "
                   "first)")
    assert not Path("data/extended_model").exists()


# --- nothing silently wrong: divergence, byte-identical reruns ------------------------------------------------------


def test_a_diverging_run_stops_naming_the_step_and_publishes_nothing(project, capsys):
    """An absurd learning rate (1e10) makes the weights NaN after the first optimizer step: the Trainer alone would
    log the loss as 0, write NaN weights and exit 0."""
    code, err = _cli_run("extend", tiny_params_dict(extend={"lr": 1.0e10, "max_steps": 6, "warmup_steps": 0}),
                         capsys)
    errors = [line for line in re.split(r"[\r\n]", err) if "error" in line.lower()]  # the rest: progress bars
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("stages.extend: error: extend: training diverged at step 2: the loss is nan; nothing "
                                "was published. Lower extend.lr"), err
    assert not Path("data/extend").exists() and not Path("data/metrics/extend.json").exists()


def test_a_non_finite_gradient_norm_stops_the_run_where_it_is_logged(project, monkeypatch):
    """The gradient norm is checked where the Trainer logs it, whatever the loss."""
    from transformers import Trainer

    from longlora.errors import NonFiniteError

    monkeypatch.setattr(Trainer, "_get_grad_norm", lambda self, model, grad_norm=None: float("inf"))
    with pytest.raises(NonFiniteError, match="diverged at step 1: the gradient norm is inf"):
        extend.run(parse_params(tiny_params_dict(extend={"max_steps": 3, "log_every": 1})))
    assert not Path("data/extend").exists()


def test_extend_writes_the_same_bytes_under_any_hash_seed(project):
    """PEFT keeps target_modules in a set: its order in adapter_config.json followed PYTHONHASHSEED, so every rerun
    changed the output's hash and DVC reran everything after it."""
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(extend={"max_steps": 2})), encoding="utf-8")
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "stages.extend"], check=True, env=env, capture_output=True)
        outputs.append(_snapshot(project / "data/extend"))
        shutil.rmtree(project / "data/extend")
    assert outputs[0] == outputs[1], [name for name in outputs[0] if outputs[0][name] != outputs[1].get(name)]
    config = json.loads(outputs[0]["adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"])


def _interrupted_run(project: Path, monkeypatch, params) -> list[Path]:
    """A run that trains to the end and dies before publishing (as a kill after the last checkpoint would): its
    checkpoints stay."""
    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(_training, "raise_if_diverged", killed)
        with pytest.raises(KeyboardInterrupt):
            extend.run(params)
    assert not (project / "data/extend").exists()
    return sorted(_complete_checkpoints(project), key=_training._step_of)


def test_a_checkpoint_of_another_base_model_is_never_resumed(project, monkeypatch, caplog):
    """The same params and the same folder name, other weights (the base rebuilt): its checkpoints belong to another
    configuration, and the run starts over."""
    from transformers import AutoModelForCausalLM

    params = parse_params(tiny_params_dict(extend={"max_steps": 4, "checkpoint_every": 2}))
    assert [c.name for c in _interrupted_run(project, monkeypatch, params)] == ["checkpoint-2", "checkpoint-4"]
    base = AutoModelForCausalLM.from_pretrained("data/base_model")
    with torch.no_grad():
        base.model.norm.weight.mul_(1.01)
    base.save_pretrained("data/base_model")
    with caplog.at_level("INFO"):
        extend.run(params)
    assert json.loads((run_log("extend") / TIMINGS_FILE).read_text())["resumed_from_step"] is None
    assert "resuming from" not in caplog.text
    assert "also holds checkpoints of other configurations" in caplog.text


def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_it_resumed(project, monkeypatch, caplog):
    params = parse_params(tiny_params_dict(extend={"max_steps": 4, "checkpoint_every": 2}))
    first, latest = (c.relative_to(project) for c in _interrupted_run(project, monkeypatch, params))
    optimizer = project / latest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    with caplog.at_level("INFO"):
        extend.run(params)
    assert json.loads((run_log("extend") / TIMINGS_FILE).read_text())["resumed_from_step"] == 2
    assert f"checkpoint {latest} is unreadable (optimizer.pt: not a whole torch archive" in caplog.text
    assert f"resuming from the one before it, {first}" in caplog.text
    assert f"moved it to {latest.parent / 'corrupt-checkpoint-4'}" in caplog.text
    # The run completed: its configuration's folder went, the checkpoint set aside with it.
    assert not (project / latest.parent).exists() and (project / "data/extend/adapter_model.safetensors").is_file()


def test_sigterm_ends_a_stage_as_ctrl_c_does_leaving_no_lock_or_temporary_folder(project):
    """What `timeout`, SLURM and Docker send: the stage exits 143 and takes its lock and temporary folders with it."""
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(extend={"max_steps": 100000})), encoding="utf-8")
    child = subprocess.Popen([sys.executable, "-m", "stages.extend"], env=_stage_env(), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        marker = project / "data/checkpoints/extend" / _training.CHECKPOINTS_MARKER
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (project / "data/.extend.lock").exists(), "the run holds its lock while it trains"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert err.strip().splitlines()[-1] == "stages.extend: terminated (SIGTERM): nothing was published"
    assert sorted(p.name for p in (project / "data").iterdir()) == ["base_model", "checkpoints", "pretrain"]
