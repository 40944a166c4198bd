# tokenprune-bench. `make demo` and `make test` are all a new user needs: both set up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
# The environment is locked: one lock per machine type, every distribution pinned with its hashes,
# generated from pyproject.toml's ranges + requirements/constraints.txt by `make lock` (uv).
# The locks are for CPython 3.11 (the CI machine's python3); PYTHON=python3.11 picks another binary.
PYTHON ?= python3
LOCK_PY := 3.11
ARCH := $(shell uname -m)
LOCK := requirements/lock-$(ARCH).txt
UV_VERSION := 0.13.9
# uv lives in its own tools venv, so that .venv holds exactly the lock.
UV := .cache/tools/bin/uv
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
# x86_64's torch is a CUDA build (~7 GB in .venv with its nvidia-* wheels), so the set-up checks the
# free space first and says so, rather than letting pip die halfway with "No space left on device".
ifeq ($(ARCH),aarch64)
MIN_FREE_GB ?= 3
else
MIN_FREE_GB ?= 8
endif

.PHONY: help install lock slurm-deps browser-deps demo test check test-gpu leaderboard list clean-venv

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	@test -f $(LOCK) || { echo "error: no lock for this machine type ($(ARCH)): $(LOCK). Locks exist for x86_64 and aarch64." >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PY)" else "error: the lock is for Python $(LOCK_PY); $(PYTHON) is " + v + ". Run make PYTHON=python$(LOCK_PY) <target>, or install the package with its ranges: pip install -e .")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || { \
	  free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  [ "$$free" -ge $(MIN_FREE_GB) ] || { \
	    echo "error: installing the locked environment into $(VENV) needs about $(MIN_FREE_GB) GB free; $$free GB free there." >&2; \
	    echo "       Free some space, or put the environment elsewhere: make VENV=/path/with/space <target>" >&2; exit 1; }; }
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -c "import lmms_eval, transformers, hydra, torch; print('environment ok (locked): torch', torch.__version__, 'transformers', transformers.__version__)"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP) ## create .venv with exactly the lock, then the project itself (idempotent)

lock: ## regenerate requirements/lock-{x86_64,aarch64}.txt from pyproject.toml (needs PyPI)
	test -x $(UV) || { $(PYTHON) -m venv .cache/tools && .cache/tools/bin/pip install -q uv==$(UV_VERSION); }
	for arch in x86_64 aarch64; do \
	  $(UV) pip compile -q pyproject.toml requirements/build.in --extra test --generate-hashes \
	    --python-version $(LOCK_PY) --python-platform $$arch-manylinux_2_28 -c requirements/constraints.txt \
	    --custom-compile-command 'make lock' -o requirements/lock-$$arch.txt || exit 1; \
	done

