# dynsim: `make demo` sets up .venv and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dynsim-installed

.PHONY: setup demo test test-all lint bench clean

# torch first and pinned: 2.13.0 is a CPU build on these machines; an unpinned torch would pull CUDA.
# The ray extra is installed too, so that `make test` runs the Ray backend's tests (tests/test_sweeps_ray.py).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dynsim run dssm --data digits --epochs 20 --eval-every 2 --out runs/demo.json --overwrite

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check dynsim tests benchmarks

clean:
	rm -rf runs .pytest_cache build *.egg-info
