# Two entry points on a fresh machine (both idempotent):
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run the test suite (what .ci/run calls)
PY := .venv/bin/python

.PHONY: setup demo test test-all reproduce clean

setup:
	bash scripts/setup.sh

demo: setup
	OMP_NUM_THREADS=1 $(PY) -m recipes.reproduce demo --root runs/demo

test: setup
	$(PY) -m pytest -q   # -rs (pyproject addopts): every skip prints its reason

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs lightning_logs
