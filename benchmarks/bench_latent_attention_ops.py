"""Benchmark the latent-attention ops on the current device:
`python benchmarks/bench_latent_attention_ops.py [--json PATH]`.

Same as `python -m latentembed bench --op latent_attention_ops`; the measurement code lives in
latentembed.bench so the installed package can run it too.
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "latent_attention_ops", *sys.argv[1:]]))
