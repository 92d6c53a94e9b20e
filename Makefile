# align: one target per stage, plus setup, tests and the main job.
# Every target that runs code sets up the virtual environment first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= recipes/smollm2/quickstart.yaml
ARGS   ?=
TORCH  ?= torch==2.13.0
# Several processes (accelerate): make sft NPROC=8 ENGINE=fsdp (ddp | fsdp | zero2 | zero3; zero* need
# `pip install -e ".[deepspeed]"`). NPROC counts processes on all machines together.
NPROC  ?= 1
ENGINE ?=
SCALE  := $(if $(filter-out 1,$(NPROC)),--nproc $(NPROC)) $(if $(ENGINE),--engine $(ENGINE))

.PHONY: setup test quickstart plan sft rm ppo dpo models recipes eval report chat playground check-export clean

$(BIN)/align: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/align

setup: $(BIN)/align  ## create .venv and install align with its dependencies

# Each test process runs torch on one thread (tests/conftest.py), so the suite runs one process per core, up
# to 4 (pytest-xdist); a file's tests stay in one process, so its module fixtures run once.
TEST_PROCS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")

test: setup  ## run the test suite (tiny models, CPU; one test uses the real default model)
	$(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile tests

quickstart: setup  ## the main job: the quickstart recipe on the default model (SmolLM2-135M-Instruct)
	$(BIN)/align run recipes/smollm2/quickstart.yaml $(SCALE) $(ARGS)
	$(BIN)/align models list

plan: setup  ## dry run: validate RECIPE, resolve refs and data, load no weights
	$(BIN)/align plan $(RECIPE) $(ARGS)

sft: setup  ## run the SFT stage of RECIPE
	$(BIN)/align run $(RECIPE) --stage sft $(SCALE) $(ARGS)

rm: setup  ## run the reward-model stage of RECIPE
	$(BIN)/align run $(RECIPE) --stage reward $(SCALE) $(ARGS)

ppo: setup  ## run the PPO stage of RECIPE
	$(BIN)/align run $(RECIPE) --stage ppo $(SCALE) $(ARGS)

dpo: setup  ## run the DPO stage of RECIPE
	$(BIN)/align run $(RECIPE) --stage dpo $(SCALE) $(ARGS)

models: setup  ## list registry entries
	$(BIN)/align models list

recipes: setup  ## list the shipped recipes with what each is for
	$(BIN)/align recipes

eval: setup  ## evaluate REF (eval settings of the recipe in its manifest; ARGS="--against REF2 --limit 20")
	@test -n "$(REF)" || (echo "usage: make eval REF=quickstart/sft [ARGS=...]" && exit 2)
	$(BIN)/align eval $(REF) $(ARGS)

report: setup  ## cross-stage report of RECIPE: base, SFT, PPO, DPO side by side (<registry>/reports/<recipe>/)
	$(BIN)/align report $(RECIPE) $(ARGS)

chat: setup  ## chat with REF in the terminal (default: the packaged model; ARGS="--compare quickstart/dpo")
	$(BIN)/align chat $(or $(REF),smollm2-135m-instruct) $(ARGS)

check-export: setup  ## REF's GGUF exports (f16, q8_0) run in llama.cpp against the fp32 model; builds llama-cpp-python once
	@test -n "$(REF)" || (echo "usage: make check-export REF=quickstart/sft [ARGS=--dtypes f16,q8_0]" && exit 2)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || (echo "building llama-cpp-python (several minutes)" && \
		$(BIN)/pip install -q -e ".[llama-cpp]")
	$(BIN)/align check-export $(REF) $(ARGS)

playground: setup  ## web page on 127.0.0.1:7860: REFS="quickstart/sft quickstart/dpo" side by side [JUDGE=quickstart/reward]
	$(BIN)/align playground $(or $(REFS),smollm2-135m-instruct) $(if $(JUDGE),--judge $(JUDGE)) $(ARGS)

.PHONY: merge export
FORMAT ?= hf

merge: setup  ## merge REF's LoRA adapter into full weights, checked, as a new entry (ARGS="--dtype bf16")
	@test -n "$(REF)" || (echo "usage: make merge REF=quickstart/sft [ARGS=...]" && exit 2)
	$(BIN)/align merge $(REF) $(ARGS)

export: setup  ## export REF as FORMAT=hf|gguf into exports/, verified (ARGS="--dtype q8_0 --out DIR")
	@test -n "$(REF)" || (echo "usage: make export REF=quickstart/sft FORMAT=hf|gguf [ARGS=...]" && exit 2)
	$(BIN)/align export $(REF) --format $(FORMAT) $(ARGS)

.PHONY: bench
STEPS ?=

bench: setup  ## align vs plain TRL + PEFT on the same work, every stage (STEPS=N per stage; ARGS="--tiny" or "--stage sft")
	$(BIN)/python -m benchmarks.bench $(if $(STEPS),--steps $(STEPS)) $(ARGS)

.PHONY: gpu-check

gpu-check: setup  ## every stage on a GPU, with TRL + PEFT on the same work, into gpu_check/ (ARGS="--dry-run" on a CPU)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:  ## remove run folders (checkpoints); the registry is kept
	rm -rf runs
