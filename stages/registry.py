"""The pipeline's stages by name, in dvc.yaml's order, and the params key each reads: one list for params.yaml's
checks, the Prefect flow and the tests."""

from __future__ import annotations

TRAINING_STAGES = ("extend", "sft")
"""The stages that train a model (stages/_training.py): `python -m stages.launch <stage>` starts them as the `launch`
section says (dvc.yaml runs that command), and the world size it gives must divide their global batch."""

MERGE_SOURCES = ("extend", "sft")
"""The training stages whose output `merge` folds into a plain model: one dvc.yaml instance each (`merge@extend`),
one `merge.<stage>` subsection each for its out_dir and metrics_file."""

STAGES = ("build_base_model", "prepare_corpus", "prepare_pretrain", "prepare_sft", "prepare_eval", "extend",
          "merge@extend", "sft", "merge@sft")
"""The stages of dvc.yaml before the evaluations. Each reads the params section of its own name (`merge@extend`:
`merge.extend`), which holds its `out_dir` and `metrics_file`; `embedded_corpus`, `model`, `s2attn` and `lora` are
shared by several stages."""

EVAL_STAGES = ("eval_perplexity", "eval_passkey", "eval_longqa", "eval_ruler", "eval_harness", "longbench",
               "longbench2")
"""The evaluation stages, after STAGES: one dvc.yaml instance per `eval_models` name (`eval_perplexity@base`), all
instances reading the stage's section, each writing `<out_dir>/<name>/` and `<metrics_dir>/<name>.json` of it
(`Params.stages` lists every instance, `Params.destination` gives its paths)."""

FINAL_STAGES = ("report",)
"""The stages after the evaluations, reading their results: each reads and writes as a STAGES stage does."""

RESERVED_MODEL_NAMES = ("score",)
"""Not a model name: `python -m stages.longbench score PRED_DIR` scores a folder of predictions."""


def stage_key(stage: str) -> str:
    """The params key of a stage's own section: `extend` -> `extend`, `merge@extend` -> `merge.extend`,
    `eval_perplexity@base` -> `eval_perplexity` (shared by the instances; the model is `eval_models.base`)."""
    name = stage.partition("@")[0]
    return name if name in EVAL_STAGES else stage.replace("@", ".")


PIPELINE_MODELS = {"extended": "extend", "sft": "sft"}
"""The eval_models names whose default path is a merged model of the pipeline (`merge.<source>.out_dir`); every other
name defaults to model.name_or_path."""
