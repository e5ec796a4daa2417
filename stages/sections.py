"""The sections of `params.yaml`, one typed model each, named after the section (`extend` → `ExtendParams`): fields,
documented defaults and the rules that need only the section itself. Rules across sections, derived defaults and
path rules are `stages/params.py`'s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePath
from types import UnionType
from typing import Annotated, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from longlora.choices import (
    LONGBENCH_DATASETS,
    LONGBENCH_E_DATASETS,
    RULER_CHAT_TEMPLATE,
    RULER_MODEL_TEMPLATES,
    RULER_OFFLINE_TASKS,
    RULER_TASKS,
    BosPolicy,
    OnError,
    Remainder,
    Template,
    TokenDtype,
    Truncation,
)
from longlora.embedded.corpus import Document, Split, stdlib_documents
from longlora.errors import InputError
from longlora.io import protected_place
from longlora.recipe import (
    DEFAULT_GROUP_SIZE_RATIO,
    PAPER_TARGET_MODULES,
    PASSKEY_DEPTHS,
    Attention,
    EvalDtype,
    LrSchedule,
    MergeDtype,
    Method,
    Precision,
    RopeType,
    S2AttnKernel,
    check_group_size,
    check_group_size_ratio,
    group_size_for,
)


class KeyProblem(ValueError):
    """A cross-field problem best reported at one key (`section.key`) rather than at the top level."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


def _nonempty(value: object) -> object:
    if isinstance(value, str | PurePath) and not str(value).strip():
        raise ValueError("empty path: name a file or folder")
    return value


def _source(value: object) -> object:
    """An input: a local path (`~` expanded) or a hub name."""
    value = _nonempty(value)
    if isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())
    return value


def _output(value: object) -> object:
    """A place a stage writes: never empty, `.`, the working directory or above it, or the home folder."""
    value = _nonempty(value)
    if isinstance(value, str | PurePath):
        path = Path(value).expanduser()
        if path == Path("."):
            raise ValueError("'.' is the working directory, which a stage would replace; name a folder inside it")
        reason = protected_place(path)
        if reason is not None:
            raise ValueError(f"{str(path)!r} {reason}, which a stage would replace; name a folder inside it")
        return path
    return value


Source = Annotated[str, BeforeValidator(_source)]
"""A local file or folder, or a Hugging Face hub name."""
InPath = Annotated[Path, BeforeValidator(_source)]
"""A local file or folder a stage reads."""
OutPath = Annotated[Path, BeforeValidator(_output)]
"""A file or folder a stage writes (and replaces on the next run)."""


def _check_positive_lengths(lengths: tuple[int, ...] | None) -> None:
    """The positive-lengths rule of every `lengths` list (prepare_eval, eval_passkey), written here alone: None
    (derived later) or at least one length, each a positive token count."""
    if lengths is not None and (not lengths or min(lengths) <= 0):
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")


def _is_number(annotation) -> bool:
    """A field meant to hold an int or a float (possibly None or constrained), not a bool or a choice."""
    if get_origin(annotation) is Annotated:
        return _is_number(get_args(annotation)[0])
    types = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(types & {int, float}) and bool not in types


class Section(BaseModel):
    # allow_inf_nan: `lr: .inf` or `1e309` (YAML reads the latter as a string that float() makes infinite) is refused.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info):
        # Pydantic's lax mode reads `max_steps: true` as 1.
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"a number is needed here, not the boolean {str(value).lower()}")
        return value


class EmbeddedCorpusParams(Section):
    """How the embedded corpus (the interpreter's own standard-library sources) is split between uses."""

    base_fraction: float = Field(0.6, gt=0, lt=1)
    """Share of files the tiny base model is pre-trained on."""
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of files no training stage ever sees (evaluation); the rest is context-extension data."""
    max_documents: int | None = Field(None, gt=0)
    """Use at most this many files of each split (in sorted order); None uses all. For quick runs and tests."""

    def documents(self, split: Split) -> Iterator[Document]:
        """The embedded corpus' documents of one split, as these parameters cut it."""
        return stdlib_documents(split, self.base_fraction, self.heldout_fraction, max_documents=self.max_documents)

    @model_validator(mode="after")
    def _fractions_leave_room(self) -> Self:
        if self.base_fraction + self.heldout_fraction >= 1:
            raise ValueError(
                f"base_fraction {self.base_fraction} + heldout_fraction {self.heldout_fraction} must stay below 1, "
                "leaving files for context extension"
            )
        return self


class BuildBaseModelParams(Section):
    """Stage `build_base_model`: the tiny embedded Llama and its tokenizer, pre-trained here without network."""

    out_dir: OutPath = Path("data/base_model")
    """Hugging Face folder (safetensors weights, config, tokenizer) that later stages load like a hub model."""
    metrics_file: OutPath = Path("data/metrics/build_base_model.json")
    """DVC metrics: losses, parameter count, throughput."""
    seed: int = 0
    """Seeds tokenizer training order, weight initialisation and batch sampling."""
    vocab_size: int = Field(1024, ge=300, le=65535)
    """Byte-level BPE vocabulary size (256 byte symbols and 4 special tokens included). Small, so that most of
    the compute goes into the layers rather than the output softmax (docs/base-model.md: the study)."""
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    """Four: two-layer models did not learn to look back within the budget, four did (docs/base-model.md)."""
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(4, gt=0)
    """Fewer than num_heads gives grouped-query attention."""
    tie_word_embeddings: bool = True
    """One matrix for input embeddings and output head, as in many small open models; it also formed the copying
    mechanism soonest in the study."""
    context_length: int = Field(256, gt=0)
    """The short pre-training context that later stages extend; becomes max_position_embeddings."""
    batch_size: int = Field(8, gt=0)
    steps: int = Field(5000, gt=0)
    """Enough for the copying mechanism to form and carry over to passkey retrieval at context_length; how many that
    takes: docs/base-model.md."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW, β = (0.9, 0.95), weight decay 0.1)."""
    warmup_steps: int = Field(50, ge=0)
    decay_share: float = Field(0.2, gt=0, le=1)
    """Warm-up, constant, then a linear decay to zero over this share of the steps (WSD schedule)."""
    synthetic_share: float = Field(0.75, ge=0, lt=1)
    """Share of each batch that is synthetic recall or copy sequences around real code (longlora/embedded/synthetic.py);
    the rest is plain code. Without them the model does not learn to use its context in a CPU budget."""
    haystack_share: float = Field(0.25, ge=0, le=1)
    """Share of the synthetic sequences that hide one prose fact among repeated look-alike statements and ask for
    it at the end (`SyntheticSequences.haystack`); of the rest, recall_share are key–value recall."""
    recall_share: float = Field(0.5, ge=0, le=1)
    """Share of the other synthetic sequences that are key–value recall; the rest repeat a span of code."""
    prose_share: float = Field(0.5, ge=0, le=1)
    """Share of the recalled facts stated as a comment in prose (`# The retry limit is 4411.`) instead of code."""
    eval_blocks: int = Field(64, gt=0)
    """Held-out windows of context_length tokens scored for the reported loss by position, and as many held-out
    recall sequences."""
    passkey_trials: int = Field(4, ge=0)
    """Passkey prompts of context_length tokens per depth (0, ¼, ½, ¾, 1) for the reported accuracy; 0: none."""

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.warmup_steps + round(self.decay_share * self.steps) > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} and the decay ({self.decay_share} of {self.steps} "
                             "steps) do not fit in steps")
        return self


