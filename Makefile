# llmshearing: `make demo` runs the embedded default end to end; `make test` runs the test suite.
PY ?= .venv/bin/python
PIP_FLAGS ?= -q
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo fetch shards tiny test test-fast test-devices clean

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/pip install $(PIP_FLAGS) --upgrade pip

# constraints.txt pins every package to the set proved on CPU (README, Environment)
.venv/.installed: .venv/bin/python pyproject.toml constraints.txt
	.venv/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,gguf,eval]'
	touch $@

install: .venv/.installed

fetch: install
	$(PY) -m llmshearing.data_prep.fetch_offline --out data

shards: fetch
	$(PY) -m llmshearing.data_prep.shards

demo: fetch
	$(PY) -m llmshearing.cli demo --data data --out runs/demo

tiny: install
	$(PY) -m llmshearing.cli make-tiny data/tiny

# The paper's comparisons in miniature (docs/reproduce_mini.md): sheared vs from scratch vs one-shot
# (activation importance; magnitude too with REPRODUCE_ARGS="--arms all") vs fixed mixture, and the pruning share of a fixed budget; SCALE multiplies every arm's steps.
# On a GPU e.g. (after python -m llmshearing.data_prep.shards --out data/shards-x10 --prune-tokens 500000
# --continue-tokens 2000000, whose eval/test documents differ from data/shards'; not run on a GPU):
# make reproduce-mini SCALE=10 REPRODUCE_ARGS="--batch 8 --shards data/shards-x10 --arms sheared_act oneshot_act_kd --precision amp_bf16 --out runs/rm-x10"
SCALE ?= 1
REPRODUCE_ARGS ?=
.PHONY: reproduce-mini
reproduce-mini: shards
	$(PY) -m llmshearing.experiments.reproduce --scale $(SCALE) --out runs/reproduce-mini $(REPRODUCE_ARGS)

# The full suite (what CI runs). test-fast: math, config, model parity, mixture (no training runs, no subprocesses).
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# The second-device tier (docs/devices.md): the paper recipes' GPU code paths at real shapes on torch's meta device
# (no GPU, no weights); part of `make test` too.
test-devices: install
	$(PY) -m pytest -q -p no:cacheprovider tests/test_devices.py

clean:
	rm -rf runs data/tiny
