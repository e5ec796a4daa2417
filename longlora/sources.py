"""Where a model or a data set comes from: a local path or a Hugging Face hub id, decided before anything is downloaded.

A name that looks local is never sent to the hub: a mistyped path then fails at once with "no such folder", not
after a minute of hub retries ending in "couldn't connect" or "Repo id must be in the form …".
"""

from __future__ import annotations

import re
from pathlib import Path

from longlora.errors import InputError

_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".txt")
"""The local file types a data input can be (longlora/data/readers.py reads each)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
"""Any one of these makes a folder something AutoTokenizer can load from."""


def looks_local(name: str) -> bool:
    """A path rather than a hub id: it exists, is absolute, starts with `~` or `.`, has more than one `/`, has
    characters a hub id cannot have, or is `owner/name` where `owner` is an existing local folder."""
    if not name or Path(name).expanduser().exists():
        return True
    if name.startswith(("/", "~", ".")) or not _HUB_MODEL_ID.match(name):
        return True
    return "/" in name and Path(name).parent.exists()


def is_hub_model_id(name: str) -> bool:
    """True for names that can only mean a hub repository (`meta-llama/Llama-2-7b-hf`, `gpt2`)."""
    return not looks_local(name)


def check_model_source(name: str, param: str = "model.name_or_path", need_config: bool = False) -> None:
    """Raise a clear InputError for a local model path that cannot work; hub ids pass (the hub decides)."""
    if is_hub_model_id(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise InputError(f"{param} {name!r}: no such folder (a local path, so the hub was not asked)")
    if not path.is_dir():
        raise InputError(f"{param} {name!r}: is a file; expected a Hugging Face model folder")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        note = ""
        if (path / "NOT_BUILT.txt").exists():
            note = " (it holds only NOT_BUILT.txt: build_base_model did not build a model there)"
        raise InputError(f"{param} {name!r}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, "
                         f"…){note}; expected a Hugging Face model folder")
    if need_config and not (path / "config.json").exists():
        raise InputError(f"{param} {name!r}: the folder has no config.json; expected a Hugging Face model folder")


def is_hub_name(source: str | Path) -> bool:
    """True when a data input `source` is not a local path and is shaped like a hub dataset id (`owner/name`)."""
    text = str(source)
    return not Path(text).exists() and bool(_HUB_DATASET_ID.match(text)) and not text.lower().endswith(SUFFIXES)


# --- what a local model folder says about itself, read without transformers (params.yaml is checked with it) --------

CHAT_PROBE = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
"""The exchange a chat template renders to tell a chat-turn marker from a start-of-sequence token."""


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's {"content": …}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def bos_opens_chat_turns(bos: str | None, chat_template: str | None, specials: dict[str, str | None]) -> bool:
    """Whether `bos` is a chat turn marker (ChatML's `<|im_start|>` set as BOS) rather than a start-of-sequence
    token: it appears more than once in a rendered user + assistant exchange, where a start-of-sequence token (Llama
    2's `<s>`, Llama 3's `<|begin_of_text|>`) appears once. The template is rendered as transformers renders it (a
    sandboxed Jinja environment); one that cannot be rendered here counts as a chat marker when it writes `bos`
    literally. `specials`: the tokenizer's special tokens by name (`bos_token`, `eos_token`, …)."""
    if not bos or not chat_template:
        return False
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
        rendered = env.from_string(chat_template).render(
            messages=[dict(m) for m in CHAT_PROBE], add_generation_prompt=False,
            **{key: value for key, value in specials.items() if value is not None})
    except Exception:  # a template this exchange or environment does not suit: what it writes literally
        return chat_template.count(bos) > 0
    return rendered.count(bos) > 1


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The tokenizer's (default) chat template: chat_template.jinja beside it, or tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def _json_file(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class LocalModel:
    """What a local Hugging Face model folder says about itself, as plain JSON: its config.json and its tokenizer's
    special tokens and chat template (no transformers, no network; whatever is missing or unreadable is None)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = _json_file(folder / "config.json")
        """config.json, or None."""
        self.tokenizer_config = _json_file(folder / "tokenizer_config.json")
        """tokenizer_config.json, or None (then nothing is known of the tokenizer)."""
        tokenizer_config = self.tokenizer_config or {}
        older = _json_file(folder / "special_tokens_map.json") or {}  # where older tokenizers keep them
        self.specials = {key: _token_text(tokenizer_config[key] if key in tokenizer_config else older.get(key))
                         for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.chat_template = _chat_template(folder, tokenizer_config) if self.tokenizer_config is not None else None

    @property
    def context_length(self) -> int | None:
        """config.json's max_position_embeddings, or None."""
        length = (self.config or {}).get("max_position_embeddings")
        return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None

    @property
    def bos_token(self) -> str | None:
        return self.specials["bos_token"]

    def bos_opens_chat_turns(self) -> bool | None:
        """Whether its BOS is a chat turn marker; None when the folder has no tokenizer_config.json."""
        if self.tokenizer_config is None:
            return None
        return bos_opens_chat_turns(self.bos_token, self.chat_template, self.specials)


def local_model(name: str) -> LocalModel | None:
    """The local model folder `name` names, or None for a hub id or a path that is no folder."""
    if is_hub_model_id(name):
        return None
    folder = Path(name).expanduser()
    return LocalModel(folder) if folder.is_dir() else None
