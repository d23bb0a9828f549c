"""ditctl's benchmarks: `python -m bench [NAMES...] [--quick]` (see bench/run.py and
docs/performance.md). Each module `bench_<name>.py` has `run(quick: bool) -> dict`."""
