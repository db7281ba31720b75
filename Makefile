# Two commands do all set-up: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv and installs the package with its dependencies when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench zoo zoo-full clean

$(STAMP): pyproject.toml constraints.txt
	@echo "Setting up $(VENV): torch, Lightning, ONNX Runtime, W&B and the package; 2-3 minutes the first time, then never again"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'  # the torch these machines have on disk
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_compress pipeline --out demo-output

test: $(STAMP)
	$(PY) -m ruff check lightning_compress tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m mkdocs build --strict --quiet --site-dir site  # the documentation: a warning fails it
	$(PY) -m pytest -q -n 2 --dist loadgroup  # one worker per CI core; tests sharing a trained fixture share a worker

lint: $(STAMP)
	$(PY) -m ruff check lightning_compress tests benchmarks examples
	$(PY) -m mypy

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/pruning_vs_modelpruning.py

zoo: $(STAMP)
	$(PY) benchmarks/zoo.py

zoo-full: $(STAMP)
	$(PY) -m pytest -q -m zoo_full tests/test_zoo_full.py

clean:
	rm -rf $(VENV) build site demo-output *.egg-info .pytest_cache .ruff_cache .mypy_cache lightning_logs
