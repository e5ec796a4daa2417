"""Stages eval_perplexity and eval_passkey end to end on tiny models built here: what they write (CSV, metrics, the
heatmap PNG) agrees with itself and with the library, `dvc plots show` reads it (eval_ruler's heatmaps too), and bad
input stops before any work with one line naming the parameter."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.data.packing import TokenStream, TokenStreamWriter
from longlora.evaluation.loading import Interpolation, load_for_evaluation
from longlora.evaluation.perplexity import strided_perplexity, windowed_perplexity
from stages import eval_passkey, eval_perplexity, eval_ruler
from stages.params import parse_params
from tests.conftest import ROOT, tiny_params_dict

TARGET = 128  # tiny_params_dict: model.target_context
# The tiny tokenizer needs about 200 tokens for a passkey prompt: these models are evaluated past their 128
# positions on purpose (test_lengths_past_a_models_positions_need_extrapolate_true).
MODELS = {"base": {"path": "models/base", "interpolate": True, "extrapolate": True},
          "extended": {"path": "models/extended", "extrapolate": True}}
EVALS = {"eval_models": MODELS,
         "eval_perplexity": {"lengths": [32, 64], "windowed_step": 32, "batch_size": 3, "max_tokens": 600},
         "eval_passkey": {"lengths": [200, 256], "depths": [0.0, 1.0], "trials": 2}}


def _save_model(folder: Path, tokenizer, max_positions: int, seed: int) -> None:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    """Two tiny models (a base pre-trained at 32 tokens, to interpolate; an extended one at 128) and a token stream
    of held-out standard-library files in prepare_eval's format, built once."""
    from longlora.embedded.corpus import stdlib_documents

    root = tmp_path_factory.mktemp("eval_inputs")
    _save_model(root / "models/base", tiny_tokenizer, 32, seed=0)
    _save_model(root / "models/extended", tiny_tokenizer, TARGET, seed=1)
    (root / "data/eval").mkdir(parents=True)
    writer = TokenStreamWriter(root / "data/eval", np.uint16)
    for doc in stdlib_documents("heldout", max_documents=6):
        ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(doc.text, add_special_tokens=False)["input_ids"],
               tiny_tokenizer.eos_token_id]
        writer.write(np.array(ids), np.array([len(ids)]))
    writer.close({"tokenizer": "tiny", "vocab_size": len(tiny_tokenizer)})
    return root


