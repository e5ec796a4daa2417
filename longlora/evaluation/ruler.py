"""RULER's synthetic tasks (Hsieh et al., 2024, github.com/NVIDIA/RULER), built offline, scored as RULER scores.

Task configurations, prompt templates, answer prefixes, generation lengths, needle and haystack formats, the sizing
of each haystack to the prompt length in the model's own tokens, the model templates and the metrics are RULER's
(scripts/synthetic.yaml, scripts/data/synthetic/*.py, scripts/data/template.py, scripts/eval/; Apache-2.0, notice
in THIRD_PARTY_NOTICES.md). Where this differs, and why, is in docs/evaluation.md (RULER section): the essay
haystack is a text of the user's choosing (the embedded default: held-out standard-library sources), sentences are
split by punctuation instead of NLTK's punkt, and prompts shorter than 4096 tokens grow their haystack in small steps.
The QA tasks read SQuAD v2.0 and HotpotQA (distractor) dev sets, given here as loaded data (`read_squad`,
`read_hotpotqa`: RULER's readers on the parsed JSON) or as the hub's rows (`qa_from_rows`), never downloaded here.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from longlora.choices import RULER_CHAT_TEMPLATE


@dataclass(frozen=True)
class Family:
    """One of RULER's task families (scripts/data/synthetic/constants.py and scripts/eval/synthetic/constants.py)."""

    tokens_to_generate: int
    template: str
    answer_prefix: str
    metric: str


FAMILIES = {
    "niah": Family(
        128,
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        "string_match_all"),
    "variable_tracking": Family(
        30,
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: ",
        "string_match_all"),
    "common_words_extraction": Family(
        120,
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        "string_match_all"),
    "freq_words_extraction": Family(
        50,
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        "string_match_all"),
    "qa": Family(
        32,
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        "string_match_part"),
}

TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_1": ("niah", {"type_haystack": "noise", "type_needle_k": "words", "type_needle_v": "numbers"}),
    "niah_single_2": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers"}),
    "niah_single_3": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids"}),
    "niah_multikey_1": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_k": 4}),
    "niah_multikey_2": ("niah", {"type_haystack": "needle", "type_needle_k": "words", "type_needle_v": "numbers"}),
    "niah_multikey_3": ("niah", {"type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"}),
    "niah_multivalue": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_v": 4}),
    "niah_multiquery": ("niah", {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                                 "num_needle_q": 4}),
    "vt": ("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": ("qa", {"dataset": "squad"}),
    "qa_2": ("qa", {"dataset": "hotpotqa"}),
}
"""RULER's 13 tasks, in scripts/synthetic.yaml's order; the two QA tasks read a data set (`build_samples`' `qa`)."""

QA_TASKS = tuple(name for name, (family, _) in TASKS.items() if family == "qa")
"""Tasks that read a QA data set (RULER: SQuAD v2.0 dev, HotpotQA distractor dev), the others need none."""

QA_HUB = {"squad": ("rajpurkar/squad_v2", None), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}
"""The hub copies of RULER's two QA files (name, configuration; split `validation`): the same questions, in the
hub's row format (`qa_from_rows`)."""
QA_HUB_SPLIT = "validation"

DOCUMENT_PROMPT = "Document {i}:\n{document}"
"""How RULER's qa.py numbers each document of the haystack."""

ESSAY_TASKS = tuple(name for name, (_, args) in TASKS.items() if args.get("type_haystack") == "essay")
"""Tasks whose haystack is prose (RULER: Paul Graham's essays); their scores depend on the text used."""

MODEL_TEMPLATES = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:",
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
    "meta-llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
"""RULER's model templates (scripts/data/template.py) for the model families this project extends."""

