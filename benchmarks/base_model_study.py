"""Study: which tiny base model learns to use its 256-token context within a few CPU minutes.

    python benchmarks/base_model_study.py prep --vocab 4096 --out /tmp/study/v4096
    python benchmarks/base_model_study.py train --data /tmp/study/v4096 --hidden 256 --layers 4 --heads 4 ...

Prints (and writes with --out) the held-out loss by position, perplexity at 256 and passkey accuracy at 256.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup, get_wsd_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longlora.embedded.probes import bits_per_byte, bucket_means, loss_by_position, masked_accuracy  # noqa: E402
from longlora.embedded.synthetic import WORDS, SyntheticSequences, corpus_words  # noqa: E402
from longlora.embedded.tiny import tiny_llama_config  # noqa: E402
from longlora.evaluation.passkey import PASSKEY_DEPTHS, passkey_accuracy  # noqa: E402
from stages.build_base_model import token_stream, train_step  # noqa: E402


def prep(args) -> None:
    from longlora.embedded.corpus import stdlib_documents
    from longlora.embedded.tiny import train_bpe_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [d.text for d in stdlib_documents("base")]
    tokenizer = train_bpe_tokenizer(base, args.vocab)
    tokenizer.save_pretrained(out)
    for split, texts in (("base", base), ("heldout", [d.text for d in stdlib_documents("heldout")])):
        stream = token_stream(tokenizer, texts)
        np.save(out / f"{split}.npy", stream)
        print(split, len(stream), "tokens", file=sys.stderr)


def evaluate(model, tokenizer, heldout_blocks, recall_eval, copy_eval, passkey_trials, haystack_eval=None) -> dict:
    per_pos = loss_by_position(model, heldout_blocks)
    buckets = {name: round(value, 4) for name, value in bucket_means(per_pos).items()}
    result = {
        "heldout_loss": round(float(per_pos.mean()), 4),
        "ppl_256": round(math.exp(float(per_pos.mean())), 2),
        "loss_by_position": buckets,
        "context_gain": round(buckets["8-32"] - buckets["128-256"], 4),
        "recall_acc": round(masked_accuracy(model, *recall_eval), 3),
        "copy_acc": round(masked_accuracy(model, *copy_eval), 3),
    }
    if haystack_eval is not None:
        result["haystack_acc"] = round(masked_accuracy(model, *haystack_eval), 3)
    if passkey_trials:
        result["passkey_256"] = passkey_accuracy(model, tokenizer, 256, PASSKEY_DEPTHS, passkey_trials)
    return result


def train(args) -> None:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = Path(args.data)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data)
    base = np.load(data / "base.npy")
    heldout = np.load(data / "heldout.npy")
    L = args.context
    n_blocks = len(base) // L
    blocks = torch.from_numpy(base[: n_blocks * L].reshape(n_blocks, L).astype(np.int64))
    held = torch.from_numpy(heldout[: (len(heldout) // L) * L].reshape(-1, L).astype(np.int64))
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(1))[: args.eval_blocks]].to(device)
    words = corpus_words(tokenizer.decode(base.tolist())) if args.corpus_words else WORDS
    synth = SyntheticSequences(tokenizer, base, L, prose_share=args.prose_share, words=words)
    short_synth = SyntheticSequences(tokenizer, base, args.short_len, prose_share=args.prose_share, words=words)
    probes = SyntheticSequences(tokenizer, heldout, L)
    recall_eval = [torch.from_numpy(a).to(device) for a in probes.batch(64, 1.0, np.random.default_rng(12345))]
    copy_eval = [torch.from_numpy(a).to(device) for a in probes.batch(64, 0.0, np.random.default_rng(12346))]
    haystack_eval = [torch.from_numpy(a).to(device) for a in probes.batch(64, 0.0, np.random.default_rng(12347), 1.0)]

    config = tiny_llama_config(tokenizer, args.hidden, args.ff, args.layers, args.heads, args.kv or args.heads, L,
                               tie_word_embeddings=args.tie)
    config.initializer_range = args.init
    config.rope_parameters["rope_theta"] = args.theta  # read when the model is built, below
    model = LlamaForCausalLM(config)
    if args.mimetic:
        # Mimetic initialisation (Trockman & Kolter, 2023): W_k = W_q so heads start out attending to similar
        # tokens, W_o = W_v^T so they start out copying what they attend to.
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                attn.q_proj.weight.normal_(0, args.mimetic)
                attn.k_proj.weight.copy_(attn.q_proj.weight[: attn.k_proj.weight.shape[0]])
                attn.o_proj.weight.copy_(attn.v_proj.weight.T.repeat(1, args.hidden // attn.v_proj.weight.shape[0]))
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.wd)
    if args.schedule == "cosine":
        schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    else:  # warm-up, constant, then a linear decay to zero over the last `decay` share of the steps (as the stage)
        schedule = get_wsd_schedule(optimizer, args.warmup, max(1, round(args.decay * args.steps)),
                                    num_training_steps=args.steps, decay_type="linear")
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    started = time.perf_counter()
    model.train()
    step = 0
    for step in range(args.steps):
        frac = step / max(args.steps - 1, 1)
        share = args.syn_start + (args.syn_end - args.syn_start) * min(frac / args.syn_ramp, 1.0)
        n_syn = int(round(share * args.batch))
        rng = np.random.default_rng([args.seed, 0, step])
        batch = blocks[torch.randint(len(blocks), (args.batch - n_syn,), generator=gen)]
        if n_syn:
            rows = synth.batch(n_syn, args.recall_share, rng, args.haystack_share)[0]
            batch = torch.cat([batch, torch.from_numpy(rows)])
        if step < args.short_steps:  # short windows first: attention is less diluted while heads form
            per = L // args.short_len
            code = batch[: args.batch - n_syn].reshape(-1, args.short_len)
            batch = code
            if n_syn:
                rows = short_synth.batch(n_syn * per, args.recall_share, rng, args.haystack_share)[0]
                batch = torch.cat([code, torch.from_numpy(rows)])
        loss = train_step(model, batch.to(device), optimizer, schedule)
        if (step + 1) % args.log_every == 0:
            seconds = round(time.perf_counter() - started, 1)
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": seconds}
            if args.eval_every and (step + 1) % args.eval_every == 0:
                entry.update(evaluate(model, tokenizer, held, recall_eval, copy_eval, 0, haystack_eval))
            log.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
        if args.seconds and time.perf_counter() - started > args.seconds:
            break
    train_seconds = time.perf_counter() - started
    result = {
        "args": vars(args), "parameters": params, "steps_done": step + 1, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round((step + 1) * args.batch * L / train_seconds, 1),
        **evaluate(model, tokenizer, held, recall_eval, copy_eval, args.passkey_trials, haystack_eval), "log": log,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


def evaluate_folder(args) -> None:
    """A saved model on a prepare_eval stream (non-overlapping windows) and on passkey prompts, with the answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora.data.packing import TokenStream
    from longlora.evaluation.passkey import passkey_trial

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stream = TokenStream(args.stream)
    tokens = np.concatenate([stream.document(i) for i in range(len(stream))]).astype(np.int64)
    L = args.context
    blocks = torch.from_numpy(tokens[: len(tokens) // L * L].reshape(-1, L))[: args.eval_blocks]
    per_pos = loss_by_position(model, blocks)
    loss = float(per_pos.mean())
    result = {"model": args.model, "windows": len(blocks), "loss": round(loss, 4), "ppl": round(math.exp(loss), 2),
              "bits_per_byte": round(bits_per_byte(tokenizer, blocks, loss), 4),
              "loss_by_position": {k: round(v, 3) for k, v in bucket_means(per_pos).items()}}
    trials = [passkey_trial(model, tokenizer, L, depth, seed)
              for depth in PASSKEY_DEPTHS for seed in range(args.passkey_trials)]
    result["passkey"] = sum(t.correct for t in trials) / len(trials)
    shown = trials[:: max(1, len(trials) // 10)]
    result["passkey_answers"] = [f"{t.depth}:{t.key}->{t.answer.strip()!r}" for t in shown]
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out")
    t.add_argument("--save")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--context", type=int, default=256)
    t.add_argument("--hidden", type=int, default=192)
    t.add_argument("--ff", type=int, default=512)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=6)
    t.add_argument("--kv", type=int, default=0)
    t.add_argument("--theta", type=float, default=10000.0)
    t.add_argument("--tie", action="store_true")
    t.add_argument("--init", type=float, default=0.02)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--seconds", type=float, default=0)
    t.add_argument("--lr", type=float, default=4e-3)
    t.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine")
    t.add_argument("--decay", type=float, default=0.2)
    t.add_argument("--prose-share", type=float, default=0.0)
    t.add_argument("--mimetic", type=float, default=0.0)
    t.add_argument("--short-steps", type=int, default=0)
    t.add_argument("--short-len", type=int, default=64)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--syn-start", type=float, default=0.0)
    t.add_argument("--syn-end", type=float, default=0.0)
    t.add_argument("--syn-ramp", type=float, default=1.0)
    t.add_argument("--haystack-share", type=float, default=0.0)
    t.add_argument("--corpus-words", action="store_true", help="names drawn from the corpus's words, not WORDS")
    t.add_argument("--recall-share", type=float, default=0.5)
    t.add_argument("--eval-blocks", type=int, default=64)
    t.add_argument("--passkey-trials", type=int, default=4)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=0)
    e = sub.add_parser("evaluate")
    e.add_argument("--model", required=True)
    e.add_argument("--stream", default="data/eval")
    e.add_argument("--context", type=int, default=256)
    e.add_argument("--eval-blocks", type=int, default=256)
    e.add_argument("--passkey-trials", type=int, default=4)
    args = parser.parse_args()
    {"prep": prep, "train": train, "evaluate": evaluate_folder}[args.cmd](args)


if __name__ == "__main__":
    main()
