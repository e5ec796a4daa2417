"""The choices the data stages' parameters are validated against, importable without numpy, torch or transformers.

`stages/params.py` validates all of params.yaml before any stage starts, and every stage lists what params.py
imports among its DVC dependencies: keeping these enums here, away from the readers, packers and tokenizers that use
them, means an edit to one of those modules reruns only the stages that run it. Each choice is defined once; the
modules that act on it import it from here. (The method's own choices and rules live in `longlora.recipe`.)
"""

from __future__ import annotations

from typing import Literal

OnError = Literal["raise", "skip"]
"""A bad record stops the stage (raise) or is skipped and counted (skip)."""

BosPolicy = Literal["auto", "document", "none"]
"""`document`: each document is `BOS text EOS` (how Llama was pre-trained); `none`: `text EOS`; `auto`: `document`
unless the tokenizer has no BOS or its BOS is a chat turn marker (ChatML's `<|im_start|>`), then `none`."""

TokenDtype = Literal["auto", "uint16", "uint32"]
"""Dtype of written token ids: auto picks uint16 when the vocabulary fits (ids < 65536), else uint32."""

Remainder = Literal["drop", "pad"]
"""What happens to the last tokens that do not fill a block: dropped, or padded to a full block."""

Template = Literal["llama2", "chat_template"]
"""SFT prompt format: the paper code's Llama-2 `[INST]` template, or the tokenizer's own chat template."""

Truncation = Literal["drop", "truncate_middle"]
"""An SFT example too long for max_length: dropped (answer cut at the end), or its prompt cut in the middle."""

LONGBENCH_DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
    "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
"""The 21 LongBench tasks, in LongBench's order (longlora/evaluation/longbench.py holds how each is prompted and
scored)."""

LONGBENCH_E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                        "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
"""The tasks LongBench-E has (files `<dataset>_e.jsonl`), with lengths spread evenly over 0-4k, 4-8k and 8k+."""


RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
"""RULER's 13 tasks, in its scripts/synthetic.yaml order (longlora/evaluation/ruler.py holds how each is built and
scored)."""

RULER_QA_TASKS = ("qa_1", "qa_2")
"""RULER's two QA tasks, on SQuAD v2.0 and HotpotQA (distractor) dev: the ones that read a data set
(eval_ruler.qa_squad, eval_ruler.qa_hotpotqa); the others are built from nothing but word lists and a haystack."""

RULER_OFFLINE_TASKS = tuple(name for name in RULER_TASKS if name not in RULER_QA_TASKS)
"""RULER's 11 tasks that need no data set: eval_ruler's default."""

RULER_MODEL_TEMPLATES = ("base", "meta-chat", "vicuna-chat", "lwm-chat", "Phi3", "meta-llama3")
"""The names of RULER's model templates (its scripts/data/template.py) that longlora/evaluation/ruler.py has."""
RULER_CHAT_TEMPLATE = "chat"
"""Not one of RULER's template names: the model's own chat template, one user turn
(longlora/evaluation/ruler.py: chat_model_template)."""
