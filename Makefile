# Two commands on a fresh machine: `make serve` and `make test`. Both build .venv from the pinned lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 5001
SAMAPI_PORT ?= 8000
MODEL_DIR ?= $(CURDIR)/model
PYTEST_ARGS ?=

.PHONY: venv serve serve-qupath test lint pacs-tools samples bench-quality bench-speed clean

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

test: $(STAMP) lint pacs-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The PACS tests (tests/test_pacs.py) run a real Orthanc with its DICOMweb plugin and check every SEG with
# dciodvfy: installed here when running as root (CI does); without them those tests fail, they never skip.
# The tests start their own Orthanc process on a free port; the Debian service is not used.
ORTHANC_PARTS := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/dciodvfy
pacs-tools:
	@for f in $(ORTHANC_PARTS); do test -e $$f || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends orthanc orthanc-dicomweb dicom3tools; \
	  else \
	    echo "Orthanc, its DICOMweb plugin or dciodvfy is missing: tests/test_pacs.py will fail;" \
	         "install them as root: apt-get install orthanc orthanc-dicomweb dicom3tools" >&2; \
	  fi; \
	fi

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
