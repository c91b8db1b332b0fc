# Shortcuts for the scripts the README names (make is optional: the scripts need only bash).
.PHONY: setup run test lint bench

setup:
	@scripts/setup.sh

run:
	scripts/run

test:
	scripts/test

lint:
	scripts/lint

bench: setup
	.venv/bin/python -m bench.updates
	.venv/bin/python -m bench.archiver
	.venv/bin/python -m bench.dashboard
	.venv/bin/python -m bench.compare --ops 5000
