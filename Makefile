# Every target creates/uses a local virtual environment, so a fresh clone needs nothing else.
# torch is installed first from its pinned CPU build; anything else would pull CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install quickstart test test-slow test-gpu lint bench clean

$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements/ci.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default data: shards -> train -> sample -> evaluate (CPU, minutes).
quickstart: $(STAMP)
	$(BIN)/xtalgen quickstart

## The default test suite (CPU): lint, import contracts, then pytest without slow/gpu tests.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -x --timeout=900

## Long tests (benchmark-sized builds, multi-rank training) and GPU tests.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout=3600

test-gpu: $(STAMP)
	XTALGEN_TRITON_COMPILED=1 $(BIN)/python -m pytest -q -m gpu

# Import contracts are checked on a real (non-editable) install: the top-level folders only become
# `xtalgen.*` subpackages there, which is also what `pip install .` gives users.
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf build/lint && $(BIN)/pip install --quiet --no-deps --no-build-isolation . --target build/lint
	cd build/lint && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info
