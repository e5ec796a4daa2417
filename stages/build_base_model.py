"""Stage `build_base_model`: the embedded default base model, built and briefly pre-trained here, offline.

    .venv/bin/python -m stages.build_base_model     # or: dvc repro build_base_model

On 2 CPU cores (the default params) it takes about 2.5 minutes: a byte-level BPE tokenizer (4096 tokens) and a
3.1M-parameter Llama pre-trained for 400 steps at 256 tokens on the base split of the Python standard library
sources, written as a Hugging Face folder (safetensors) that later stages load like `meta-llama/Llama-2-7b-hf`.
Expected (Python 3.11.7): held-out loss 4.95 nats/token (perplexity ~140), from 8.36 at initialisation.
A killed run resumes from its last checkpoint (an unreadable one is set aside with a warning, and the run starts
over). When `model.name_or_path` names another model (the full-size profile), there is nothing to build: the stage
writes only a note saying so, and later stages load that model. The output folder is replaced only when it is this
stage's own earlier output (longlora/io.py); a second run at the same time fails at once.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from longlora.checkpoint import load_checkpoint
from longlora.io import StageOutput, same_path
from longlora.packing import cut_blocks, join_documents
from longlora.tiny import tiny_llama_config, train_bpe_tokenizer
from stages import _cli
from stages.params import BaseModelParams, Params

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 50


def run(params: Params) -> dict:
    """Build the tokenizer, pre-train the tiny Llama, save both, return metrics."""
    with params.output("build_base_model") as out:
        if not same_path(params.model.name_or_path, params.base_model.out_dir):
            return _skip(params, out)
        return _build(params, out)


def _build(params: Params, out: StageOutput) -> dict:
    p = params.base_model
    started = time.perf_counter()
    torch.manual_seed(p.seed)
    base_texts = [d.text for d in params.corpus.documents("base")]
    tokenizer = train_bpe_tokenizer(base_texts, p.vocab_size)
    train_blocks = _blocks(tokenizer, base_texts, p.context_length)
    heldout_blocks = _blocks(tokenizer, [d.text for d in params.corpus.documents("heldout")], p.context_length)
    heldout_blocks = heldout_blocks[: p.eval_blocks]

    model = LlamaForCausalLM(tiny_llama_config(
        tokenizer, p.hidden_size, p.intermediate_size, p.num_layers, p.num_heads, p.num_kv_heads, p.context_length
    ))
    initial_loss = _mean_loss(model, heldout_blocks)
    final_train_loss = _pretrain(model, train_blocks, p, _checkpoint_path(p))
    heldout_loss = _mean_loss(model, heldout_blocks)

    with out.publish() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    _checkpoint_path(p).unlink(missing_ok=True)
    metrics = {
        "built": True,
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_tokens": int(train_blocks.size),
        "initial_heldout_loss": round(initial_loss, 4),
        "final_train_loss": round(final_train_loss, 4),
        "heldout_loss": round(heldout_loss, 4),
        "heldout_ppl": round(math.exp(heldout_loss), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return out.write_metrics(metrics)


def _skip(params: Params, out: StageOutput) -> dict:
    """Keep the stage's outputs well-defined (DVC expects them) without building anything."""
    note = (
        f"No embedded base model was built: model.name_or_path is {params.model.name_or_path!r}.\n"
        f"Set it to {str(params.base_model.out_dir)!r} to build and use the tiny embedded default.\n"
    )
    with out.publish() as tmp:
        (tmp / "NOT_BUILT.txt").write_text(note, encoding="utf-8")
    return out.write_metrics({"built": False, "base_model": params.model.name_or_path})



def _blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_len: int) -> np.ndarray:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = join_documents(ids, eos_id=tokenizer.eos_token_id, bos_id=tokenizer.bos_token_id)
    return cut_blocks(stream, block_len)


def _checkpoint_path(p: BaseModelParams) -> Path:
    return p.out_dir.with_name(f".{p.out_dir.name}.checkpoint.pt")


def _pretrain(model: LlamaForCausalLM, blocks: np.ndarray, p: BaseModelParams, checkpoint: Path) -> float:
    """Next-token training on random blocks; checkpoints every CHECKPOINT_EVERY steps and resumes from one."""
    data = torch.from_numpy(blocks.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, p.warmup_steps, p.steps)
    sampler = torch.Generator().manual_seed(p.seed)
    start = _resume(checkpoint, p, model, optimizer, schedule, sampler)
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(range(start, p.steps), desc="pre-train base model", initial=start, total=p.steps) as bar:
        for step in bar:
            batch = data[torch.randint(len(data), (p.batch_size,), generator=sampler)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < p.steps:
                _save_checkpoint(checkpoint, p, step + 1, model, optimizer, schedule, sampler)
    return loss.item()


def _save_checkpoint(path: Path, p: BaseModelParams, step: int, model, optimizer, schedule, sampler) -> None:
    state = {
        "params": p.model_dump(mode="json"),
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "sampler": sampler.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(path: Path, p: BaseModelParams, model, optimizer, schedule, sampler) -> int:
    """Load a checkpoint written with the same parameters; return the step to continue from (0 if none)."""
    state = load_checkpoint(path, required=("params", "step", "model", "optimizer", "schedule", "sampler"))
    if state is None:
        return 0
    if state["params"] != p.model_dump(mode="json"):
        log.info("ignoring checkpoint %s: it was written with other parameters", path)
        return 0
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if {name: tuple(t.shape) for name, t in state["model"].items()} != expected:
        log.info("ignoring checkpoint %s: it was written for another model architecture", path)
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    sampler.set_state(state["sampler"])
    log.info("resuming pre-training from step %d (%s)", state["step"], path)
    return state["step"]


@torch.no_grad()
def _mean_loss(model: LlamaForCausalLM, blocks: np.ndarray, batch_size: int = 8) -> float:
    model.eval()
    data = torch.from_numpy(blocks.astype(np.int64))
    losses, weights = [], []
    for batch in data.split(batch_size):
        losses.append(model(input_ids=batch, labels=batch).loss.item())
        weights.append(len(batch))
    model.train()
    return float(np.average(losses, weights=weights))


if __name__ == "__main__":
    raise SystemExit(_cli.main("build_base_model", run))