class ModelParams(Section):
    """The model to extend and how far."""

    name_or_path: Source = "data/base_model"
    """Local Hugging Face folder or hub id (e.g. meta-llama/Llama-2-7b-hf; hub ids need the network). A path that
    looks local (absolute, relative with `./` or several parts, or whose parent folder exists) is never looked up
    on the hub. Equal to build_base_model.out_dir (however spelled), build_base_model builds it."""
    original_context: int | None = Field(None, gt=0)
    """Context the model was pre-trained at; default: the config's max_position_embeddings."""
    target_context: int = Field(1024, gt=0)
    """Context to extend to; the RoPE factor is target_context / original_context × rope_headroom."""
    rope_type: RopeType = "linear"
    """Position interpolation: linear (paper), or dynamic NTK, YaRN, Llama-3 scaling."""
    rope_headroom: float = Field(1.0, ge=1.0)
    """Scale positions as if the target were this many times longer (1: the paper's recipe); the saved config
    still says max_position_embeddings = target_context. A model reads the longest distances it was pre-trained on
    least well (they are the rarest in its windows) and interpolation maps the target's longest distances exactly
    there; headroom moves them back into the well-trained range (docs/extension.md)."""
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

    group_size_ratio: float | None = DEFAULT_GROUP_SIZE_RATIO
    """Group size as a share of the actual sequence length (paper: 1/4)."""
    group_size: int | None = None
    """Fixed group size in tokens; takes precedence over the ratio (use it for variable-length SFT batches)."""
    shift: bool = True
    """Shift half the heads by half a group (the method). false: every head in the plain groups, so no information
    crosses a group boundary in training — the paper's "short attention" ablation (benchmarks/replicate.py)."""
    kernel: S2AttnKernel = "auto"
    """The attention kernel S²-Attn trains with (same result, different speed and requirements). auto: flash-attn
    (`flash_attn` package) on CUDA in fp16/bf16 when it imports; else torch's varlen FlashAttention (`varlen`, CUDA,
    fp16/bf16); else a compiled FlexAttention block-sparse mask (`flex`, CUDA); else `sdpa`: one fused SDPA call per
    group batch (per length bucket with packed documents), the CPU path — on the CPU compiled FlexAttention has no
    backward and eager FlexAttention takes N² memory. varlen and flex have no attention dropout: with dropout auto
    takes flash-attn or sdpa. An explicit choice that cannot run here (package missing, no CUDA, fp32 for varlen,
    dropout) stops training with an error instead of falling back."""

    @field_validator("group_size_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        return None if value is None else check_group_size_ratio(value)

    @field_validator("group_size")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        return None if value is None else check_group_size(value)

    @model_validator(mode="after")
    def _one_rule(self) -> Self:
        if self.group_size is None and self.group_size_ratio is None:
            raise ValueError("set group_size_ratio or group_size")
        return self

    def group_size_for(self, seq_len: int) -> int:
        """The group size S²-Attn uses on a sequence of `seq_len` tokens; raises if it cannot tile it."""
        return group_size_for(seq_len, self.group_size, self.group_size_ratio)


class LoraParams(Section):
    """LoRA+ (paper defaults): LoRA on the attention projections plus trainable embeddings and norms."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = PAPER_TARGET_MODULES
    train_embeddings: bool = True
    """Without trainable embeddings and norms LoRA fails to extend context (paper: PG19 ppl 11.4–12.0 vs 8.12)."""
    train_norms: bool = True

    @model_validator(mode="after")
    def _targets(self) -> Self:
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer")
        return self


class PrepareCorpusParams(Section):
    """Stage `prepare_corpus`: the offline default data, written in the formats real inputs come in."""

    out_dir: OutPath = Path("data/corpus")
    """pretrain.jsonl (RedPajama format), eval/ (one long text file per document), longqa.json and
    longqa_heldout.json (LongAlpaca format)."""
    metrics_file: OutPath = Path("data/metrics/prepare_corpus.json")
    """DVC metrics: documents, tokens and question counts of each file written."""
    seed: int = 0
    """Seeds the file order of the evaluation documents and the LongQA windows and questions."""
    eval_min_tokens: int | None = Field(None, gt=0)
    """Each evaluation document is held-out files joined until it has at least this many tokens;
    None: 2 × model.target_context, so every document reaches the longest default evaluation length."""
    eval_documents: int | None = Field(64, gt=0)
    """At most this many evaluation documents; None: as many as the held-out split gives."""
    longqa_examples: int = Field(512, gt=0)
    """LongQA training examples (from the extend split); fewer when the split has too few usable windows."""
    longqa_heldout_examples: int = Field(128, ge=0)
    """LongQA examples from the held-out split, for scoring answers of the fine-tuned model."""
    longqa_min_tokens: int | None = Field(None, gt=0)
    """Shortest LongQA instruction (source code + question) in tokens; None: half of model.target_context."""
    longqa_max_tokens: int | None = Field(None, gt=0)
    """Longest LongQA instruction in tokens; None: 85 % of model.target_context, which leaves room for the prompt
    template and the answer, so that prepare_sft's default `drop` policy keeps every example."""
    longbench_examples: int = Field(16, ge=0)
    """Examples of each LongBench-format set in longbench/ (lcc, passage_count, passage_retrieval_en from held-out
    code, multifieldqa_en from the held-out LongQA; longlora/embedded/longbench_data.py), contexts of
    longqa_min_tokens to
    longqa_max_tokens tokens; 0: none."""
    longbench2_examples: int = Field(16, ge=0)
    """Four-choice questions of longbench2.jsonl, LongBench v2's format made from the held-out LongQA
    (longlora/embedded/longbench2_data.py); 0: none."""
    longqa_choice_share: float = Field(0.25, ge=0, le=1)
    """Share of longqa.json's questions (the SFT set) asked with four choices and answered "The correct answer is
    (B).", the sentence LongBench v2 reads, so that the fine-tuned model answers its questions as an instruction-tuned
    model does (longlora/embedded/longbench2_data.py); the held-out questions stay open. 0: none."""


class PreparePretrainParams(Section):
    """Stage `prepare_pretrain`: RedPajama-format text → fixed blocks of tokens with document boundaries."""

    input: Source = "data/corpus/pretrain.jsonl"
    """A .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt file, a folder of them, or a Hugging Face dataset
    name (e.g. togethercomputer/RedPajama-Data-1T-Sample; streamed, needs the network). dvc.yaml takes its dep
    from here, so DVC tracks whichever local input it names."""
    text_field: str = "text"
    """Field (or parquet column) holding each document's text (a .txt file is one document whatever it says)."""
    hub_split: str = "train"
    """Split to stream when `input` is a hub dataset name."""
    hub_config: str | None = None
    """Configuration (subset) name of a hub dataset, if it has several."""
    max_documents: int | None = Field(None, gt=0)
    """Read at most this many documents (a bounded sample of a large or streamed input); None reads all."""
    on_error: OnError = "raise"
    """A malformed line, a non-UTF-8 line or a missing or empty text stops the stage with file:line
    (raise) or is skipped and counted in the metrics (skip)."""
    block_length: int | None = Field(None, gt=0)
    """Tokens per block; None: model.target_context. Must not exceed it and must be tiled by S²-Attn groups."""
    bos: BosPolicy = "auto"
    """`document`: each document is `BOS text EOS` (how Llama was pre-trained); `none`: `text EOS`; `auto`: follows
    the model, `document` for a start-of-sequence BOS (Llama's `<s>`, the embedded model's), `none` when the
    tokenizer has no BOS or its BOS is a chat turn marker (SmolLM2's `<|im_start|>`). Resolved when params.yaml loads
    if model.name_or_path is a local folder (the stage reports the result), else by the stage from the tokenizer.
    `document` with a chat-marker BOS is refused."""
    remainder: Remainder = "drop"
    """The last tokens that do not fill a block: dropped, or padded with the pad token to a full block
    (the training stage must mask padding); either way the count is reported."""
    dtype: TokenDtype = "auto"
    """Token file dtype: auto picks uint16 when the vocabulary fits (ids < 65536), else uint32."""
    batch_chars: int = Field(4_000_000, ge=1000)
    """Text per tokenizer call (characters); bounds memory whatever the size of the input."""
    num_proc: int = Field(1, ge=1)
    """1: one process, the fast tokenizer's own threads use all cores; >1: that many tokenizer processes
    (pays off when reading and packing, not tokenization, would otherwise be the bottleneck)."""
    synthetic_share: float = Field(0.0, ge=0, lt=1)
    """Share of the blocks that are synthetic long-range sequences of block_length tokens built around the input's
    own tokens (longlora/embedded/synthetic.py: facts stated and restated far apart, haystacks, repeated spans), drawn
    in
    build_base_model's mix (its haystack_share, recall_share and prose_share), each block one document. 0 (the
    paper's recipe): the input alone. The embedded default extends on its base model's own pre-training mix at the
    target length (0.75, as build_base_model.synthetic_share), as LongLoRA extends Llama on its pre-training
    distribution (RedPajama): extension data without the long-range signal the base learnt from erases it."""
    synthetic_min_length: int | None = Field(None, gt=0)
    """Synthetic sequences are whole multiples of this many tokens, as many to a block as fill it (their lengths
    drawn at random, each its own document), so that facts are asked for at every position and over every span up
    to block_length; None: one sequence of block_length per block. Must divide block_length."""
    seed: int = 0
    """Seeds the synthetic sequences."""
    out_dir: OutPath = Path("data/pretrain")
    """tokens.bin (blocks × block_length), doc_starts.bin, doc_index.npy and meta.json: see docs/data.md."""
    metrics_file: OutPath = Path("data/metrics/prepare_pretrain.json")
    """DVC metrics: documents, tokens, blocks, dropped or padded tokens, skipped records, tokens/s."""


class PrepareSftParams(Section):
    """Stage `prepare_sft`: LongAlpaca-format instructions → tokenized examples with prompt-masked labels."""

    input: Source = "data/corpus/longqa.json"
    """A LongAlpaca-format .json list (or .jsonl, .parquet, a folder of them) of {"instruction", "output",
    optional "input", "file"}, or a hub dataset name (e.g. Yukang/LongAlpaca-12k; needs the network)."""
    hub_split: str = "train"
    """Split to stream when `input` is a hub dataset name."""
    hub_config: str | None = None
    """Configuration (subset) name of a hub dataset, if it has several."""
    max_examples: int | None = Field(None, gt=0)
    """Read at most this many examples; None reads all."""
    on_error: OnError = "raise"
    """A malformed record stops the stage with file:line (raise) or is skipped and counted (skip)."""
    template: Template = "llama2"
    """llama2: the paper code's `[INST]{instruction}[/INST]`, and its system-prompt variant when `input` is
    present; chat_template: the tokenizer's own chat template (system turn only when `input` is present)."""
    system_prompt: str = (
        "You are a helpful assistant. Answer the question from the document you are given, briefly and exactly."
    )
    """System prompt of the with-input variant (the reference used Llama-2's default system prompt)."""
    max_length: int | None = Field(None, ge=2)
    """Longest example in tokens (prompt + answer + EOS); None: model.target_context."""
    truncation: Truncation = "drop"
    """Too long: `drop` drops (and counts) examples whose prompt alone leaves no room for an answer token and
    cuts over-long answers at the end; `truncate_middle` cuts tokens from the middle of the prompt (keeping its
    start and the question at its end), leaving the answer at least half of max_length."""
    group_by_length: bool = False
    """Write examples in length-grouped batches of `group_batch_size` (batches in seeded random order, the
    longest first) so padding is small; the training stage must then read them in order."""
    group_batch_size: int = Field(4, gt=0)
    """Batch size the grouping (and the padding figures in the metrics) assume; match the training batch."""
    seed: int = 0
    """Seeds the length-grouped order."""
    out_dir: OutPath = Path("data/sft")
    """Hugging Face dataset (datasets.load_from_disk) with input_ids, labels (−100 on the prompt), length."""
    metrics_file: OutPath = Path("data/metrics/prepare_sft.json")
    """DVC metrics: examples kept, dropped and truncated, tokens, label tokens, padding with and without
    length grouping."""


class PrepareEvalParams(Section):
    """Stage `prepare_eval`: long documents → one flat token stream with document offsets."""

    input: Source = "data/corpus/eval"
    """A folder of text files (PG19 / proof-pile style, one document per file), a .jsonl/.parquet file or
    folder of them, or a hub dataset name (needs the network)."""
    text_field: str = "text"
    """Field (or parquet column) holding each document's text (a .txt file is one document whatever it says)."""
    hub_split: str = "test"
    """Split to stream when `input` is a hub dataset name."""
    hub_config: str | None = None
    """Configuration (subset) name of a hub dataset, if it has several."""
    max_documents: int | None = Field(None, gt=0)
    """Read at most this many documents; None reads all."""
    on_error: OnError = "raise"
    """A malformed or empty record stops the stage with file:line (raise) or is skipped and counted (skip)."""
    bos: BosPolicy = "auto"
    """`document`: each document is `BOS text EOS` in the stream; `none`: `text EOS`; `auto`: as
    prepare_pretrain.bos, from the model's tokenizer."""
    dtype: TokenDtype = "auto"
    """Stream dtype: auto picks uint16 when the vocabulary fits (ids < 65536), else uint32."""
    lengths: tuple[int, ...] | None = None
    """Evaluation context lengths whose reach is counted (documents with at least that many tokens);
    None: model.target_context / 4, / 2 and × 1."""
    batch_chars: int = Field(4_000_000, ge=1000)
    """Text per tokenizer call (characters); bounds memory."""
    out_dir: OutPath = Path("data/eval")
    """tokens.bin (flat stream), doc_offsets.npy (documents + 1 offsets) and meta.json: see docs/data.md."""
    metrics_file: OutPath = Path("data/metrics/prepare_eval.json")
    """DVC metrics: documents, tokens, documents reaching each evaluation length."""

    @model_validator(mode="after")
    def _positive_lengths(self) -> Self:
        _check_positive_lengths(self.lengths)
        return self


class TrainingParams(Section):
    """What every training stage (`extend`, `sft`) sets the same way: method, recipe, checkpoints, outputs. The
    defaults are the paper's recipe (LongLoRA fine-tune.py, 7B → 32k on 8 GPUs); params.yaml sets the tiny CPU
    default."""

    method: Method = "lora_plus"
    """lora_plus: LoRA plus trainable embeddings and norms (paper); lora: the adapter alone (ablation); full: every
    weight (the paper's full fine-tuning reference; writes a full model folder); qlora: lora_plus over the frozen base
    loaded in 4-bit NF4 (bitsandbytes, the `qlora` extra; computing in bf16 on a GPU, fp32 on a CPU), embeddings and
    norms unquantised and trained in fp32, the same adapter folder, merged into the full-precision base; not with a
    ZeRO-3 `deepspeed` config (docs/training.md, "QLoRA")."""
    attention: Attention = "s2"
    """s2: shifted sparse attention while training (evaluation is always dense); dense: causal attention (baseline)."""
    max_steps: int = Field(1000, gt=0)
    """Optimizer steps (paper: 1000 at a global batch of 64)."""
    global_batch_size: int = Field(64, gt=0)
    """Sequences per optimizer step over all processes = per_device_batch_size × gradient accumulation × world size;
    the accumulation is derived from it once the world size is known (paper: 64 = 1 × 8 × 8 GPUs). The world size
    `launch` gives (nodes × nproc_per_node) must divide it into whole per-device batches."""
    per_device_batch_size: int = Field(1, gt=0)
    """Sequences per forward pass on each process."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate (paper: 2e-5; 1e-5 for 70B)."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    """0.95 as in the paper (the reference scripts silently used the default 0.999)."""
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    """Paper: 0."""
    lr_schedule: LrSchedule = "constant_with_warmup"
    """Paper: constant after a linear warm-up (also under ZeRO-3: the shipped DeepSpeed configs leave the schedule to
    the Trainer, unlike the reference's ZeRO-3 config, which replaced it with a decaying one)."""
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this norm (the Trainer's default, which the paper's runs used)."""
    precision: Precision = "auto"
    """auto: bf16 mixed precision on a GPU that supports it, fp32 on a CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (paper: on; what lets 7B train at 32k)."""
    deepspeed: InPath | None = None
    """DeepSpeed config (JSON), e.g. configs/ds_zero2.json or configs/ds_zero3.json; its "auto" values are filled from
    these params by the Trainer. None: no DeepSpeed."""
    seed: int = 0
    """Seeds LoRA initialisation, the data order and dropout."""
    log_every: int = Field(10, gt=0)
    """Log loss, learning rate and tokens/s (dvclive, console) every this many steps."""
    checkpoint_every: int = Field(100, gt=0)
    """Save a resumable checkpoint (weights, optimizer, scheduler, RNG and data position) every this many steps."""
    keep_checkpoints: int = Field(2, gt=0)
    """Keep at most this many recent checkpoints of a run; older ones are removed as new ones are written."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint this same configuration left in checkpoint_dir (a killed or failed
    run), else start; never: start over; or the path of one checkpoint folder (`…/checkpoint-<step>`), which must
    come from this same configuration."""

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: use auto, never, or the path of a checkpoint folder")
        return value if value in ("auto", "never") else str(Path(value).expanduser())

    def batch_split_problem(self, world_size: int, processes: str = "") -> str | None:
        """The global-batch rule, written here alone: why global_batch_size does not split into whole per-device
        batches over `world_size` processes (`processes`: where that number comes from, in words), or None. Checked
        when params.yaml loads against `launch`'s world size, and by the stage against the one it runs with."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            return (f"{self.global_batch_size} is not divisible by per_device_batch_size {self.per_device_batch_size} "
                    f"× {world_size} processes{processes} = {per_step}; change one of them")
        return None

    def gradient_accumulation(self, world_size: int, stage: str) -> int:
        """Gradient accumulation steps that make global_batch_size with `world_size` processes."""
        problem = self.batch_split_problem(world_size)
        if problem:
            raise InputError(f"{stage}.global_batch_size {problem}")
        return self.global_batch_size // (self.per_device_batch_size * world_size)


