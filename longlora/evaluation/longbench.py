"""LongBench (Bai et al., 2023): its 21 tasks' prompts, generation lengths and metrics; predicted as its `pred.py`
(the prompt cut in the middle to `max_length` tokens, the chat template except where it skips it, greedy decoding)
and scored exactly as its `eval.py`, with the packages its `metrics.py` uses (`rouge`, `fuzzywuzzy` on difflib,
`jieba`). Prediction files are its JSON lines, `<dataset>.jsonl`, so its own tools rescore them.

The prompt templates and maximum generation lengths are LongBench's (config/dataset2prompt.json, dataset2maxlen.json),
used under its MIT licence: see THIRD_PARTY_NOTICES.md.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from longlora.choices import LONGBENCH_DATASETS, LONGBENCH_E_DATASETS
from longlora.errors import InputError

log = logging.getLogger(__name__)

# --- the tasks ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One LongBench dataset: how it is prompted, how long the answer may be, how it is scored."""

    prompt: str
    """str.format template over the record's fields (`{context}`, `{input}`)."""
    max_new_tokens: int
    metric: str
    """A key of METRICS."""
    category: str
    first_line_only: bool = False
    """Score only the prediction's first line (LongBench: trec, triviaqa, samsum, lsht)."""
    chat: bool = True
    """Whether chat models get their chat template here (LongBench skips it on the few-shot and code tasks, whose
    prompts are continuations)."""


TASKS: dict[str, Task] = {
    "narrativeqa": Task(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1", "single_doc_qa"),
    "qasper": Task(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
        "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
        "Question: {input}\n\nAnswer:",
        128, "qa_f1", "single_doc_qa"),
    "multifieldqa_en": Task(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1", "single_doc_qa"),
    "multifieldqa_zh": Task(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64, "qa_f1_zh", "single_doc_qa"),
    # hotpotqa, 2wikimqa and musique share one prompt.
    **dict.fromkeys(("hotpotqa", "2wikimqa", "musique"), Task(
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        32, "qa_f1", "multi_doc_qa")),
    "dureader": Task("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n"
                     "请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：", 128, "rouge_zh", "multi_doc_qa"),
    "gov_report": Task(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, "rouge", "summarization"),
    "qmsum": Task(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512, "rouge", "summarization"),
    "multi_news": Task(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
        512, "rouge", "summarization"),
    "vcsum": Task("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
                  512, "rouge_zh", "summarization"),
    "trec": Task("Please determine the type of the question below. Here are some examples of questions.\n\n"
                 "{context}\n{input}", 64, "classification", "few_shot", first_line_only=True, chat=False),
    "triviaqa": Task("Answer the question based on the given passage. Only give me the answer and do not output any "
                     "other words. The following are some examples.\n\n{context}\n\n{input}",
                     32, "qa_f1", "few_shot", first_line_only=True, chat=False),
    "samsum": Task("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
                   "{context}\n\n{input}", 128, "rouge", "few_shot", first_line_only=True, chat=False),
    "lsht": Task("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
                 64, "classification", "few_shot", first_line_only=True, chat=False),
    "passage_count": Task(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32, "count", "synthetic"),
    "passage_retrieval_en": Task(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ",
        32, "retrieval", "synthetic"),
    "passage_retrieval_zh": Task(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
        32, "retrieval_zh", "synthetic"),
    "lcc": Task("Please complete the code given below. \n{context}Next line of code:\n",
                64, "code_sim", "code", chat=False),
    "repobench-p": Task("Please complete the code given below. \n{context}{input}Next line of code:\n",
                        64, "code_sim", "code", chat=False),
}
"""The 21 LongBench tasks, in LongBench's order."""

assert tuple(TASKS) == LONGBENCH_DATASETS and set(LONGBENCH_E_DATASETS) <= set(TASKS)
CATEGORIES = ("single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code")
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")
HUB_DATASET = "THUDM/LongBench"
"""The hub dataset repository; its data.zip holds `data/<dataset>.jsonl` and `data/<dataset>_e.jsonl`."""


# --- the metrics (LongBench metrics.py) ---------------------------------------------------------------------------

_ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"
                   "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, no ASCII or Chinese punctuation, no whitespace at all."""
    excluded = set(string.punctuation + _ZH_PUNCTUATION)
    return "".join("".join(ch for ch in text.lower() if ch not in excluded).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs the loading of its dictionary at INFO on first use
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, reference: str, **_) -> float:
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(word) for word in _jieba_words(text)) if w]

    return token_f1(words(prediction), words(reference))


