"""How much a model uses its context: loss by position inside a window, and exact recall of planted values.

A model that uses its context predicts late tokens of a window better than early ones (it has more to look back
at); one that does not has a flat loss curve after the first few tokens. These probes are cheap enough to run at
the end of every pre-training and work on any causal LM that returns logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

POSITION_BUCKETS = ((0, 8), (8, 32), (32, 64), (64, 128), (128, 256))
"""Context sizes (tokens before the predicted one, minus one) whose mean loss is reported."""


@torch.no_grad()
def loss_by_position(model, blocks: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Mean next-token loss at each position of `blocks` (n, length): entry p scores token p + 1 from tokens 0..p."""
    was_training = model.training
    model.eval()
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    try:
        for chunk in blocks.split(batch_size):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
            total += nll.sum(0).double().cpu()
    finally:
        model.train(was_training)
    return (total / len(blocks)).numpy()


def bucket_means(per_position: np.ndarray, buckets=POSITION_BUCKETS) -> dict[str, float]:
    """Mean of `per_position` over each `[start, end)` bucket that the window reaches, keyed "start-end"."""
    return {f"{a}-{b}": float(per_position[a:b].mean()) for a, b in buckets if a < len(per_position)}


def bits_per_byte(tokenizer, blocks: torch.Tensor, mean_loss: float) -> float:
    """`mean_loss` (nats per predicted token of `blocks`) as bits per byte of the text those tokens spell, which
    compares across vocabularies."""
    scored_bytes = sum(len(tokenizer.decode(block[1:]).encode("utf-8")) for block in blocks.tolist())
    return mean_loss * blocks[:, 1:].numel() / scored_bytes / math.log(2)


@torch.no_grad()
def masked_accuracy(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 16) -> float:
    """Teacher-forced share of the tokens where `mask` is true that the model predicts exactly (greedy)."""
    was_training = model.training
    model.eval()
    hits, total = 0, 0
    try:
        for chunk, chunk_mask in zip(ids.split(batch_size), mask.split(batch_size), strict=True):
            predicted = model(input_ids=chunk).logits[:, :-1].argmax(-1)
            scored = chunk_mask[:, 1:]
            hits += int((predicted == chunk[:, 1:])[scored].sum())
            total += int(scored.sum())
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("masked_accuracy: the mask selects no predicted token")
    return hits / total
