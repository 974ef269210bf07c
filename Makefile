# The two commands of the README: `make demo` and `make test`.  Each sets up
# what it needs (a venv with the project and its tools, Debian packages when
# a target needs them) and is safe to run again.

SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# Debian's Python when present: a venv made from it can be run by other
# system users (PostgreSQL's archive_command runs as `postgres`).
PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3)
STAMP := $(VENV)/.installed
SOURCES := $(shell find shardvault shards verify restore flows -name '*.py' 2>/dev/null)

.PHONY: setup run demo test lint bench bench-lifecycle bench-pg clean

# Every source file is a prerequisite: strict editable mode links files, so a
# new module needs the (two-second) reinstall.
$(STAMP): pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	# strict editable mode links the folders of DESIGN.md's layout into one
	# `shardvault` tree, so mypy and tools that read files see the real names.
	# Compiled bytecode, as pip leaves it: without it every command compiles what it imports
	# (~70 ms of each start, and PostgreSQL starts one per WAL file); PYTHONDONTWRITEBYTECODE
	# environments would never cache it.
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]' --config-settings editable_mode=strict --compile-bytecode
	$(BIN)/python -m compileall -q build/__editable__.*
	touch $@

setup: $(STAMP)

# The main job: Prefect server, serve, exporter, Prometheus (and Alertmanager) on loopback; Ctrl-C stops all.
run: $(STAMP)
	scripts/apt-install prometheus prometheus-alertmanager:/usr/bin/amtool postgresql:/usr/lib/postgresql/15/bin/initdb
	scripts/run.sh

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# mypy runs inside the link tree, where the layout is one package.
	cd build/__editable__.shardvault-* && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p shardvault

test: $(STAMP) lint
	# Prometheus (promtool, a real server), Alertmanager (amtool), PostgreSQL 15 and docker-compose (config -q) for the tests.
	scripts/apt-install prometheus postgresql:/usr/lib/postgresql/15/bin/initdb prometheus-alertmanager:/usr/bin/amtool docker-compose
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	scripts/apt-install restic
	$(BIN)/python bench/run.py

# Issue 9: opening a repository of 10,000 index files before and after prune's compaction; prune against restic's.
bench-lifecycle: $(STAMP)
	scripts/apt-install restic
	$(BIN)/python bench/lifecycle.py

bench-pg: $(STAMP)
	$(BIN)/python bench/pg.py

clean:
	rm -rf $(VENV) build demo run *.egg-info
