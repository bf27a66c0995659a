"""python -m benchmarks: the benchmark harness (see benchmarks/harness.py)."""

from .harness import cli

cli()
