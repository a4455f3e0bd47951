"""Benchmark masked_mean_pool on the current device: `python benchmarks/bench_masked_mean.py [--json PATH]`.

Same as `python -m latentembed bench --op masked_mean_pool`; the measurement code lives in
latentembed.bench so the installed package can run it too.
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "masked_mean_pool", *sys.argv[1:]]))
