"""Benchmark multi-LoRA routing on the current device: `python benchmarks/bench_multi_lora.py [--json PATH]`.

Same as `python -m latentembed bench --op multi_lora`; the measurement code lives in
latentembed.bench.multi_lora so the installed package can run it too.
"""

import sys

from latentembed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "multi_lora", *sys.argv[1:]]))
