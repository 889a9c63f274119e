# Everything installs itself: `make test` and `make run` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test run lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# make run: `tickwire run` with the packaged default config;
# make run CONFIG=path/to/tickwire.toml: with that config file instead
run: $(STAMP)
	$(BIN)/tickwire run $(if $(CONFIG),--config $(CONFIG))

# ruff on everything; mypy --strict on daemon/ (pyproject.toml [tool.mypy])
lint: $(STAMP)
	$(BIN)/ruff check daemon tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
