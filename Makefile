# ovseg-bench: `make setup` once, then `make bench` (main job) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS ?= san_b,san_l,simseg,scan_l,scan_b,catseg_b,catseg_l
DATASETS ?= ade847,pc459,ade150,pc59,voc20,voc20b,voc20b_proxies

.PHONY: setup test test-fast bench bench-cpu bench-cpu-official bench-vocab bench-gpu bench-overhead bench-repeat leaderboard weights clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test,cluster]"

test:
	$(PY) -m pytest -q --durations=25

test-fast:
	$(PY) -m pytest -q -m "not slow"

# The default run: a pipeline smoke cell (SAN-B, seeded random weights, generated data: marked "pipeline check",
# never a result), then every model x the six datasets (PAS-20b under both protocols) at each model's own protocol; the sweep ends by rebuilding
# results/leaderboard.md. Cells without weights or data are recorded as missing with the expected path.
bench:
	$(PY) -m bench model=san_b dataset=synthetic synthesize_weights=true $(ARGS)
	$(PY) -m bench -m model=$(MODELS) dataset=$(DATASETS) $(ARGS)

# The CPU speed benchmark: ordinary cells (conf/sweep/cpu_speed.yaml: every model x fp32 / bf16 / autocast bf16 at
# 640x640, evaluation off, interleaved peak probes, bf16 agreement, gap tables), then SAN-B under torch.compile.
# Records in results/runs/; the leaderboard's "Speed against the compute floor" section is built from them.
bench-cpu:
	$(PY) -m bench -m +sweep=cpu_speed $(ARGS)
	$(PY) -m bench -m +sweep=cpu_speed model=san_b precision=fp32,bf16 compile=default $(ARGS)

# SAN-B beside the official SAN (MendelXu/SAN e19262d under detectron2 02b5c4e, bench/official), interleaved in
# one run: fp32 and bf16 (official: CPU autocast) on an idle machine, then fp32 with two CPU-bound background
# processes started and stopped by the cell (profile.background_load=2). Needs the reference environment
# (README "Official code beside ours"): REF=<its folder>, or OVSEG_REFERENCE_ENV; without it the rows say why.
bench-cpu-official:
	$(PY) -m bench -m +sweep=cpu_speed model=san_b precision=fp32,bf16 profile.official=true \
		$(if $(REF),profile.official_env=$(REF)) $(ARGS)
	$(PY) -m bench -m +sweep=cpu_speed model=san_b precision=fp32 profile.official=true profile.background_load=2 \
		$(if $(REF),profile.official_env=$(REF)) $(ARGS)

# Cost against vocabulary size: every model at K = 20, 59, 150, 459, 847 (conf/sweep/vocab_cost.yaml), evaluation
# off; the leaderboard's "Cost against vocabulary size" table and plot.
bench-vocab:
	$(PY) -m bench -m +sweep=vocab_cost $(ARGS)

# The GPU speed grid (issue: speed): every model x 448/640/896 x fp32/bf16 x eager/CUDA graphs, batch-1 latency
# (20 warm-up, 100 timed) and batch-8 throughput; its own leaderboard file.
bench-gpu:
	$(PY) -m bench -m model=$(MODELS) dataset=ade150 resolution=448,640,896 precision=fp32,bf16 \
		compile=eager,reduce-overhead device=cuda profile.throughput_batch=8 $(ARGS)
	$(PY) -m bench.leaderboard device=cuda out=leaderboard-gpu.md

# Harness overhead: full evaluation of a 512-image synthetic split of square OVERHEAD_SIZE images (DataLoader
# workers, batch 8) vs model-only throughput at the same input size, batch and precision (eval_img_s vs
# throughput_img_s in runs.csv; the leaderboard's "Harness overhead" table).
OVERHEAD_SIZE ?= 640
OVERHEAD_WORKERS ?= 8
OVERHEAD_SPLIT := dataset.synth.n_images=512 'dataset.synth.size=[$(OVERHEAD_SIZE),$(OVERHEAD_SIZE)]' \
	dataset.layout.image_dir=ovseg_synthetic512_$(OVERHEAD_SIZE)/images/validation \
	dataset.layout.label_dir=ovseg_synthetic512_$(OVERHEAD_SIZE)/annotations_detectron2/validation
bench-overhead:
	$(PY) -m bench model=san_b dataset=synthetic synthesize_weights=true batch_size=8 num_workers=$(OVERHEAD_WORKERS) \
		resolution=$(OVERHEAD_SIZE) profile.throughput_batch=8 $(OVERHEAD_SPLIT) $(ARGS)

# Repeatability: the same SAN-B cell measured 5 times in a row, each run its own record and process
# (repeat=0..4); the leaderboard's "Repeatability" table gives the CV of the per-run medians.
bench-repeat:
	$(PY) -m bench -m model=san_b dataset=synthetic synthesize_weights=true max_images=1 repeat=0,1,2,3,4 $(ARGS)

weights:
	$(PY) -m bench.fetch $(if $(MODEL),model=$(MODEL),all=true) $(ARGS)

leaderboard:
	$(PY) -m bench.leaderboard $(ARGS)

clean:
	rm -rf outputs multirun results/cache
