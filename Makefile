# Two commands for a newcomer: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 9234
HOST ?= 127.0.0.1
MODEL_DIR ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: serve test install install-dev lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the project metadata changed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[embedded]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[embedded,dev,ray]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/cosyserve serve --host $(HOST) --port $(PORT) $(if $(MODEL_DIR),--model_dir $(MODEL_DIR),)

test: install-dev
	bash scripts/ensure-test-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check cosyserve tests scripts
	$(BIN)/ruff format --check cosyserve tests scripts

format: install-dev
	$(BIN)/ruff format cosyserve tests scripts
	$(BIN)/ruff check --fix cosyserve tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
