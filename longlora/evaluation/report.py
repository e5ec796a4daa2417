"""The evaluations side by side: tables, the perplexity plot and the short summary, from the evaluation stages'
metrics.

`model_results` is the one place that knows the shape of the evaluation stages' metrics files (eval_perplexity,
eval_passkey, eval_longqa, eval_ruler, eval_harness, longbench, longbench2); everything else here works on the
`ModelResults` it returns. The report stage (stages/report.py) and the Prefect flow's comparison artifact
(pipelines/longlora_flow.py) both build their tables with `comparison_markdown`, so the two show the same numbers the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PERPLEXITY_DIGITS = 2
ACCURACY_DIGITS = 2
SCORE_DIGITS = 2
"""Decimals shown (LongBench reports its 0-100 scores with two)."""
HARNESS_DIGITS = 4
"""lm-eval's numbers are shares (0-1), which its tables show with four decimals."""
LONGQA_SCORES = {"exact_match": "EM", "f1": "F1"}
"""eval_longqa's scores, with their short names in tables."""
LONGBENCH2_SCORES = ("overall", "easy", "hard", "short", "medium", "long")
"""longbench2's accuracies, in result.py's column order."""


@dataclass(frozen=True)
class ModelResults:
    """One model's evaluation results; an empty mapping / None where that evaluation has not run."""

    perplexity: dict[int, float] = field(default_factory=dict)
    """The standard strided perplexity, by context length (tokens)."""
    windowed_perplexity: dict[int, float] = field(default_factory=dict)
    """LongLoRA's own (its eval.py: windows every `windowed_step` tokens), by context length."""
    passkey_accuracy: float | None = None
    """Share of passkey prompts answered exactly, over every length and depth."""
    passkey_by_length: dict[int, float] = field(default_factory=dict)
    longqa: dict[str, float] = field(default_factory=dict)
    """Held-out questions in the SFT prompt format (eval_longqa): `exact_match` and `f1`, 0-100."""
    longbench: dict[str, float] = field(default_factory=dict)
    """LongBench score (0-100, as its eval.py) by task."""
    ruler: dict[int, float] = field(default_factory=dict)
    """RULER's average over its tasks (0-100), by prompt length."""
    ruler_effective_length: int | None = None
    """The longest length up to which every RULER average clears the threshold; 0: not even the shortest."""
    longbench2: dict[str, float | None] = field(default_factory=dict)
    """LongBench v2 accuracy (0-100, as its result.py) by LONGBENCH2_SCORES key; None: no question of that group."""
    longbench2_unread: bool = False
    """Not one of LongBench v2's answers could be read (nulls = questions): the model does not write its answer
    sentence, as a base model does not."""
    harness: dict[str, float] = field(default_factory=dict)
    """lm-evaluation-harness numbers as lm-eval reports them, by `<task> <metric>`."""

    @property
    def longbench_average(self) -> float | None:
        """LongBench's headline number: the mean over the tasks run."""
        return round(sum(self.longbench.values()) / len(self.longbench), SCORE_DIGITS) if self.longbench else None


def _by_length(values: dict | None) -> dict[int, float]:
    return {int(length): float(value) for length, value in sorted((values or {}).items(), key=lambda kv: int(kv[0]))}


def model_results(metrics: dict[str, dict | None]) -> ModelResults:
    """A model's results from what its evaluation stages wrote: the parsed metrics file (`<metrics_dir>/<model>.json`)
    by stage, `eval_perplexity`, `eval_passkey`, `eval_longqa`, `eval_ruler`, `eval_harness`, `longbench` and
    `longbench2`; a stage missing or None has not run."""
    perplexity = metrics.get("eval_perplexity") or {}
    passkey = metrics.get("eval_passkey") or {}
    longqa = metrics.get("eval_longqa") or {}
    longbench = metrics.get("longbench") or {}
    ruler = metrics.get("eval_ruler") or {}
    longbench2 = metrics.get("longbench2") or {}
    harness = metrics.get("eval_harness") or {}
    return ModelResults(
        perplexity=_by_length(perplexity.get("ppl")),
        windowed_perplexity=_by_length(perplexity.get("ppl_windowed")),
        passkey_accuracy=passkey.get("accuracy"),
        passkey_by_length=_by_length(passkey.get("by_length")),
        longqa={key: float(longqa[key]) for key in LONGQA_SCORES if key in longqa},
        longbench={task: float(score) for task, score in (longbench.get("scores") or {}).items()},
        ruler=_by_length(ruler.get("average")),
        ruler_effective_length=ruler.get("effective_length"),
        longbench2={key: longbench2[key] for key in LONGBENCH2_SCORES if key in longbench2},
        longbench2_unread=bool(longbench2.get("questions")) and longbench2.get("nulls") == longbench2["questions"],
        harness={f"{task} {metric}": float(value) for task, numbers in (harness.get("results") or {}).items()
                 for metric, value in numbers.items()},
    )


