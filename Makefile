.PHONY: setup test lint format

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
