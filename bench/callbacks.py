"""Hydra callbacks: after a sweep, rebuild the leaderboard, then fail the command if any of its cells failed."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RebuildLeaderboard(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench.leaderboard import build_leaderboard

        sweep_dir = config.hydra.sweep.dir
        statuses = []
        for path in glob.glob(os.path.join(sweep_dir, "**", "cell_status.json"), recursive=True):
            with open(path) as f:
                statuses.append(json.load(f))
        build_leaderboard(config.results_dir)
        failed = [s for s in statuses if s["status"] in ("error", "busy")]
        print(f"sweep: {len(statuses)} cells, {len(failed)} failed; leaderboard rebuilt in {config.results_dir}/")
        if failed:
            sys.stdout.flush()
            os._exit(1)  # after aggregation: the tables above are written
