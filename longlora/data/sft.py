"""Supervised fine-tuning data (the `sft` training stage reads it): prompt templates, prompt-masked labels,
truncation, padding, length grouping.

An example is `prompt tokens + answer tokens + EOS`; labels are −100 on the prompt (and on padding), so the loss
is on the answer only. The prompt and the answer are tokenized separately and concatenated: the prompt's tokens are
then exactly those the model sees at inference, when it is given the prompt alone. (The reference tokenized
prompt+answer as one string and masked the prompt's token count, which is off when tokens merge across the seam.)

Truncation never yields an example without a single answer token to learn from: the reference truncated
prompt+answer at the right, so a prompt longer than the maximum produced an all −100 example (a NaN or zero loss).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from longlora.choices import Template, Truncation

IGNORE_INDEX = -100

# The paper code's Llama-2 templates (supervised-fine-tune.py): no system prompt without `input`, and the
# system-prompt variant (with the input on its own line) when the example has one.
LLAMA2_PROMPT = "[INST]{instruction}[/INST]"
LLAMA2_PROMPT_WITH_INPUT = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>> \n\n {instruction} \n{input} [/INST]"
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% if loop.first and system is defined %}"
    "[INST] <<SYS>>\n{{ system }}\n<</SYS>> \n\n {{ message['content'] }} [/INST]"
    "{% else %}[INST]{{ message['content'] }}[/INST]{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
"""The same two formats as a chat template, saved with the fine-tuned model so that whatever prompts it as a chat
(the evaluations, lm-eval, a serving engine) writes what it was trained on: BOS, then `[INST]{user}[/INST]`, or the
system-prompt variant when a system turn comes first (`{user}` being `{instruction} \n{input}`)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Written by prepare_sft beside its dataset: the template its prompts are in, which the sft stage saves with the
tokenizer."""

@dataclass(frozen=True)
class Instruction:
    """One LongAlpaca-format record."""

    instruction: str
    output: str
    input: str = ""


def parse_instruction(data: dict) -> Instruction:
    """Validate a LongAlpaca record ({"instruction", "output", optional "input"}); ValueError says what is wrong."""
    for key in ("instruction", "output"):
        if key not in data:
            raise ValueError(f"no {key!r} field (has {sorted(data)[:8]})")
        if not isinstance(data[key], str):
            raise ValueError(f"{key!r} is a {type(data[key]).__name__}, not a string")
        if not data[key].strip():
            raise ValueError(f"{key!r} is empty")
    extra = data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"'input' is a {type(extra).__name__}, not a string")
    return Instruction(data["instruction"], data["output"], extra or "")


def render_prompt(example: Instruction, template: Template, tokenizer=None, system_prompt: str = "") -> str:
    """The prompt text: the paper's Llama-2 format, or the tokenizer's own chat template."""
    if template == "llama2":
        if example.input:
            return LLAMA2_PROMPT_WITH_INPUT.format(
                system_prompt=system_prompt, instruction=example.instruction, input=example.input
            )
        return LLAMA2_PROMPT.format(instruction=example.instruction)
    if template == "chat_template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template chat_template: the tokenizer has no chat template; use template llama2")
        messages = []
        content = example.instruction
        if example.input:
            messages.append({"role": "system", "content": system_prompt})
            content = f"{example.instruction}\n{example.input}"
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}")


def chat_template_of(template: Template, tokenizer) -> str:
    """The chat template that renders a prompt as `render_prompt(…, template, tokenizer)` does."""
    if template == "llama2":
        return LLAMA2_CHAT_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template chat_template: the tokenizer has no chat template; use template llama2")
    return tokenizer.chat_template


def prompt_has_special_tokens(template: Template) -> bool:
    """Chat templates write BOS themselves; the Llama-2 format relies on the tokenizer adding it."""
    return template == "chat_template"


@dataclass(frozen=True)
class Fitted:
    input_ids: np.ndarray | None
    labels: np.ndarray | None
    status: Literal["kept", "dropped", "answer_truncated", "prompt_truncated"]


def middle_cut(ids: np.ndarray, keep: int) -> np.ndarray:
    """Keep the first and last `keep` tokens' worth (head gets the extra one), removing the middle."""
    if keep >= len(ids):
        return ids
    if keep <= 0:
        return ids[:0]
    head = (keep + 1) // 2
    return np.concatenate([ids[:head], ids[len(ids) - (keep - head):]])


