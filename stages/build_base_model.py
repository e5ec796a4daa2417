"""Stage `build_base_model`: the embedded default base model, built and briefly pre-trained here, offline.

    .venv/bin/python -m stages.build_base_model     # or: dvc repro build_base_model

A byte-level BPE tokenizer (1024 tokens) and a 0.79M-parameter Llama (4 layers, tied embeddings) pre-trained on
batches of 8 × 256 tokens of the base split of the Python standard library sources, three quarters of each batch
synthetic sequences built around that code (longlora/embedded/synthetic.py: haystacks, key-value recall, copies),
written as a
Hugging Face folder (safetensors) that later stages load like `meta-llama/Llama-2-7b-hf`. Its metrics say how much it
uses its context: held-out loss by position, bits per byte, planted-value recall and passkey retrieval at 256 tokens.
The default model is built once and shipped in git (the stage is frozen in dvc.yaml): `make base-model` rebuilds it
and `python -m stages.build_base_model provenance` records how (docs/base-model.md: what it measures, how long it
takes).
The training loss (mean of every 10 steps) and learning rate go to dvclive's log in the run log,
data/logs/build_base_model/dvclive/ (`dvc plots show` draws them). A killed run resumes from its last checkpoint (an
unreadable one is set aside with a warning, and the run starts over). When `model.name_or_path` names another model
(the full-size profile), there is nothing to build: the stage writes only a note saying so, and later stages load
that model. The output folder is replaced only when it is this
stage's own earlier output (longlora/io.py); a second run at the same time fails at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, get_wsd_schedule

from longlora.checkpoint import load_checkpoint, save_checkpoint
from longlora.data.packing import cut_blocks, join_encoded
from longlora.data.tokenizing import BatchEncoder, rust_parallelism
from longlora.embedded.probes import bits_per_byte, bucket_means, loss_by_position, masked_accuracy
from longlora.embedded.synthetic import SyntheticSequences, corpus_words
from longlora.embedded.tiny import tiny_llama_config, train_bpe_tokenizer
from longlora.errors import InputError, diverged, raise_if_diverged
from longlora.evaluation.passkey import PASSKEY_DEPTHS, passkey_accuracy
from longlora.io import TIMINGS_FILE, StageOutput, file_digests, run_log, same_path, write_json
from stages import _cli
from stages.params import Params
from stages.sections import BuildBaseModelParams

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 50
# The loss curve's resolution: the mean training loss of every LOG_EVERY steps (and of the last, shorter stretch).
LOG_EVERY = 10
# Independent random streams derived from build_base_model.seed: training batches (one per step) and held-out probes.
_TRAINING, _PROBES = 0, 1


def run(params: Params) -> dict:
    """Build the tokenizer, pre-train the tiny Llama, save both, return metrics."""
    with params.output("build_base_model") as out:
        if not same_path(params.model.name_or_path, params.build_base_model.out_dir):
            return _skip(params, out)
        return _build(params, out)


def _build(params: Params, out: StageOutput) -> dict:
    p = params.build_base_model
    torch.manual_seed(p.seed)
    base_texts = [d.text for d in params.embedded_corpus.documents("base")]
    tokenizer = train_bpe_tokenizer(base_texts, p.vocab_size)
    code = token_stream(tokenizer, base_texts)
    heldout = token_stream(tokenizer, [d.text for d in params.embedded_corpus.documents("heldout")])
    if len(code) < 2 * p.context_length or len(heldout) < p.context_length:
        raise InputError(f"embedded_corpus: too little text for build_base_model.context_length {p.context_length}: "
                         f"{len(code)} training and {len(heldout)} held-out tokens")
    model = LlamaForCausalLM(tiny_llama_config(
        tokenizer, p.hidden_size, p.intermediate_size, p.num_layers, p.num_heads, p.num_kv_heads, p.context_length,
        tie_word_embeddings=p.tie_word_embeddings,
    ))
    heldout_blocks = _spread_blocks(heldout, p.context_length, p.eval_blocks)
    initial_loss = float(loss_by_position(model, heldout_blocks).mean())
    # Names for the planted facts come from the corpus's own words (minus the passkey prompt's): an open set, so
    # that looking a name up cannot be learnt by heart.
    synthetic = SyntheticSequences(tokenizer, code, p.context_length, prose_share=p.prose_share,
                                   words=corpus_words("\n".join(base_texts)))
    final_train_loss = _pretrain(model, code, synthetic, p, _checkpoint_path(p), out.log_dir / "dvclive")
    context = _context_use(model, tokenizer, heldout, heldout_blocks, p)

    with out.publish() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    _checkpoint_path(p).unlink(missing_ok=True)
    metrics = {
        "built": True,
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_tokens": int(len(code)),
        "tokens_seen": p.steps * p.batch_size * p.context_length,
        "initial_heldout_loss": round(initial_loss, 4),
        "final_train_loss": round(final_train_loss, 4),
        **context,
    }
    return out.write_metrics(metrics)


def _skip(params: Params, out: StageOutput) -> dict:
    """Keep the stage's outputs well-defined (DVC expects them) without building anything."""
    note = (
        f"No embedded base model was built: model.name_or_path is {params.model.name_or_path!r}.\n"
        f"Set it to {str(params.build_base_model.out_dir)!r} to build and use the tiny embedded default.\n"
    )
    with out.publish() as tmp:
        (tmp / "NOT_BUILT.txt").write_text(note, encoding="utf-8")
    return out.write_metrics({"built": False, "base_model": params.model.name_or_path})


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """The documents as one token stream, each `BOS text EOS`: encoded as the data stages do, on every core (the
    tokenizer's own call runs on one)."""
    with rust_parallelism():
        lengths, flat = BatchEncoder(tokenizer, np.int32)(texts)
    return join_encoded(lengths, flat, eos_id=tokenizer.eos_token_id, bos_id=tokenizer.bos_token_id)[0]


