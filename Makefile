# The verbs people use. Each first runs scripts/setup.sh (idempotent, fast when done).
.PHONY: setup run test lint bench

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/kvstate up

test: setup
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: setup
	.venv/bin/python -m bench.updates
	.venv/bin/python -m bench.archiver
	.venv/bin/python -m bench.dashboard
	.venv/bin/python -m bench.compare --ops 5000
