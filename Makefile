# Two commands: `make demo` runs the growth demo, `make test` runs the test suite.
# Each creates .venv, installs torch 2.13.0 (the CPU wheel) first, then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-gpu install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	OMP_NUM_THREADS=1 $(BIN)/esper-fn grow --task mnist1d --host mlp-impaired --controller heuristic \
		--epochs 200 --seed 0 --out runs/demo --overwrite
	$(BIN)/esper-fn report runs/demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest --durations=25

test-fast: install  # the suite without the tests marked slow (subprocesses, worker processes, compiles)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" --durations=10

# The device tests on CUDA only (ESPER_FN_REQUIRE_CUDA=1: no CUDA is a failure, not a skip), on a GPU
# machine's own CUDA build of torch (not .venv's CPU wheel): install the project there first with
# `$(GPU_PY) -m pip install --no-deps -e .`, then `make test-gpu GPU_PY=/path/to/python`.
GPU_PY ?= python3
test-gpu:
	ESPER_FN_REQUIRE_CUDA=1 OMP_NUM_THREADS=1 $(GPU_PY) -m pytest -m device -p no:cacheprovider --durations=10

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) runs
