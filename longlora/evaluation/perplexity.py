"""Perplexity of a causal LM on a flat token stream (prepare_eval's tokens.bin): the standard strided number and
LongLoRA's own.

    from longlora.evaluation.perplexity import strided_perplexity, windowed_perplexity
    strided_perplexity(model, tokens, seq_len=8192)["perplexity"]          # each token of whole windows once
    windowed_perplexity(model, tokens, seq_len=8192, step=256)["perplexity"]  # the paper's tables (eval.py)

The two differ on purpose. `strided_perplexity` scores each token at most once (whole windows of `seq_len` every
`stride` tokens, each scoring only the tokens no earlier window scored): exp(total NLL / tokens scored). Every window
holds `seq_len` tokens, so the number is about that context length: the stream's first token, and the tail after the
last whole window (fewer than `stride` tokens), are not scored, and `tokens_scored` says how many were.
`windowed_perplexity` is the reference's `eval.py`: full windows starting every `step` tokens over
`range(0, len(tokens) - seq_len, step)` minus its last start, each window's mean loss with labels = inputs, and exp
of the mean of those means — so a token is scored up to seq_len / step times, each time with a different amount of
context. (The reference raises
2.71828 rather than e to that power: a relative difference below 1e-6 × the loss.)

Both run batched under `torch.no_grad` with the model's attention as loaded (dense for `load_for_evaluation`), or
S²-Attn for the duration of the call (`attention="s2"`: the paper reports both; models trained with S²-Attn score
better with dense attention).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longlora.recipe import DEFAULT_GROUP_SIZE_RATIO, Attention


def _as_tokens(tokens) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected a 1-D integer token array, got shape {array.shape} of {array.dtype}")
    return array


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a window scores the tokens after its first), got {seq_len}")
    if len(tokens) < seq_len:
        raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than one window of seq_len {seq_len}")


def strided_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(window start, first token it scores) of every full window: starts 0, stride, 2·stride, … while a whole
    window of `seq_len` fits; each window scores its tokens from the end of the previous window on (the first
    window from its second token)."""
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len {seq_len}], got {stride}")
    windows, scored_until = [], 0
    for start in range(0, n_tokens - seq_len + 1, stride):
        windows.append((start, max(scored_until, start + 1)))
        scored_until = start + seq_len
    return windows


def reference_windows(n_tokens: int, seq_len: int, step: int = 256) -> list[int]:
    """Window starts of LongLoRA's eval.py (`get_as_batch`): range(0, n_tokens - seq_len, step), last one dropped."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    return list(range(0, n_tokens - seq_len, step))[:-1]


@contextlib.contextmanager
def attention_for_evaluation(model, attention: Attention = "dense", group_size_ratio: float | None =
                             DEFAULT_GROUP_SIZE_RATIO, group_size: int | None = None) -> Iterator[None]:
    """Evaluate with `attention` inside the block: `dense` leaves the model as loaded; `s2` switches it to S²-Attn
    (groups of group_size, else group_size_ratio × the window) in eval mode too, and restores it afterwards."""
    if attention == "dense":
        yield
        return
    if attention != "s2":
        raise ValueError(f"attention must be dense or s2, got {attention!r}")
    from longlora.method.s2attn import S2ATTN, configure_s2attn

    config = model.config
    saved = {name: getattr(config, name, None) for name in ("s2attn_group_size", "s2attn_group_size_ratio",
                                                            "s2attn_shift", "s2attn_in_eval")}
    implementation = config._attn_implementation
    configure_s2attn(model, group_size=group_size,
                     group_size_ratio=DEFAULT_GROUP_SIZE_RATIO if group_size_ratio is None else group_size_ratio)
    config.s2attn_in_eval = True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        if implementation != S2ATTN:
            model.set_attn_implementation(implementation)


_NLL_CHUNK = 4096
"""Positions whose logits are upcast to float32 at a time: at 100k tokens × a 32k vocabulary, upcasting all of them at
once would take 13 GB more than the model's own bfloat16 logits."""


