# herd: `make demo` (install + tiny QLoRA run on CPU) and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.herd-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install demo test test-all lint rehearsal

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev,eval]'
	touch $(STAMP)

install: $(STAMP)

# Builds the tiny model, fine-tunes it with QLoRA on the bundled sample data, evaluates before and after,
# writes the adapter, and prints where everything is.
demo: $(STAMP)
	$(PY) -m train experiment=tiny-demo
	$(PY) -m infer.generate run_dir=runs/tiny-demo generate.max_new_tokens=48

test: $(STAMP) lint
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# Every stage of the GPU round (benchmarks/gpu_round.py) on CPU, zero3_offload included (~7 min on 2 cores).
rehearsal: $(STAMP)
	$(PY) -m pytest -q -m rehearsal tests/test_gpu_round.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src train infer tests benchmarks