@pytest.fixture
def project(inputs, tmp_path, monkeypatch, single_torch_thread):
    for name in ("models", "data/eval"):
        shutil.copytree(inputs / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(**sections):
    return parse_params(tiny_params_dict(**{**EVALS, **sections}))


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_perplexity_writes_both_numbers_per_length_as_the_library_computes_them(project):
    params = _params()
    metrics = {name: eval_perplexity.run(params, name) for name in MODELS}
    tokens = TokenStream("data/eval").tokens[:600]
    base, _ = load_for_evaluation("models/base", Interpolation(TARGET, params.model.rope_type,
                                                                headroom=params.model.rope_headroom))
    for name in MODELS:
        rows = _csv(Path(f"data/eval_results/perplexity/{name}/perplexity.csv"))
        assert [(row["model"], int(row["length"])) for row in rows] == [(name, 32), (name, 64)]
        written = json.loads(Path(f"data/metrics/eval_perplexity/{name}.json").read_text())
        assert written == metrics[name] and written["stage"] == f"eval_perplexity@{name}"
        assert set(written) == {"stage", "ppl", "ppl_windowed"}  # a model-by-length table in `dvc metrics show`
        ran_with = json.loads(Path(f"data/logs/eval_perplexity@{name}/params.json").read_text())["params"]
        assert ran_with["eval_model"] == {"name": name, **MODELS[name], "interpolate": name == "base", "chat": False}
        for row in rows:
            assert float(row["perplexity"]) == written["ppl"][row["length"]] > 1
            assert float(row["windowed_perplexity"]) == written["ppl_windowed"][row["length"]] > 1
    # The base model is scored with its RoPE interpolated to model.target_context, as load_for_evaluation gives it.
    want = {64: (strided_perplexity(base, tokens, 64, progress=False)["perplexity"],
                 windowed_perplexity(base, tokens, 64, 32, progress=False)["perplexity"])}
    # The metrics keep 3 decimals.
    assert metrics["base"]["ppl"]["64"] == pytest.approx(want[64][0], abs=5e-4)
    assert metrics["base"]["ppl_windowed"]["64"] == pytest.approx(want[64][1], abs=5e-4)
    base_rows = {row["length"]: row for row in _csv(Path("data/eval_results/perplexity/base/perplexity.csv"))}
    assert int(base_rows["64"]["tokens_scored"]) == 9 * 63  # 600 tokens: 9 side-by-side windows of 64
    assert int(base_rows["64"]["windows"]) == len(range(0, 600 - 64, 32)) - 1


def test_perplexity_with_s2attn_at_evaluation_differs_from_dense(project):
    dense = eval_perplexity.run(_params(), "extended")["ppl"]["64"]
    s2 = eval_perplexity.run(_params(eval_perplexity={**EVALS["eval_perplexity"], "attention": "s2"}),
                             "extended")["ppl"]["64"]
    assert s2 > 1 and s2 != dense  # random weights: close, but S² hides part of each window from the rest


def test_passkey_writes_the_grid_its_trials_and_a_heatmap(project):
    import matplotlib.image

    metrics = eval_passkey.run(_params(), "base")
    folder = Path("data/eval_results/passkey/base")
    cells = _csv(folder / "passkey.csv")
    assert [(int(c["length"]), float(c["depth"]), int(c["trials"])) for c in cells] == [
        (200, 0.0, 2), (200, 1.0, 2), (256, 0.0, 2), (256, 1.0, 2)]
    trials = _csv(folder / "trials.csv")
    assert len(trials) == 8 and all(int(t["prompt_tokens"]) <= int(t["length"]) for t in trials)
    # Two trials per cell: each cell its own two keys (fewer than 4 trials; longlora.evaluation.passkey.cell_seeds).
    assert [int(t["seed"]) for t in trials] == list(range(8))
    for cell in cells:
        in_cell = [t for t in trials if (t["length"], float(t["depth"])) == (cell["length"], float(cell["depth"]))]
        assert int(cell["correct"]) == sum(t["correct"] == "True" for t in in_cell)
    assert metrics["accuracy"] == pytest.approx(sum(t["correct"] == "True" for t in trials) / 8, abs=1e-4)
    assert set(metrics) == {"stage", "accuracy", "by_length", "prompts"} and set(metrics["by_length"]) == {"200", "256"}
    assert metrics["by_length"]["256"] == pytest.approx(
        sum(t["correct"] == "True" for t in trials if t["length"] == "256") / 4, abs=1e-4)
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(folder / "heatmap.png").ndim == 3
    assert json.loads(Path("data/metrics/eval_passkey/base.json").read_text())["prompts"] == 8


def test_heatmap_and_cells_score_an_oracle_fully(tiny_tokenizer, tmp_path):
    """The grid, its cells and the heatmap with a model that always answers right (test_passkey's oracle)."""
    from longlora.evaluation.passkey import cell_accuracy, passkey_grid, save_heatmap
    from tests.test_passkey import _Oracle

    trials = passkey_grid(_Oracle(tiny_tokenizer), tiny_tokenizer, (200, 300), (0.0, 0.5), trials=3, progress=False)
    cells = cell_accuracy(trials)
    assert cells == {(200, 0.0): (3, 3), (200, 0.5): (3, 3), (300, 0.0): (3, 3), (300, 0.5): (3, 3)}
    assert [t.seed for t in trials[:3]] == [0, 1, 2]
    save_heatmap(cells, tmp_path / "h.png", "oracle")
    assert (tmp_path / "h.png").stat().st_size > 1000


def _cli(module, raw: dict, model: str, capsys) -> tuple[int, str]:
    Path("params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = module.main([model, "--params", "params.yaml"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("module", "model", "sections", "message"), [
    (eval_perplexity, "extended", {"eval_models": {**MODELS, "extended": {"path": "models/absent"}}},
     r"eval_models\.extended\.path 'models/absent': no such folder"),
    (eval_passkey, "extended", {"eval_models": {**MODELS, "extended": {"path": "models/absent"}}},
     r"eval_models\.extended\.path 'models/absent': no such folder"),
    (eval_perplexity, "base", {"eval_perplexity": {"lengths": [32, 1_000_000], "max_tokens": None}},
     r"prepare_eval\.out_dir 'data/eval': \d+ tokens, too few for eval_perplexity\.lengths up to 1000000"),
    (eval_perplexity, "base", {"eval_perplexity": {"lengths": [32, 64], "attention": "s2"},
                               "s2attn": {"group_size": 16, "group_size_ratio": None}},
     None),  # 32 and 64 are tiled by groups of 16: it runs
    (eval_perplexity, "base", {"eval_perplexity": {"lengths": [32, 72], "attention": "s2"},
                               "s2attn": {"group_size": 16, "group_size_ratio": None}},
     r"eval_perplexity\.attention s2 at length 72: .*not divisible"),
    (eval_passkey, "base", {"eval_passkey": {"lengths": [64, 256]}},
     r"eval_passkey\.lengths: 64 tokens cannot hold the passkey prompt and its answer with eval_models\.base's"),
    (eval_perplexity, "mine", {},
     r"eval_perplexity@mine: no model 'mine' in eval_models \(base, base_pi, extended, sft\)"),
    # Past a model's positions only when asked: its own (the extended test model's 128), or the interpolated
    # target's (the base one, interpolated to model.target_context 128).
    (eval_perplexity, "extended", {"eval_models": {**MODELS, "extended": {"path": "models/extended",
                                                                          "extrapolate": False}},
                                   "eval_perplexity": {"lengths": [32, 256], "max_tokens": None}},
     r"eval_perplexity\.lengths: 256 tokens, beyond the 128 positions of eval_models\.extended \(models/extended\);"
     r" evaluate within them, or set eval_models\.extended\.extrapolate: true"),
    (eval_passkey, "base", {"eval_models": {**MODELS, "base": {"path": "models/base", "interpolate": True,
                                                               "extrapolate": False}}},
     r"eval_passkey\.lengths: 256 tokens, beyond the 128 positions of eval_models\.base"),
])
def test_bad_input_stops_before_any_work_naming_the_parameter(project, capsys, module, model, sections, message):
    raw = tiny_params_dict(**{**EVALS, **sections})
    code, err = _cli(module, raw, model, capsys)
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    written = [path for path in Path("data").rglob("*") if path.is_file() and path.parts[1] != "eval"]
    assert not written, written


