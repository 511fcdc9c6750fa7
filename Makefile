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
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

fuzz: install
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.fuzz.gguf_fuzz --cases 10000 --seed 1 --json fuzz-result.json

.PHONY: install demo test fuzz
