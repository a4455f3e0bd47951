"""``python -m latentembed mine``: hard negatives for training rows, mined with a model
(:func:`~.mining.mine_hard_negatives`), written as training JSONL with ``negatives``.

Example::

    python -m latentembed mine --model run/model --data rows.jsonl --output mined.jsonl \\
        --num-negatives 4 --candidates 30 --max-score-ratio 0.95
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .._cli_types import positive_float, positive_int

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentembed mine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (EmbeddingModel.from_pretrained)")
    p.add_argument("--data", required=True, metavar="FILE", help="training rows (JSONL: query, positive, ...)")
    p.add_argument("--output", required=True, metavar="FILE", help="the rows with mined negatives (JSONL)")
    p.add_argument(
        "--corpus",
        metavar="FILE",
        help='documents to mine from: JSONL rows {"_id", "title"?, "text"} (default: the rows\' positives '
        "and negatives)",
    )
    p.add_argument("--num-negatives", type=positive_int, default=4, help="negatives per row (default 4)")
    p.add_argument("--candidates", type=positive_int, default=30, help="documents retrieved per query (default 30)")
    p.add_argument(
        "--max-score-ratio",
        type=positive_float,
        default=0.95,
        help="drop candidates scoring above this fraction of the positive's score: likely false "
        "negatives (default 0.95, NV-Retriever's rule)",
    )
    p.add_argument("--absolute-margin", type=float, help="also drop candidates within this of the positive's score")
    p.add_argument("--pooling", help="pooling of a plain decoder checkpoint (mean, last, ...)")
    p.add_argument("--task", default="retrieval", help="query task of rows without one (default retrieval)")
    p.add_argument("--instruction", help="query instruction of rows without task or instruction")
    p.add_argument("--doc-task", help="documents' task (default: none)")
    p.add_argument("--group-key", help="a field every row carries (e.g. article), kept in the output")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward (default 32)")
    p.add_argument("--max-length", type=positive_int, help="truncate texts to this many tokens")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return p


def _fail(message: str) -> int:
    print(f"latentembed mine: error: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the mine command; returns the exit code (0 ok, 1 bad files / model / data, 2 usage)."""
    args = build_parser().parse_args(argv)
    for flag, path, is_dir in (("--model", args.model, True), ("--data", args.data, False)):
        if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
            return _fail(f"{flag}: no such {'directory' if is_dir else 'file'}: {path}")
    if args.corpus is not None and not os.path.isfile(args.corpus):
        return _fail(f"--corpus: no such file: {args.corpus}")
    if os.path.isdir(args.output):
        return _fail(f"--output {args.output}: is a directory; expected the path of a JSONL file")
    import torch

    from ..evaluation.data import load_corpus
    from ..models.embedding import EmbeddingModel
    from .data import read_examples
    from .mining import mine_hard_negatives, write_examples

    try:
        rows = read_examples(args.data, group_key=args.group_key)
        corpus = list(load_corpus(args.corpus).values()) if args.corpus else None
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: CUDA is not available on this machine")
    try:
        model = EmbeddingModel.from_pretrained(args.model, pooling=args.pooling).to(device)
        mined, stats = mine_hard_negatives(
            model,
            rows,
            corpus=corpus,
            num_negatives=args.num_negatives,
            candidates=args.candidates,
            max_score_ratio=args.max_score_ratio,
            absolute_margin=args.absolute_margin,
            default_task=args.task,
            instruction=args.instruction,
            doc_task=args.doc_task,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except ValueError as e:
        return _fail(str(e))
    write_examples(args.output, mined, group_key=args.group_key)
    print(
        f"mined {stats.negatives} negatives for {stats.rows} rows from {stats.corpus} documents "
        f"({stats.dropped_margin} candidates dropped as likely false negatives, {stats.dropped_positive} "
        f"were positives; {stats.short_rows} rows got fewer than {args.num_negatives}) -> {args.output}"
    )
    return 0