def chat_model_template(tokenizer) -> str:
    """The tokenizer's chat template around one user turn, in the form of MODEL_TEMPLATES (`{task_template}` where the
    turn goes): what RULER's named templates spell out by hand for the chat models it knows. A leading BOS is left
    out, since the prompt is encoded with the tokenizer's special tokens, as RULER's HuggingFace client encodes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model template chat needs a tokenizer with a chat template")
    marker = "\x00turn\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id]:
        text = text[len(bos):]
    head, _, tail = (part.replace("{", "{{").replace("}", "}}") for part in text.partition(marker))
    return head + "{task_template}" + tail


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]
"""np.round(np.linspace(0, 100, 40)): the depths (percent) a needle may sit at."""
THRESHOLD = 85.6
"""Llama-2-7B's average at 4K, RULER's bar for an effective length."""


def _word_lists() -> tuple[list[str], list[str], list[str]]:
    """wonderwords' nouns, adjectives and verbs, the lists RULER draws its keys and common words from."""
    from importlib.resources import files

    assets = files("wonderwords.assets")
    return tuple([line.rstrip() for line in assets.joinpath(name).read_text(encoding="utf-8").splitlines(True)]
                 for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"))


@dataclass
class Sample:
    """One prompt, as RULER's data files hold it (`input` without the answer prefix, which `prompt` appends)."""

    index: int
    input: str
    outputs: list[str]
    length: int
    """Tokens of the input and the answer prefix, plus the tokens to generate."""
    answer_prefix: str
    others: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


class DoesNotFit(ValueError):
    """The task's smallest prompt and its answer exceed the length asked for."""


class _Builder:
    """The samples of one task at one length: RULER's generator for the task's family, its random draws from one
    `random.Random(seed)` (RULER seeds the global generators once per task and length)."""

    def __init__(self, task: str, tokenizer, max_seq_length: int, seed: int, model_template: str,
                 essay_words: list[str] | None, qa: tuple[list[dict], list[str]] | None = None):
        self.family_name, args = TASKS[task]
        self.family = FAMILIES[self.family_name]
        self.args = {"num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1, **args}
        self.args["num_needle_k"] = max(self.args["num_needle_k"], self.args["num_needle_q"])
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.rng = random.Random(seed)
        # prepare.py: the model template around the task's, then the answer prefix.
        wrapper = (chat_model_template(tokenizer) if model_template == RULER_CHAT_TEMPLATE
                   else MODEL_TEMPLATES[model_template])
        self.template = wrapper.format(task_template=self.family.template) + self.family.answer_prefix
        self.essay_words = essay_words
        if self.args.get("type_haystack") == "essay" and not essay_words:
            raise ValueError(f"{task} needs a prose haystack")
        if self.family_name == "qa" and qa is None:
            raise ValueError(f"{task} needs its data set ({self.args['dataset']}): read_squad / read_hotpotqa")
        self.qa = qa
        self._nouns = self._adjectives = self._verbs = None
        self._cwe_words: list[str] | None = None

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))  # RULER's HFTokenizer.text_to_tokens

    def words(self) -> tuple[list[str], list[str], list[str]]:
        if self._nouns is None:
            self._nouns, self._adjectives, self._verbs = _word_lists()
        return self._nouns, self._adjectives, self._verbs

    # -- needle in a haystack (scripts/data/synthetic/niah.py) --

    def _random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            # RULER: random.choice over sorted(set(adj-noun for every pair)), uniform over the pairs; drawing the
            # two parts uniformly is the same distribution without building six million strings.
            nouns, adjectives, _ = self.words()
            return f"{self.rng.choice(adjectives)}-{self.rng.choice(nouns)}"
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type {kind!r}")

    def _niah(self, num_haystack: int) -> tuple[str, list[str]]:
        a = self.args
        keys, values, needles = [], [], []
        for _ in range(a["num_needle_k"]):
            keys.append(self._random(a["type_needle_k"]))
            value = []
            for _ in range(a["num_needle_v"]):
                value.append(self._random(a["type_needle_v"]))
                needles.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)
        if a["type_haystack"] == "essay":
            words = self.essay_words
            text = " ".join((words * -(-num_haystack // len(words)))[:num_haystack])
            sentences = split_sentences(text.strip())
            cuts = [0, *sorted(int(len(sentences) * (d / 100)) for d in self.rng.sample(DEPTHS, len(needles))),
                    len(sentences)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if a["type_haystack"] == "noise":
                lines = [NOISE] * num_haystack
            else:
                lines = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=self._random(a["type_needle_k"]),
                                       value=self._random(a["type_needle_v"])) for _ in range(num_haystack)]
            for index, needle in zip(sorted(self.rng.sample(range(num_haystack), len(needles)), reverse=True),
                                     needles, strict=True):
                lines.insert(index, needle)
            context = "\n".join(lines)
        chosen = self.rng.sample(range(a["num_needle_k"]), a["num_needle_q"])
        queries = [keys[i] for i in chosen]
        answers = [v for i in chosen for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_needle_v = self.template, a["type_needle_v"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_needle_v = type_needle_v[:-1]
        return template.format(type_needle_v=type_needle_v, context=context, query=query), answers

    # -- variable tracking (scripts/data/synthetic/variable_tracking.py, noise haystack) --

    def _chains(self, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        hops, chains_n = self.args["num_hops"], self.args["num_chains"]
        k = 3 if icl else 5
        hops = min(10, hops) if icl else hops
        names = ["".join(self.rng.choices(string.ascii_uppercase, k=k)) for _ in range((hops + 1) * chains_n)]
        while len(set(names)) < chains_n * (hops + 1):
            names.append("".join(self.rng.choices(string.ascii_uppercase, k=k)))
        variables, chains = [], []
        for i in range(0, len(names), hops + 1):
            these = names[i:i + hops + 1]
            variables.append(these)
            chain = [f"VAR {these[0]} = {12345 if icl else self.rng.randint(10000, 99998)}"]
            chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
            chains.append(chain)
        return variables, chains

    def _vt(self, num_noises: int, icl: bool = False) -> tuple[str, list[str]]:
        variables, chains = self._chains(icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * num_noises
        for chain in chains:
            positions = sorted(self.rng.sample(range(len(lines)), len(chain)))
            for j, position in enumerate(positions):
                lines.insert(position + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        template = self.family.template + self.family.answer_prefix if icl else self.template
        return template.format(context=context, query=value, num_v=self.args["num_hops"] + 1), variables[0]

    def _vt_example(self) -> str:
        """RULER's in-context example: the same task at 500 tokens with 3-letter names and the value 12345."""
        fits = _largest_fitting(lambda n: self._vt(n, icl=True)[0], self.n_tokens, 500, 5)
        text, answer = self._vt(fits, icl=True)
        # final_output=False in RULER's first pass: the whole text, answer prefix included, then the answer.
        return text + " " + " ".join(answer) + "\n"

    def _randomized_example(self, example: str) -> str:
        for item in example.strip().split()[-self.args["num_hops"] - 1:]:
            example = example.replace(item, "".join(self.rng.choices(string.ascii_uppercase, k=len(item))))
        return example.replace("12345", str(self.rng.randint(10000, 99998)))

    # -- common words (scripts/data/synthetic/common_words_extraction.py) --

    def _cwe_example(self, num_words: int, common_repeats: int, uncommon_repeats: int, common_nums: int):
        if self._cwe_words is None:
            nouns, adjectives, verbs = self.words()
            self._cwe_words = sorted(set(nouns + adjectives + verbs))
            random.Random(self.seed).shuffle(self._cwe_words)
        if num_words > len(self._cwe_words):
            raise DoesNotFit(f"cwe at this length needs {num_words} distinct words; wonderwords has "
                             f"{len(self._cwe_words)} (RULER falls back to a list of its own)")
        chosen = self.rng.sample(self._cwe_words, num_words)
        common, uncommon = chosen[:common_nums], chosen[common_nums:]
        listed = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(listed)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), common

    def _cwe(self, num_words: int) -> tuple[str, list[str]]:
        a = self.args
        if self.max_seq_length < 4096:
            shots = [self._cwe_example(20, 3, 1, a["num_cw"])]
            context, answer = self._cwe_example(num_words, 6, 1, a["num_cw"])
        else:
            shots = [self._cwe_example(40, 10, 3, a["num_cw"])]
            context, answer = self._cwe_example(num_words, a["freq_cw"], a["freq_ucw"], a["num_cw"])
        examples = "\n".join(self.template.format(num_cw=a["num_cw"], context=shot, query="") + " "
                             + " ".join(f"{i + 1}. {word}" for i, word in enumerate(words)) for shot, words in shots)
        return examples + "\n" + self.template.format(num_cw=a["num_cw"], context=context, query=""), answer

    # -- frequent words (scripts/data/synthetic/freq_words_extraction.py) --

    def _fwe_text(self, vocab: list[str], num_words: int) -> tuple[str, list[str]]:
        alpha = self.args["alpha"]
        norm = zeta(alpha)
        listed = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * k ** -alpha / norm))]
        random.Random(self.seed).shuffle(listed)
        return self.template.format(context=" ".join(listed), query=""), vocab[1:4]

    def _fwe_vocab(self, size: int) -> list[str]:
        vocab = ["".join(self.rng.choices(string.ascii_lowercase, k=6)) for _ in range(size)]
        while len(set(vocab)) < size:
            vocab.append("".join(self.rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # the most frequent word is noise
        return vocab

    def _fwe(self, max_len: int, num_words: int, vocab_size: int) -> tuple[str, list[str], int]:
        incremental = max(1, max_len // 32)
        vocab = self._fwe_vocab(vocab_size)
        if num_words > 0:
            text, answer = self._fwe_text(vocab, num_words)
            while self.n_tokens(text) > max_len and num_words > incremental:
                num_words -= incremental
                text, answer = self._fwe_text(vocab, num_words)
        else:
            num_words = max_len // 6
            text, answer = self._fwe_text(vocab, num_words)
            while self.n_tokens(text) < max_len:
                num_words += incremental
                text, answer = self._fwe_text(vocab, num_words)
            num_words -= incremental
        text, answer = self._fwe_text(vocab, num_words)
        return text, answer, num_words

    # -- question answering (scripts/data/synthetic/qa.py) --

    def _qa(self, index: int, num_docs: int) -> tuple[str, list[str]]:
        """RULER's generate_input_output: question `index` among `num_docs` documents, its own first, then the
        rest of its article (SQuAD), then others drawn at random; all shuffled by a fresh generator of the seed."""
        qas, docs = self.qa
        question = qas[index]
        own, more = question["context"], question.get("more_context", [])
        if num_docs < len(docs):
            if num_docs < len(own):  # RULER: random.sample of a negative count, retried forever
                raise DoesNotFit(f"{num_docs} documents, fewer than question {index}'s own {len(own)}")
            if num_docs - len(own) > len(more):
                taken = set(own + more)
                others = [i for i in range(len(docs)) if i not in taken]
                chosen = own + more + self.rng.sample(others, max(0, num_docs - len(own) - len(more)))
            else:
                chosen = own + self.rng.sample(more, num_docs - len(own))
            listed = [docs[i] for i in chosen]
        else:
            listed = (docs * -(-num_docs // len(docs)))[:num_docs]  # every document, repeated as needed
        random.Random(self.seed).shuffle(listed)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(listed))
        return self.template.format(context=context, query=question["query"]), question["outputs"]

    # -- the samples --

    def samples(self, count: int) -> list[Sample]:
        builders = {"niah": self._niah_samples, "variable_tracking": self._vt_samples,
                    "common_words_extraction": self._cwe_samples, "freq_words_extraction": self._fwe_samples,
                    "qa": self._qa_samples}
        return builders[self.family_name](count)

    def _split(self, index: int, text: str, answer: list[str], length: int) -> Sample:
        cut = text.rfind(self.family.answer_prefix[:10])  # RULER: the answer prefix's first 10 characters
        return Sample(index, text[:cut], list(answer), length, text[cut:])

    def _sized(self, generate: Callable[[int], tuple[str, list[str]]], count: int, incremental: int,
               extra_tokens: int = 0, transform: Callable[[str], str] = lambda text: text,
               generate_for: Callable[[int], Callable[[int], tuple[str, list[str]]]] | None = None) -> list[Sample]:
        """`count` samples whose haystack is the largest that fits, found with `generate`; `generate_for(index)`:
        sample `index`'s generator where it differs (qa: question `index`; RULER sizes on question 0)."""
        budget = self.max_seq_length - self.family.tokens_to_generate - extra_tokens
        size = _largest_fitting(lambda n: generate(n)[0], self.n_tokens, budget, incremental)
        out = []
        for index in range(count):
            make = generate if generate_for is None else generate_for(index)
            used = size
            while True:
                text, answer = make(used)
                text = transform(text)
                length = self.n_tokens(text) + self.family.tokens_to_generate
                if length <= self.max_seq_length:
                    break
                if used <= incremental:
                    raise DoesNotFit(f"a prompt of {length} tokens at the smallest haystack")
                used -= incremental
            out.append(self._split(index, text, answer, length))
        return out

    def _niah_samples(self, count: int) -> list[Sample]:
        kind = self.args["type_haystack"]
        incremental = {"essay": 500, "noise": 25, "needle": 25}[kind]
        if self.max_seq_length < 4096:
            incremental = 5  # RULER: 5 below 4096 for noise and needles; 500 words alone outgrow such prompts
        return self._sized(self._niah, count, incremental)

    def _vt_samples(self, count: int) -> list[Sample]:
        example = self._vt_example()
        incremental = 5 if self.max_seq_length < 4096 else 10
        task_start = self.family.template[:20]

        def with_example(text: str) -> str:
            cut = text.index(task_start)  # the example goes between the model template and the task
            return text[:cut] + self._randomized_example(example) + "\n" + text[cut:]

        return self._sized(lambda n: self._vt(n), count, incremental, extra_tokens=self.n_tokens(example),
                           transform=with_example)

    def _qa_samples(self, count: int) -> list[Sample]:
        qas, docs = self.qa
        if count > len(qas):
            raise ValueError(f"{count} samples asked of {len(qas)} questions")
        if not docs:
            raise ValueError("a QA data set without documents")
        # RULER's step of 10 documents at every length: a HotpotQA question brings 10 of its own.
        return self._sized(lambda n: self._qa(0, n), count, 10,
                           generate_for=lambda index: lambda n: self._qa(index, n))

    def _cwe_samples(self, count: int) -> list[Sample]:
        return self._sized(self._cwe, count, 10)

    def _fwe_samples(self, count: int) -> list[Sample]:
        budget = self.max_seq_length - self.family.tokens_to_generate
        vocab_size = max(4, budget // 50)
        _, _, num_words = self._fwe(budget, -1, vocab_size)
        out = []
        for index in range(count):
            text, answer, _ = self._fwe(budget, num_words, vocab_size)
            length = self.n_tokens(text) + self.family.tokens_to_generate
            if length > self.max_seq_length:
                raise DoesNotFit(f"a prompt of {length} tokens at the smallest text")
            out.append(self._split(index, text, answer, length))
        return out


def _largest_fitting(render: Callable[[int], str], n_tokens: Callable[[str], int], budget: int,
                     incremental: int) -> int:
    """The largest haystack size, from `incremental` up, whose rendered prompt has at most `budget` tokens: RULER's
    binary search. RULER bounds it by three times an estimate from a prompt of `incremental` items, which the fixed
    text dominates when `incremental` is small; doubling until a size does not fit bounds it at any step."""
    if n_tokens(render(incremental)) > budget:
        raise DoesNotFit(f"{incremental} haystack items already exceed {budget} tokens")
    low, high = incremental, 2 * incremental
    while n_tokens(render(high)) <= budget:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        if n_tokens(render(mid)) <= budget:
            low = mid
        else:
            high = mid
    return low


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta (alpha > 1; scipy.special.zeta in RULER): a partial sum plus its Euler-Maclaurin tail."""
    n = terms
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences at '.', '!' or '?' followed by white space (RULER uses NLTK's punkt, which needs a download)."""
    return [s for s in _SENTENCE_END.split(text) if s]


def essay_words(text: str) -> list[str]:
    """A prose haystack as RULER reads its essays: white space collapsed, split into words."""
    return re.sub(r"\s+", " ", text).strip().split(" ")


def build_samples(task: str, tokenizer, max_seq_length: int, count: int, seed: int = 42, model_template: str = "base",
                  haystack: list[str] | None = None, qa: tuple[list[dict], list[str]] | None = None) -> list[Sample]:
    """`count` samples of RULER task `task` whose prompt and answer fit `max_seq_length` tokens of `tokenizer`;
    `haystack`: the words of the essay haystack (essay_words); `qa`: a QA task's (questions, documents), as
    read_squad / read_hotpotqa give them. Raises DoesNotFit when even the smallest does not."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if model_template not in (*MODEL_TEMPLATES, RULER_CHAT_TEMPLATE):
        raise ValueError(f"unknown RULER model template {model_template!r}; known: {', '.join(MODEL_TEMPLATES)}, "
                         f"{RULER_CHAT_TEMPLATE}")
    return _Builder(task, tokenizer, max_seq_length, seed, model_template, haystack, qa).samples(count)


# -- the QA data sets (scripts/data/synthetic/qa.py's readers; scripts/data/synthetic/json/download_qa_dataset.sh) --

def read_squad(data: dict) -> tuple[list[dict], list[str]]:
    """RULER's read_squad on SQuAD's JSON (dev-v2.0.json, RULER's squad.json), parsed: (questions, documents). The
    documents are every paragraph, sorted; a question (answerable ones only) has its paragraph as `context` and the
    other paragraphs of its article as `more_context`, by index into the documents; `outputs`: every annotator's
    answer. (A question without `is_impossible`, as in SQuAD v1.1, counts as answerable: RULER's stops there.)"""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        more = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [own], "more_context": [i for i in more if i != own]})
    return qas, docs


def read_hotpotqa(data: list) -> tuple[list[dict], list[str]]:
    """RULER's read_hotpotqa on HotpotQA's JSON (hotpot_dev_distractor_v1.json, RULER's hotpotqa.json), parsed:
    (questions, documents). A document is a paragraph's title, a line break and its sentences joined; the documents
    are all of them, sorted; a question's `context` is its own ten (gold and distractors), `outputs` its answer."""
    def doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, p) for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]], "context": [index[doc(t, p)] for t, p in d["context"]]}
           for d in data]
    return qas, docs


def squad_from_rows(rows: Iterable[dict]) -> dict:
    """SQuAD's JSON from the hub's rows of it (rajpurkar/squad_v2: id, title, context, question, answers{text,
    answer_start}): an article per title, in order of first appearance, a paragraph per run of rows with the same
    context, a question without answers impossible."""
    articles: dict[str, list[dict]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], [])
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        answers = row["answers"]
        texts = list(answers["text"])
        paragraphs[-1]["qas"].append({
            "question": row["question"], "id": row.get("id"),
            "answers": [{"text": t, "answer_start": s} for t, s in zip(texts, answers["answer_start"], strict=True)],
            "is_impossible": not texts})
    return {"version": "v2.0", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}


def hotpotqa_from_rows(rows: Iterable[dict]) -> list[dict]:
    """HotpotQA's JSON from the hub's rows of it (hotpotqa/hotpot_qa, distractor: question, answer, context{title:
    [...], sentences: [[...]]}): each paragraph as the file has it, `[title, sentences]`."""
    return [{"_id": row.get("id"), "question": row["question"], "answer": row["answer"],
             "context": [[t, list(s)] for t, s in zip(row["context"]["title"], row["context"]["sentences"],
                                                       strict=True)]}
            for row in rows]


QA_READERS = {"squad": (read_squad, squad_from_rows), "hotpotqa": (read_hotpotqa, hotpotqa_from_rows)}


def qa_dataset(task: str) -> str:
    """The data set a QA task reads: squad (qa_1) or hotpotqa (qa_2)."""
    return TASKS[task][1]["dataset"]


def read_qa(dataset: str, data) -> tuple[list[dict], list[str]]:
    """(questions, documents) of RULER's JSON file for `dataset` (squad, hotpotqa), parsed."""
    return QA_READERS[dataset][0](data)


def qa_from_rows(dataset: str, rows: Iterable[dict]) -> tuple[list[dict], list[str]]:
    """(questions, documents) of the hub's rows of `dataset` (squad, hotpotqa): the same as RULER's file gives."""
    reader, convert = QA_READERS[dataset]
    return reader(convert(rows))


def load_hub_qa(dataset: str, name: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) of hub dataset `name` (QA_HUB's for `dataset`, or a copy in its format), split
    `validation`, as `datasets` loads it (its cache offline)."""
    import datasets

    rows = datasets.load_dataset(name, QA_HUB[dataset][1], split=QA_HUB_SPLIT)
    return qa_from_rows(dataset, rows)


def tokens_to_generate(task: str) -> int:
    return FAMILIES[TASKS[task][0]].tokens_to_generate


def predict(model, tokenizer, task: str, samples: list[Sample], progress: bool = True) -> list[str]:
    """Greedy continuations of each sample's prompt (its input and answer prefix, as RULER sends them), the task's
    tokens to generate each, no stop sequence: what RULER's HuggingFace wrapper returns."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out = []
    with torch.no_grad():
        for sample in tqdm(samples, desc=task, unit="prompt", disable=not progress):
            input_ids = tokenizer(sample.prompt, return_tensors="pt")["input_ids"].to(device)
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=tokens_to_generate(task), do_sample=False, use_cache=True,
                                       pad_token_id=pad)
            out.append(tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True))
    return out


# -- scoring (scripts/eval/evaluate.py and scripts/eval/synthetic/constants.py) --

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs, strict=True)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref)
                for p, ref in zip(preds, refs, strict=True)) / len(preds) * 100
    return round(score, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_task(task: str, predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    """(score 0-100, nulls "empty/total") as RULER's evaluate.py computes them from raw predictions."""
    preds = [postprocess(p) for p in predictions]
    nulls = f"{sum(len(p) == 0 for p in preds)}/{len(preds)}"
    return METRICS[FAMILIES[TASKS[task][0]].metric](preds, references), nulls


def prediction_record(sample: Sample, prediction: str) -> dict:
    """A line of RULER's prediction file (scripts/pred/call_api.py's fields, in its order)."""
    return {"index": sample.index, "pred": prediction, "input": sample.prompt, "outputs": sample.outputs,
            "others": sample.others, "truncation": -1, "length": sample.length}


def write_predictions(folder: Path, task: str, samples: Iterable[Sample], predictions: Iterable[str]) -> Path:
    path = folder / f"{task}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for sample, prediction in zip(samples, predictions, strict=True):
            f.write(json.dumps(prediction_record(sample, prediction)) + "\n")
    return path


def write_summary(folder: Path, results: dict[str, tuple[float, str]]) -> Path:
    """The file RULER's evaluate.py writes for a folder of predictions: pandas' to_csv of the rows Tasks / Score /
    Nulls (a header of column numbers; summary-<task>.csv for a single task)."""
    tasks = list(results)
    path = folder / ("summary.csv" if len(tasks) > 1 else f"summary-{tasks[0]}.csv")
    rows = [["Tasks", *tasks], ["Score", *(results[t][0] for t in tasks)], ["Nulls", *(results[t][1] for t in tasks)]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(range(len(tasks) + 1))
        writer.writerows(rows)
    return path


def read_summary(path: Path) -> dict[str, tuple[float, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    rows = {row[0]: row[1:] for row in rows}
    return {task: (float(score), nulls) for task, score, nulls in zip(rows["Tasks"], rows["Score"], rows["Nulls"],
                                                                        strict=True)}


# -- across lengths (RULER's README table) --

def average(scores: Iterable[float]) -> float:
    scores = list(scores)
    return round(sum(scores) / len(scores), 2)


def effective_length(averages: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """The longest length of the grid up to which every length's average clears `threshold`; None when the
    shortest does not (RULER's table writes "<4K")."""
    effective = None
    for length in sorted(averages):
        if averages[length] < threshold:
            break
        effective = length
    return effective


def weighted_averages(averages: dict[int, float]) -> tuple[float, float]:
    """RULER's wAvg (inc) and wAvg (dec): the averages weighted linearly increasing and decreasing with length."""
    lengths = sorted(averages)
    n = len(lengths)
    inc = sum((i + 1) * averages[length] for i, length in enumerate(lengths)) / (n * (n + 1) / 2)
    dec = sum((n - i) * averages[length] for i, length in enumerate(lengths)) / (n * (n + 1) / 2)
    return round(inc, 2), round(dec, 2)


def save_heatmap(scores: dict[tuple[int, str], float], lengths: Iterable[int], tasks: Iterable[str], path,
                 title: str) -> None:
    """A PNG of the score per task (down) and length (across); a blank cell is a task that does not fit there."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, tasks = list(lengths), list(tasks)
    grid = np.full((len(tasks), len(lengths)), np.nan)
    fig, ax = plt.subplots(figsize=(max(4.8, 2.6 + 0.9 * len(lengths)), max(3.4, 1.4 + 0.4 * len(tasks))), dpi=100)
    for row, task in enumerate(tasks):
        for col, length in enumerate(lengths):
            if (length, task) in scores:
                grid[row, col] = scores[length, task]
                ax.text(col, row, f"{scores[length, task]:.0f}", ha="center", va="center", fontsize=8)
            else:
                ax.text(col, row, "-", ha="center", va="center", fontsize=8)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score (0-100)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
