"""Command line: `python -m latentembed info` and `python -m latentembed bench`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="latentembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, CUDA extension and the backend each op would use")
    bench = sub.add_parser("bench", help="benchmark the ops on the current device")
    bench.add_argument("--op", action="append", help="op to benchmark (repeatable; default: all)")
    bench.add_argument("--impl", action="append", help="only these implementations (repeatable)")
    bench.add_argument("--json", help="also write the measurements to this JSON file")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from ._info import info

        print(info())
    else:
        from .bench import run_benchmarks

        try:
            print(run_benchmarks(args.op, args.json, args.impl, args.device))
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
