"""`method: qlora`: the frozen base's Linear layers in 4-bit NF4 (bitsandbytes), LoRA on the attention projections, the
embeddings and norms unquantised and trained in fp32; the adapter folder is lora_plus's, and merge folds it into the
full-precision base (base + ΔW, not the dequantised 4-bit weights + ΔW). Bad input (bitsandbytes missing, too old,
without a 4-bit kernel for the device; ZeRO-3; an already quantised base) is one InputError naming the key.

The real-model tests run wherever bitsandbytes quantises to 4-bit on the training device (its CPU backend does, from
0.4x on); they skip where it is not installed (it is the optional `qlora` extra). The GPU test checks the bf16 compute
path."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from longlora.errors import InputError
from longlora.io import TIMINGS_FILE, run_log
from longlora.method import training
from longlora.method.extension import EXTENSION_FILE, load_extended
from longlora.method.lora import trainable_parameter_counts
from longlora.method.training import check_bitsandbytes, quantization_config, resolve_precision, trainable_model
from stages import _training, build_base_model, extend, merge, prepare_pretrain
from stages.params import parse_params
from tests.conftest import ROOT, tiny_params_dict

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "train_embeddings": True, "train_norms": True}
VOCAB = 64


def _bitsandbytes_problem() -> str | None:
    try:
        check_bitsandbytes("extend.method")  # on the device trainable_model loads the 4-bit base on
    except InputError as err:
        return str(err)
    return None


needs_4bit = pytest.mark.skipif(_bitsandbytes_problem() is not None, reason=f"{_bitsandbytes_problem()}")


def _save_llama(folder: Path, tied: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=tied)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("untied"), tied=False)


def _build(folder, **kwargs):
    config = LlamaConfig.from_pretrained(folder)
    return trainable_model(str(folder), config, **{"method": "qlora", "attention": "dense", "precision": "fp32",
                                                   "lora": LORA} | kwargs)


def _ids(seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _device(model) -> torch.device:
    """Where trainable_model put the 4-bit base: this process' GPU if there is one, else the CPU."""
    return next(w.device for w in model.parameters() if w.dtype == torch.uint8)


