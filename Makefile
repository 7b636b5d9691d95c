# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORKDIR ?= workdirs/xlmr_tiny
CONFIG ?= configs/xlm_roberta/pretrain_mlm.py:tiny
ARGS   ?=
PYTEST_WORKERS ?= 2
# `make train` is the CPU quickstart. The test extra installs libtpu (for `xformers-jax compile`),
# which jax would otherwise probe for TPU chips at start-up; `make train JAX_PLATFORMS=` lifts it.
JAX_PLATFORMS ?= cpu

.PHONY: train test test-slow lint format bench clean

# The venv is (re)built when pyproject.toml changes. torch is pinned to the local CPU build.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,prepare]'
	# apache-beam declares protobuf < 7; sentencepiece's model proto needs protobuf 7, on which
	# beam runs (the prepare tests): put it back after the extras (pip notes the declared conflict).
	$(BIN)/pip install -q 'protobuf>=7,<8'
	# OpenAI's DALL-E dVAE for the parity test of data/dalle.py, without its unpinned deps
	# (torchvision would replace the pinned torch); it needs only torch, attrs and requests.
	$(BIN)/pip install -q --no-deps dall-e==0.1
	touch $@

train: $(BIN)/.installed
	JAX_PLATFORMS=$(JAX_PLATFORMS) $(BIN)/xformers-jax train --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/pytest -n $(PYTEST_WORKERS) -q

test-slow: $(BIN)/.installed
	$(BIN)/pytest -n $(PYTEST_WORKERS) -q -m slow

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/xformers-jax bench --out bench_out

clean:
	rm -rf $(VENV) workdirs bench_out
