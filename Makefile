# revlit — the two sacred commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
N ?= 512

# CIFAR-10: $REVLIT_DATA_DIR if set; else ../shared/datasets when it is there; else data/.
REVLIT_DATA_DIR ?= $(shell [ -d ../shared/datasets/cifar-10-batches-py ] && echo $(abspath ../shared/datasets) || echo data)
export REVLIT_DATA_DIR
# glibc returns every tensor >= 32 MB to the OS and faults it back in on the next allocation;
# keeping big blocks mapped is ~1.5x faster for the purifier loop (../shared/DESIGN.md §4).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824

.PHONY: install test demo lint format clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## make test: install (if needed) and run the test suite (tiny synthetic data, a few minutes).
test: install
	$(PY) -m pytest

## make demo: install (if needed) and run the main job on the shipped default.
demo: install
	$(PY) cli.py test --config configs/classifier/test_shipped.yaml

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
