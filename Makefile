# ovseg-bench: `make setup` once, then `make bench` (main job) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS ?= san_b,san_l,simseg,scan_l,scan_b
DATASETS ?= ade847,pc459,ade150,pc59,voc20,voc20b

.PHONY: setup test test-fast bench leaderboard weights clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test,cluster]"

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

bench:
	$(PY) -m bench -m model=$(MODELS) dataset=$(DATASETS) $(ARGS)

weights:
	$(PY) -m bench.fetch $(if $(MODEL),model=$(MODEL),all=true) $(ARGS)

leaderboard:
	$(PY) -m bench.leaderboard $(ARGS)

clean:
	rm -rf outputs multirun results/cache
