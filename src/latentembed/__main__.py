"""Command line: `python -m latentembed demo|train|eval|convert|mine|export|info|bench` (`demo -h`,
`train -h`, `eval -h`, `convert -h`, `mine -h` for theirs)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # train and eval own their argument parsers: everything after the subcommand goes to them.
    if argv and argv[0] == "train":
        from .training.cli import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "eval":
        from .evaluation.cli import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo.cli import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "convert":
        from .models.convert import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "mine":
        from .training.mine_cli import main as mine_main

        return mine_main(argv[1:])
    parser = argparse.ArgumentParser(prog="latentembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="the main job on CPU: SmolLM2 + real Wikipedia text from PyPI wheels, fine-tuned vs BM25 (demo -h)"
    )
    sub.add_parser("train", help="fine-tune an embedding model with LoRA and the InfoNCE loss (train -h)")
    sub.add_parser("eval", help="nDCG@10, MRR@10 and recall@k on a BEIR-style JSONL set (eval -h)")
    sub.add_parser("convert", help="write a model as a sentence-transformers directory (TEI, vLLM, MTEB) (convert -h)")
    sub.add_parser("mine", help="hard negatives for training rows, mined with a model (mine -h)")
    export = sub.add_parser(
        "export", help="a sharded (train --fsdp) checkpoint as one save_pretrained directory, in one process"
    )
    export.add_argument("checkpoint", help="a DIR/checkpoints/step-N directory written by train --fsdp")
    export.add_argument("output", help="the model directory to write (EmbeddingModel.from_pretrained reads it)")
    sub.add_parser("info", help="versions, GPU, CUDA extension and the backend each op would use")
    bench = sub.add_parser(
        "bench", help="the GPU main job: benchmark the kernels on a CUDA GPU (--device cpu: smoke run)"
    )
    bench.add_argument(
        "--op", action="append", help="op to benchmark (repeatable; default: all but train_step, run when named)"
    )
    bench.add_argument("--impl", action="append", help="only these implementations (repeatable)")
    bench.add_argument("--json", help="also write the measurements to this JSON file")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--model", help="train_step only: the model directory (default: a tiny random model)")
    bench.add_argument(
        "--quick", action="store_true", help="skip what no target needs (torch.compile and external baselines)"
    )
    args = parser.parse_args(argv)

    if args.command == "export":
        from .training.sharded_checkpoint import export_checkpoint

        try:
            print(f"exported {args.checkpoint} -> {export_checkpoint(args.checkpoint, args.output)}")
        except (ValueError, FileNotFoundError) as e:
            print(f"latentembed export: error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "info":
        from ._info import info

        print(info())
    else:
        import torch

        from .bench import BENCHMARKS, BenchmarkFailure, run_benchmarks

        unknown = set(args.op or ()) - BENCHMARKS.keys()
        if unknown:
            parser.error(f"unknown op(s) {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
        if args.device is None and not torch.cuda.is_available():
            # CPU rows would time tiny shapes in Triton's interpreter: numbers that mean nothing.
            print(
                "bench: no CUDA GPU here (torch.cuda.is_available() is False), nothing to measure; "
                "`--device cpu` only checks that the benchmarks run; on CPU try `python -m latentembed demo`"
            )
            return 0
        try:
            print(run_benchmarks(args.op, args.json, args.impl, args.device, model=args.model, quick=args.quick))
        except BenchmarkFailure as e:  # the others ran: print everything, exit 1
            print(e.report)
            return 1
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
