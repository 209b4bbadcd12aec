"""`python -m bench.board ...`: rebuild the leaderboard (see bench.board)."""
import sys

from bench.board.render import main

sys.exit(main(sys.argv[1:]))
