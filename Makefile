# mmcl — every install step lives here, so a fresh machine with only Python 3.10+ and pip works.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision come first: DeepSpeed builds from source and imports torch while building.
# The upper bounds are the newest builds this machine kind keeps on local disk (no multi-GB download).
TORCH_SPEC ?= "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
STAMP := $(VENV)/.mmcl-installed
PYTEST_ARGS ?=
# `make test` runs on this many pytest-xdist workers: on 2 cores, two workers fill the time one
# spends in a launcher's start-up and shutdown; a file's tests (and its module fixtures) stay on one worker.
PYTEST_WORKERS ?= 2

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export DS_ACCELERATOR ?= cpu
# DeepSpeed compiles a CPU op on first launch; one build cache per environment, so two
# checkouts never rebuild over each other.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup test test-fast docs docs-reference demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install --no-build-isolation "deepspeed>=0.15,<0.20"
	$(PIP) install -e ".[dev]"
	$(PY) -c "import mmcl, open_clip, deepspeed, webdataset, datasets, sentencepiece"
# DeepSpeed's CPU comm op (~2 min on 2 cores) is built here, once, not by the first launch of `make test`.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# Everything, as CI runs it (.ci/run): unit tests, end-to-end deepspeed launches, the strict docs build.
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The unit tests: no deepspeed/torchrun launches (`e2e`), no multi-rank or many-second tests (`slow`).
test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

# The documentation site into site/; --strict: a broken link, anchor or include, or a page left out
# of the nav, fails. NO_MKDOCS_2_WARNING: Material's end-of-life banner, printed on every build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Regenerate the generated reference pages (config keys, objectives, every command's --help)
# after changing a setting, an objective or a command's flags.
docs-reference: setup
	$(PY) -m mmcl.docs --write

# The main job on the built-in data: the digits shards (built once, offline), then the real
# DeepSpeed launcher with 2 CPU ranks and ZeRO-2; prints the zero-shot top-1 on held-out digits.
# Then the Hub user's view: the export (a transformers CLIPModel) scored with plain transformers.
DEMO_DATA ?= data/demo
DEMO_OUT ?= runs/demo
# Each demo is a fresh run: an earlier demo run at DEMO_OUT (its config.yaml records that output_dir)
# is removed; anything else there (a link, another folder) is refused, never deleted.
demo: setup
	$(VENV)/bin/mmcl-demo-data --out $(DEMO_DATA)
	@test -n "$(DEMO_OUT)" || { echo "make demo: DEMO_OUT is empty; set it to a folder for the run, like runs/demo"; exit 2; }
	@if [ -e "$(DEMO_OUT)" ] || [ -L "$(DEMO_OUT)" ]; then \
		if [ -L "$(DEMO_OUT)" ] || ! grep -qxF 'output_dir: $(DEMO_OUT)' "$(DEMO_OUT)/config.yaml" 2>/dev/null; then \
			echo "make demo: $(DEMO_OUT) is not an earlier demo run (no config.yaml with output_dir: $(DEMO_OUT)); set DEMO_OUT to a new folder"; \
			exit 2; \
		fi; \
		rm -rf -- "$(DEMO_OUT)"; \
	fi
	$(VENV)/bin/deepspeed --num_gpus 2 train.py --config configs/demo.yaml \
		--deepspeed_config configs/ds/zero2.json output_dir=$(DEMO_OUT)
	$(VENV)/bin/mmcl export --run $(DEMO_OUT) --out $(DEMO_OUT)/export --overwrite
	$(PY) eval/transformers_zeroshot.py --model $(DEMO_OUT)/export --data $(DEMO_DATA)/classification

# The virtualenv goes only when it is one (pyvenv.cfg, not a link): VENV=~ removes nothing.
clean:
	@if [ -e "$(VENV)" ] && { [ -L "$(VENV)" ] || [ ! -f "$(VENV)/pyvenv.cfg" ]; }; then \
		echo "make clean: $(VENV) is not a virtualenv (no pyvenv.cfg); nothing removed"; exit 2; fi
	rm -rf -- $(if $(strip $(VENV)),"$(VENV)") build *.egg-info site
