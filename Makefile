# herd: `make demo` (install + tiny QLoRA run on CPU) and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.herd-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install demo demo-dpo test test-all lint system-packages mutants rehearsal

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The exact tested stack (constraints.txt); pyproject.toml itself only states compatible ranges.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,eval]'
	touch $(STAMP)

install: $(STAMP)

# Builds the tiny model, fine-tunes it with QLoRA on the bundled sample data, evaluates before and after,
# writes the adapter, and prints where everything is.
demo: $(STAMP)
	$(PY) -m train experiment=tiny-demo
	$(PY) -m infer.generate run_dir=runs/tiny-demo generate.max_new_tokens=48

# SFT then DPO on the tiny model (README, "Preference tuning"): the SFT demo (skipped when it has finished), then
# DPO on the bundled preference pairs from its adapter; prints the eval reward margin before -> after.
demo-dpo: $(STAMP)
	$(PY) -m train experiment=tiny-demo
	$(PY) -m train experiment=tiny-dpo-demo

# Debian packages of the SLURM layer (slurmctld, slurmd, munge, shellcheck), installed here rather than by the
# tests; without root it says what is missing and the SLURM tests skip, except under CI=true where both fail.
system-packages:
	scripts/install-system-packages

test: $(STAMP) lint system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile

# Deliberate bugs, each applied to a scratch copy and run against the tests that must catch it (tests/mutants.py);
# passes when every one is caught. A few minutes; not part of `make test`.
mutants: $(STAMP)
	$(PY) -m tests.mutants

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "slow or not slow"

# Every stage of the GPU round (benchmarks/gpu_round.py) on CPU, zero3_offload included (~7 min on 2 cores).
rehearsal: $(STAMP)
	$(PY) -m pytest -q -m rehearsal tests/test_gpu_round.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src train infer tests benchmarks