class ExtendParams(TrainingParams):
    """Stage `extend`: long-context extension. The base model is loaded with its RoPE interpolated to
    model.target_context, trained with S²-Attn on prepare_pretrain's packed blocks (HF Trainer), and written as a
    self-describing PEFT adapter folder (`method: full`: a full model folder)."""

    data: InPath | None = None
    """Packed blocks to train on (prepare_pretrain's format, read memory-mapped with PackedBlocks); None:
    prepare_pretrain.out_dir. Their block length must be model.target_context."""
    document_attention: bool = False
    """false: the documents packed into a block attend to the documents before them (the paper's recipe); true:
    each document attends only to itself, its positions restarting at 0 and its S² groups laid out from its own start
    (document-aware S²-Attn: exactly as if alone in its row; fewer FLOPs), and its first token is no target."""
    checkpoint_dir: OutPath = Path("data/checkpoints/extend")
    """Checkpoints, one subfolder per configuration (a hash of everything that shapes training), outside the
    DVC-cached output so that they survive `dvc repro` (persist: true). A run's own subfolder is removed when it
    completes."""
    out_dir: OutPath = Path("data/extend")
    """PEFT adapter folder (adapter_config.json, adapter_model.safetensors) with the extended config.json, the
    tokenizer and extension.json (base model, RoPE scaling, S² group size, these params); a full model folder for
    method full. The dvclive logs go to the run log, data/logs/extend/dvclive/."""
    metrics_file: OutPath = Path("data/metrics/extend.json")
    """DVC metrics: first and final loss, trainable parameters per group (tokens/s, peak memory and seconds: the run
    log's data/logs/extend/timings.json)."""


