"""Typed, validated `params.yaml`: one model per section, checked as a whole before any stage does work.

An unknown key, a wrong type or an impossible combination stops with the key path and the reason, e.g.
`params.yaml: s2attn.group_size: target_context 1000 is not divisible by the S²-Attn group size 256`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from longlora.errors import InputError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class ParamsError(InputError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class CorpusParams(Section):
    """How the embedded corpus (the interpreter's own standard-library sources) is split between uses."""

    base_fraction: float = Field(0.6, gt=0, lt=1)
    """Share of files the tiny base model is pre-trained on."""
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of files no training stage ever sees (evaluation); the rest is context-extension data."""
    max_documents: int | None = Field(None, gt=0)
    """Use at most this many files of each split (in sorted order); None uses all. For quick runs and tests."""

    @model_validator(mode="after")
    def _fractions_leave_room(self) -> Self:
        if self.base_fraction + self.heldout_fraction >= 1:
            raise ValueError(
                f"base_fraction {self.base_fraction} + heldout_fraction {self.heldout_fraction} must stay below 1, "
                "leaving files for context extension"
            )
        return self


class BaseModelParams(Section):
    """Stage `build_base_model`: the tiny embedded Llama and its tokenizer, pre-trained here without network."""

    out_dir: Path = Path("data/base_model")
    """Hugging Face folder (safetensors weights, config, tokenizer) that later stages load like a hub model."""
    metrics_file: Path = Path("data/metrics/base_model.json")
    """DVC metrics: losses, parameter count, throughput."""
    seed: int = 0
    """Seeds tokenizer training order, weight initialisation and batch sampling."""
    vocab_size: int = Field(4096, ge=300, le=65535)
    """Byte-level BPE vocabulary size (256 byte symbols and 4 special tokens included)."""
    hidden_size: int = Field(192, gt=0)
    intermediate_size: int = Field(512, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(6, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    """Fewer than num_heads gives grouped-query attention, so the default exercises GQA end to end."""
    context_length: int = Field(256, gt=0)
    """The short pre-training context that later stages extend; becomes max_position_embeddings."""
    batch_size: int = Field(8, gt=0)
    steps: int = Field(300, gt=0)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    eval_blocks: int = Field(32, gt=0)
    """Held-out blocks of context_length tokens scored for the reported held-out loss."""

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        return self


class ModelParams(Section):
    """The model to extend and how far."""

    name_or_path: str = "data/base_model"
    """Local Hugging Face folder or hub id (e.g. meta-llama/Llama-2-7b-hf; hub ids need the network)."""
    original_context: int | None = Field(None, gt=0)
    """Context the model was pre-trained at; default: the config's max_position_embeddings."""
    target_context: int = Field(1024, gt=0)
    """Context to extend to; the RoPE factor is target_context / original_context."""
    rope_type: Literal["linear", "dynamic", "yarn", "llama3"] = "linear"
    """Position interpolation: linear (paper), or dynamic NTK, YaRN, Llama-3 scaling."""
    trust_remote_code: bool = False
    """Never enabled implicitly: executing a hub repository's code is the user's explicit decision."""

    @model_validator(mode="after")
    def _extends(self) -> Self:
        if self.original_context is not None and self.target_context < self.original_context:
            raise ValueError(
                f"target_context {self.target_context} is shorter than original_context {self.original_context}"
            )
        return self


class S2AttnParams(Section):
    """Shifted sparse attention used while training (inference always uses dense attention)."""

    group_size_ratio: float | None = Field(0.25, gt=0, le=1)
    """Group size as a share of the actual sequence length (paper: 1/4)."""
    group_size: int | None = Field(None, gt=0)
    """Fixed group size in tokens; takes precedence over the ratio (use it for variable-length SFT batches)."""

    @model_validator(mode="after")
    def _one_rule(self) -> Self:
        if self.group_size is None and self.group_size_ratio is None:
            raise ValueError("set group_size_ratio or group_size")
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size {self.group_size} must be even (the shifted heads move by half a group)")
        return self

    def group_size_for(self, seq_len: int) -> int:
        """The group size S²-Attn uses on a sequence of `seq_len` tokens; raises if it cannot tile it."""
        if self.group_size is not None:
            size = self.group_size
        else:
            exact = seq_len * self.group_size_ratio
            size = int(exact) if math.isclose(exact, round(exact)) else -1
            if size <= 0:
                raise ValueError(f"{seq_len} × group_size_ratio {self.group_size_ratio} is not a whole token count")
        if seq_len % size or size % 2:
            raise ValueError(f"sequence length {seq_len} is not divisible by the S²-Attn group size {size}")
        return size


class LoraParams(Section):
    """LoRA+ (paper defaults): LoRA on the attention projections plus trainable embeddings and norms."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_embeddings: bool = True
    """Without trainable embeddings and norms LoRA fails to extend context (paper: PG19 ppl 11.4–12.0 vs 8.12)."""
    train_norms: bool = True

    @model_validator(mode="after")
    def _targets(self) -> Self:
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer")
        return self


class Params(Section):
    """The whole params.yaml."""

    corpus: CorpusParams = CorpusParams()
    base_model: BaseModelParams = BaseModelParams()
    model: ModelParams = ModelParams()
    s2attn: S2AttnParams = S2AttnParams()
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _cross_section(self) -> Self:
        try:
            self.s2attn.group_size_for(self.model.target_context)
        except ValueError as err:
            raise ValueError(f"s2attn vs model.target_context: {err}") from None
        return self


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate an already-parsed mapping; errors name `source` and each offending key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            reason = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {_location(e['loc'])}: {reason} (got {e.get('input')!r})"[:500])
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(f"{path}: cannot read parameters ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    return parse_params(raw, str(path))
