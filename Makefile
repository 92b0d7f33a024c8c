# Two commands on a fresh machine: `make serve` and `make test`. Both build .venv from the pinned lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 5001
SAMAPI_PORT ?= 8000
MODEL_DIR ?= $(CURDIR)/model
PYTEST_ARGS ?=

.PHONY: venv serve serve-qupath test lint samples bench-quality bench-speed clean

venv: $(STAMP)

$(STAMP): environment/requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r environment/requirements.lock
	# sam2's build imports torch, so build it against the pinned torch; its CUDA extension is not needed.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps sam2==1.1.0
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/azmlinfsrv --entry_script score.py --model_dir $(MODEL_DIR) --port $(PORT)

serve-qupath: $(STAMP)
	$(VENV)/bin/medsam2-endpoint serve-samapi --port $(SAMAPI_PORT) --model-dir $(MODEL_DIR)

test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks score.py batch_score.py
	$(VENV)/bin/mypy src/medsam2_endpoint score.py batch_score.py
	# the benchmarks import each other and tests/reference_pipeline.py: checked on their own, with those on the path
	MYPYPATH=src:tests $(VENV)/bin/mypy benchmarks

samples: $(STAMP)
	$(VENV)/bin/medsam2-endpoint samples --out sample_requests

bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV)