def fit_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], max_length: int,
                truncation: Truncation = "drop") -> Fitted:
    """Concatenate prompt and answer (the answer already ends with EOS) within `max_length` tokens.

    `drop`: a prompt of max_length tokens or more leaves no answer token, so the example is dropped; otherwise a
    too-long answer is cut at its end. `truncate_middle`: the answer keeps min(its length, max(room after the
    prompt, max_length // 2)) tokens and the prompt loses tokens from its middle to make room.
    Every kept example has at least one label that is not −100.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    answer = np.asarray(answer_ids, dtype=np.int64)
    if len(answer) == 0:
        raise ValueError("the answer has no tokens (it must at least end with EOS)")
    status = "kept"
    if len(prompt) + len(answer) > max_length:
        if truncation == "drop":
            if len(prompt) >= max_length:
                return Fitted(None, None, "dropped")
            answer = answer[: max_length - len(prompt)]
            status = "answer_truncated"
        elif truncation == "truncate_middle":
            answer_keep = min(len(answer), max(max_length - len(prompt), max_length // 2))
            prompt_keep = max_length - answer_keep
            status = "prompt_truncated" if prompt_keep < len(prompt) else "answer_truncated"
            prompt = middle_cut(prompt, prompt_keep)
            answer = answer[:answer_keep]
        else:
            raise ValueError(f"unknown truncation {truncation!r}")
    input_ids = np.concatenate([prompt, answer])
    labels = input_ids.copy()
    labels[: len(prompt)] = IGNORE_INDEX
    return Fitted(input_ids, labels, status)


def pad_batch(
    examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray]:
    """Right-pad `input_ids`/`labels` of a batch: pad ids get label −100 and attention_mask 0.

    `pad_to_multiple_of` rounds the length up (S²-Attn needs sequence lengths divisible by its group size).
    """
    longest = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(examples), longest), pad_id, dtype=np.int64)
    labels = np.full((len(examples), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), longest), dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = example["input_ids"]
        labels[row, :n] = example["labels"]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Example indices per row, rows of at most `row_length` tokens: first-fit decreasing (longest example first,
    each into the first row it fits)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_length:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit a row of {row_length}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(row_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack_batch(examples: Sequence[dict], pad_id: int, row_length: int) -> dict[str, np.ndarray]:
    """Padding-free batch: the examples packed back to back into rows of at most `row_length` tokens (`pack_rows`),
    `position_ids` restarting at 0 at every example (document-aware S²-Attn computes each as if alone), the rows
    right-padded to the longest one (pad ids: label −100, attention_mask 0, positions of their own). An example's
    first token is no target (nothing before it in its example predicts it), as in a padded row."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], row_length)
    longest = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    position_ids = np.zeros((len(rows), longest), dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(examples[i]["input_ids"])
            input_ids[r, start: start + n] = examples[i]["input_ids"]
            labels[r, start: start + n] = examples[i]["labels"]
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start: start + n] = np.arange(n)
            start += n
        mask[r, :start] = 1
        position_ids[r, start:] = np.arange(longest - start)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}


class PaddedBatches:
    """The Trainer's collator of tokenized examples (`input_ids`, `labels`): right-padded batches (`pad_batch`) as
    tensors, pad ids masked from the loss and the attention, the length rounded up to a multiple of `multiple` (the
    S²-Attn group size, so that every padded row computes exactly what it computes alone, padded to that multiple).
    With `row_length`: padding-free batches instead (`pack_batch`: the examples packed into rows of at most that
    many tokens, for document-aware S²-Attn). Counts the real and padded tokens it has produced."""

    def __init__(self, pad_id: int, multiple: int | None = None, row_length: int | None = None):
        self.pad_id, self.multiple, self.row_length = pad_id, multiple, row_length
        self.tokens = self.padded_tokens = 0

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        if self.row_length:
            batch = pack_batch(examples, self.pad_id, self.row_length)
        else:
            batch = pad_batch(examples, self.pad_id, self.multiple)
        real = int(batch["attention_mask"].sum())
        self.tokens += real
        self.padded_tokens += batch["attention_mask"].size - real
        return {name: torch.from_numpy(values) for name, values in batch.items()}


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int = 0,
                         megabatch_batches: int = 50) -> np.ndarray:
    """A permutation whose consecutive runs of `batch_size` have similar lengths (little padding).

    Like transformers' LengthGroupedSampler: shuffle, sort within megabatches of `megabatch_batches` batches by
    length (longest first), cut into batches, shuffle the batches — and put the batch holding the longest example
    first, so an out-of-memory shows at step one rather than hours in.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    mega = batch_size * megabatch_batches
    sorted_chunks = [chunk[np.argsort(-lengths[chunk], kind="stable")]
                     for chunk in (order[i: i + mega] for i in range(0, len(order), mega))]
    batches = [chunk[i: i + batch_size] for chunk in sorted_chunks for i in range(0, len(chunk), batch_size)]
    if not batches:
        return np.zeros(0, dtype=np.int64)
    # Only the very last batch can be short; it stays last so that every run of batch_size is one batch.
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    batches = [full[i] for i in rng.permutation(len(full))] + short
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b]].max())
    if len(batches[longest]) == batch_size or len(batches) == 1:
        batches[0], batches[longest] = batches[longest], batches[0]
    return np.concatenate(batches).astype(np.int64)


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Share of a padded batch that is padding, when consecutive runs of `batch_size` form the batches."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    padded = sum(int(lengths[i: i + batch_size].max()) * len(lengths[i: i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    return float(1 - lengths.sum() / padded)


ORDER_FILE = "order.json"
"""Written beside the dataset by prepare_sft: whether its rows are stored in length-grouped batches, and of what
size, so that the training stage knows to read them in order and in batches of that size."""


def write_order(folder: str | Path, grouped_batch_size: int | None) -> None:
    """Record in `folder` that its rows form length-grouped batches of `grouped_batch_size` (None: no order)."""
    text = json.dumps({"length_grouped_batch_size": grouped_batch_size}, indent=2) + "\n"
    (Path(folder) / ORDER_FILE).write_text(text, encoding="utf-8")


def read_order(folder: str | Path) -> int | None:
    """The length-grouped batch size `write_order` recorded in `folder`, or None (rows in no particular order)."""
    path = Path(folder) / ORDER_FILE
    if not path.is_file():
        return None
    size = json.loads(path.read_text(encoding="utf-8")).get("length_grouped_batch_size")
    return int(size) if size else None
