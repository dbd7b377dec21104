PY := .venv/bin/python

.PHONY: train test test-slow lint format bench setup

setup: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

train: .venv/.installed  ## the out-of-the-box run; pass overrides with ARGS='key=value ...'
	$(PY) train.py $(ARGS)

lint: .venv/.installed  ## ruff: formatting and lint rules (pyproject.toml)
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

format: .venv/.installed  ## apply ruff's formatting and safe fixes
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

bench: .venv/.installed
	$(PY) scripts/bench_topk.py
