# Every target creates/uses a local virtual environment, so a fresh clone needs nothing else.
# torch is installed first from its pinned CPU build; anything else would pull CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install quickstart test test-slow test-gpu lint bench clean slurm-deps

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
## slurm-deps first: tests/test_slurm.py submits the slurm/ recipes to a local one-node Slurm.
test: $(STAMP) lint slurm-deps
	$(BIN)/python -m pytest -q -x --timeout=900

## Long tests (benchmark-sized builds, multi-rank training) and GPU tests.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout=3600

test-gpu: $(STAMP)
	XTALGEN_TRITON_COMPILED=1 $(BIN)/python -m pytest -q -m gpu

## Debian's slurm-wlm and munge for the local Slurm of tests/test_slurm.py (slurm/local/start.sh).
## Installed only when missing, and only as root with apt-get; otherwise it says why and goes on
## (the Slurm tests then skip, or fail under CI=true).
SLURM_TOOLS = slurmctld slurmd munged sbatch
slurm-deps:
	@missing=; for t in $(SLURM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then \
		echo "slurm-deps: slurm-wlm and munge are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; \
	else \
		echo "slurm-deps: missing$$missing, and not root with apt-get; the Slurm tests will not run" >&2; \
	fi

# Import contracts are checked on a real (non-editable) install: the top-level folders only become
# `xtalgen.*` subpackages there, which is also what `pip install .` gives users.
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf build/lint && $(BIN)/pip install --quiet --no-deps --no-build-isolation . --target build/lint
	cd build/lint && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info