def test_a_model_with_another_tokenizer_is_refused(project, capsys):
    from longlora.embedded.tiny import train_bpe_tokenizer

    _save_model(Path("models/other"), train_bpe_tokenizer(["some other text " * 50], vocab_size=300), 128, seed=0)
    raw = tiny_params_dict(**{**EVALS, "eval_models": {**MODELS, "other": {"path": "models/other"}}})
    code, err = _cli(eval_perplexity, raw, "other", capsys)
    assert code == 2 and "eval_models.other.path 'models/other': its tokenizer has" in err
    assert "data/eval was tokenized with 'tiny' (400 tokens)" in err


def test_params_refuse_windows_that_cannot_fit():
    from stages.params import ParamsError

    with pytest.raises(ParamsError, match=r"eval_perplexity: stride 100 exceeds the shortest length 32"):
        parse_params(tiny_params_dict(eval_perplexity={"stride": 100}))  # lengths: prepare_eval's 32, 64, 128
    with pytest.raises(ParamsError, match=r"max_tokens 150 leaves no LongLoRA window at length 128"):
        parse_params(tiny_params_dict(eval_perplexity={"max_tokens": 150}))
    with pytest.raises(ParamsError, match=r"eval_passkey: depths must be shares"):
        parse_params(tiny_params_dict(eval_passkey={"depths": [0.5, 1.5]}))
    assert parse_params({}).eval_passkey.lengths == (256, 512, 1024)  # model.target_context / 4, / 2, × 1
    assert parse_params({}).eval_perplexity.lengths == parse_params({}).prepare_eval.lengths
    assert parse_params({"prepare_eval": {"lengths": [100, 300]}}).eval_perplexity.lengths == (100, 300)


@pytest.mark.slow
def test_dvc_plots_show_reads_the_perplexity_lines_and_the_heatmaps(project):
    """The real `dvc plots show` on the project's dvc.yaml: one line per model in each perplexity plot, the PNGs."""
    # Every model the project's dvc.yaml plots (params.yaml's eval_models), the later ones on the extended test model.
    names = yaml.safe_load((ROOT / "params.yaml").read_text())["eval_models"]
    models = {name: {**MODELS.get(name, MODELS["extended"]), "chat": False} for name in names}  # stand-ins: no template
    evals = {**EVALS, "eval_models": models}
    params = parse_params(tiny_params_dict(**{**evals, "eval_perplexity": {**EVALS["eval_perplexity"],
                                                                            "lengths": [32, 64, 128]}}))
    passkey = parse_params(tiny_params_dict(**{**evals, "eval_passkey": {"lengths": [200], "depths": [0.5],
                                                                         "trials": 1}}))
    ruler = parse_params(tiny_params_dict(**{**evals, "eval_ruler": {"lengths": [600], "tasks": ["fwe"],
                                                                     "samples": 1}}))
    for name in models:
        eval_perplexity.run(params, name)
        eval_passkey.run(passkey, name)
        eval_ruler.run(ruler, name)
    shutil.copy(ROOT / "dvc.yaml", "dvc.yaml")
    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**evals)), encoding="utf-8")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(project / "dvc-site-cache")}
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, check=True, env=env)
    shown = subprocess.run([dvc, "plots", "show", "--json"], capture_output=True, text=True, env=env, check=True)
    plots = json.loads(shown.stdout)
    errors = [e for e in plots.get("errors", []) if "dvclive" not in e["name"]]  # no training run here
    assert not errors, errors
    for title, field in (("perplexity (strided) vs context length", "perplexity"),
                         ("perplexity (LongLoRA eval.py) vs context length", "windowed_perplexity")):
        points = plots["data"][title][0]["content"]["data"]["values"]
        lines = {(p["model"], p["filename"]) for p in points}
        assert {model for model, _ in lines} == set(models) and len(lines) == len(models)
        assert sorted(int(p["length"]) for p in points if p["model"] == "base") == [32, 64, 128]
        assert all(float(p[field]) > 1 for p in points)
    for name in models:
        for stage in ("passkey", "ruler"):
            image = plots["data"][f"data/eval_results/{stage}/{name}/heatmap.png"][0]
            assert image["type"] == "image" and Path(image["url"]).exists()
