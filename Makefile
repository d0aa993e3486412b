# Two commands on a fresh clone: `make serve` and `make test`. Each bootstraps .venv from
# pyproject.toml first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := .bazaar/demo-repository
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test check bench clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

$(DEMO): | $(INSTALLED)
	$(BIN)/bazaar models build-demo $(DEMO)

serve: $(INSTALLED) $(DEMO)
	$(BIN)/bazaar model-server --model-repository $(DEMO) --host $(HOST) --port $(PORT)

test: $(INSTALLED)
	$(BIN)/python -m pytest

check: $(INSTALLED)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy gateway models autoscaler

clean:
	rm -rf $(VENV) .bazaar .pytest_cache .mypy_cache .ruff_cache
