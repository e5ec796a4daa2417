# `make repro` — set up .venv/, run the whole pipeline (dvc repro) on the embedded tiny default, print the summary.
# `make test`  — set up .venv/, lint, and run the test suite.
# `make base-model` — rebuild the shipped embedded base model (data/base_model/) and record how it was built.
# `make bench` — the speed benchmarks (run on an idle machine); `make flow` — the pipeline as a Prefect flow;
# `make server` — the Prefect UI on 127.0.0.1:4200; `make serve` — the flow as a deployment runnable from the UI.
# `make gpu-check` — the GPU path on one CUDA GPU (benchmarks/gpu_check.py).
# `make docs` — regenerate docs/params.md from stages/sections.py (tests/test_docs.py checks it is current).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Stages run `python -m stages.…`: put the project's interpreter first on PATH so DVC picks it, not whatever
# `python` the caller happens to have.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# Every stage is a fresh Python process. With PYTHONDONTWRITEBYTECODE set (some images set it globally) each one
# compiles the ~5 000 modules it imports from source again: 7 s more per stage, five minutes over `make repro`'s 37
# stages. The environment in .venv/ is this project's own, so its bytecode is written once, on first import.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup repro test lint bench flow server serve clean-venv base-model docs gpu-check

setup: $(VENV)/.installed

# torch first and pinned: this machine serves 2.13.0 as a CPU build; an unpinned torch would pull a CUDA build.
# The qlora extra (bitsandbytes, 4-bit on the CPU too) so that QLoRA's tests run for real here.
# No bytecode compiled ahead (--no-compile): compiling all 22 000 files of the environment took 70 s on 2 cores, most
# of them never imported (scipy, scikit-learn and nltk come with lm-eval); Python writes each module's bytecode the
# first time a stage imports it (see PYTHONDONTWRITEBYTECODE above).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev,qlora]"
	touch $@

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q

# Ends with the report's summary: perplexity at each length, passkey accuracy and LongBench average per model.
repro: setup
	$(BIN)/dvc repro
	@$(BIN)/python -m stages.report summary

# The shipped base model is a frozen DVC stage (dvc.yaml): `dvc repro` never rebuilds it. This does, on this machine
# (about 20 min on 2 CPU cores), then records the command, params, commit,
# build time and file digests in data/base_model.provenance.json and updates dvc.lock. Commit all three.
base-model: setup
	$(BIN)/python -m stages.build_base_model
	$(BIN)/python -m stages.build_base_model provenance
	$(BIN)/dvc commit --force build_base_model

# One CUDA GPU, at most 8 minutes: environment, the gpu-marked tests, S² kernels against dense attention, a 1.1B
# training step; writes benchmarks/results/gpu/<card>.md. Without CUDA: one line, exit 0.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

docs: setup
	$(BIN)/python -m stages.params_doc > docs/params.md

flow: setup
	$(BIN)/python -m pipelines.longlora_flow

# Local only: the server has no authentication, so it listens on the loopback interface.
server: setup
	$(BIN)/prefect server start --host 127.0.0.1

serve: setup
	$(BIN)/python -m pipelines.longlora_flow --serve longlora

bench: setup
	$(BIN)/python benchmarks/s2attn_speed.py
	$(BIN)/python benchmarks/pack_speed.py
	$(BIN)/python benchmarks/train_step.py

clean-venv:
	rm -rf $(VENV)
