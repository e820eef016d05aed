# Every target sets up the environment it needs (idempotent: an existing environment is reused).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
VENV_LATEST ?= .venv-latest
VENV_DOCS ?= .venv-docs
LIB := self_supervised_swav
# notebooks and pytest run in JOBS processes of one torch thread each (tests/conftest.py sets it for pytest-xdist
# workers): on 2 cores, two processes of two threads wait on each other and take 2-3x as long
JOBS ?= 2
# a fingerprint of a folder's files, to check that a tool changed nothing
fingerprint = find $(1) -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha1sum

.PHONY: help env env-latest export readme test test-latest demo clean docs docs-check gpu-check

help:
	@echo "make demo         pretrain on the embedded default data (scikit-learn digits)"
	@echo "make test         dev environment: export check, clean check, notebooks, pytest"
	@echo "make test-latest  pytest against the newest fastai/fastcore (no nbdev)"
	@echo "make docs         build the documentation site from the notebooks into docs/site/"
	@echo "make docs-check   build it, then open every page in headless Chromium and check it"

$(VENV)/.installed: requirements-dev.txt settings.ini setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV_LATEST)/.installed: requirements-latest.txt settings.ini setup.py
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q --disable-pip-version-check --upgrade -r requirements-latest.txt
	$(VENV_LATEST)/bin/pip install -q --disable-pip-version-check -e .
	touch $@

env: $(VENV)/.installed
env-latest: $(VENV_LATEST)/.installed

export: env
	$(VENV)/bin/nbdev_export

readme:
	$(PYTHON) .ci/nb2md.py

test: env
	@echo "== nbdev_export must not change $(LIB)/"
	@$(call fingerprint,$(LIB)) > $(VENV)/.fp_lib
	$(VENV)/bin/nbdev_export
	@$(call fingerprint,$(LIB)) | diff -u $(VENV)/.fp_lib - || { echo "nbdev_export changed $(LIB)/: run 'make export' and commit"; exit 1; }
	@echo "== nbdev_clean must not change nbs/"
	@$(call fingerprint,nbs) > $(VENV)/.fp_nbs
	$(VENV)/bin/nbdev_clean
	@$(call fingerprint,nbs) | diff -u $(VENV)/.fp_nbs - || { echo "notebooks were not clean: run nbdev_clean and commit"; exit 1; }
	@echo "== ruff: no unused or undefined names in the library, tests, benchmarks and docs build"
	$(VENV)/bin/ruff check .
	@echo "== layers: no import cycle, no library module imports a command, no module above 450 code lines"
	$(PYTHON) .ci/check_layers.py
	@echo "== README.md must match nbs/index.ipynb"
	$(PYTHON) .ci/nb2md.py --check
	@echo "== notebooks"
	OMP_NUM_THREADS=1 $(VENV)/bin/nbdev_test --n_workers $(JOBS)
	@echo "== pytest"
	$(VENV)/bin/python -m pytest tests -q -n $(JOBS)

test-latest: env-latest
	$(VENV_LATEST)/bin/python -c "import fastai, fastcore; print('fastai', fastai.__version__, 'fastcore', fastcore.__version__)"
	$(VENV_LATEST)/bin/python -m pytest tests -q -n $(JOBS)

# one torch thread unless OMP_NUM_THREADS says otherwise: on 2 shared cores, two threads wait on each other
demo: env
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/swav_pretrain

clean:
	rm -rf $(VENV) $(VENV_LATEST) build dist *.egg-info

# documentation site: the notebooks run in $(VENV); mkdocs-material lives in $(VENV_DOCS)
$(VENV_DOCS)/.installed: requirements-docs.txt
	test -x $(VENV_DOCS)/bin/python || $(PYTHON) -m venv $(VENV_DOCS)
	$(VENV_DOCS)/bin/pip install -q --disable-pip-version-check -r requirements-docs.txt
	$(VENV_DOCS)/bin/pip install -q --disable-pip-version-check --no-deps jupyter-server-mathjax==0.2.6
	touch $@

docs: env $(VENV_DOCS)/.installed
	$(VENV)/bin/python docs/build.py --mathjax "$$($(VENV_DOCS)/bin/python -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("jupyter_server_mathjax").origin), "static"))')"
	NO_MKDOCS_2_WARNING=1 $(VENV_DOCS)/bin/mkdocs build -f docs/_build/mkdocs.yml
	@echo "docs: open docs/site/index.html"

docs-check: docs
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(PYTHON) docs/check_site.py

# on a CUDA GPU machine with no package registry (the device tool): the wheels carried in bench/wheels/, then every
# part of bench/gpu_check.py, each within its cap, 8 minutes in all; gpu_check.json/.md/.log under $OUT (else
# gpu_check_out/). A CPU check: make gpu-check GPU_PYTHON=.venv/bin/python GPU_CHECK_ARGS=--dry-run
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)