# The default job runs the full SynthVQA test split (1000 questions). The sweep over every method x
# 0.5/0.75/0.9 uses the first 100 questions (types are interleaved, so 20 per type) to finish in
# minutes on a laptop; its retention is against method=none on the same 100 questions.
# Two worker processes with one torch thread each share the work (DEMO_WORKERS=1: one process, torch's
# default threads): the tiny model's matrices are too small for two threads to pay off, while two
# processes also overlap the Python work. Worker 1 runs the default job first, then both walk the same
# sweep; each run is executed once, by whichever worker claims it first (runs/<id>/.claim).
# Predictions do not depend on the thread count (checked: identical samples at 1 and 2 threads).
# RESULTS=<dir> writes somewhere other than results/ (e.g. to time the demo without touching it).
DEMO_LIMIT ?= 100
DEMO_WORKERS ?= 2
RESULTS ?= results
DEMO_SWEEP = -m +sweep=demo benchmark.limit=$(DEMO_LIMIT) benchmark.batch_size=16 logger=none results_dir=$(RESULTS)
# exit code 2 = some combinations refused with a reason (a method that cannot reach a ratio on a
# model's geometry: TransPrune's official schedule at 0.9 on the 6-layer embedded model), nothing written for them; failed runs (exit 1) still
# stop the demo
ok_or_refused = rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 2 ] || exit $$rc
# The default job runs with verify=true: where its record is already there (a fresh clone), the model
# answers the full split again and the demo prints whether every answer equals the committed one.
# Exit code 3 (answers differ, e.g. another CPU's float rounding) is reported, not fatal to the demo.
ok_or_unreproduced = rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc
demo: install ## run (or, if recorded, re-check) the default job, then every method at ratios 0.5/0.75/0.9 (SynthVQA subset), print the leaderboard
	@if [ "$(DEMO_WORKERS)" = 1 ]; then \
	  $(PY) -m bench run results_dir=$(RESULTS) verify=true; $(ok_or_unreproduced); \
	  $(PY) -m bench run $(DEMO_SWEEP); $(ok_or_refused); \
	else \
	  echo "[demo] 2 workers x 1 thread; worker 2 prints one line per run"; \
	  rcf=$$(mktemp); \
	  ( OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(PY) -m bench run $(DEMO_SWEEP) 2>&1; echo $$? > $$rcf ) \
	    | grep --line-buffered -E '^\[bench\] (run|skip)|^error|Traceback|Error' | sed -u 's/^/[worker 2] /' & \
	  w2=$$!; \
	  OMP_NUM_THREADS=1 $(PY) -m bench run results_dir=$(RESULTS) verify=true; rc0=$$?; rc1=0; \
	  if [ $$rc0 -eq 0 ] || [ $$rc0 -eq 3 ]; then OMP_NUM_THREADS=1 $(PY) -m bench run $(DEMO_SWEEP); rc1=$$?; fi; \
	  wait $$w2; rc2=$$(cat $$rcf); rm -f $$rcf; \
	  [ $$rc0 -eq 0 ] || [ $$rc0 -eq 3 ] || exit $$rc0; \
	  for rc in $$rc1 $$rc2; do [ $$rc -eq 0 ] || [ $$rc -eq 2 ] || exit $$rc; done; \
	fi
	$(PY) -m bench aggregate --results-dir $(RESULTS)

# The test suite starts a real single-node Slurm cluster (scripts/slurm_localhost.sh): Debian's
# slurmctld, slurmd and munge. Installed here when missing (needs root, as on CI and dev machines).
slurm-deps: ## install Debian's slurm-wlm and munge if missing (for the Slurm tests)
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then echo "slurm present: $$(slurmctld -V)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null && echo "installed $$(slurmctld -V)"; \
	else echo "warning: cannot install slurm-wlm/munge (not root or no apt-get); the Slurm test will fail with the reason"; fi

# The site's browser tests drive Debian's chromium through playwright (which never downloads a browser).
browser-deps: ## install Debian's chromium if missing (for the leaderboard site's browser tests)
	@if command -v chromium >/dev/null; then echo "chromium present: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && echo "installed $$(chromium --version 2>/dev/null)"; \
	else echo "warning: cannot install chromium (not root or no apt-get); the browser tests will fail with the reason"; fi

test: install slurm-deps browser-deps ## run every test that needs no GPU (GPU tests skip themselves), the real-Slurm sweep included
	$(PY) -m pytest

check: install ## fast tier for the edit-test loop: unit and config tests (no lmms-eval end-to-end runs, no Slurm, no per-case CLI processes): about 2 min on 2 AVX512 cores, 6 on AVX2
	$(PY) -m pytest -m "not slow and not gpu and not integration" -q

test-gpu: install ## run the GPU-marked tests (needs CUDA)
	$(PY) -m pytest -m gpu

leaderboard: install ## rebuild results/leaderboard.csv from the run records
	$(PY) -m bench aggregate

list: install ## list models, methods and benchmarks
	$(PY) -m bench list

clean-venv: ## remove .venv
	rm -rf $(VENV)
