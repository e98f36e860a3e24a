# `make run`: set up .venv (once) and run the whole pipeline; `make test`: set up and run every test.
SHELL := /bin/bash
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test install data lessons clean

# torch first, pinned, so pip takes this machine's local build instead of resolving a newer one
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/python -m pip install -q -e ".[train,serve,dev]"
	touch $@

install: $(VENV)/.installed
	nbdev-export

# the lake snapshot that data.dvc pins; an unchanged lake leaves data.dvc as it is
data: install
	petpark data

run: data
	dvc repro
	dvc metrics show

test: install
	nbdev-test
	python -m pytest -q

# the notebooks' lesson outputs, kept in git so that they read as documentation (big outputs trimmed)
lessons: install
	nbdev-test --n-workers 2 --save
	python -c "from petpark.testing import trim_outputs; print('trimmed:', trim_outputs())"
	nbdev-clean

clean:
	rm -rf $(VENV) .cache
