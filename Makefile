# akosha-sync: every target creates and uses the project's own virtual environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
AKOSHA_VENV ?= .venv-akosha

.PHONY: demo test lint check bench faults akosha-venv claude-code dev-up dev-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: sync sample Session-Buddy databases to a local folder (no server needed)
demo: $(STAMP)
	$(BIN)/akosha-sync demo

## test: lint, type-check, then the tests against real SeaweedFS and a real Akosha
test: $(STAMP) akosha-venv claude-code lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

## akosha-venv: Akosha 0.11 in its own Python 3.13 venv (cached)
akosha-venv:
	AKOSHA_VENV=$(AKOSHA_VENV) scripts/build-akosha-venv.sh

## claude-code: the real Claude Code CLI (npm) the plugin tests drive (cached in .cache/)
claude-code:
	scripts/build-claude-code.sh

## bench: cold sync / re-sync / rclone on ~50 MB and ~250 MB databases
bench: $(STAMP)
	$(BIN)/python bench/bench_cloud.py

## faults: the fault suite against real SeaweedFS, Akosha and daemon; table into bench/README.md
faults: $(STAMP) akosha-venv
	AKOSHA_VENV=$(AKOSHA_VENV) $(BIN)/python bench/faults.py --write-readme

## dev-up / dev-down: MinIO + the daemon in docker compose (needs a Docker engine)
dev-up:
	docker compose up -d --build
dev-down:  # down needs no token, but compose reads the whole file
	AKOSHA_SYNC_DAEMON_TOKEN=$${AKOSHA_SYNC_DAEMON_TOKEN:-unused} docker compose down

clean:
	rm -rf $(VENV) $(AKOSHA_VENV) .cache .mypy_cache .ruff_cache
