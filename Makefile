# Two commands for a fresh machine: `make demo` (install + run the embedded model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'

demo: install
	$(BIN)/moeserve generate "The for statement" --max-tokens 48 --seed 0

test: install
	$(BIN)/ruff check moeserve tests benchmarks scripts
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -n 2 tests

fuzz: install
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.fuzz.gguf_fuzz --cases 10000 --seed 1 --json fuzz-result.json

# 64 streaming clients against a loopback server for SOAK_SECONDS (default 600), random disconnects, a KV pool
# small enough to preempt, batch-invariant kernels (greedy outputs must equal their solo runs); then /health latency
# under hostile requests. Hard timeout: SOAK_SECONDS + 10 minutes. Summary: soak-result.json (docs/reliability.md).
SOAK_SECONDS ?= 600
soak: install
	OMP_NUM_THREADS=2 timeout --kill-after=30 $$(( $(SOAK_SECONDS) + 600 )) $(BIN)/python scripts/soak.py \
		--seconds $(SOAK_SECONDS) --clients 64 --hostile --samples --json soak-result.json

.PHONY: install demo test fuzz soak