def _token_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """(windows, seq_len − 1) negative log-likelihood of tokens 1… of each window given the tokens before them."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    targets = batch[:, 1:]
    return torch.cat([F.cross_entropy(logits[:, i:i + _NLL_CHUNK].float().transpose(1, 2),
                                      targets[:, i:i + _NLL_CHUNK], reduction="none")
                      for i in range(0, targets.shape[1], _NLL_CHUNK)], dim=1)


def _batches(tokens: np.ndarray, starts: Sequence[int], seq_len: int, batch_size: int,
             device: torch.device) -> Iterator[tuple[list[int], torch.Tensor]]:
    for i in range(0, len(starts), batch_size):
        chunk = list(starts[i:i + batch_size])
        windows = np.stack([tokens[s:s + seq_len] for s in chunk]).astype(np.int64)
        yield chunk, torch.from_numpy(windows).to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def strided_perplexity(model, tokens, seq_len: int, stride: int | None = None, *, batch_size: int = 1,
                       attention: Attention = "dense", group_size_ratio: float | None = DEFAULT_GROUP_SIZE_RATIO,
                       group_size: int | None = None, progress: bool = True) -> dict:
    """The standard perplexity: whole windows of `seq_len` every `stride` tokens (default `seq_len`), each token
    scored at most once, from the tokens before it inside its window. Not scored: the stream's first token, with
    stride == seq_len each window's first, and the tail after the last whole window (fewer than `stride` tokens;
    a shorter final window, as Hugging Face's perplexity guide scores it, would mix in a shorter context).
    Returns {"perplexity", "nll", "tokens_scored", "windows"}."""
    tokens = _as_tokens(tokens)
    _check_length(tokens, seq_len)
    windows = strided_windows(len(tokens), seq_len, stride)
    first_scored = dict(windows)
    total_nll, scored = 0.0, 0
    with attention_for_evaluation(model, attention, group_size_ratio, group_size):
        starts = [start for start, _ in windows]
        bar = tqdm(total=len(starts), desc=f"strided perplexity @{seq_len}", unit="window", disable=not progress)
        for chunk, batch in _batches(tokens, starts, seq_len, batch_size, _device(model)):
            nll = _token_nll(model, batch)
            for row, start in enumerate(chunk):
                # nll[:, j] is token start + 1 + j.
                first = first_scored[start] - start - 1
                total_nll += nll[row, first:].double().sum().item()
                scored += seq_len - 1 - first
            bar.update(len(chunk))
        bar.close()
    return {"perplexity": math.exp(total_nll / scored), "nll": total_nll / scored, "tokens_scored": scored,
            "windows": len(windows)}


@torch.no_grad()
def windowed_perplexity(model, tokens, seq_len: int, step: int = 256, *, batch_size: int = 1,
                        attention: Attention = "dense", group_size_ratio: float | None = DEFAULT_GROUP_SIZE_RATIO,
                        group_size: int | None = None, progress: bool = True) -> dict:
    """LongLoRA's eval.py number: exp of the mean, over windows of `seq_len` starting every `step` tokens (last start
    dropped), of each window's mean loss. Returns {"perplexity", "loss", "windows"}."""
    tokens = _as_tokens(tokens)
    _check_length(tokens, seq_len)
    starts = reference_windows(len(tokens), seq_len, step)
    if not starts:
        raise ValueError(f"the token stream has {len(tokens)} tokens: LongLoRA's windows of {seq_len} every {step} "
                         f"tokens need more than seq_len + step = {seq_len + step} (its last window is dropped)")
    window_losses: list[float] = []
    with attention_for_evaluation(model, attention, group_size_ratio, group_size):
        bar = tqdm(total=len(starts), desc=f"windowed perplexity @{seq_len}", unit="window", disable=not progress)
        for chunk, batch in _batches(tokens, starts, seq_len, batch_size, _device(model)):
            window_losses += _token_nll(model, batch).double().mean(dim=1).tolist()
            bar.update(len(chunk))
        bar.close()
    loss = sum(window_losses) / len(window_losses)
    return {"perplexity": math.exp(loss), "loss": loss, "windows": len(window_losses)}