def _spread_blocks(stream: np.ndarray, length: int, n: int) -> torch.Tensor:
    """`n` windows of `length` tokens spread evenly over the stream (not just its first files)."""
    blocks = cut_blocks(stream, length)
    picked = np.unique(np.linspace(0, len(blocks) - 1, num=min(n, len(blocks))).round().astype(int))
    return torch.from_numpy(blocks[picked].astype(np.int64))


def _checkpoint_path(p: BuildBaseModelParams) -> Path:
    return p.out_dir.with_name(f".{p.out_dir.name}.checkpoint.pt")


def _batch(step: int, code_blocks: np.ndarray, synthetic: SyntheticSequences, p: BuildBaseModelParams) -> torch.Tensor:
    """The batch of `step`: a pure function of (seed, step), so a resumed run sees exactly the same data."""
    rng = np.random.default_rng([p.seed, _TRAINING, step])
    n_synthetic = round(p.synthetic_share * p.batch_size)
    rows = code_blocks[rng.integers(len(code_blocks), size=p.batch_size - n_synthetic)].astype(np.int64)
    if n_synthetic:
        rows = np.concatenate([rows, synthetic.batch(n_synthetic, p.recall_share, rng, p.haystack_share)[0]])
    return torch.from_numpy(rows)


def _pretrain(model: LlamaForCausalLM, code: np.ndarray, synthetic: SyntheticSequences, p: BuildBaseModelParams,
              checkpoint: Path, log_dir: Path) -> float:
    """Next-token training on code and synthetic recall; checkpoints every CHECKPOINT_EVERY steps, resumes. The loss
    curve goes to dvclive's log in `log_dir` (the run log, as extend's and sft's: `dvc plots show` draws it)."""
    from dvclive import Live

    code_blocks = cut_blocks(code, p.context_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)
    decay_steps = max(1, round(p.decay_share * p.steps))
    schedule = get_wsd_schedule(optimizer, p.warmup_steps, decay_steps, num_training_steps=p.steps,
                                decay_type="linear")
    start = _resume(checkpoint, p, model, optimizer, schedule)
    model.train()
    loss = torch.tensor(float("nan"))
    since_logged: list[float] = []
    # dvcyaml=None: dvclive must not rewrite dvc.yaml during `dvc repro`; a resumed run continues its curve.
    live = Live(str(log_dir), resume=start > 0, dvcyaml=None, save_dvc_exp=False, report=None)
    with live, tqdm(range(start, p.steps), desc="pre-train base model", initial=start, total=p.steps) as bar:
        for step in bar:
            lr = schedule.get_last_lr()[0]
            loss = train_step(model, _batch(step, code_blocks, synthetic, p), optimizer, schedule)
            if not math.isfinite(loss.item()):
                raise diverged("build_base_model", step + 1, f"the loss is {loss.item()}")
            bar.set_postfix(loss=f"{loss.item():.3f}")
            since_logged.append(loss.item())
            if (step + 1) % LOG_EVERY == 0 or step + 1 == p.steps:
                live.step = step + 1
                live.log_metric("loss", round(sum(since_logged) / len(since_logged), 4))
                live.log_metric("learning_rate", lr)
                live.next_step()
                since_logged.clear()
            if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < p.steps:
                _save_checkpoint(checkpoint, p, step + 1, model, optimizer, schedule)
    raise_if_diverged("build_base_model", model, p.steps)
    return loss.item()