class SftParams(TrainingParams):
    """Stage `sft`: supervised fine-tuning on prepare_sft's examples (LongAlpaca/LongQA format), loss on the answer
    tokens only, in padding-free packed rows (document-aware S²-Attn) or right-padded batches; S²-Attn with a fixed
    group size.
    Output: a self-describing PEFT adapter folder over `base_model` (as `extend` writes), merged by `merge@sft`.
    Defaults as the reference's supervised-fine-tune.py (lr 2e-5, 20 warm-up steps, constant, global batch 64)."""

    base_model: Source | None = None
    """The model to fine-tune: None is merge.extend.out_dir, the extended model (the paper's order: extend, then SFT).
    A chat model (folder or hub id) whose context is shorter than model.target_context is interpolated to it at load
    time, and the adapter folder records that scaling."""
    data: InPath | None = None
    """Tokenized examples (prepare_sft's Hugging Face dataset); None: prepare_sft.out_dir. With its group_by_length
    on they are read in the order written, in batches of per_device_batch_size (= prepare_sft.group_batch_size);
    otherwise shuffled."""
    padding_free: bool | None = None
    """true: each batch's examples are packed back to back into rows of up to the model's context, every
    example computed exactly as if alone (document-aware S²-Attn, positions restarting per example): the same loss
    and gradients as padded batches, without computing the padding (needs attention s2 and s2attn.shift true). false:
    each example right-padded to the batch's longest, rounded up to a multiple of the S² group. None: true exactly
    when it can be (attention s2 and s2attn.shift true), else false."""
    replay_share: float = Field(0.0, ge=0, lt=1)
    """Share of the training examples that are plain-text replay: pieces of `replay_data`'s packed blocks,
    `replay_length` tokens each, loss on every token, shuffled among the instructions (seeded by `seed`). Replay
    keeps SFT from forgetting plain text, so a higher lr can train the answers (docs/sft.md). 0: instructions only,
    as the paper."""
    replay_data: InPath | None = None
    """Packed blocks replayed when replay_share > 0 (prepare_pretrain's format, blocks of model.target_context);
    None: prepare_pretrain.out_dir."""
    replay_length: int = Field(256, gt=0)
    """Tokens per replay piece, each cut from one block (at most the block's length)."""
    max_steps: int = Field(560, gt=0)
    """Optimizer steps; 560 at a global batch of 64 is about 3 epochs of LongAlpaca-12k."""
    checkpoint_dir: OutPath = Path("data/checkpoints/sft")
    """Checkpoints, as extend.checkpoint_dir (persist: true, one subfolder per configuration)."""
    out_dir: OutPath = Path("data/sft_adapter")
    """PEFT adapter folder with config.json, the tokenizer, extension.json (base model, its RoPE scaling, the S²
    group size, these params); a full model folder for method full. The dvclive logs go to data/logs/sft/dvclive/."""
    metrics_file: OutPath = Path("data/metrics/sft.json")
    """DVC metrics: first and final loss, padding share, trainable parameters per group (tokens/s, peak memory and
    seconds: data/logs/sft/timings.json)."""


