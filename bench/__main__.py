"""`python -m bench`: the one entry point of the benchmarks (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