def cell(value) -> str:
    """A markdown table cell: floats to 6 significant digits, None empty, pipes escaped."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    """A result as shown in tables and the summary: fixed decimals, `-` for one not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def _lengths(values: list[dict[int, float]]) -> list[int]:
    return sorted({length for by_length in values for length in by_length})


def _effective(r: ModelResults) -> str:
    """The RULER effective length as shown: `<N` below the shortest length N, `-` when not evaluated."""
    if r.ruler_effective_length is None:
        return "-"
    return str(r.ruler_effective_length) if r.ruler_effective_length else f"<{min(r.ruler)}"


def comparison_sections(results: dict[str, ModelResults]) -> dict[str, str]:
    """Markdown tables by evaluation stage, the models as rows: `eval_perplexity` (both numbers by context length),
    `eval_passkey` (accuracy by prompt length and overall), `longbench` (score by task and their average). A stage
    no model has results of is left out."""
    sections = {}
    tables = []
    for title, attribute in (("perplexity (strided) by context length", "perplexity"),
                             ("perplexity as LongLoRA's eval.py computes it, by context length",
                              "windowed_perplexity")):
        lengths = _lengths([getattr(r, attribute) for r in results.values()])
        if lengths:
            rows = [[name, *(_number(getattr(r, attribute).get(n), PERPLEXITY_DIGITS) for n in lengths)]
                    for name, r in results.items()]
            tables.append(f"### eval_perplexity: {title}\n\n" + markdown_table(["model", *map(str, lengths)], rows))
    if tables:
        sections["eval_perplexity"] = "\n".join(tables)
    lengths = _lengths([r.passkey_by_length for r in results.values()])
    if lengths or any(r.passkey_accuracy is not None for r in results.values()):
        rows = [[name, *(_number(r.passkey_by_length.get(n), ACCURACY_DIGITS) for n in lengths),
                 _number(r.passkey_accuracy, ACCURACY_DIGITS)]
                for name, r in results.items()]
        sections["eval_passkey"] = ("### eval_passkey: passkey accuracy by prompt length (tokens)\n\n"
                                    + markdown_table(["model", *map(str, lengths), "all"], rows))
    if any(r.longqa for r in results.values()):
        rows = [[name, *(_number(r.longqa.get(key), SCORE_DIGITS) for key in LONGQA_SCORES)]
                for name, r in results.items()]
        sections["eval_longqa"] = ("### eval_longqa: held-out questions in the SFT prompt format (0-100)\n\n"
                                   + markdown_table(["model", "exact match", "token F1"], rows))
    lengths = _lengths([r.ruler for r in results.values()])
    if lengths:
        rows = [[name, *(_number(r.ruler.get(n), SCORE_DIGITS) for n in lengths), _effective(r)]
                for name, r in results.items()]
        sections["eval_ruler"] = ("### eval_ruler: RULER average over its tasks by prompt length (0-100), and the "
                                  "effective length\n\n"
                                  + markdown_table(["model", *map(str, lengths), "effective length"], rows))
    tasks = list(dict.fromkeys(task for r in results.values() for task in r.longbench))
    if tasks:
        rows = [[name, *(_number(r.longbench.get(task), SCORE_DIGITS) for task in tasks),
                 _number(r.longbench_average, SCORE_DIGITS)]
                for name, r in results.items()]
        sections["longbench"] = ("### longbench: score by task (0-100, LongBench's metrics)\n\n"
                                 + markdown_table(["model", *tasks, "average"], rows))
    if any(r.longbench2 for r in results.values()):
        rows = [[name, *(_number(r.longbench2.get(key), SCORE_DIGITS) for key in LONGBENCH2_SCORES)]
                for name, r in results.items()]
        sections["longbench2"] = ("### longbench2: LongBench v2 accuracy (0-100, as its result.py)\n\n"
                                  + markdown_table(["model", *LONGBENCH2_SCORES], rows))
    numbers = list(dict.fromkeys(key for r in results.values() for key in r.harness))
    if numbers:
        rows = [[name, *(_number(r.harness.get(key), HARNESS_DIGITS) for key in numbers)]
                for name, r in results.items()]
        sections["eval_harness"] = ("### eval_harness: lm-evaluation-harness, each task's numbers as lm-eval "
                                    "reports them\n\n" + markdown_table(["model", *numbers], rows))
    return sections


