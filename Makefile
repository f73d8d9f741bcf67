# fastlm developer commands. `make test` and `make demo` each create (or reuse) the virtual
# environment in .venv first, so both work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "not gpu"

.PHONY: venv test lint cuda-check demo bench-cpu clean

# torch first, from the local CPU wheel (any other torch request downloads a multi-GB CUDA
# build); deepspeed without build isolation because its setup imports torch.
$(BIN)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .

cuda-check: venv
	bash .ci/check_cuda.sh
	PYTHON=$(BIN)/python bash .ci/check_bindings.sh

test: venv lint cuda-check
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The README's main command: prepare pydoc text, train, evaluate, sample, export (CPU).
demo: venv
	$(BIN)/fastlm train configs/demo.yaml --resume auto

bench-cpu: venv
	$(BIN)/fastlm bench attention --device cpu --out benchmarks/results
	$(BIN)/fastlm bench adamw --device cpu --out benchmarks/results

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
