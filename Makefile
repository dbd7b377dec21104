PY := .venv/bin/python

.PHONY: test test-slow bench setup

setup: .venv/.installed

.venv/.installed: requirements.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

test: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

bench: .venv/.installed
	$(PY) scripts/bench_topk.py
