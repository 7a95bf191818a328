# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Each creates the virtual environment it needs in .venv on first use.

# The first interpreter that actually runs (a pyenv shim may exist without working): 3.12 first.
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): setup.cfg requirements-dev.txt requirements-gpu-compile.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/cuda-plugin \
		-r requirements-gpu-compile.txt
	touch $(STAMP)

venv: $(STAMP)

# The main job: pretrain → GRPO → held-out evaluation of the small model (reruns resume).
# DEMO_ARGS overrides run-config fields, e.g. DEMO_ARGS="--pretrain.train.steps=4 --grpo.train.steps=2".
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m experiments.demo --workdir=$(DEMO_DIR) $(DEMO_ARGS)

# The linter first (ruff, configured in pyproject.toml), then the tests.
# Tests run on 8 fake CPU devices (tests/conftest.py sets the XLA flag) in two workers.
# Whole files per worker, heaviest first (tests/conftest.py orders them; xdist's own reordering
# by test count is off), and the 25 slowest tests listed at the end. TEST_ARGS adds options, e.g.
# TEST_ARGS="--dist load" to hand out single tests instead.
TEST_ARGS ?=
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 $(TEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
