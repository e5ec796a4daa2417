"""Stage sft and merge@sft end to end on a 2-layer tiny model (pre-trained at 32 tokens, extended to 128), the loss it
trains on (answer tokens only, right-padded rows computing what they compute alone), the order it reads
length-grouped data in, and bad input stopping before training with one line naming the parameter or file."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longlora.data.sft import (
    CHAT_TEMPLATE_FILE,
    IGNORE_INDEX,
    LLAMA2_CHAT_TEMPLATE,
    PaddedBatches,
    fit_example,
    pack_rows,
)
from longlora.io import run_log
from longlora.method.extension import EXTENSION_FILE, load_extended
from longlora.method.s2attn import configure_s2attn
from stages import _cli, build_base_model, extend, merge, prepare_pretrain, prepare_sft, sft
from stages.params import parse_params
from tests.conftest import _merge, tiny_params_dict
from tests.test_extend import _ids, _logits

TARGET, ORIGINAL, GROUP = 128, 32, 32  # tiny_params_dict: target_context, the base's context, S² group at 128


LOCAL_INPUTS = {"prepare_sft": {"input": "longqa.json"}, "prepare_pretrain": {"input": "corpus.jsonl"}}


def _params(**sections):
    return parse_params(tiny_params_dict(**_merge(LOCAL_INPUTS, sections)))


def _longqa(n: int = 16) -> list[dict]:
    """LongAlpaca-format records: a piece of source code, a question about it, a short answer."""
    from longlora.embedded.corpus import stdlib_documents

    docs = list(stdlib_documents("extend", max_documents=n))
    return [{"instruction": f"{d.text[: 40 + 30 * i]}\nWhich line comes first?",
             "output": d.text.splitlines()[0][:40] or "nothing"} for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Base model, blocks, SFT examples (grouped and not) and the merged extended model, built once."""
    from longlora.embedded.corpus import stdlib_documents

    root = tmp_path_factory.mktemp("sft_inputs")
    with contextlib.chdir(root):
        with open("corpus.jsonl", "w", encoding="utf-8") as f:
            for doc in stdlib_documents("extend", max_documents=16):
                f.write(json.dumps({"text": doc.text}) + "\n")
        Path("longqa.json").write_text(json.dumps(_longqa()), encoding="utf-8")
        params = _params(extend={"max_steps": 2})
        build_base_model.run(params)
        prepare_pretrain.run(params)
        extend.run(params)
        merge.run(params, "extend")
        prepare_sft.run(params)
        grouped = _params(prepare_sft={"group_by_length": True, "group_batch_size": 2, "out_dir": "grouped_sft",
                                       "metrics_file": "grouped_sft.json"}, sft={"replay_share": 0})
        prepare_sft.run(grouped)
    return root


