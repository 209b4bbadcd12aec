"""The leaderboard: records in `results/runs/` -> `runs.csv`, `per_class.csv`, the markdown page and its figures.

It reads records only (no model is built or imported). Modules: `tables` (records -> tidy tables, the filtered
view), `published` (published figures, display names and table order carried by the records, GPU datasheet peaks
in `gpu_peaks.yaml`), `accuracy`, `efficiency`, `floor` (speed against the compute floor), `sections` (drill-down,
cells without a result, provenance), `figures` + `plots` (the PNGs), `render` (the page, `build_leaderboard`,
the command line), `fmt` (number and table formatting).

`python -m bench.board [results_dir=...] [model=a,b] [dataset=...] [resolution=...] [precision=...] [device=h100]
[out=leaderboard-h100.md] [tolerance=0.3] [conf_dir=...]` (also `python -m bench.leaderboard`).
"""
from bench.board.render import build_leaderboard, main

__all__ = ["build_leaderboard", "main"]
