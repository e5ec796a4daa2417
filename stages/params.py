"""Typed, validated `params.yaml`, checked as a whole before any stage does work: the sections (stages/sections.py)
put together, the defaults that derive from other keys, the rules across sections, the path rules, and loading.

An unknown key, a duplicate key, a wrong type or an impossible combination stops with the key path and the reason,
e.g. `params.yaml: s2attn.group_size: target_context 1000 is not divisible by the S²-Attn group size 256`.

Paths are checked as a whole too: every output (`out_dir`, `metrics_file`) has a place of its own, none inside
another, none overlapping an input a stage reads, none the working directory, a folder above it or the home folder;
empty paths are rejected and `~` is expanded. (What is on disk is checked when a stage starts: longlora/io.py.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Self

import yaml
from pydantic import ValidationError, field_validator, model_validator

from longlora.errors import InputError
from longlora.io import StageOutput, path_relation, resolved, same_path
from longlora.sources import is_hub_model_id, is_hub_name, local_model, looks_local
from stages.registry import (
    EVAL_STAGES,
    FINAL_STAGES,
    MERGE_SOURCES,
    PIPELINE_MODELS,
    RESERVED_MODEL_NAMES,
    STAGES,
    TRAINING_STAGES,
    stage_key,
)
from stages.sections import (
    DEFAULT_EVAL_MODELS,
    BuildBaseModelParams,
    EmbeddedCorpusParams,
    EvalHarnessParams,
    EvalLongQAParams,
    EvalModel,
    EvalPasskeyParams,
    EvalPerplexityParams,
    EvalRulerParams,
    ExtendParams,
    KeyProblem,
    LaunchParams,
    LongBench2Params,
    LongBenchParams,
    LoraParams,
    MergeParams,
    ModelParams,
    PrepareCorpusParams,
    PrepareEvalParams,
    PreparePretrainParams,
    PrepareSftParams,
    ReportParams,
    S2AttnParams,
    Section,
    SftParams,
    sequence_parallel_problem,
)

DEFAULT_PARAMS_FILE = Path("params.yaml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ParamsError(InputError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key path."""


