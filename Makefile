# PER reproduction suite. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Empty: the scripts' own defaults (per.sweep.DEFAULT_SEEDS = 3, DEFAULT_SELECT_SEEDS = 1,
# per.schema.SELECTION_VAL_SIZE = 5000; reproduce.py's --slurm-multiruns 8).
SEEDS ?=                # seeds of the reported runs
SELECT_SEEDS ?=         # seeds per lambda on the images' 45k/5k selection split
VAL_SIZE ?=             # images held out for lambda selection
GPUS ?= 0
# auto: the count with the most runs/hour in `make step-times CONCURRENCY=1,2,4,8`'s table, else 1
RUNS_PER_GPU ?= auto
CONCURRENCY ?=
# local: one Hydra multirun at a time here; pool: GPUS x RUNS_PER_GPU runs at once, all cells
# together (logs in results/logs/); slurm: submitit multiruns
LAUNCHER ?= local
SLURM_MULTIRUNS ?=       # multiruns in flight under LAUNCHER=slurm
DRY_RUN ?=
STEP_TABLE ?=           # DRY_RUN's device-hours from results/step_times/$(STEP_TABLE).json, e.g. cuda-nvidia-h200
EXPERIMENT ?=
LAMS ?=
RUNS ?=                 # default: paths.runs_dir (configs/paths/default.yaml); logs/, tables/, figures/ go beside it
OVERRIDES ?=
SEED_ARGS = $(if $(SEEDS),--seeds $(SEEDS)) $(if $(SELECT_SEEDS),--select-seeds $(SELECT_SEEDS))
REPRO = $(PY) scripts/reproduce.py $(SEED_ARGS) $(if $(VAL_SIZE),--val-size $(VAL_SIZE)) --gpus $(GPUS) --runs-per-gpu $(RUNS_PER_GPU) \
        --launcher $(LAUNCHER) $(if $(SLURM_MULTIRUNS),--slurm-multiruns $(SLURM_MULTIRUNS)) $(if $(RUNS),--runs $(RUNS)) $(if $(DRY_RUN),--dry-run) $(if $(STEP_TABLE),--step-table $(STEP_TABLE)) \
        $(foreach o,$(OVERRIDES),--override $(o))

.PHONY: help setup test test-all bench demo reproduce-cifar reproduce-lm sweep ablation strength tables figures step-times gpu-check presets

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

setup: ## create .venv and install the package with its dev extras (torch pinned by constraints.txt)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -c constraints.txt -e ".[dev]"

test: ## quick suite (unit tests, fast end-to-end runs): a few minutes on 2 CPU cores
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: ## everything CI runs: quick suite + slow tiers (end-to-end, resume, real-data smoke tests)
	$(PY) -m pytest -q -m "not gpu" --durations=15

bench: ## speed ratios on this device (PER/L2/LM/RBN vs vanilla, compiled, per_grad, trainers, runs at once), JSON lines; ARGS=--tiny
	$(PY) scripts/bench.py $(ARGS)

demo: ## CPU, offline: generated CIFAR-layout data, short runs, table and figures in results/demo/
	$(PY) scripts/demo.py --out results/demo

reproduce-cifar: ## Tables 1-2: lambda on 45k/5k, then SEEDS seeds on 50k; tables and figures (DRY_RUN=1 to plan)
	$(REPRO) --task cifar

reproduce-lm: ## Table 3: every lambda x SEEDS seeds, lambda chosen on validation perplexity (DRY_RUN=1 to plan)
	$(REPRO) --task lm

sweep: ## one cell's lambda sweep: make sweep EXPERIMENT=t1_cifar10_resnet56_per [LAMS=1e-4,3e-5] [SEEDS=3]
	$(if $(EXPERIMENT),,$(error make sweep needs EXPERIMENT=<preset>, e.g. EXPERIMENT=t1_cifar10_resnet56_per; presets: ls configs/experiment))
	$(REPRO) --sweep $(EXPERIMENT) $(if $(LAMS),--lams=$(LAMS))

ablation: ## ResNet-56/CIFAR-10 PER: layout (channels, flatten) x reduction (sum, mean), 16/64/256/1024 slices
	$(REPRO) --ablation

strength: ## per-site gradient ratios of every family x lambda grid x layout x reduction -> results/strength/
	$(PY) scripts/strength.py

tables: ## aggregate results/runs into results/tables (Markdown, LaTeX, CSV); rows with fewer than SEEDS seeds are marked; RUNS=: beside it
	$(PY) scripts/aggregate.py $(SEED_ARGS) $(if $(RUNS),--runs $(RUNS) --out $(RUNS)/../tables)

figures: ## figures from results/runs into results/figures (PNG, PDF); folders from configs/paths (RUNS=: beside it)
	$(PY) scripts/figures.py $(if $(RUNS),--runs $(RUNS) --out $(RUNS)/../figures)

step-times: ## measure s/step and s/eval batch of every preset here -> results/step_times/<device>.json (what DRY_RUN=1 plans read); CONCURRENCY=1,2,4,8 adds runs/hour
	$(if $(DRY_RUN),$(error make step-times measures (it rewrites results/step_times/<device>.json); DRY_RUN=1 belongs to reproduce-*, sweep and ablation))
	$(PY) scripts/step_times.py $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) $(ARGS)

gpu-check: ## on a GPU box: CUDA tests, full bench, step times and runs/hour -> results/gpu_check/ (scripts/gpu_check.sh)
	PY=$(PY) bash scripts/gpu_check.sh results/gpu_check

presets: ## regenerate configs/experiment/ from scripts/make_presets.py
	$(PY) scripts/make_presets.py
