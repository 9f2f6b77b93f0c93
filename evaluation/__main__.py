"""`python -m evaluation [overrides]`: `bigscience eval` under torchrun or srun (one process per rank)."""

import sys

from evaluation.run import main

sys.exit(main(sys.argv[1:]))
