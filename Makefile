# revlit — the two sacred commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# N: test images. Unset, `make demo` takes revlit.demo's own default (python -m revlit.demo --help);
# attacks/evaluate take EVAL_N.
EVAL_N ?= 512

# CIFAR-10: $REVLIT_DATA_DIR if set; else ../shared/datasets when it is there; else data/.
REVLIT_DATA_DIR ?= $(shell [ -d ../shared/datasets/cifar-10-batches-py ] && echo $(abspath ../shared/datasets) || echo data)
export REVLIT_DATA_DIR
# glibc returns every tensor >= 32 MB to the OS and faults it back in on the next allocation;
# these settings keep big blocks mapped (the fallback where mimalloc, below, is missing).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824
# The long jobs (demo, attacks, evaluate, bench, adaptive, studies, training) run under mimalloc
# (pip package cmeel-mimalloc, installed with revlit on x86-64 Linux) with purging off and large
# OS pages: no page faults on reuse like the glibc settings above, and no heap fragmentation
# (docs/speed.md). ALLOCATOR=glibc runs them without it; where the library is missing they fall
# back to glibc silently.
ALLOCATOR ?= mimalloc
MIMALLOC_LIB = $(firstword $(wildcard $(abspath $(VENV))/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so))
RUN = $(if $(and $(filter mimalloc,$(ALLOCATOR)),$(MIMALLOC_LIB)),LD_PRELOAD=$(MIMALLOC_LIB) MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1 )$(PY)

.PHONY: install test demo attacks evaluate bench adaptive studies classifiers ssl rst lint format clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## make test: install (if needed) and run the test suite (tiny synthetic data, a few minutes).
test: install
	$(PY) -m pytest

## make demo: install (if needed) and run the main job on the shipped default: PGD L1/L2/Linf sets
## for the first N test images, evaluation without/with the defense, table + JSON + PNG + TensorBoard.
demo: install
	$(RUN) -m revlit.demo $(if $(N),--n $(N))

## make attacks: stored PGD sets (L1, L2, Linf) for the first N test images under data/pgd/.
ATTACK_ITERS ?= 10
attacks: install
	for c in pgd_l1 pgd_l2 pgd_linf; do \
	  $(RUN) cli.py predict --config configs/attack/$$c.yaml --model.init_args.steps $(ATTACK_ITERS) \
	    --data.init_args.test_subset $(or $(N),$(EVAL_N)) || exit 1; done

## make evaluate: the defense table (clean/L1/L2/Linf x none/reverse/noise) on the first N images.
evaluate: install
	$(RUN) -m revlit.evaluate --n $(or $(N),$(EVAL_N)) --out results/evaluate

## make bench: purifier and PGD throughput against the hardware bound (benchmarks/, docs/speed.md).
## BENCH_ARGS="--bf16" adds the bfloat16 rows; `$(PY) -m benchmarks --help` lists the options.
BENCH_ARGS ?=
bench: install
	$(RUN) -m benchmarks --ddp --out results/bench/bench.json $(BENCH_ARGS)

## make ssl: train the SSL heads on the shipped ResNet-20 classifiers (~9 min each here).
ssl: install
	$(RUN) cli.py fit --config configs/ssl/resnet20_at.yaml
	$(RUN) cli.py fit --config configs/ssl/resnet20_std.yaml

## make rst RST=path/to/cifar10_rst_adv.pt.ckpt: convert Carmon et al.'s RST WRN-28-10 into checkpoints/wrn28_10_rst.pt.
rst: install
	$(PY) -m revlit.models.rst $(RST) checkpoints/wrn28_10_rst.pt

## make adaptive: attack the defended classifier through the deployed purifier (transfer, defense-aware and BPDA+EOT
## attacks, cheapest first, each on the images still unbroken; per-image worst case beside the static APGD reference);
## table, JSON records and plots under results/adaptive/<preset>/. Default: table (n=1000), then convergence (n=200:
## doubling check and eps sweep). ADAPTIVE=cheap (20x4 purifier), bank (bank purifier) or smoke (16 images);
## ADAPTIVE_N=<n> overrides n.
ADAPTIVE ?= table convergence
adaptive: install
	@for c in $(ADAPTIVE); do \
	  echo "== make adaptive: configs/adaptive/$$c.yaml"; \
	  $(RUN) cli.py predict --config configs/adaptive/$$c.yaml $(if $(ADAPTIVE_N),--data.init_args.test_subset $(ADAPTIVE_N)) || exit 1; \
	done

## make studies: the five studies at their configs/studies/ settings, one at a time (results/studies/<study>/,
## markdown + PNG copied to docs/studies/). About 2 h here in all; STUDIES="batch_size" runs one.
STUDIES ?= detection cost_frontier batch_size loss_functions head_batch
studies: install
	@for s in $(STUDIES); do \
	  echo "== make studies: $$s"; \
	  $(RUN) -m revlit.studies $$s --config configs/studies/$$s.yaml --out results/studies --docs docs/studies || exit 1; \
	done

## make classifiers: retrain the shipped classifiers (~40 + 15 min here).
classifiers: install
	bash runs/train_classifiers.sh

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
