# Two commands on a fresh machine (Python ≥ 3.10, no GPU needed):
#   make quickstart   install, then synth data -> train -> eval -> export -> predict -> bench
#   make test         install, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# the suite spends most of its time on one core (Python, I/O): two workers use both
TEST_WORKERS ?= 2

.PHONY: install quickstart test readme clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# a second run refuses to replace the first one's results: make quickstart ARGS=--overwrite
quickstart: $(STAMP)
	$(BIN)/segdeploy quickstart quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# README's verbs walked in order on a fresh directory with tiny settings (about 2 min; skipped by `make test`)
readme: $(STAMP)
	SEGDEPLOY_SLOW=1 $(BIN)/python -m pytest -q tests/test_readme.py

clean:
	rm -rf $(VENV) quickstart .pytest_cache
