"""`python -m bench.leaderboard ...` and `bench.leaderboard.build_leaderboard`, kept for the Makefile, the sweep
callback and existing scripts: the board lives in bench/board/ (this module only forwards to it)."""
from __future__ import annotations

import sys

from bench.board.render import build_leaderboard, main

__all__ = ["build_leaderboard", "main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
