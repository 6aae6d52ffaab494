# The single entry point: `make help` lists the targets. Every target creates or updates the
# virtual environment in .venv/ and installs the system packages it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
HOST ?= 0.0.0.0
WEIGHTS_DIR ?= weights
DATA ?= data/corpus
UNSEEN ?= data/unseen-all
RUN ?= runs/resnet18
PER_VOICE ?= 200
SEED ?= 0
EPOCHS ?= 6
SYSTEM_PACKAGES := flite festival festvox-kdlpc16k espeak-ng sox ffmpeg nginx
SYSTEM_COMMANDS := flite festival espeak-ng sox ffmpeg nginx

.PHONY: help venv system-deps test lint serve corpus corpus-unseen train evaluate bench soak image clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create or update .venv/ from pyproject.toml

system-deps: ## apt-get the speech synthesisers, sox, ffmpeg and nginx when missing
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	dpkg -s festvox-kdlpc16k >/dev/null 2>&1 || missing="$$missing festvox-kdlpc16k"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

test: $(STAMP) system-deps ## run the whole test suite
	$(PY) -m pytest

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check model app bench tests
	$(VENV)/bin/ruff format --check model app bench
	$(VENV)/bin/mypy model app bench

serve: $(STAMP) ## start the service on the shipped weights (PORT=8000)
	WEIGHTS_DIR=$(WEIGHTS_DIR) HOST=$(HOST) PORT=$(PORT) $(PY) -m app

corpus: $(STAMP) system-deps ## synthesise the 9-voice corpus into $(DATA)
	$(PY) -m model.training.corpus $(DATA) --per-voice $(PER_VOICE) --seed $(SEED)

corpus-unseen: $(STAMP) system-deps ## fresh sentences in recording conditions the corpus never uses
	$(PY) -m model.training.corpus $(UNSEEN) --per-voice 20 --seed $(SEED) --conditions unseen-all

train: $(STAMP) ## train ResNet18 on $(DATA), write $(RUN)/weights
	$(PY) -m model.training.train --data $(DATA) --arch resnet18 --out $(RUN) --epochs $(EPOCHS) --seed $(SEED)

evaluate: $(STAMP) ## evaluate $(WEIGHTS_DIR) on the test split of $(DATA)
	$(PY) -m model.training.evaluate $(WEIGHTS_DIR) $(DATA) --split test

bench: $(STAMP) system-deps ## service vs model-only, naive baseline and hardware ceilings, in one run
	$(PY) -m bench.run

soak: $(STAMP) system-deps ## RSS after 5,000 requests of mixed lengths vs after warm-up
	$(PY) -m bench.soak

image: ## build the Dockerfile with buildah, start it, check user, health and /embed (root)
	deploy/build-image.sh

clean: ## remove caches (keeps .venv and data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