def _train(model, steps: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _ids(1).to(_device(model))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --- configuration and bad input: no bitsandbytes needed ------------------------------------------------------------


def test_qlora_is_a_method_of_both_training_stages():
    params = parse_params(tiny_params_dict(extend={"method": "qlora"}, sft={"method": "qlora"}))
    assert params.extend.method == params.sft.method == "qlora"


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                  ("fp32", torch.float32)])
def test_the_quantization_config_is_nf4_double_quantised_computing_in_the_precision(monkeypatch, precision, dtype):
    checked = []
    monkeypatch.setattr(training, "check_bitsandbytes", lambda param, device=None: checked.append(param) or "0")
    config = quantization_config(precision, "sft.method")
    assert checked == ["sft.method"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == dtype


def test_on_a_cpu_auto_precision_computes_in_fp32(monkeypatch):
    monkeypatch.setattr(training, "check_bitsandbytes", lambda param, device=None: "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quantization_config(resolve_precision("auto")).bnb_4bit_compute_dtype == torch.float32


def _installed(monkeypatch, version: str | None) -> None:
    """Pretend bitsandbytes `version` is installed (None: not installed)."""
    real = metadata.version

    def version_of(name: str) -> str:
        if name != "bitsandbytes":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", version_of)


def _fake_bitsandbytes(monkeypatch, quantize) -> None:
    """A bitsandbytes whose `functional.quantize_4bit` is `quantize`."""
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_4bit = quantize
    functional.dequantize_4bit = lambda packed, state: packed
    package = types.ModuleType("bitsandbytes")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)


def _no_kernel(*args, **kwargs):
    raise NotImplementedError("no 4-bit kernel for this device\nsecond line")


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "sft.method qlora: bitsandbytes is not installed; pip install -e '.[qlora]'"),
    ("too old", "sft.method qlora: bitsandbytes 0.45.0 is older than 0.46.1"),
    ("no kernel", "sft.method qlora: bitsandbytes 0.50.2 cannot quantise to 4-bit NF4 on cpu (no 4-bit kernel for "
                  "this device); install a release with a kernel for it"),
    ("wrong numbers", "sft.method qlora: bitsandbytes 0.50.2 quantises to 4-bit NF4 on cpu with an error of 1"),
])
def test_bitsandbytes_that_cannot_run_4bit_here_is_one_line_naming_the_method_key(tied_dir, monkeypatch, case,
                                                                                   message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _installed(monkeypatch, {"missing": None, "too old": "0.45.0"}.get(case, "0.50.2"))
    if case == "no kernel":
        _fake_bitsandbytes(monkeypatch, _no_kernel)
    if case == "wrong numbers":
        _fake_bitsandbytes(monkeypatch, lambda probe, **kwargs: (probe + 1, None))
    with pytest.raises(InputError) as caught:
        _build(tied_dir, param="sft.base_model")
    assert str(caught.value).startswith(message), caught.value
    assert len(str(caught.value).splitlines()) == 1


def test_zero3_is_refused_naming_both_keys(tied_dir, monkeypatch):
    import transformers.integrations.deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(InputError, match=r"^extend\.method qlora cannot be combined with a ZeRO-3 config in "
                                         r"extend\.deepspeed: .*configs/ds_zero2\.json"):
        _build(tied_dir, param="model.name_or_path")


def test_an_already_quantised_base_is_refused(tmp_path):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(InputError, match=r"^sft\.base_model '.*' is already quantised \(bitsandbytes\); sft\.method "
                                         r"qlora quantises a full-precision base itself"):
        trainable_model(str(tmp_path), config, method="qlora", attention="dense", precision="fp32", lora=LORA,
                        param="sft.base_model")


# --- the real thing: 4-bit NF4 where bitsandbytes runs it ------------------------------------------------------------


@needs_4bit
def test_the_base_is_4bit_and_embeddings_and_norms_train_in_fp32(tied_dir, single_torch_thread):
    import bitsandbytes as bnb

    model = _build(tied_dir)
    inner = model.get_base_model()
    for layer in inner.model.layers:
        for linear in (*(getattr(layer.self_attn, n) for n in LORA["target_modules"]),
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            base = getattr(linear, "base_layer", linear)
            assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
            assert base.weight.quant_state.quant_type == "nf4" and base.weight.quant_state.nested  # double quant
            assert base.compute_dtype == torch.float32
    assert not isinstance(inner.lm_head, bnb.nn.Linear4bit)
    trained = {name: weight for name, weight in model.named_parameters() if weight.requires_grad}
    assert all(weight.dtype == torch.float32 for weight in trained.values())
    assert all("lora_" in name or "modules_to_save" in name for name in trained)
    assert any("embed_tokens.modules_to_save" in name for name in trained)
    assert sum("norm" in name and "modules_to_save" in name for name in trained) == 2 * 2 + 1
    assert {w.dtype for w in model.parameters() if not w.requires_grad} == {torch.uint8, torch.float32}
    counts = trainable_parameter_counts(model)
    full = sum(w.numel() for w in LlamaForCausalLM.from_pretrained(tied_dir).parameters())
    # 4-bit weights are counted by their real shape: the total is the base plus the adapter's own weights.
    assert counts["total"] == full + counts["trainable"] and counts["embeddings"] == VOCAB * 64

    original = inner.model.embed_tokens.original_module.weight.detach().clone()
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.1, losses
    embedding = model.get_input_embeddings().modules_to_save["default"].weight
    assert (embedding - original).abs().max() > 1e-3
    # Tied: the output head is the trained embedding (ensure_weight_tying), not the frozen original.
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_ids(2).to(_device(model)), output_hidden_states=True)
    torch.testing.assert_close(out.logits, out.hidden_states[-1] @ embedding.T, rtol=1e-5, atol=1e-5)


def _saved(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
        return {name: tuple(f.get_slice(name).get_shape()) for name in names}


@needs_4bit
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_adapter_is_lora_plus_format_and_merges_into_the_full_precision_base(tied_dir, untied_dir, tmp_path,
                                                                                 single_torch_thread, tied):
    folder = tied_dir if tied else untied_dir
    model = _build(folder)
    _train(model, steps=3)
    model.save_pretrained(tmp_path / "qlora")
    _build(folder, method="lora_plus").save_pretrained(tmp_path / "lora_plus")
    assert _saved(tmp_path / "qlora") == _saved(tmp_path / "lora_plus")
    settings = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("qlora", "lora_plus")]
    assert settings[0] == settings[1]

    ids = _ids(3)
    model.eval()
    with torch.no_grad():
        four_bit = model(input_ids=ids.to(_device(model))).logits.cpu()
    base = LlamaForCausalLM.from_pretrained(folder)
    base_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapter = PeftModel.from_pretrained(base, tmp_path / "qlora").eval()
    with torch.no_grad():
        unmerged = adapter(input_ids=ids).logits
    lora_q = adapter.base_model.model.model.layers[0].self_attn.q_proj
    delta = (lora_q.lora_B["default"].weight @ lora_q.lora_A["default"].weight) * lora_q.scaling["default"]
    merged = adapter.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM) and merged.dtype == torch.float32
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    # Base + ΔW exactly, not dequantised NF4 + ΔW: the merged model differs from the 4-bit one it was trained on.
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, base_q + delta)
    assert (unmerged - four_bit).abs().max() > 1e-3


