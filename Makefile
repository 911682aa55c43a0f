# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine: they create the
# virtual environment and install everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixmap-installed

.PHONY: install demo test lint bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: a plain `torch` requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mixmap demo --out demo_output

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) benchmarks/lsq.py

clean:
	rm -rf demo_output .pytest_cache site
