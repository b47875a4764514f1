# Two entry points: `make test` (ruff + pytest) and `make demo` (the main job); `make docs` builds
# the documentation site into site/ (strict: a broken link or API reference fails it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint demo bench docs clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

demo: venv
	$(BIN)/python examples/train_demo.py

bench: venv
	$(BIN)/python benchmarks/throughput.py

docs: venv
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
