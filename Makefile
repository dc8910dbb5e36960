# Two entry points: `make demo` (set up, make data, train, sample) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO_CLASSES := 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test lint format clean

setup: $(STAMP)

# torch is pinned first through constraints.txt: an unpinned resolve pulls a multi-GB CUDA build.
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	rm -rf runs/demo
	test -f demo_data/manifest.json || $(PY) -m data_tools synth demo_data --count 2048 --per-shard 256
	$(PY) -m pixelflow train configs/demo.yaml
	$(PY) -m pixelflow sample --checkpoint runs/demo --out runs/demo/samples/grid.png \
		--classes $(DEMO_CLASSES) --per-class 2

test: setup lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs demo_data .pytest_cache .ruff_cache
