"""The Hydra entry point: `python -m bench model=san_b dataset=ade150 resolution=640` runs one cell;
`python -m bench -m model=san_b,san_l dataset=ade150,pc59` sweeps the grid (any Hydra launcher).

Each job runs `run_cell` and leaves a `cell_status.json` in its Hydra output folder; at the end of a sweep
`bench.callbacks.RebuildLeaderboard` rebuilds the tables and exits non-zero if a cell of the sweep failed.
"""
from __future__ import annotations

import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench import BenchError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    from bench.cell import run_cell

    rec = run_cell(cfg)
    hc = HydraConfig.get()
    with open(os.path.join(hc.runtime.output_dir, "cell_status.json"), "w") as f:
        json.dump({"key": rec["key"], "status": rec["status"], "reason": rec.get("reason", "")}, f)
    if hc.mode.name == "RUN" and rec["status"] == "error":
        sys.exit(1)
    return rec["status"]


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
