# Two commands for a fresh machine:  make demo   |   make test
# Both create .venv (Python 3.10+) and install dgate into it first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/dgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/dgate

install: $(BIN)/dgate

demo: install  ## offline end-to-end run on built-in data (about 1-2 minutes on 2 CPU cores)
	$(BIN)/dgate demo

test: install  ## the test suite (uses ../shared/data when present, skips those tests otherwise)
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m pip install --quiet ruff && $(BIN)/ruff check dgate_cli tests benchmarks examples

clean:
	rm -rf $(VENV) dgate-demo .pytest_cache