Launcher = Literal["none", "torchrun", "accelerate"]


def sequence_parallel_problem(shards: int, attention: str, group_size: int | None,
                              row_length: int | None) -> str | None:
    """Why rows cannot be shared by `shards` processes (the rule, written here alone), or None: attention must be
    S² and fixed-length rows (`row_length`) must cut into `shards` shards of whole groups; SFT's padded rows are
    padded to that."""
    if shards == 1:
        return None
    if attention != "s2":
        return f"{shards} shares rows between processes through S²-Attn's halo: it needs attention s2, not {attention}"
    if row_length is not None and group_size is not None and row_length % (shards * group_size):
        return (f"{shards} × S² group size {group_size} = {shards * group_size} does not divide the rows' "
                f"{row_length} tokens (model.target_context): lower it, or set a smaller s2attn.group_size_ratio")
    return None


class LaunchParams(Section):
    """How `python -m stages.launch <stage>` starts a training stage (TRAINING_STAGES): the command is built in
    stages/launch.py and nowhere else. The launcher only starts processes; the Trainer inside each one does the
    distribution, and DeepSpeed is a setting of the training stage itself (`extend.deepspeed`), because the Trainer
    reads it, a checkpoint's configuration includes it, and two training stages may need different ZeRO stages."""

    launcher: Launcher = "none"
    """none: run the stage in the launching process (one process, one device or the CPU); torchrun: `python -m
    torch.distributed.run`, one process per device, c10d rendezvous; accelerate: `accelerate launch` (its
    multi-GPU mode, the same c10d rendezvous). Both hand each process RANK and WORLD_SIZE, from which the stage
    derives its gradient accumulation."""
    nproc_per_node: int = Field(1, gt=0)
    """Processes on each node: one per GPU (8 on an 8×A100 node)."""
    nodes: int = Field(1, gt=0)
    """Nodes taking part; every node runs the same command (configs/slurm/multinode.sbatch does it under SLURM)."""
    rdzv_endpoint: str = "localhost:0"
    """host:port of the c10d rendezvous, on the first node. localhost:0 (one node only) lets torchrun pick a free
    port; several nodes need the first node's address and an open port, e.g. node001:29500."""
    sequence_parallel: int = Field(1, gt=0)
    """P: processes that share each training row (S²-aware sequence parallelism, docs/long-sequences.md). Every row
    is cut into P contiguous shards on S² group boundaries, one per process, so each holds 1/P of the activations;
    only the K/V of the tokens just before each shard travel between them. 1: off. The world size must be a multiple
    of P (data-parallel degree = world size / P, which the global batch must split over), the row length (the
    training stages' model.target_context) a multiple of P × the S² group size, and attention s2. Consecutive ranks
    share a row, so with P ≤ nproc_per_node the halo stays inside a node."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def data_parallel(self) -> int:
        """Processes that each see different rows: world size / sequence_parallel."""
        return self.world_size // self.sequence_parallel

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r} is not host:port (e.g. node001:29500, or localhost:0 on one node)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.launcher == "none" and self.world_size > 1:
            raise ValueError(f"launcher none runs one process, but nodes {self.nodes} × nproc_per_node "
                             f"{self.nproc_per_node} asks for {self.world_size}: use torchrun or accelerate")
        if self.world_size % self.sequence_parallel:
            raise KeyProblem("launch.sequence_parallel", f"{self.sequence_parallel} does not divide the world size, "
                                                         f"nodes {self.nodes} × nproc_per_node {self.nproc_per_node} "
                                                         f"= {self.world_size}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nodes > 1 and (host in ("localhost", "127.0.0.1", "::1", "[::1]") or port == "0"):
            raise KeyProblem("launch.rdzv_endpoint", f"{self.rdzv_endpoint!r} cannot be reached by the other "
                                                     f"{self.nodes - 1} node(s): name the first node and a port, "
                                                     "e.g. node001:29500")
        return self


class MergeOutput(Section):
    """Where one `merge` instance writes."""

    out_dir: OutPath
    """Hugging Face model folder (safetensors, config with the composed RoPE scaling, tokenizer, generation config)
    that plain `AutoModelForCausalLM.from_pretrained` loads."""
    metrics_file: OutPath
    """DVC metrics: parameters, context length, RoPE scaling, tied embeddings."""


class MergeParams(Section):
    """Stage `merge`: a training stage's output (adapter + its base, or a full model) → one plain Hugging Face model
    folder. One instance per training stage (dvc.yaml `merge@<stage>`), each with its own subsection here."""

    dtype: MergeDtype = "auto"
    """Weights dtype of the merged folder; auto keeps the base model's own dtype (merging itself runs in fp32)."""
    extend: MergeOutput = MergeOutput(out_dir=Path("data/extended_model"),
                                      metrics_file=Path("data/metrics/merge_extend.json"))
    """merge@extend: the extended model, base of the sft stage."""
    sft: MergeOutput = MergeOutput(out_dir=Path("data/sft_model"), metrics_file=Path("data/metrics/merge_sft.json"))
    """merge@sft: the fine-tuned long-context model, the pipeline's final product."""


