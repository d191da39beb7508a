# One setup path for README's two commands and CI. `make setup` is idempotent:
# a second run only checks the stamp and takes seconds.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdaug-setup
# Prebuilt torch-scatter/torch-sparse wheels (cp311, torch 2.4.1) when the
# shared folder has them; otherwise pip builds them from source against the
# installed torch (about 20 minutes on 2 cores).
WHEELS := ../shared/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS),)
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

DEMO_OUT ?= out/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.4.1
	$(PIP) $(FIND_LINKS) --no-build-isolation torch-scatter==2.1.2 torch-sparse==0.6.18
	$(PIP) --no-build-isolation -e '.[test]'
	touch $@

# Main job on the embedded default: pretrained CHGNet teacher, embedded bulks.
demo: setup
	$(BIN)/kdaug generate --config generators/demo.yaml --out $(DEMO_OUT)
	$(BIN)/kdaug inspect $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/models.py

clean:
	rm -rf $(VENV) out
