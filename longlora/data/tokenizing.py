"""Batch tokenization straight into numpy, the throughput-critical part of the data stages.

A fast (Rust) tokenizer encodes a whole batch of documents in one call with its own thread pool and without the
GIL; `encode_batch_fast` skips the character offsets nobody here needs. Ids go into one flat numpy array per batch
(plus the per-document lengths), so no per-token Python work happens after the encoder's own list conversion.
Reading and JSON parsing run in a background thread, overlapping the encoder. (Two batches in the encoder at once,
to fill the Rust pool's idle tail on a batch's longest document, measured no faster here and cost more CPU.) With
`num_proc > 1`, batches go to that many single-threaded tokenizer processes instead, at most two per process in
flight. Memory stays bounded by a few batches either way.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import get_args

import numpy as np

from longlora.choices import BosPolicy, TokenDtype
from longlora.errors import InputError
from longlora.sources import bos_opens_chat_turns as _bos_opens_chat_turns
from longlora.sources import check_model_source

Encoded = tuple[np.ndarray, np.ndarray]
"""(lengths int64 of each document, flat ids of all documents in order)."""

UINT16_VOCAB = 1 << 16


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, param: str = "model.name_or_path"):
    """The model's tokenizer via AutoTokenizer (a local folder, or a hub id when the network allows); errors name
    `param`."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, param)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"{param} {name_or_path!r}: cannot load its tokenizer: {err}") from None


def token_dtype(vocab_size: int, requested: TokenDtype = "auto", param: str = "dtype") -> np.dtype:
    """uint16 when every id fits (vocabulary ≤ 65536), else uint32; an explicit dtype too small is an error."""
    if requested not in get_args(TokenDtype):
        raise InputError(f"{param}: {requested!r} is not a token dtype ({', '.join(get_args(TokenDtype))})")
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise InputError(
            f"{param}: {requested} cannot hold the ids of a {vocab_size}-token vocabulary (largest id "
            f"{vocab_size - 1} > {np.iinfo(dtype).max}); use uint32 or auto"
        )
    return dtype


def bos_opens_chat_turns(tokenizer) -> bool:
    """Whether the BOS token is a chat turn marker (ChatML's `<|im_start|>` set as BOS): it appears more than once
    in a rendered user + assistant exchange, where a start-of-sequence token (Llama 2's `<s>`, Llama 3's
    `<|begin_of_text|>`) appears once. The rule params.yaml is checked with (longlora.sources), on the loaded
    tokenizer."""
    specials = {key: getattr(tokenizer, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    template = getattr(tokenizer, "chat_template", None)
    return _bos_opens_chat_turns(tokenizer.bos_token, template if isinstance(template, str) else None,
                                 {key: value if isinstance(value, str) else None for key, value in specials.items()})


def resolve_bos(tokenizer, bos_policy: BosPolicy) -> BosPolicy:
    """`auto` as params.yaml resolves it when it can read the model's folder (a hub model's tokenizer is only known
    here): `document` for a start-of-sequence BOS, `none` for a chat turn marker or no BOS at all."""
    if bos_policy != "auto":
        return bos_policy
    if tokenizer.bos_token_id is None or bos_opens_chat_turns(tokenizer):
        return "none"
    return "document"


def special_ids(tokenizer, bos_policy: BosPolicy, param: str = "bos") -> tuple[int, int | None, int]:
    """EOS (required), BOS (when the policy, `auto` resolved, asks for it) and the pad id (pad token, else EOS)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise InputError("model.name_or_path: the tokenizer has no EOS token, which separates documents")
    bos_id = None
    if resolve_bos(tokenizer, bos_policy) == "document":
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise InputError(f"{param}: document, but the tokenizer has no BOS token; use auto or none")
        if bos_opens_chat_turns(tokenizer):
            raise InputError(f"{param}: document, but the tokenizer's BOS {tokenizer.bos_token!r} opens every turn of "
                             "its chat template (a chat marker, not a start-of-document token): every document would "
                             "start with it; use auto or none")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return eos_id, bos_id, pad_id


class BatchEncoder:
    """Callable: list of texts → (lengths, flat ids), without special tokens, truncation or padding."""

    def __init__(self, tokenizer, dtype: np.dtype | type = np.uint32):
        self.dtype = np.dtype(dtype)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None and hasattr(tokenizer, "encode_batch"):
            backend = tokenizer  # a bare `tokenizers.Tokenizer`
        self._slow = None
        if backend is None:
            self._slow = tokenizer
            self.backend_json = None
            return
        # A private copy: the model's tokenizer.json may switch on truncation or padding, which must not apply.
        from tokenizers import Tokenizer

        self.backend_json = backend.to_str()
        self._backend = Tokenizer.from_str(self.backend_json)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    @property
    def is_fast(self) -> bool:
        return self._slow is None

    def __call__(self, texts: list[str]) -> Encoded:
        return self.to_numpy(self.encode(texts))

    def encode(self, texts: list[str]):
        """The tokenizer's own output for a batch (Rust `Encoding`s; the GIL is released meanwhile)."""
        if self._slow is not None:
            return self._slow(texts, add_special_tokens=False)["input_ids"]
        # Longest first: a long document last in the batch would run alone on one thread while the others idle
        # (docs/performance.md, packing).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        encoded = self._encode([texts[i] for i in order], add_special_tokens=False)
        restored = [None] * len(texts)
        for position, encoding in zip(order, encoded, strict=True):
            restored[position] = encoding
        return restored

    def to_numpy(self, encoded) -> Encoded:
        """(lengths, flat ids) of `encode`'s output."""
        ids = encoded if self._slow is not None else (e.ids for e in encoded)
        lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, count=int(lengths.sum()))
        return lengths, flat


@contextlib.contextmanager
def rust_parallelism(enabled: bool = True) -> Iterator[None]:
    """Let the Rust encoder use its thread pool inside this block only (the tokenizers library reads the
    variable on every call); the Makefile and tests switch it off globally because forked workers deadlock."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def encode_batches(batches: Iterable[list[str]], encoder: BatchEncoder, num_proc: int = 1) -> Iterator[Encoded]:
    """Encode batches in order: in this process (Rust threads), or in `num_proc` tokenizer processes."""
    if num_proc <= 1:
        with rust_parallelism():
            for texts in prefetch(batches):
                yield encoder(texts)
        return
    if not encoder.is_fast:
        raise InputError("num_proc > 1 needs a fast (Rust) tokenizer; this model's tokenizer is a slow one")
    # spawn: a forked child would inherit the parent's Rust thread pool state and the tokenizers library
    # disables (or deadlocks) parallel encoding there.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                             initargs=(encoder.backend_json, encoder.dtype.str)) as pool:
        pending: deque[Future] = deque()
        for texts in prefetch(batches):
            pending.append(pool.submit(_encode_in_worker, texts))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_worker_encoder: Callable[[list[str]], Encoded] | None = None


def _init_worker(backend_json: str, dtype: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from tokenizers import Tokenizer

    _worker_encoder = BatchEncoder(Tokenizer.from_str(backend_json), np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> Encoded:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(texts)


_DONE = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, at most `depth` ahead; its exceptions re-raise here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            put((_DONE, err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
