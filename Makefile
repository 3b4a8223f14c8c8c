# Two commands on a fresh machine (Python ≥ 3.10, no GPU needed):
#   make quickstart   install, then synth data -> train -> eval -> export -> predict -> bench
#   make test         install, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install quickstart test clean

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
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) quickstart .pytest_cache