class EvalModel(Section):
    """One model the evaluation stages compare."""

    path: Source | None = None
    """A Hugging Face causal-LM folder (e.g. a merge stage's out_dir) or a hub id (needs the network). None (not in
    params.yaml, whose dvc.yaml names each path as a dependency: DVC refuses a null one) follows the pipeline:
    `extended` and `sft` are merge.extend.out_dir and merge.sft.out_dir (PIPELINE_MODELS), any other name is
    model.name_or_path."""
    interpolate: bool = False
    """Interpolate its RoPE to model.target_context when loading (model.rope_type and model.rope_headroom, from
    model.original_context), as extend does: the base model's "interpolation without training" baseline. Merged
    models already carry their scaling."""
    chat: bool = False
    """An instruction-tuned model: the evaluations that generate answers (LongBench, LongBench v2, RULER, lm-eval)
    put each prompt in its tokenizer's chat template as one user turn, as their own tools do for chat models. The
    pipeline's `sft` model carries the prompt format it was fine-tuned in (prepare_sft.template) as its template."""
    extrapolate: bool = False
    """Evaluate it at lengths beyond its positions (`max_position_embeddings`, after interpolation): a deliberate
    extrapolation study, such as the base model as pre-trained at the extended lengths. Otherwise an evaluation that
    would read past them stops, naming the length."""


class EvalPerplexityParams(Section):
    """Stage `eval_perplexity`: perplexity of each eval_models model on prepare_eval's stream at each length, both the
    standard strided number and LongLoRA's own (longlora/evaluation/perplexity.py)."""

    lengths: tuple[int, ...] | None = None
    """Context lengths (tokens per window) to evaluate at; None: prepare_eval.lengths. The paper: 2k … 32k (PG19,
    proof-pile), up to 100k for its 100k models."""
    stride: int | None = None
    """Strided perplexity: a whole window starts every `stride` tokens (each token is still scored at most once, with
    more context the smaller the stride; the tail after the last whole window is not scored); None: every length
    itself (windows side by side). At most the shortest length."""
    windowed_step: int = Field(256, gt=0)
    """LongLoRA's number: a window of each length starts every this many tokens (its eval.py: 256)."""
    batch_size: int = Field(1, gt=0)
    """Windows per forward pass."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    attention: Attention = "dense"
    """dense: what the paper's tables use; s2: S²-Attn at evaluation too (the shared `s2attn` group size), which
    the paper also reports (LongLoRA-trained models score better dense)."""
    max_tokens: int | None = Field(None, gt=0)
    """Evaluate on the stream's first this many tokens (the same tokens at every length: a CPU budget); None: the
    whole stream. Must leave room for LongLoRA's windows at the longest length (longest + windowed_step + 1)."""
    out_dir: OutPath = Path("data/eval_results/perplexity")
    """One folder per model, `<out_dir>/<name>/perplexity.csv` (model, length, perplexity, windowed_perplexity,
    tokens_scored, windows): `dvc plots show` draws perplexity against context length, one line per model."""
    metrics_dir: OutPath = Path("data/metrics/eval_perplexity")
    """DVC metrics, `<metrics_dir>/<name>.json`: both perplexities per length, `ppl.<length>` (strided) and
    `ppl_windowed.<length>`, so that `dvc metrics show <metrics_dir>` is a model-by-length table."""

    def check_windows(self) -> None:
        """Raise ValueError unless the (resolved) lengths, stride and max_tokens leave windows to score."""
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be token counts of at least 2, got {list(self.lengths or ())}")
        if self.stride is not None and self.stride > min(self.lengths):
            raise ValueError(f"stride {self.stride} exceeds the shortest length {min(self.lengths)}: windows would "
                             "leave tokens unscored")
        longest = max(self.lengths)
        if self.max_tokens is not None and self.max_tokens <= longest + self.windowed_step:
            raise ValueError(f"max_tokens {self.max_tokens} leaves no LongLoRA window at length {longest} (it "
                             f"needs more than length + windowed_step = {longest + self.windowed_step})")


