# Two entry points: `make demo` (set up, make data, train, sample, score) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO_CLASSES := 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo demo-t2i test test-fast lint format clean

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
	test -f demo_data/classifier.pt || $(PY) -m data_tools train-classifier demo_data/classifier.pt
	$(PY) -m pixelflow train configs/demo.yaml
	$(PY) -m pixelflow sample --checkpoint runs/demo --out runs/demo/samples/grid.png \
		--classes $(DEMO_CLASSES) --per-class 2
	$(PY) -m pixelflow eval --checkpoint runs/demo --out runs/demo/eval --images 256 --batch 64 \
		--classifier demo_data/classifier.pt

demo-t2i: setup
	rm -rf runs/demo_t2i
	test -f demo_data/manifest.json || $(PY) -m data_tools synth demo_data --count 2048 --per-shard 256
	test -f demo_t5/config.json || $(PY) -m data_tools tiny-text-encoder demo_data demo_t5
	$(PY) -m pixelflow train configs/demo_t2i.yaml
	$(PY) -m pixelflow sample --checkpoint runs/demo_t2i --out runs/demo_t2i/samples/grid.png --per-class 2 \
		--prompt "a red circle" --prompt "a blue square" --prompt "a green triangle" --prompt "a yellow diamond"

# everything (what CI runs), with the slowest tests' times in the output
test: setup lint
	$(PY) -m pytest --durations=25

# the inner loop: no subprocess ranks, SLURM or multi-second runs (`slow`), a few minutes on 2 cores
test-fast: setup
	$(PY) -m pytest -m "not slow" -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/pyright

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs demo_data demo_t5 .pytest_cache .ruff_cache
