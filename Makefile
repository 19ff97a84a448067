# `make run` runs the four notebooks end to end; `make test` runs the test suite.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch, so that tests never pull a multi-GB CUDA wheel. Elsewhere than this
# project's machines use e.g.: make test TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_INSTALL ?= torch==2.13.0
PRESET ?= auto
ARGS ?=
# Keep freed memory mapped instead of returning it to the OS after every step: on a 2-core CPU
# this made the paper-preset GPT-2 step about 20% faster (see README, Benchmarks).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken_cache)

.PHONY: run test install clean-venv benchmark sweep

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m llm_nb_utils.pipeline --preset $(PRESET) $(ARGS)

# Seeds (or the MoE grid) at one budget: make sweep PRESET=small ARGS="--seeds 3 --max-steps 300"
sweep: install
	$(PY) -m llm_nb_utils.sweep --preset $(PRESET) $(ARGS)

# Two workers, one file each at a time, one thread each (two torch runs with two threads each on two
# cores would slow both): the suite took 12 min instead of 16 on this project's 2-core machines.
test: install
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(PY) -m pytest -q -n 2 --dist loadfile tests

benchmark: install
	$(PY) benchmarks/train_throughput.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
