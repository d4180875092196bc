# mmcl — every install step lives here, so a fresh machine with only Python 3.10+ and pip works.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision come first: DeepSpeed builds from source and imports torch while building.
TORCH_SPEC ?= torch>=2.4,<3 torchvision>=0.19
STAMP := $(VENV)/.mmcl-installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export DS_ACCELERATOR ?= cpu

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install --no-build-isolation "deepspeed>=0.15,<0.20"
	$(PIP) install -e ".[dev]"
	$(PY) -c "import mmcl, open_clip, deepspeed, webdataset, datasets, sentencepiece"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