def rouge_score(prediction: str, reference: str, **_) -> float:
    """F of ROUGE-L by the `rouge` package; 0 where it raises (an empty or all-punctuation text, say)."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [reference], avg=True)
    except Exception:  # noqa: BLE001 - LongBench scores anything `rouge` cannot take as 0
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, reference: str, **_) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def _share_naming(prediction: str, wanted: str) -> float:
    """Share of the numbers in `prediction` that are `wanted` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == wanted for number in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str, **_) -> float:
    return _share_naming(prediction, str(reference))


def retrieval_score(prediction: str, reference: str, **_) -> float:
    return _share_naming(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def retrieval_zh_score(prediction: str, reference: str, **_) -> float:
    return _share_naming(prediction, re.findall(r"段落(\d+)", reference)[0])


@functools.cache
def _fuzz():
    with warnings.catch_warnings():
        # Without python-Levenshtein fuzzywuzzy warns that it uses difflib: the backend of LongBench's environment.
        warnings.simplefilter("ignore", UserWarning)
        from fuzzywuzzy import fuzz
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        log.warning("fuzzywuzzy uses python-Levenshtein here: code similarity (lcc, repobench-p) can differ from "
                    "LongBench's numbers, which come from its difflib backend; uninstall python-Levenshtein")
    return fuzz


def _fuzz_ratio(a: str, b: str) -> int:
    return _fuzz().ratio(a, b)


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """fuzz.ratio / 100 of the reference line and the prediction's first line that holds no `, # or // (LongBench
    skips markdown fences and comments); an empty prediction when no line qualifies."""
    first = next((line for line in prediction.lstrip("\n").split("\n")
                  if "`" not in line and "#" not in line and "//" not in line), "")
    return _fuzz_ratio(first, reference) / 100


def classification_score(prediction: str, reference: str, *, all_classes: list[str], **_) -> float:
    """1 / (number of class names found in the prediction) if the reference is among them, else 0.

    Before counting, a found name that is a proper substring of the reference is dropped — by removing from the
    list while iterating over it, as LongBench does, so the name right after a dropped one is not examined. Kept
    on purpose: it changes scores, and these must equal LongBench's. (Its fallback to the most similar class by
    difflib, guarded by `list != 0`, can never run; the guard is always true.)
    """
    found = [name for name in all_classes if name in prediction]
    for name in found:
        if name in reference and name != reference:
            found.remove(name)
    return 1.0 / len(found) if reference in found else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score, "qa_f1_zh": qa_f1_zh_score, "rouge": rouge_score, "rouge_zh": rouge_zh_score,
    "classification": classification_score, "retrieval": retrieval_score, "retrieval_zh": retrieval_zh_score,
    "count": count_score, "code_sim": code_sim_score,
}

# --- scoring prediction files (LongBench eval.py) -----------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    pred: str
    answers: list[str]
    all_classes: list[str] | None
    length: int | None


def example_score(dataset: str, prediction: Prediction, all_classes: list[str] | None) -> float:
    """The best score over the reference answers, on LongBench's 0–1 scale."""
    task = TASKS[dataset]
    text = prediction.pred
    if task.first_line_only:
        text = text.lstrip("\n").split("\n")[0]
    metric = METRICS[task.metric]
    best = 0.0
    for answer in prediction.answers:
        best = max(best, metric(text, answer, all_classes=all_classes))
    return best


def _example_scores(dataset: str, predictions: list[Prediction]) -> list[float]:
    # eval.py keeps the class list of a file's last line for all its lines (one list per task in LongBench's data).
    all_classes = predictions[-1].all_classes
    return [example_score(dataset, p, all_classes) for p in predictions]


def score(dataset: str, predictions: list[Prediction]) -> float:
    """LongBench's score of one task: 100 × mean example score, rounded to 2 decimals."""
    return round(100 * sum(_example_scores(dataset, predictions)) / len(predictions), 2)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def score_by_length(dataset: str, predictions: list[Prediction]) -> dict[str, float | None]:
    """LongBench-E: the score per length bucket (None for an empty bucket, where LongBench's numpy mean gives nan)."""
    import numpy as np

    buckets: dict[str, list[float]] = {bucket: [] for bucket in LENGTH_BUCKETS}
    for prediction, value in zip(predictions, _example_scores(dataset, predictions), strict=True):
        buckets[length_bucket(prediction.length)].append(value)
    # numpy's mean, as eval.py's scorer_e: its pairwise sum can differ from a plain sum in the last bits.
    return {bucket: round(100 * float(np.mean(s)), 2) if s else None for bucket, s in buckets.items()}


