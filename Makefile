PY := .venv/bin/python

.PHONY: train test test-slow bench setup

setup: .venv/.installed

.venv/.installed: requirements.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

train: .venv/.installed  ## the out-of-the-box run; pass overrides with ARGS='key=value ...'
	$(PY) train.py $(ARGS)

test: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

bench: .venv/.installed
	$(PY) scripts/bench_topk.py
