# kfast developer entry points. `make test` works on a fresh machine: it
# creates .venv, installs kfast with its test extras (compiling the Cython
# extensions), fetches Apache Kafka's jars through Maven, then runs lint,
# type checks and the whole suite against a real broker and PostgreSQL that
# the tests start themselves.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kfast-installed

.PHONY: test lint typecheck unit demo bench fetch-kafka fetch-registry clean build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py $(shell find kfast -name '*.pyx' -o -name '*.pxd')
	$(PY) -m pip install -q -e '.[test,bench,arrow]'
	touch $(STAMP)

build: $(STAMP)

fetch-kafka: $(STAMP)
	$(PY) -m kfast.testing.kafka fetch

fetch-registry: $(STAMP)
	$(PY) -m kfast.testing.registry fetch

lint: $(STAMP)
	$(VENV)/bin/ruff check kfast tests benchmarks
	$(VENV)/bin/ruff format --check kfast tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: build fetch-kafka fetch-registry lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: build
	$(PY) -m pytest -q -m "not integration" tests

demo: build fetch-kafka
	$(PY) -m kfast.demo

bench: build fetch-kafka
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/latest.json

clean:
	rm -rf build $(VENV) kfast/**/*.c kfast/*.c kfast/**/*.so kfast/*.so
