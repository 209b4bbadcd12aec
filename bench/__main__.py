"""The Hydra entry point: `python -m bench model=san_b dataset=ade150 resolution=640` runs one cell;
`python -m bench -m model=san_b,san_l dataset=ade150,pc59` sweeps the grid (any Hydra launcher).

With `isolate=true` (the default) each cell runs in a fresh spawned process, pinned to one GPU (job number modulo
the visible GPUs) before CUDA initialises, so peak-memory figures never leak from one cell into the next and a
cell that dies (killed, out of memory) becomes an error record instead of taking the sweep down.
Each job leaves `cell_status.json` in its Hydra output folder; after a sweep `bench.callbacks.RebuildLeaderboard`
rebuilds the tables and exits non-zero if a cell of the sweep failed.
"""
from __future__ import annotations

import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench import BenchError
from bench import config as bench_config   # registers the typed schema (bench_schema) with Hydra


def _workers() -> int:
    """Parallel jobs for a local launcher: the visible GPUs, or the CPU cores on a CPU-only machine."""
    import torch

    return torch.cuda.device_count() or os.cpu_count() or 1


OmegaConf.register_new_resolver("bench_workers", _workers, replace=True)
OmegaConf.register_new_resolver("bench_pid", os.getpid, replace=True)

EXIT_OK, EXIT_ERROR, EXIT_BAD_VALUE, EXIT_MISSING = 0, 1, 2, 3   # a single cell's exit code says what it produced


def check_writable(results_dir: str) -> None:
    """Fail fast, in one line, before any cell runs, if the records cannot be written."""
    import tempfile

    from bench.records import runs_dir

    folder = runs_dir(results_dir)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-writable-"):
            pass
    except OSError as e:
        raise BenchError(f"cannot write results under {folder}: {e.strerror}; set results_dir=<a writable folder>") \
            from e


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:  # a BenchError escaping a Hydra task function would be printed as a traceback: one line instead
        cfg = bench_config.plain(cfg)   # typed values checked by Hydra; from here on plain strings and numbers
        bench_config.check_values(cfg)
        check_writable(cfg.results_dir)
        return _main(cfg)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    if cfg.isolate:
        from bench.cell import run_cell_isolated

        rec = run_cell_isolated(cfg, int(hc.job.num) if multirun else 0)
    else:
        from bench.cell import run_cell

        rec = run_cell(cfg)
    with open(os.path.join(hc.runtime.output_dir, "cell_status.json"), "w") as f:
        json.dump({"key": rec["key"], "status": "error" if rec.get("rerun_failed_now") else rec["status"],
                   "reason": rec.get("rerun_failed") or rec.get("reason", "")}, f)
    if not multirun:
        from bench.leaderboard import build_leaderboard

        build_leaderboard(cfg.results_dir)
        code = {"ok": EXIT_OK, "missing": EXIT_MISSING}.get(rec["status"], EXIT_ERROR)
        if rec.get("rerun_failed_now"):
            code = EXIT_ERROR   # the kept record is an older result, not this run's
        if code:
            sys.exit(code)
    return rec["status"]


if __name__ == "__main__":
    try:
        bench_config.check_overrides(sys.argv[1:])
        main()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
