# The two commands of the README: `make run` (the `demo` preset: a pruned speech model that learns
# in a few minutes) and `make test`. Both set up .venv on first use.
PY := .venv/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.venv/.installed: pyproject.toml requirements.lock
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.lock
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: setup run test lint
setup: .venv/.installed

# One intra-op thread per torch call: the clients already train side by side, and on a 2-core machine that
# others share, two threads each made the demo's evaluations 17x slower (measured). Its numbers are then
# bit for bit those of `fedprune_core.simulate`.
run: setup
	OMP_NUM_THREADS=1 .venv/bin/fedprune run --preset demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	$(PY) -m pytest -n 2  # two workers: most end-to-end tests wait on servers and child processes

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