def dataset_name(path: Path) -> str:
    """The task a `<dataset>.jsonl` file holds; an InputError for a name LongBench does not have."""
    name = path.name.removesuffix(".jsonl")
    if name not in TASKS:
        raise InputError(f"{path}: unknown LongBench dataset {name!r} (the file name must be one of "
                         f"{', '.join(TASKS)}, plus .jsonl)")
    return name


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err})") from None


def _string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_common(record: object, where: str, dataset: str, need_length: bool) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    answers = record.get("answers")
    if "answers" not in record:
        raise InputError(f"{where}: missing \"answers\"")
    if not _string_list(answers) or not answers:
        raise InputError(f"{where}: \"answers\" must be a non-empty list of strings")
    classes = record.get("all_classes")
    if classes is not None and not _string_list(classes):
        raise InputError(f"{where}: \"all_classes\" must be a list of strings or null")
    if TASKS[dataset].metric == "classification" and not classes:
        raise InputError(f"{where}: {dataset} is scored by class names: \"all_classes\" must list them")
    pattern = {"retrieval": r"Paragraph (\d+)", "retrieval_zh": r"段落(\d+)"}.get(TASKS[dataset].metric)
    if pattern and not all(re.search(pattern, answer) for answer in answers):
        raise InputError(f"{where}: {dataset} answers must name a paragraph like "
                         f"{'Paragraph 3' if 'zh' not in dataset else '段落3'}")
    length = record.get("length")
    if (need_length or length is not None) and (not isinstance(length, int) or isinstance(length, bool)
                                                 or length < 0):
        raise InputError(f"{where}: \"length\" must be a non-negative integer (words, or characters in Chinese)")
    return record


def read_predictions(path: Path, need_length: bool = False) -> tuple[str, list[Prediction]]:
    """(dataset, predictions) of one LongBench prediction file; InputErrors name the file and line."""
    dataset = dataset_name(path)
    predictions = []
    for number, record in _json_lines(path):
        where = f"{path}:{number}"
        _check_common(record, where, dataset, need_length)
        if "pred" not in record:
            raise InputError(f"{where}: missing \"pred\"")
        if not isinstance(record["pred"], str):
            raise InputError(f"{where}: \"pred\" must be a string")
        predictions.append(Prediction(record["pred"], record["answers"], record.get("all_classes"),
                                      record.get("length")))
    if not predictions:
        raise InputError(f"{path}: no predictions")
    return dataset, predictions


def category_averages(scores: dict[str, float]) -> dict[str, float]:
    """Mean score of each category with at least one scored task (LongBench's six), rounded to 2 decimals."""
    averages = {}
    for category in CATEGORIES:
        values = [s for name, s in scores.items() if TASKS[name].category == category and s is not None]
        if values:
            averages[category] = round(sum(values) / len(values), 2)
    return averages


def score_folder(folder: Path, by_length: bool = False) -> dict:
    """Score every `<dataset>.jsonl` in `folder`: {"scores": {dataset: score}, "categories": {...}} and, with
    `by_length` (LongBench-E), {"by_length": {dataset: {bucket: score}}} with its per-bucket averages."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of LongBench predictions")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise InputError(f"{folder}: no <dataset>.jsonl prediction files")
    scores: dict[str, float] = {}
    by_bucket: dict[str, dict[str, float | None]] = {}
    for path in files:
        dataset, predictions = read_predictions(path, need_length=by_length)
        scores[dataset] = score(dataset, predictions)
        if by_length:
            by_bucket[dataset] = score_by_length(dataset, predictions)
    result: dict = {"scores": scores, "categories": category_averages(scores)}
    if by_length:
        result["by_length"] = by_bucket
        result["length_buckets"] = {
            bucket: round(sum(vs) / len(vs), 2) if (vs := [b[bucket] for b in by_bucket.values()
                                                            if b[bucket] is not None]) else None
            for bucket in LENGTH_BUCKETS}
    return result


# --- inputs -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One LongBench input record (`input`, `context`, `answers`, `all_classes`, `length`)."""

    fields: dict

    @property
    def answers(self) -> list[str]:
        return self.fields["answers"]


