"""Benchmark the InfoNCE loss with infonce_lse: `python benchmarks/bench_contrastive.py [--json PATH]`.

Same as `python -m latentembed bench --op infonce_lse`; the measurement code lives in
latentembed.bench so the installed package can run it too. cut-cross-entropy and inf-cl are
measured when importable (see the README for the wheels).
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "infonce_lse", *sys.argv[1:]]))