@pytest.fixture
def project(inputs, tmp_path, monkeypatch, single_torch_thread):
    for name in ("data/base_model", "data/extended_model", "data/sft", "grouped_sft", "data/pretrain"):
        shutil.copytree(inputs / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sft_fine_tunes_the_extended_model_and_merge_folds_it_into_the_final_model(project):
    params = _params()
    metrics = sft.run(params)
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    assert all(np.isfinite(metrics["losses"])) and metrics["s2attn_group_size"] == GROUP
    # Batches are right-padded to a multiple of the group: some padding, and the tokens counted are the real ones.
    assert 0 < metrics["padding_share"] < 0.5
    # The fixture's extended model is still at its base's context: sft interpolates it, headroom included.
    assert metrics["trainable_parameters"]["embeddings"] > 0
    assert metrics["rope_parameters"]["factor"] == TARGET / ORIGINAL * params.model.rope_headroom
    assert json.loads(Path("data/metrics/sft.json").read_text()) == metrics
    assert [p.name for p in Path("data/checkpoints/sft").iterdir()] == [".longlora-checkpoints.json"]

    out = project / "data/sft_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", EXTENSION_FILE,
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (run_log("sft") / "dvclive/plots/metrics/loss.tsv").is_file()  # the run log, not the cached output
    described = json.loads((out / EXTENSION_FILE).read_text())
    assert described["base_model"] == "data/extended_model" and described["original_context"] == ORIGINAL
    assert described["target_context"] == TARGET and described["s2attn_group_size"] == GROUP
    assert described["params"]["sft"]["max_steps"] == 4

    adapter = load_extended(out)
    ids = _ids()
    expected = _logits(adapter, ids)
    # It moved away from the extended model it started from.
    start = AutoModelForCausalLM.from_pretrained("data/extended_model").eval()
    assert (_logits(start, ids) - expected).abs().max() > 1e-4

    merged_metrics = merge.run(params, "sft")
    assert merged_metrics["merged_adapter"] and merged_metrics["tied_embeddings"]
    assert merged_metrics["max_position_embeddings"] == TARGET
    final = AutoModelForCausalLM.from_pretrained(project / "data/sft_model").eval()
    assert "s2attn" not in (project / "data/sft_model/config.json").read_text()
    torch.testing.assert_close(_logits(final, ids), expected, atol=1e-4, rtol=0)
    provenance = json.loads((project / "data/sft_model" / EXTENSION_FILE).read_text())
    assert provenance["merged_from"] == "data/sft_adapter" and provenance["original_context"] == ORIGINAL
    # The final model answers in the format it was fine-tuned in: its tokenizer's chat template renders
    # prepare_sft's prompt, token for token, for whatever prompts it as a chat.
    tokenizer = AutoTokenizer.from_pretrained(project / "data/sft_model")
    assert (project / "data/sft" / CHAT_TEMPLATE_FILE).read_text() == tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Question: x?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer("[INST]Question: x?[/INST]")["input_ids"]


def test_a_chat_base_with_a_shorter_context_is_interpolated_to_the_target(project):
    params = _params(sft={"base_model": "data/base_model", "max_steps": 1}, model={"rope_headroom": 1.0})
    metrics = sft.run(params)
    assert metrics["rope_parameters"]["factor"] == TARGET / ORIGINAL
    config = json.loads((project / "data/sft_adapter/config.json").read_text())
    assert config["max_position_embeddings"] == TARGET and config["rope_parameters"]["factor"] == 4


def test_length_grouped_examples_are_read_in_the_stored_order(project, monkeypatch):
    import datasets

    seen: list[list[int]] = []
    collate = PaddedBatches.__call__

    def recording(self, examples):
        seen.append([len(e["input_ids"]) for e in examples])
        return collate(self, examples)

    monkeypatch.setattr(PaddedBatches, "__call__", recording)
    sft.run(_params(sft={"data": "grouped_sft", "replay_share": 0}))
    stored = datasets.load_from_disk("grouped_sft")["length"]
    # 4 steps × accumulation 2 × batches of 2: the first 16 rows, in the stored order and batches.
    assert seen == [stored[i: i + 2] for i in range(0, 16, 2)]


def test_replay_pieces_are_shuffled_in_with_every_token_in_the_loss(project):
    import datasets

    from longlora.data.packing import PackedBlocks
    from longlora.errors import InputError
    from stages.params import ParamsError

    before = sorted(p.name for p in Path("data/sft").iterdir())
    examples = len(datasets.load_from_disk("data/sft"))
    plain = sft.prepare_job(_params(sft={"replay_share": 0}))
    assert len(plain.dataset) == examples and "replay" not in plain.data_meta

    job = sft.prepare_job(_params(sft={"replay_share": 0.25, "replay_length": 48}))
    pieces = round(examples / 3)  # a quarter of all rows
    assert len(job.dataset) == examples + pieces and job.data_meta["replay"]["pieces"] == pieces
    rows = list(job.dataset)
    replayed = [i for i, row in enumerate(rows) if row["labels"] == row["input_ids"]]  # instructions mask the prompt
    assert len(replayed) == pieces and replayed != list(range(examples, examples + pieces))  # shuffled in
    blocks = PackedBlocks("data/pretrain")
    cut = {tuple(np.asarray(blocks[b][j * 48:(j + 1) * 48]).tolist()) for b in range(len(blocks)) for j in range(2)}
    assert all(len(rows[i]["input_ids"]) == 48 and tuple(rows[i]["input_ids"]) in cut for i in replayed)
    assert sorted(p.name for p in Path("data/sft").iterdir()) == before  # nothing written into prepare_sft's output

    metrics = sft.run(_params(sft={"replay_share": 0.25, "replay_length": 48, "max_steps": 1}))
    assert np.isfinite(metrics["losses"]).all()
    with pytest.raises(ParamsError, match="sft.replay_share"):
        _params(sft={"replay_share": 0.25}, prepare_sft={"group_by_length": True})
    with pytest.raises(InputError, match="sft.replay_share 0.25: 'grouped_sft/order.json' says"):
        sft.prepare_job(_params(sft={"replay_share": 0.25, "data": "grouped_sft", "per_device_batch_size": 2}))


def _s2_llama(heads: int, kv_heads: int):
    """A seeded 2-layer Llama (context 64) training with S²-Attn in fixed groups of 8."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=8 * heads, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return configure_s2attn(LlamaForCausalLM(config), group_size=8).train()


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (9, 3)])
def test_the_loss_is_on_answer_tokens_only_and_padded_rows_compute_what_they_compute_alone(heads, kv_heads):
    model = _s2_llama(heads, kv_heads)
    rng = np.random.default_rng(0)
    examples = []
    for prompt_len, answer_len in ((20, 5), (9, 3), (30, 10)):
        fitted = fit_example(rng.integers(1, 64, prompt_len), rng.integers(1, 64, answer_len), 64)
        examples.append({"input_ids": fitted.input_ids.tolist(), "labels": fitted.labels.tolist()})
    batch = PaddedBatches(pad_id=0, multiple=8)(examples)
    assert batch["input_ids"].shape == (3, 40)  # the longest row (40) is already a multiple of 8
    loss = model(**batch).loss

    # The reference: each row alone, padded only to a multiple of the group, cross-entropy on its answer tokens.
    total, count = 0.0, 0
    for example in examples:
        n = len(example["input_ids"])
        padded = -(-n // 8) * 8
        ids = torch.tensor(example["input_ids"] + [0] * (padded - n))[None]
        logits = model(input_ids=ids).logits[0, : n - 1]
        targets = torch.tensor(example["labels"][1:])
        answer = targets != IGNORE_INDEX
        assert int(answer.sum()) > 0 and int((~answer).sum()) > 0
        total = total + torch.nn.functional.cross_entropy(logits[answer], targets[answer], reduction="sum")
        count += int(answer.sum())
    torch.testing.assert_close(loss, total / count, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (9, 3)])
def test_a_padding_free_batch_has_the_loss_and_gradients_of_the_same_examples_padded(heads, kv_heads):
    model = _s2_llama(heads, kv_heads)
    rng = np.random.default_rng(1)
    examples = []
    # Shorter than half a group, a group, several groups: 3 rows of at most 40 tokens instead of 6 padded ones.
    for prompt_len, answer_len in ((20, 5), (2, 1), (9, 3), (30, 10), (5, 3), (14, 2)):
        fitted = fit_example(rng.integers(1, 64, prompt_len), rng.integers(1, 64, answer_len), 64)
        examples.append({"input_ids": fitted.input_ids.tolist(), "labels": fitted.labels.tolist()})
    padded_collator, packed_collator = PaddedBatches(pad_id=0, multiple=8), PaddedBatches(pad_id=0, row_length=40)
    padded, packed = padded_collator(examples), packed_collator(examples)
    assert padded["input_ids"].shape == (6, 40) and packed["input_ids"].shape == (3, 40)
    real = sum(len(e["input_ids"]) for e in examples)
    assert padded_collator.tokens == packed_collator.tokens == real
    assert packed_collator.padded_tokens == 3 * 40 - real < padded_collator.padded_tokens
    # Every answer token is a target in both, once.
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())

    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-6)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_fit_the_row_length_first_fit_decreasing():
    rows = pack_rows([5, 30, 12, 9, 25, 1], 32)
    assert rows == [[1, 5], [4, 0], [2, 3]]  # longest first, each into the first row with room: 30 + 1, 25 + 5, 12 + 9
    with pytest.raises(ValueError, match="33 tokens does not fit a row of 32"):
        pack_rows([33], 32)


# --- bad input: one line, exit 2, nothing written --------------------------------------------------------------


def _bad_dataset(folder: str) -> str:
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 5000, 3]], "labels": [[-100, 5000, 3]], "length": [3]}) \
        .save_to_disk(folder)
    return folder


@pytest.mark.parametrize(("case", "expected"), [
    ("missing data", "sft.data 'absent': no dataset there (run prepare_sft first)"),
    ("missing base", "sft.base_model 'data/absent_model': no such folder"),
    ("other vocabulary", "sft.data 'foreign': token id 5000 is outside the model's 400-token vocabulary"),
    ("batch of another grouping", "sft.per_device_batch_size 4: 'grouped_sft/order.json' says the examples are "
                                  "stored in length-grouped batches of 2"),
])
def test_bad_input_stops_before_training_with_one_line(project, capsys, case, expected):
    import yaml

    if case == "other vocabulary":
        _bad_dataset("foreign")
        capsys.readouterr()  # its progress bar
    overrides = {
        "missing data": {"data": "absent"},
        "missing base": {"base_model": "data/absent_model"},
        "other vocabulary": {"data": "foreign"},
        "batch of another grouping": {"data": "grouped_sft", "per_device_batch_size": 4},
    }[case]

    Path("params.yaml").write_text(yaml.safe_dump(tiny_params_dict(sft=overrides)), encoding="utf-8")
    code = _cli.main("sft", sft.run, ["--params", "params.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"stages.sft: error: {expected}"), err
    assert len(err.splitlines()) == 1
    assert not Path("data/sft_adapter").exists() and not Path("data/metrics/sft.json").exists()
    assert not Path("data/checkpoints/sft").exists()


# --- sequence parallelism (launch.sequence_parallel): the collator's side -------------------------------------------


def test_sequence_parallel_pads_rows_to_whole_shards_of_groups_and_cuts_them():
    """Padded SFT rows (group 4) shared by 2 processes: right-padded to a multiple of 2 × 4, then halved; the halves
    put back together are the padded batch, with the labels shifted over the whole row."""
    from stages._training import ShardedBatches

    examples = [{"input_ids": [5] * 11, "labels": [IGNORE_INDEX] * 3 + [5] * 8},
                {"input_ids": [6] * 5, "labels": [6] * 5}]
    inner = PaddedBatches(pad_id=0, multiple=4)
    whole = inner(examples)  # 12 tokens: a multiple of the group, not of 2 groups
    halves = [ShardedBatches(inner, 2, index, {"group_size": 4, "shift": True})(examples) for index in (0, 1)]
    assert [h["input_ids"].shape for h in halves] == [(2, 8), (2, 8)]
    joined = {key: torch.cat([h[key] for h in halves], dim=1) for key in ("input_ids", "attention_mask",
                                                                         "shift_labels", "position_ids")}
    assert joined["input_ids"][:, :12].tolist() == whole["input_ids"].tolist()
    assert joined["input_ids"][:, 12:].eq(0).all() and joined["attention_mask"][:, 12:].eq(0).all()
    assert joined["attention_mask"].sum(dim=1).tolist() == [11, 5]
    labels = torch.cat((whole["labels"], torch.full((2, 4), IGNORE_INDEX)), dim=1)
    assert joined["shift_labels"].tolist() == torch.cat(
        (labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)), dim=1).tolist()
    assert joined["position_ids"].tolist() == [list(range(16))] * 2
    assert [h["sequence_shard"].recv for h in halves] == [(0, 0), (0, 2)]


def test_ranks_sharing_a_row_get_the_same_batches_in_the_one_process_order():
    """accelerate hands process k every world-size-th batch from k: with 2 processes per row and 4 processes, 0 and 1
    see the base order's batches 0, 2, …, and 2 and 3 the batches 1, 3, …"""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from stages._training import RepeatedBatches

    base = [7, 3, 1, 6, 0, 2, 5, 4]
    repeated = RepeatedBatches(base, batch_size=2, shards=2)
    assert list(repeated) == [7, 3, 7, 3, 1, 6, 1, 6, 0, 2, 0, 2, 5, 4, 5, 4] and len(repeated) == 16
    seen = [list(BatchSamplerShard(BatchSampler(repeated, 2, False), num_processes=4, process_index=k))
            for k in range(4)]
    assert seen[0] == seen[1] == [[7, 3], [0, 2]]
    assert seen[2] == seen[3] == [[1, 6], [5, 4]]


@pytest.mark.parametrize("padding_free", [False, True])
def test_two_processes_sharing_every_row_fine_tune_as_one(project, tmp_path_factory, padding_free):
    """`launch.sequence_parallel 2` under torchrun (gloo) on sft: rows padded to whole shards of groups (64 here,
    32 alone), or padding-free rows of several examples cut across the halves; the loss curve and the adapter of
    one process, and the same count of real tokens."""
    from tests.test_extend import _adapter_weights, _assert_same_weights, _torchrun_unavailable, launched_pair

    if _torchrun_unavailable():
        pytest.skip(_torchrun_unavailable())
    section = {"padding_free": padding_free}
    raw = tiny_params_dict(**_merge(LOCAL_INPUTS, {"sft": section, "launch": {
        "launcher": "torchrun", "nproc_per_node": 2, "sequence_parallel": 2}}))
    pair, written, _ = launched_pair(project, tmp_path_factory, "sft", raw, "data/sft_adapter")
    assert (pair["world_size"], pair["sequence_parallel"], pair["gradient_accumulation_steps"]) == (2, 2, 2)

    single = sft.run(_params(sft=section))
    assert single["tokens_seen"] == pair["tokens_seen"]  # real tokens only: the extra padding is not counted
    assert pair["losses"] == pytest.approx(single["losses"], abs=1e-4)
    _assert_same_weights(written, _adapter_weights(project / "data/sft_adapter"), atol=1e-5)
