"""Benchmark the decoder backbone on the current device: `python benchmarks/bench_decoder.py [--json PATH]`.

Same as `python -m latentembed bench --op decoder`; the measurement code lives in
latentembed.bench so the installed package can run it too.
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "decoder", *sys.argv[1:]]))
