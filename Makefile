# tokenprune-bench. `make demo` and `make test` are all a new user needs: both set up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
# torch + torchvision are installed as a matching pair first: PyPI's torchvision breaks
# `import lmms_eval` beside a CPU-only torch build (see docs/footguns.md).
ifeq ($(shell uname -m),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: help install slurm-deps demo test test-gpu leaderboard list clean-venv

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import lmms_eval, transformers, hydra, torch; print('environment ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP) ## create .venv and install the project (idempotent)

# The default job runs the full SynthVQA test split (1000 questions). The sweep over every method x
# 0.5/0.75/0.9 uses the first 100 questions (types are interleaved, so 20 per type) to finish in
# minutes on a laptop; its retention is against method=none on the same 100 questions.
DEMO_LIMIT ?= 100
demo: install ## run the default job, then every method at ratios 0.5/0.75/0.9 (SynthVQA subset), print the leaderboard
	$(PY) -m bench run
	@# exit code 2 = some combinations refused with a reason (e.g. ToMe cannot reach 10% in the tiny
	@# tower's 5 blocks), nothing written for them; failed runs (exit 1) still stop the demo
	$(PY) -m bench run -m +sweep=demo benchmark.limit=$(DEMO_LIMIT) benchmark.batch_size=16 logger=none; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 2 ] || exit $$rc
	$(PY) -m bench aggregate

# The test suite starts a real single-node Slurm cluster (scripts/slurm_localhost.sh): Debian's
# slurmctld, slurmd and munge. Installed here when missing (needs root, as on CI and dev machines).
slurm-deps: ## install Debian's slurm-wlm and munge if missing (for the Slurm tests)
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then echo "slurm present: $$(slurmctld -V)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null && echo "installed $$(slurmctld -V)"; \
	else echo "warning: cannot install slurm-wlm/munge (not root or no apt-get); the Slurm test will fail with the reason"; fi

test: install slurm-deps ## run every test that needs no GPU (GPU tests skip themselves), the real-Slurm sweep included
	$(PY) -m pytest

test-gpu: install ## run the GPU-marked tests (needs CUDA)
	$(PY) -m pytest -m gpu

leaderboard: install ## rebuild results/leaderboard.csv from the run records
	$(PY) -m bench aggregate

list: install ## list models, methods and benchmarks
	$(PY) -m bench list

clean-venv: ## remove .venv
	rm -rf $(VENV)