class Params(Section):
    """The whole params.yaml."""

    embedded_corpus: EmbeddedCorpusParams = EmbeddedCorpusParams()
    build_base_model: BuildBaseModelParams = BuildBaseModelParams()
    model: ModelParams = ModelParams()
    s2attn: S2AttnParams = S2AttnParams()
    lora: LoraParams = LoraParams()
    prepare_corpus: PrepareCorpusParams = PrepareCorpusParams()
    prepare_pretrain: PreparePretrainParams = PreparePretrainParams()
    prepare_sft: PrepareSftParams = PrepareSftParams()
    prepare_eval: PrepareEvalParams = PrepareEvalParams()
    extend: ExtendParams = ExtendParams()
    sft: SftParams = SftParams()
    merge: MergeParams = MergeParams()
    launch: LaunchParams = LaunchParams()
    eval_models: dict[str, EvalModel] = DEFAULT_EVAL_MODELS
    """The models every evaluation stage compares, by name (dvc.yaml runs one instance per name); shared by the
    evaluation stages."""
    eval_perplexity: EvalPerplexityParams = EvalPerplexityParams()
    eval_passkey: EvalPasskeyParams = EvalPasskeyParams()
    eval_longqa: EvalLongQAParams = EvalLongQAParams()
    eval_ruler: EvalRulerParams = EvalRulerParams()
    eval_harness: EvalHarnessParams = EvalHarnessParams()
    longbench: LongBenchParams = LongBenchParams()
    longbench2: LongBench2Params = LongBench2Params()
    report: ReportParams = ReportParams()

    @model_validator(mode="after")
    def _derive_defaults(self) -> Self:
        """Fill in every default that derives from another value, here and nowhere else: stages read the effective
        value, and their metrics report it (`params` in each metrics file). Runs before the checks below."""
        target = self.model.target_context
        quarter_half_whole = tuple(sorted({max(target // 4, 1), max(target // 2, 1), target}))
        derived = {
            "prepare_corpus": {"eval_min_tokens": 2 * target, "longqa_min_tokens": target // 2,
                               "longqa_max_tokens": int(0.85 * target)},
            "prepare_pretrain": {"block_length": target},
            "prepare_sft": {"max_length": target},
            "prepare_eval": {"lengths": quarter_half_whole},
            "extend": {"data": self.prepare_pretrain.out_dir},
            "sft": {"data": self.prepare_sft.out_dir, "replay_data": self.prepare_pretrain.out_dir,
                    "base_model": str(self.merge.extend.out_dir),
                    "padding_free": self.sft.attention == "s2" and self.s2attn.shift},
            "eval_perplexity": {"lengths": self.prepare_eval.lengths or quarter_half_whole},
            "eval_passkey": {"lengths": quarter_half_whole},
            "eval_ruler": {"lengths": tuple(sorted({max(target // 2, 1), target}))},
            "eval_harness": {"max_length": target},
            "longbench": {"max_length": target - (self.longbench.max_new_tokens or 512)},
            "longbench2": {"max_length": target - max(self.longbench2.max_new_tokens,
                                                      self.longbench2.max_new_tokens_cot
                                                      if self.longbench2.mode == "cot" else 0)},
        }
        for name, defaults in derived.items():
            section = getattr(self, name)
            unset = {key: value for key, value in defaults.items() if getattr(section, key) is None}
            if unset:
                # Frozen for the stages that read it; this validator is still building the object.
                object.__setattr__(self, name, section.model_copy(update=unset))
        models = {name: model if model.path is not None else model.model_copy(update={"path": self._default_path(name)})
                  for name, model in self.eval_models.items()}
        object.__setattr__(self, "eval_models", models)
        return self

    def _default_path(self, eval_model: str) -> str:
        """Where an eval_models entry without a path points: a merged model of the pipeline, else the model itself."""
        source = PIPELINE_MODELS.get(eval_model)
        return str(getattr(self.merge, source).out_dir) if source else self.model.name_or_path

    @field_validator("eval_models")
    @classmethod
    def _model_names(cls, value: dict[str, EvalModel]) -> dict[str, EvalModel]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"model name {name!r}: use letters, digits, - and _ (it names dvc.yaml stages and "
                                 "files)")
            if name in RESERVED_MODEL_NAMES:
                raise ValueError(f"model name {name!r} is reserved (`python -m stages.longbench score PRED_DIR`); "
                                 "name it otherwise")
        return value

    @model_validator(mode="after")
    def _cross_section(self) -> Self:
        try:
            self.s2attn.group_size_for(self.model.target_context)
        except ValueError as err:
            raise ValueError(f"s2attn vs model.target_context: {err}") from None
        return self

    @model_validator(mode="after")
    def _s2attn_variants_fit(self) -> Self:
        """Document-aware S²-Attn (extend.document_attention, sft.padding_free) lays S² groups out per document,
        which only the shifted S²-Attn does: the no-shift ablation (s2attn.shift false) takes no packed documents."""
        if self.extend.document_attention and self.extend.attention == "s2" and not self.s2attn.shift:
            raise KeyProblem("extend.document_attention", "document-aware attention needs the shifted S²-Attn; with "
                             "s2attn.shift false (the short-attention ablation) set extend.document_attention false")
        if self.sft.padding_free and self.sft.attention != "s2":
            raise KeyProblem("sft.padding_free", "packed rows need document-aware S²-Attn (sft.attention s2); with "
                             f"sft.attention {self.sft.attention} set sft.padding_free false")
        if self.sft.padding_free and not self.s2attn.shift:
            raise KeyProblem("sft.padding_free", "packed rows need the shifted S²-Attn; with s2attn.shift false (the "
                             "short-attention ablation) set sft.padding_free false")
        return self

    @model_validator(mode="after")
    def _replay_mixes(self) -> Self:
        """Replay pieces are shuffled among the examples; length-grouped examples are read in their written order."""
        if self.sft.replay_share > 0 and self.prepare_sft.group_by_length:
            raise KeyProblem("sft.replay_share", "replay is shuffled among the examples, but "
                             "prepare_sft.group_by_length makes sft read them in their written order; set one off")
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> Self:
        for stage in TRAINING_STAGES:
            p = self.section(stage)
            if p.warmup_steps > p.max_steps:
                raise KeyProblem(f"{stage}.warmup_steps", f"{p.warmup_steps} exceeds {stage}.max_steps {p.max_steps}: "
                                                          "the learning rate would never reach lr; warm up for fewer "
                                                          "steps")
        return self

    @model_validator(mode="after")
    def _data_fits_model(self) -> Self:
        target = self.model.target_context
        block = self.prepare_pretrain.block_length
        if block > target:
            raise ValueError(
                f"prepare_pretrain.block_length {block} exceeds model.target_context {target}: "
                "the model cannot take blocks longer than the context it is extended to"
            )
        try:
            self.s2attn.group_size_for(block)
        except ValueError as err:
            raise ValueError(f"prepare_pretrain.block_length vs s2attn: {err}") from None
        unit = self.prepare_pretrain.synthetic_min_length
        if unit is not None and block % unit:
            raise KeyProblem("prepare_pretrain.synthetic_min_length",
                             f"{unit} does not divide prepare_pretrain.block_length {block}")
        low, high = self.prepare_corpus.longqa_min_tokens, self.prepare_corpus.longqa_max_tokens
        if low > high:
            raise ValueError(f"prepare_corpus: LongQA instructions of {low} to {high} tokens: the minimum exceeds the "
                             "maximum (longqa_min_tokens, longqa_max_tokens, defaults from model.target_context)")
        if self.prepare_sft.max_length > target:
            raise ValueError(
                f"prepare_sft.max_length {self.prepare_sft.max_length} exceeds model.target_context {target}"
            )
        if self.longbench.max_length < 2:
            raise KeyProblem("longbench.max_length", f"{self.longbench.max_length} tokens (model.target_context "
                             f"{target} minus the generation length): set it, or max_new_tokens, explicitly")
        return self

    @model_validator(mode="after")
    def _batch_fits_world(self) -> Self:
        """Each training stage's global batch splits evenly over the processes `launch` starts (checked again by the
        stage against the WORLD_SIZE it really runs with, e.g. under a SLURM allocation of another size)."""
        launch = self.launch
        where = f" (launch.nodes {launch.nodes} × launch.nproc_per_node {launch.nproc_per_node}"
        where += f" / launch.sequence_parallel {launch.sequence_parallel})" if launch.sequence_parallel > 1 else ")"
        for stage in TRAINING_STAGES:
            problem = self.section(stage).batch_split_problem(launch.data_parallel, where)
            if problem:
                raise KeyProblem(f"{stage}.global_batch_size", problem)
            section = self.section(stage)
            group_size = self.s2attn.group_size_for(self.model.target_context) if section.attention == "s2" else None
            problem = sequence_parallel_problem(launch.sequence_parallel, section.attention, group_size,
                                                self.model.target_context if stage == "extend" else None)
            if problem:
                raise KeyProblem("launch.sequence_parallel", f"{problem} ({stage})")
        return self

    @model_validator(mode="after")
    def _evaluations_fit(self) -> Self:
        try:
            self.eval_perplexity.check_windows()
        except ValueError as err:
            raise KeyProblem("eval_perplexity", f"{err} (lengths default to prepare_eval.lengths)") from None
        return self

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage instance of dvc.yaml in pipeline order: STAGES, each evaluation per eval_models name, then
        FINAL_STAGES."""
        return STAGES + tuple(f"{stage}@{name}" for stage in EVAL_STAGES for name in self.eval_models) + FINAL_STAGES

    def check_base_context(self, source: str = "params.yaml") -> None:
        """Refuse, for every stage, a target context shorter than the local base model's (its config.json): the
        extend stage would refuse it only after the data stages had run."""
        m = self.model
        folder = local_model(m.name_or_path)
        if m.original_context is not None or folder is None:  # the model validator checked the former
            return
        original = folder.context_length  # None when config.json is missing or unreadable: its loader names it
        config = folder.folder / "config.json"
        if original is not None and m.target_context < original:
            raise ParamsError(f"{source}: model.target_context {m.target_context} is shorter than the context of "
                              f"model.name_or_path, {original} ({config}): extension needs a longer target")

    def section(self, stage: str) -> Section:
        """The stage's own section (`merge@extend`: `merge.extend`; `eval_passkey@base`: `eval_passkey`)."""
        section = self
        for part in stage_key(stage).split("."):
            section = getattr(section, part)
        return section

    def destination(self, stage: str) -> tuple[Path, str, Path, str]:
        """(output folder, its params key, metrics file, its params key) of a stage instance; an evaluation's are
        `<out_dir>/<name>` and `<metrics_dir>/<name>.json` of its section."""
        name, _, model = stage.partition("@")
        section = self.section(stage)
        if name in EVAL_STAGES:
            if model not in self.eval_models:
                raise InputError(f"{stage}: no model {model!r} in eval_models ({', '.join(self.eval_models)})")
            return (section.out_dir / model, f"{name}.out_dir", section.metrics_dir / f"{model}.json",
                    f"{name}.metrics_dir")
        key = stage_key(stage)
        return section.out_dir, f"{key}.out_dir", section.metrics_file, f"{key}.metrics_file"

    def _outputs(self) -> list[tuple[str, str, Path]]:
        """(stage, key, path) of every file or folder a stage writes, in pipeline order."""
        outputs = []
        for stage in self.stages:
            out_dir, out_key, metrics_file, metrics_key = self.destination(stage)
            outputs += [(stage, out_key, out_dir), (stage, metrics_key, metrics_file)]
            checkpoint_dir = getattr(self.section(stage), "checkpoint_dir", None)
            if checkpoint_dir is not None:
                outputs.append((stage, f"{stage_key(stage)}.checkpoint_dir", checkpoint_dir))
        return outputs

    def _local_inputs(self) -> list[tuple[set[str], str, str]]:
        """(stages reading it, key, path) of every input that is a local path rather than a hub name."""
        inputs = []
        if not is_hub_model_id(self.model.name_or_path):
            inputs.append((set(STAGES) - {"build_base_model"}, "model.name_or_path", self.model.name_or_path))
        for stage in STAGES:
            source = getattr(self.section(stage), "input", None)
            if source is not None and not is_hub_name(source):
                inputs.append(({stage}, f"{stage}.input", source))
        for stage in TRAINING_STAGES:
            section = self.section(stage)
            inputs.append(({stage}, f"{stage}.data", str(section.data)))
            if section.deepspeed is not None:
                inputs.append(({stage}, f"{stage}.deepspeed", str(section.deepspeed)))
        if not is_hub_model_id(self.sft.base_model):
            inputs.append(({"sft"}, "sft.base_model", self.sft.base_model))
        if self.sft.replay_share > 0:
            inputs.append(({"sft"}, "sft.replay_data", str(self.sft.replay_data)))
        for source in MERGE_SOURCES:
            inputs.append(({f"merge@{source}"}, f"{source}.out_dir", str(self.section(source).out_dir)))
        for name, model in self.eval_models.items():
            if not is_hub_model_id(model.path):
                inputs.append(({f"{stage}@{name}" for stage in EVAL_STAGES}, f"eval_models.{name}.path", model.path))
        inputs.append(({f"eval_perplexity@{name}" for name in self.eval_models}, "prepare_eval.out_dir",
                       str(self.prepare_eval.out_dir)))
        if not is_hub_name(self.longbench.input):
            inputs.append(({f"longbench@{name}" for name in self.eval_models}, "longbench.input",
                           self.longbench.input))
        inputs.append(({f"eval_longqa@{name}" for name in self.eval_models}, "eval_longqa.input",
                       str(self.eval_longqa.input)))
        return inputs

    @model_validator(mode="after")
    def _paths_apart(self) -> Self:
        """No stage may replace another's output, or a place a stage reads from, whatever the spelling."""
        outputs = [(stage, key, path, resolved(path)) for stage, key, path in self._outputs()]
        for i, (_, key_a, path_a, place_a) in enumerate(outputs):
            for _, key_b, path_b, place_b in outputs[i + 1:]:
                relation = path_relation(place_b, place_a)
                if relation:
                    raise KeyProblem(key_b, f"{str(path_b)!r} {relation} {key_a} {str(path_a)!r}: every stage "
                                            "output needs a place of its own")
        folders = [(stage, key, path, place) for stage, key, path, place in outputs if key.endswith(".out_dir")]
        for readers, key, source in self._local_inputs():
            place = resolved(source)
            producer = next(((stage, out_key, out_path) for stage, out_key, out_path, out_place in folders
                             if path_relation(place, out_place) in ("is the same place as", "is inside")), None)
            if producer is not None:
                # A product of the pipeline (the default inputs are): it must not be read by the stage writing it.
                stage, out_key, out_path = producer
                if key == "model.name_or_path" and stage == "build_base_model" and place != resolved(out_path):
                    raise KeyProblem(key, f"{source!r} is inside build_base_model.out_dir {str(out_path)!r}: name the "
                                          "folder itself to build and use the embedded model, or another model")
                if stage in readers:
                    raise KeyProblem(key, f"{source!r} is inside {out_key} {str(out_path)!r}: the stage would read "
                                          "from the folder it replaces")
                continue
            for _, out_key, out_path, out_place in outputs:
                relation = path_relation(out_place, place)
                if relation:
                    raise KeyProblem(out_key, f"{str(out_path)!r} {relation} {key} {source!r}: a stage never writes "
                                              "where data is read from")
        return self

    @model_validator(mode="after")
    def _follow_the_model(self) -> Self:
        """What params.yaml can check against the model's own folder when it is local (its config.json and
        tokenizer files, read as JSON; a hub id is checked by the stage that loads it): resolve `bos: auto`, refuse
        a BOS policy, an original context or an evaluation path the model contradicts."""
        m = self.model
        embedded = same_path(m.name_or_path, self.build_base_model.out_dir)
        folder = local_model(m.name_or_path)
        # The embedded tokenizer's BOS is a start-of-sequence `<s>` (longlora/embedded/tiny.py), whatever the folder
        # holds
        # before build_base_model has run.
        chat_bos = False if embedded else (folder.bos_opens_chat_turns() if folder is not None else None)
        for name in ("prepare_pretrain", "prepare_eval"):
            section = getattr(self, name)
            if section.bos == "auto" and chat_bos is not None:
                resolved_bos = "none" if chat_bos or (not embedded and folder.bos_token is None) else "document"
                object.__setattr__(self, name, section.model_copy(update={"bos": resolved_bos}))
            elif section.bos == "document" and chat_bos:
                raise KeyProblem(f"{name}.bos", f"document, but the tokenizer's BOS {folder.bos_token!r} opens every "
                                                f"turn of its chat template (model.name_or_path {m.name_or_path!r}): "
                                                "a chat marker, not a start-of-document token, would open every "
                                                "document; use auto or none")
        context = folder.context_length if folder is not None and not embedded else None
        if m.original_context is not None and context is not None and m.original_context < context:
            raise KeyProblem("model.original_context",
                             f"{m.original_context} is below the context of model.name_or_path, {context} "
                             f"(max_position_embeddings in {folder.folder / 'config.json'}): the RoPE factor would "
                             f"squeeze positions the model already reads; leave it null (uses {context}) or set it "
                             f"to at least {context}")
        for name, model in self.eval_models.items():
            place = Path(model.path).expanduser()
            built_here = same_path(place, self.build_base_model.out_dir)
            if built_here and embedded:
                continue  # build_base_model builds the embedded model there, whatever the folder holds now
            # A local model.name_or_path that is missing or unreadable is the error to report, by the stage that
            # loads it, naming model.name_or_path: not this consequence of it.
            model_is_there = folder.config is not None if folder is not None else not looks_local(m.name_or_path)
            if built_here and place.exists() and model_is_there:
                raise KeyProblem(f"eval_models.{name}.path",
                                 f"{model.path!r} is build_base_model.out_dir, which holds no model of yours: "
                                 f"model.name_or_path is {m.name_or_path!r} (build_base_model writes only "
                                 f"NOT_BUILT.txt there); set it to {m.name_or_path!r} to evaluate your model")
            if (place / "NOT_BUILT.txt").is_file() and not (place / "config.json").exists():
                raise KeyProblem(f"eval_models.{name}.path",
                                 f"{model.path!r} holds only NOT_BUILT.txt (build_base_model built no model there); "
                                 f"name a model folder, e.g. model.name_or_path {m.name_or_path!r}")
        return self

    def output(self, stage: str) -> StageOutput:
        """The stage's output folder and metrics file, to claim before any work (`with params.output(...)`)."""
        name, _, instance = stage.partition("@")
        out_dir, out_key, metrics_file, metrics_key = self.destination(stage)
        reported = self.section(stage).model_dump(mode="json")
        if name in EVAL_STAGES:  # the section its instances share, and the model this one evaluates
            reported["eval_model"] = {"name": instance, **self.eval_models[instance].model_dump(mode="json")}
        elif instance:  # an instance: its own subsection and the settings its instances share
            shared = getattr(self, name).model_dump(mode="json", exclude=set(MERGE_SOURCES))
            reported = {**shared, **reported}
        return StageOutput(stage, out_dir, out_key, metrics_file, metrics_key, params=reported)


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
            location = _location(e["loc"])
            cause = (e.get("ctx") or {}).get("error")
            if isinstance(cause, KeyProblem):
                location, reason = cause.key, str(cause)
            # A cross-field check's input is the whole section, and a rule's own message may name the value.
            value = e.get("input")
            got = "" if isinstance(value, dict) or repr(value) in reason else f" (got {value!r})"
            lines.append(f"{source}: {location}: {reason}{got}"[:500])
        raise ParamsError("\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a params file with one is a mistake to report."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {first_line[key] + 1})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(f"{path}: cannot read parameters ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    params = parse_params(raw, str(path))
    # The defaults are the paper's 7B recipe: a file that leaves sections out would silently run it (DVC refuses
    # such a file, as the keys dvc.yaml declares are missing).
    missing = [section for section in Params.model_fields if section not in (raw or {})]
    if missing:
        shown = ", ".join(missing[:6]) + (f", … ({len(missing)} in all)" if len(missing) > 6 else "")
        raise ParamsError(f"{path}: {'empty' if not raw else f'no section {shown}'}: every stage reads the whole "
                          "file; start from the project's params.yaml or a profile in configs/")
    return params
