"""Benchmark NV-Embed latent-attention pooling on the current device:
`python benchmarks/bench_latent_attention.py [--json PATH] [--impl latentembed --impl reference ...]`.

Same as `python -m latentembed bench --op latent_attention_pooling`; the measurement code lives
in latentembed.bench.latent_attention so the installed package can run it too.
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "latent_attention_pooling", *sys.argv[1:]]))