def check_example(record: object, where: str, dataset: str) -> Example:
    record = _check_common(record, where, dataset, need_length=True)
    for key in ("input", "context"):
        if not isinstance(record.get(key), str):
            raise InputError(f"{where}: \"{key}\" must be a string")
    return Example(record)


def file_name(dataset: str, longbench_e: bool) -> str:
    return f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl"


def local_datasets(folder: Path, longbench_e: bool) -> list[str]:
    """The LongBench tasks a local input folder has files for, in LongBench's order."""
    return [name for name in TASKS if (Path(folder) / file_name(name, longbench_e)).is_file()]


def read_examples(folder: Path, dataset: str, longbench_e: bool = False, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a local `<dataset>.jsonl` (`<dataset>_e.jsonl` for LongBench-E)."""
    path = Path(folder) / file_name(dataset, longbench_e)
    if not path.is_file():
        raise InputError(f"{path}: no such file (longbench.datasets names {dataset!r})")
    examples = []
    for number, record in _json_lines(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(check_example(record, f"{path}:{number}", dataset))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def hub_examples(repo: str, dataset: str, longbench_e: bool = False, limit: int | None = None) -> list[Example]:
    """Examples of one task from the hub dataset's data.zip (needs the network once; the hub cache keeps it).

    The zip rather than `datasets.load_dataset`: LongBench's hub repository loads through a dataset script, which
    `datasets` 4 and later no longer run."""
    import zipfile

    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(repo, "data.zip", repo_type="dataset")
    member = f"data/{file_name(dataset, longbench_e)}"
    examples = []
    with zipfile.ZipFile(archive) as bundle:
        try:
            lines = bundle.read(member).decode("utf-8").splitlines()
        except KeyError:
            raise InputError(f"{repo}: data.zip has no {member}") from None
    for number, line in enumerate(lines, 1):
        if limit is not None and len(examples) >= limit:
            break
        if line.strip():
            where = f"{repo}:{member}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise InputError(f"{where}: not valid JSON ({err})") from None
            examples.append(check_example(record, where, dataset))
    return examples


# --- prediction (LongBench pred.py) --------------------------------------------------------------------------------

def truncate_middle(prompt: str, tokenizer, max_length: int) -> str:
    """The prompt itself when it has at most `max_length` tokens, else its first and last max_length // 2 tokens
    decoded and joined (LongBench keeps both ends: the instructions sit there)."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def build_prompt(dataset: str, example: Example, tokenizer, max_length: int, chat: bool) -> tuple[str, bool]:
    """(text, whether it already holds its special tokens): LongBench's prompt, cut in the middle to max_length
    tokens, in the chat template when `chat` and the task takes one."""
    prompt = truncate_middle(TASKS[dataset].prompt.format(**example.fields), tokenizer, max_length)
    if chat and TASKS[dataset].chat:
        # The template writes BOS itself (for chat tokenizers whose BOS is a chat marker, too): not added twice.
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), True
    return prompt, False


def stop_ids(dataset: str, tokenizer) -> list[int] | None:
    """LongBench stops samsum at a newline too (models otherwise go on with "\\nDialogue: ..."); None: default."""
    if dataset != "samsum":
        return None
    return [tokenizer.eos_token_id, tokenizer.encode("\n", add_special_tokens=False)[-1]]


def predict_dataset(model, tokenizer, dataset: str, examples: Iterable[Example], max_length: int,
                    max_new_tokens: int | None = None, chat: bool = False, progress: bool = True) -> list[dict]:
    """LongBench prediction records ({"pred", "answers", "all_classes", "length"}) of greedy generations."""
    import torch
    from tqdm import tqdm

    task = TASKS[dataset]
    new_tokens = min(task.max_new_tokens, max_new_tokens or task.max_new_tokens)
    stops = stop_ids(dataset, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    records = []
    examples = list(examples)
    for example in tqdm(examples, desc=dataset, disable=not progress):
        text, has_special = build_prompt(dataset, example, tokenizer, max_length, chat)
        encoded = tokenizer(text, truncation=False, add_special_tokens=not has_special, return_tensors="pt")
        encoded = {key: value.to(device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")}
        prompt_length = encoded["input_ids"].shape[-1]
        extra = {"eos_token_id": stops, "min_length": prompt_length + 1} if stops else {}
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, **extra)[0]
        fields = example.fields
        records.append({"pred": tokenizer.decode(output[prompt_length:], skip_special_tokens=True),
                        "answers": fields["answers"], "all_classes": fields.get("all_classes"),
                        "length": fields["length"]})
    return records