# --- the stages: extend with qlora, then merge -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny base model and packed blocks (as tests/test_extend.py builds them)."""
    from longlora.embedded.corpus import stdlib_documents

    root = tmp_path_factory.mktemp("qlora_inputs")
    with contextlib.chdir(root):
        with open("corpus.jsonl", "w", encoding="utf-8") as f:
            for doc in stdlib_documents("extend", max_documents=16):
                f.write(json.dumps({"text": doc.text}) + "\n")
        params = parse_params(tiny_params_dict(prepare_pretrain={"input": "corpus.jsonl"}))
        build_base_model.run(params)
        prepare_pretrain.run(params)
    return root


@pytest.fixture
def project(inputs, tmp_path, monkeypatch, single_torch_thread):
    for name in ("data/base_model", "data/pretrain"):
        shutil.copytree(inputs / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_bitsandbytes_stops_extend_before_anything_is_written(project, monkeypatch):
    _installed(monkeypatch, None)
    with pytest.raises(InputError, match=r"^extend\.method qlora: bitsandbytes is not installed"):
        extend.run(parse_params(tiny_params_dict(extend={"method": "qlora"})))
    assert not (project / "data/extend").exists() and not (project / "data/checkpoints").exists()


def test_zero3_is_refused_through_the_stage_before_anything_is_written(project):
    """The TrainingArguments built from a ZeRO-3 `extend.deepspeed` are what makes transformers (and the check) see
    ZeRO-3."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    zero3 = str(ROOT / "configs/ds_zero3.json")
    try:
        with pytest.raises(InputError, match=r"^extend\.method qlora cannot be combined with a ZeRO-3 config in "
                                             r"extend\.deepspeed"):
            extend.run(parse_params(tiny_params_dict(extend={"method": "qlora", "deepspeed": zero3})))
    finally:
        unset_hf_deepspeed_config()  # transformers' process-wide ZeRO-3 flag, left by the stage's TrainingArguments
    assert not (project / "data/extend").exists() and not (project / "data/checkpoints").exists()


@needs_4bit
def test_extend_with_qlora_writes_an_adapter_folder_that_merge_folds_into_the_full_precision_base(project):
    # Gradient checkpointing on (non-reentrant, the Trainer's): gradients reach LoRA through frozen 4-bit layers.
    params = parse_params(tiny_params_dict(extend={"method": "qlora", "max_steps": 4, "log_every": 1,
                                                   "gradient_checkpointing": True}))
    metrics = extend.run(params)
    assert metrics["method"] == "qlora" and metrics["steps"] == 4
    assert all(torch.isfinite(torch.tensor(metrics["losses"])))
    counts = metrics["trainable_parameters"]
    assert counts["lora"] > 0 and counts["embeddings"] == 400 * 32 and counts["norms"] == 5 * 32
    out = project / "data/extend"
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", EXTENSION_FILE} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / EXTENSION_FILE).read_text())["method"] == "qlora"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    expected = load_extended(out)  # the full-precision base with the adapter, unmerged
    assert not any("4bit" in type(m).__name__ for m in expected.modules())
    ids = torch.randint(4, 400, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = expected(input_ids=ids).logits
    merge_metrics = merge.run(params, "extend")
    assert merge_metrics["merged_adapter"] and merge_metrics["dtype"] == "float32"
    merged_folder = project / "data/extended_model"
    assert "quantization_config" not in json.loads((merged_folder / "config.json").read_text())
    merged = LlamaForCausalLM.from_pretrained(merged_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected_logits, atol=1e-4, rtol=0)


@needs_4bit
def test_a_qlora_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(project, monkeypatch):
    """The Trainer's checkpoint of a PEFT model over a 4-bit base (the adapter, the optimizer) loads back into it."""
    params = parse_params(tiny_params_dict(extend={"method": "qlora", "max_steps": 4, "checkpoint_every": 2}))
    extend.run(params)
    uninterrupted = load_file(project / "data/extend/adapter_model.safetensors")

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(_training, "raise_if_diverged", killed)
        with pytest.raises(KeyboardInterrupt):
            extend.run(params)
    checkpoints = sorted((project / "data/checkpoints/extend").glob("*/checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(checkpoints[1])  # killed between its checkpoints 2 and 4
    extend.run(params)
    assert json.loads((run_log("extend") / TIMINGS_FILE).read_text())["resumed_from_step"] == 2
    resumed = load_file(project / "data/extend/adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, atol=1e-5, rtol=0, msg=name)


# --- GPU: the bf16 compute path ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_4bit
def test_on_a_gpu_the_4bit_base_computes_in_bf16_and_trains(tied_dir):
    import bitsandbytes as bnb

    precision = resolve_precision("auto")
    model = _build(tied_dir, precision=precision)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    if precision == "bf16":
        assert layer.compute_dtype == torch.bfloat16
        assert {w.dtype for w in model.parameters() if not w.requires_grad} == {torch.uint8, torch.bfloat16}
    assert all(w.dtype == torch.float32 for w in model.parameters() if w.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _ids(1).to(_device(model))
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