def comparison_markdown(results: dict[str, ModelResults]) -> str:
    """Every table of `comparison_sections`, one after the other."""
    return "\n".join(comparison_sections(results).values())


def summary_text(results: dict[str, ModelResults]) -> str:
    """A few lines for a terminal, two tables of the models: perplexity and passkey accuracy at each length; the
    held-out LongQA scores, the LongBench average, LongBench v2's accuracy, RULER's average at each length and its
    effective length."""
    lengths = _lengths([r.perplexity for r in results.values()])
    passkey_lengths = _lengths([r.passkey_by_length for r in results.values()])
    ruler_lengths = _lengths([r.ruler for r in results.values()])
    first = [["model", *(f"ppl@{n}" for n in lengths), *(f"passkey@{n}" for n in passkey_lengths)]]
    first += [[name, *(_number(r.perplexity.get(n), PERPLEXITY_DIGITS) for n in lengths),
               *(_number(r.passkey_by_length.get(n), ACCURACY_DIGITS) for n in passkey_lengths)]
              for name, r in results.items()]
    second = [["model", *(f"LongQA {short}" for short in LONGQA_SCORES.values()), "LongBench", "LongBench v2",
               *(f"RULER@{n}" for n in ruler_lengths), "RULER length"]]
    second += [[name, *(_number(r.longqa.get(key), SCORE_DIGITS) for key in LONGQA_SCORES),
                _number(r.longbench_average, SCORE_DIGITS), _number(r.longbench2.get("overall"), SCORE_DIGITS),
                *(_number(r.ruler.get(n), SCORE_DIGITS) for n in ruler_lengths), _effective(r)]
               for name, r in results.items()]
    notes = ["ppl@N: strided perplexity at N tokens of context; passkey@N: share of keys retrieved from N-token",
             "prompts (every depth); LongQA: held-out questions in the SFT prompt format, exact match and token F1",
             "(0-100); LongBench: mean score over its tasks (0-100); LongBench v2: accuracy on its four-choice",
             "questions (0-100, 25 is chance); RULER@N: mean score over RULER's tasks at N",
             "tokens (0-100); RULER length: its effective length (every average up to it >= the threshold);",
             "-: not evaluated"]
    unread = [name for name, r in results.items() if r.longbench2_unread]
    if unread:
        notes += [f"LongBench v2: not one answer could be read from {', '.join(unread)}: a model that does not write",
                  "\"The correct answer is (X)\" scores 0 (eval_harness gives the letters' likelihoods instead)"]
    return "\n".join([*_aligned(first), "", *_aligned(second), *notes]) + "\n"


def _aligned(table: list[list[str]]) -> list[str]:
    """Rows of a plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths,
                                                                                                     strict=True)))
            for row in table]


def perplexity_plot(results: dict[str, ModelResults], path: str | Path) -> bool:
    """A PNG of perplexity against context length, one colour per model (solid: strided; dashed: LongLoRA's own);
    byte-identical for the same results (no timestamp, no software tag). False, and no file, when no model has
    perplexity."""
    if not any(r.perplexity or r.windowed_perplexity for r in results.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt

    lengths = _lengths([r.perplexity for r in results.values()] + [r.windowed_perplexity for r in results.values()])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for index, (name, r) in enumerate(results.items()):
        color = f"C{index % 10}"
        for values, style, label in ((r.perplexity, "-", name),
                                     (r.windowed_perplexity, "--", f"{name} (LongLoRA eval.py)")):
            if values:
                ax.plot(list(values), list(values.values()), style, marker="o", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs context length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return True