def train_step(model: LlamaForCausalLM, batch: torch.Tensor, optimizer, schedule) -> torch.Tensor:
    """One next-token step on `batch` (gradients clipped to norm 1); returns the loss."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _save_checkpoint(path: Path, p: BuildBaseModelParams, step: int, model, optimizer, schedule) -> None:
    save_checkpoint(path, {
        "params": p.model_dump(mode="json"),
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    })


def _resume(path: Path, p: BuildBaseModelParams, model, optimizer, schedule) -> int:
    """Load a checkpoint written with the same parameters; return the step to continue from (0 if none)."""
    state = load_checkpoint(path, required=("params", "step", "model", "optimizer", "schedule"))
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
    log.info("resuming pre-training from step %d (%s)", state["step"], path)
    return state["step"]


def _context_use(model: LlamaForCausalLM, tokenizer, heldout: np.ndarray, blocks: torch.Tensor,
                 p: BuildBaseModelParams) -> dict:
    """Held-out loss by position, perplexity and bits per byte, synthetic recall and passkey retrieval."""
    per_position = loss_by_position(model, blocks)
    buckets = bucket_means(per_position)
    loss = float(per_position.mean())
    probes = SyntheticSequences(tokenizer, heldout, p.context_length, prose_share=p.prose_share)
    recall_ids, recall_mask = probes.batch(p.eval_blocks, 1.0, np.random.default_rng([p.seed, _PROBES]))
    metrics = {
        "heldout_loss": round(loss, 4),
        "heldout_ppl": round(math.exp(loss), 3),
        "heldout_bits_per_byte": round(bits_per_byte(tokenizer, blocks, loss), 4),
        "loss_by_position": {name: round(value, 4) for name, value in buckets.items()},
        # What 100+ more tokens of context are worth; None when the window is too short to tell.
        "context_gain": (round(buckets["8-32"] - buckets["128-256"], 4)
                         if {"8-32", "128-256"} <= buckets.keys() else None),
        "recall_accuracy": round(masked_accuracy(model, torch.from_numpy(recall_ids),
                                                 torch.from_numpy(recall_mask)), 4),
        "passkey_accuracy": None,
    }
    if p.passkey_trials:
        try:
            accuracy = passkey_accuracy(model, tokenizer, p.context_length, PASSKEY_DEPTHS, p.passkey_trials)
        except ValueError as err:  # a context too short for the prompt (tiny test configurations)
            log.info("no passkey probe: %s", err)
        else:
            metrics["passkey_accuracy"] = round(accuracy, 4)
    return metrics


def provenance_path(p: BuildBaseModelParams) -> Path:
    """Where the record of how the shipped base model was built lives: beside its folder."""
    return p.out_dir.with_name(f"{p.out_dir.name}.provenance.json")


def shipped_params(params: Params) -> dict:
    """The parameters that shape the base model: what its provenance records and the test compares."""
    return {"embedded_corpus": params.embedded_corpus.model_dump(mode="json"),
            "build_base_model": params.build_base_model.model_dump(mode="json")}


def record_provenance(params: Params) -> dict:
    """Write `<out_dir>.provenance.json` for the model this stage just built: the command, the params, the commit,
    the build's seconds and software, and the sha256 of every file (tests/test_shipped_base_model.py checks the
    committed folder against it)."""
    import platform
    import subprocess

    import transformers

    p = params.build_base_model
    metrics_file, timings_file = p.metrics_file, run_log("build_base_model") / TIMINGS_FILE
    if not (p.out_dir / "model.safetensors").is_file() or not timings_file.is_file():
        raise InputError(f"{p.out_dir}: no base model built here to record (run `python -m stages.build_base_model` "
                         f"first; it writes {timings_file})")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    record = {
        "command": "make base-model",
        "commit": git("rev-parse", "HEAD") or None,
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "params": shipped_params(params),
        "seconds": json.loads(timings_file.read_text(encoding="utf-8"))["seconds"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "metrics": json.loads(metrics_file.read_text(encoding="utf-8")),
        "files": file_digests(p.out_dir),
    }
    write_json(provenance_path(p), record)
    return record


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.build_base_model [--params …]` builds; `… provenance [--params …]` records the build."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["provenance"]:
        return _cli.main("build_base_model provenance", lambda params: {"recorded": str(provenance_path(
            params.build_base_model)), "files": len(record_provenance(params)["files"])}, argv[1:])
    return _cli.main("build_base_model", run, argv)


if __name__ == "__main__":
    _cli.exit_process(main())