class EvalPasskeyParams(Section):
    """Stage `eval_passkey`: passkey retrieval of each eval_models model over a grid of prompt lengths × key depths
    (longlora/evaluation/passkey.py: LongLoRA's prompt, lengths and depths in the model's tokens, greedy decoding)."""

    lengths: tuple[int, ...] | None = None
    """Prompt lengths in tokens (the prompt and the answer fit in each); None: model.target_context / 4, / 2, × 1.
    The paper: 1k … 32k for its 32k models, up to 100k for the 100k ones."""
    depths: tuple[float, ...] = PASSKEY_DEPTHS
    """Where the key line sits, as a share of the filler tokens before it (0: first, 1: last)."""
    trials: int = Field(2, gt=0)
    """Prompts per cell (length, depth). With 4 or more, every cell uses the keys of seeds seed, seed + 1, … (cells
    compared on the same keys); with fewer, each cell has keys of its own (cell c: seed + c × trials + t), so that
    one trial per cell does not test one key everywhere (longlora.evaluation.passkey.cell_seeds)."""
    seed: int = 0
    """Seed of the first key."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    out_dir: OutPath = Path("data/eval_results/passkey")
    """One folder per model, `<out_dir>/<name>/`: passkey.csv (accuracy per length and depth), trials.csv (every
    prompt: key, answer, prompt tokens, correct) and heatmap.png (length × depth), a DVC plot."""
    metrics_dir: OutPath = Path("data/metrics/eval_passkey")
    """DVC metrics, `<metrics_dir>/<name>.json`: `accuracy` overall and `by_length.<length>` (per depth: passkey.csv
    and the heatmap)."""

    @model_validator(mode="after")
    def _grid(self) -> Self:
        _check_positive_lengths(self.lengths)
        if not self.depths or not all(0.0 <= depth <= 1.0 for depth in self.depths):
            raise ValueError(f"depths must be shares of the filler in [0, 1], got {list(self.depths)}")
        return self

class EvalLongQAParams(Section):
    """Stage `eval_longqa` (one instance per eval_models name): held-out questions in the SFT prompt format
    (`prepare_sft.template`), greedy answers scored by exact match and token F1 (longlora/evaluation/qa.py)."""

    input: InPath = Path("data/corpus/longqa_heldout.json")
    """LongAlpaca-format records ({"instruction", "output", optional "input"}) that no training stage reads; the
    default is prepare_corpus's held-out LongQA (questions about source files of the held-out split)."""
    max_examples: int | None = Field(64, gt=0)
    """Score the first this many records; None: all."""
    max_new_tokens: int = Field(32, gt=0)
    """Longest answer generated; its first line is scored."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    out_dir: OutPath = Path("data/eval_results/longqa")
    """One folder per model, `<out_dir>/<name>/predictions.jsonl`: every question's reference, prediction and
    scores."""
    metrics_dir: OutPath = Path("data/metrics/eval_longqa")
    """DVC metrics, `<metrics_dir>/<name>.json`: `exact_match` and `f1` (0–100), by question kind too."""


class EvalRulerParams(Section):
    """Stage `eval_ruler` (one instance per eval_models name): RULER's synthetic tasks at each prompt length, scored
    as RULER scores them, and the effective length (longlora/evaluation/ruler.py; docs/evaluation.md)."""

    lengths: tuple[int, ...] | None = None
    """Prompt lengths in tokens, generation included (RULER: 4096 … 131072); None: model.target_context / 2 and × 1
    (at a quarter most of RULER's prompts do not fit a tiny tokenizer's few hundred tokens)."""
    tasks: tuple[str, ...] = tuple(RULER_OFFLINE_TASKS)
    """RULER task names (scripts/synthetic.yaml): the needle-in-a-haystack variants, vt, cwe, fwe (the default: they
    need no data set), and qa_1, qa_2 (SQuAD, HotpotQA: they read qa_squad, qa_hotpotqa, and are skipped with a note
    in the metrics while that is null or a hub set cannot be loaded). A task whose smallest prompt exceeds a length
    is reported as not fitting there (RULER's own code would loop forever)."""
    samples: int = Field(2, gt=0)
    """Prompts per task and length (RULER: 500; the embedded default's 2 keep `make repro` within its budget)."""
    seed: int = 42
    """Seed of every task at every length (RULER's default)."""
    model_template: str | None = None
    """RULER's template around each prompt, for every model: its name in RULER's scripts/data/template.py (base:
    none; meta-chat, meta-llama3, …: for the chat models RULER wraps) or chat (the model's own chat template). None:
    chat for the eval_models marked `chat`, base for the others."""
    haystack: InPath | None = None
    """Prose for the essay-haystack tasks: RULER's PaulGrahamEssays.json ({"text": …}, made by its
    download_paulgraham_essay.py), or any UTF-8 text file. None: the held-out split of the embedded corpus (Python
    sources), so those tasks' scores are RULER-format but not comparable to published essay-haystack numbers."""
    qa_squad: Source | None = None
    """qa_1's questions: RULER's squad.json (SQuAD v2.0's dev-v2.0.json, as its download_qa_dataset.sh fetches it),
    or the hub's copy, rajpurkar/squad_v2 (split validation; needs the network or the `datasets` cache). None: qa_1
    is skipped. A local path that does not exist stops the stage; a hub set that cannot be loaded skips qa_1."""
    qa_hotpotqa: Source | None = None
    """qa_2's questions: RULER's hotpotqa.json (HotpotQA's hotpot_dev_distractor_v1.json, as its download_qa_dataset.sh
    fetches it), or the hub's copy, hotpotqa/hotpot_qa (configuration distractor, split validation). None: qa_2 is
    skipped. A local path that does not exist stops the stage; a hub set that cannot be loaded skips qa_2."""
    threshold: float = Field(85.6, ge=0, le=100)
    """Effective length: the longest length up to which every length's average clears this (RULER: 85.6, Llama-2-7B's
    average at 4K)."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    out_dir: OutPath = Path("data/eval_results/ruler")
    """One folder per model, `<out_dir>/<name>/`: for each length a folder `<length>/` as RULER's own tools read it
    (`<task>.jsonl` predictions with RULER's fields, summary.csv as its evaluate.py writes it), ruler.csv (score per
    task and length) and heatmap.png (task × length, a DVC plot)."""
    metrics_dir: OutPath = Path("data/metrics/eval_ruler")
    """DVC metrics, `<metrics_dir>/<name>.json`: `average.<length>` (over the tasks that fit every length),
    `effective_length` (0: not even the shortest), `wavg_inc`, `wavg_dec`, `skipped` (task: why)."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("empty: name RULER tasks")
        unknown = [name for name in value if name not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(RULER_TASKS)}")
        return value

    @field_validator("model_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None and value not in (*RULER_MODEL_TEMPLATES, RULER_CHAT_TEMPLATE):
            raise ValueError(f"unknown RULER model template {value!r}; known: {', '.join(RULER_MODEL_TEMPLATES)}, "
                             f"{RULER_CHAT_TEMPLATE}")
        return value

    @model_validator(mode="after")
    def _grid(self) -> Self:
        _check_positive_lengths(self.lengths)
        return self


class EvalHarnessParams(Section):
    """Stage `eval_harness` (one instance per eval_models name): lm-evaluation-harness tasks on the model as the
    pipeline loads it (position interpolation, dtype, device), with lm-eval's own results (docs/evaluation.md)."""

    tasks: tuple[str, ...] = ("longlora_longbench2",)
    """lm-eval task or group names: its own (`longbench2`, `babilong`, `ruler`, `infinitebench`, …: they read the
    hub) or those of `include_path`. Default: LongBench v2's four-choice prompt on the embedded set, offline."""
    include_path: InPath = Path("longlora/evaluation/harness_tasks")
    """A folder of task YAMLs beside lm-eval's own, as its `--include_path` (a DVC dependency): by default this
    project's local tasks, `longlora_longbench2`."""
    metadata: dict[str, object] = {"longbench2_path": "data/corpus/longbench2.jsonl"}
    """lm-eval's `--metadata`, passed to every task: the local tasks' files (`longbench2_path`: a LongBench v2 file,
    JSON list or lines), RULER's `max_seq_lengths` (lm-eval's default: [4096] only), `pretrained` for the tasks that
    load a tokenizer by name."""
    task_metadata: dict[str, dict[str, object]] = {}
    """Additions to `metadata` for one task or group, where tasks read the same key differently (babilong's
    `max_seq_lengths` is one of its dataset configs, "32k"; RULER's a list of lengths): the tasks are run in as many
    lm-eval calls as there are distinct metadata, and their results merged."""
    limit: float | None = Field(None, gt=0)
    """At most this many documents per task (a fraction when below 1), as lm-eval's `--limit`; None: all."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples, as `--num_fewshot`; None: each task's own."""
    batch_size: int = Field(1, gt=0)
    """Requests per forward pass."""
    max_length: int | None = Field(None, gt=0)
    """lm-eval's `max_length`: longer contexts lose their start (lm-eval truncates on the left). None:
    model.target_context."""
    seed: int = 1234
    """lm-eval's seeds (python, numpy, torch, few-shot sampling), its own default."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    out_dir: OutPath = Path("data/eval_results/harness")
    """One folder per model, `<out_dir>/<name>/`: results.json (lm-eval's, without its clock and machine fields)
    and `samples_<task>.jsonl` (every document's prompt, answers and scores, as lm-eval's --log_samples writes)."""
    metrics_dir: OutPath = Path("data/metrics/eval_harness")
    """DVC metrics, `<metrics_dir>/<name>.json`: `results.<task>.<metric>` for each task's (and group's) numbers as
    lm-eval reports them, e.g. `results.longlora_longbench2.acc`."""

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("empty: name lm-eval tasks")
        return value

    @model_validator(mode="after")
    def _metadata_of_listed_tasks(self) -> Self:
        stray = sorted(set(self.task_metadata) - set(self.tasks))
        if stray:
            raise ValueError(f"task_metadata names {stray}, which tasks does not list")
        return self


class LongBenchParams(Section):
    """Stage `longbench` (one instance per eval_models name): LongBench's prompts, greedy predictions and its own
    scoring (longlora/evaluation/longbench.py)."""

    input: Source = "data/corpus/longbench"
    """A local folder of LongBench-format `<dataset>.jsonl` files (`input`, `context`, `answers`, `all_classes`,
    `length`), e.g. the `data/` folder of LongBench's data.zip, or the hub dataset THUDM/LongBench (its data.zip;
    needs the network once). Default: the small sets prepare_corpus makes from held-out code."""
    datasets: tuple[str, ...] | None = None
    """LongBench task names to run; None: every task the local folder has a file for (from the hub: all of
    LongBench's, or of LongBench-E's)."""
    longbench_e: bool = False
    """LongBench-E: read `<dataset>_e.jsonl` and also score by context length (0-4k, 4-8k, 8k+ words)."""
    max_examples: int | None = Field(None, gt=0)
    """At most this many examples per task (each file's first); None: all."""
    max_length: int | None = Field(None, gt=0)
    """Prompt tokens kept; longer prompts are cut in the middle (LongBench: 31500 for 32k models). None:
    model.target_context minus the longest generation (max_new_tokens, or LongBench's 512)."""
    max_new_tokens: int | None = Field(None, gt=0)
    """Cap on each task's generation length; None: LongBench's own (32 to 512 tokens per task)."""
    dtype: EvalDtype = "float32"
    """Weights dtype the models are loaded in (bfloat16 on GPUs)."""
    cpu_threads: int | None = Field(None, gt=0)
    """torch's CPU threads while predicting; None: torch's default (one per core). Decoding a tiny model is a
    chain of small matrix products that more threads do not speed up, and on a busy machine threads waiting for each
    other slow it down many times over (docs/performance.md)."""
    out_dir: OutPath = Path("data/longbench")
    """One folder per model, `<out_dir>/<model>`: LongBench's prediction files `<dataset>.jsonl` ({"pred",
    "answers", "all_classes", "length"}) and result.json (score per task, as LongBench's eval.py writes it)."""
    metrics_dir: OutPath = Path("data/metrics/longbench")
    """One DVC metrics file per model, `<metrics_dir>/<model>.json`: scores per task and per category (and per
    length bucket for LongBench-E), examples (seconds per example: data/logs/longbench@<model>/timings.json)."""

    @field_validator("datasets")
    @classmethod
    def _known(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("empty: name LongBench tasks, or null for all")
            unknown = [name for name in value if name not in LONGBENCH_DATASETS]
            if unknown:
                raise ValueError(f"unknown LongBench tasks {unknown}; known: {', '.join(LONGBENCH_DATASETS)}")
        return value

    @model_validator(mode="after")
    def _in_longbench_e(self) -> Self:
        if self.longbench_e and self.datasets is not None:
            missing = [name for name in self.datasets if name not in LONGBENCH_E_DATASETS]
            if missing:
                raise ValueError(f"longbench_e: LongBench-E has no {missing}; it has {', '.join(LONGBENCH_E_DATASETS)}")
        return self


class LongBench2Params(Section):
    """Stage `longbench2` (one instance per eval_models name): LongBench v2's four-choice questions predicted as its
    pred.py and scored as its result.py (longlora/evaluation/longbench2.py)."""

    input: Source = "data/corpus/longbench2.jsonl"
    """A LongBench v2 file (a JSON list, as its data.json, or JSON lines: `_id`, `domain`, `sub_domain`, `difficulty`,
    `length`, `question`, `choice_A` … `choice_D`, `answer`, `context`), or the hub dataset THUDM/LongBench-v2 (503
    questions; needs the network once). Default: the embedded set prepare_corpus makes from held-out code."""
    max_examples: int | None = Field(None, gt=0)
    """At most this many questions (the first); None: all."""
    mode: Literal["0shot", "cot", "no_context"] = "0shot"
    """pred.py's prompt: 0shot (its default), cot (reasoning first, then the answer: --cot), no_context (the
    question alone: --no_context, what the model knows without the text)."""
    max_length: int | None = Field(None, gt=0)
    """Prompt tokens kept, cut in the middle as pred.py cuts (its model2maxlen.json: 120000 for 128K models). None:
    model.target_context minus the longest generation."""
    max_new_tokens: int = Field(128, gt=0)
    """Tokens of the answer (pred.py: 128)."""
    max_new_tokens_cot: int = Field(1024, gt=0)
    """Tokens of the reasoning in cot mode (pred.py: 1024)."""
    compensated: bool = False
    """result.py's `compensated` flag: a question without a readable answer counts 0.25 (chance) instead of 0."""
    dtype: EvalDtype = "auto"
    """Weights dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    out_dir: OutPath = Path("data/eval_results/longbench2")
    """One folder per model, `<out_dir>/<name>/`: pred.py's prediction file `<name>.jsonl` and result.txt as
    result.py writes it for that file."""
    metrics_dir: OutPath = Path("data/metrics/longbench2")
    """DVC metrics, `<metrics_dir>/<name>.json`: accuracy (0–100) `overall`, `easy`, `hard`, `short`, `medium`,
    `long`, with `questions` and `nulls` (answers pred.py's regexes could not read)."""


class ReportParams(Section):
    """Stage `report`: the evaluations of every eval_models model side by side (tables, the perplexity plot, the
    passkey heatmaps, LongBench), each merged model's card with its results, and the short summary `make repro`
    prints (stages/report.py)."""

    out_dir: OutPath = Path("data/report")
    """README.md (the report), perplexity.png, passkey/<model>.png (the heatmaps), models/<merge source>/README.md
    (each merged model's Hugging Face card with its evaluation results, to copy into the model folder before
    uploading it) and summary.txt (perplexity per length, passkey accuracy and LongBench average per model)."""
    metrics_file: OutPath = Path("data/metrics/report.json")
    """DVC metrics: the models reported, the evaluations found for each, the cards written."""


DEFAULT_EVAL_MODELS = {
    "base_pi": EvalModel(interpolate=True),
    "extended": EvalModel(),
}
