"""`python -m latentembed eval`: nDCG@k, MRR@k and recall@k of a local embedding model on a
BEIR-style retrieval set (JSONL corpus and queries, JSONL or TSV qrels)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from .._cli_types import cli_flag, positive_int
from ..atomic_io import atomic_write_json

__all__ = ["main", "build_parser", "format_table"]

DTYPES = ("float32", "bfloat16", "float16")


def _k_list(text: str) -> tuple[int, ...]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints like 1,5,10,100, got {text!r}"
        ) from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 1,5,10,100, got {text!r}")
    return tuple(sorted(set(ks)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentembed eval",
        description=__doc__,
        epilog="Metrics average over the queries with a relevant document (grade > 0) in the qrels; "
        "scores are dot products of the model's (by default L2-normalised) embeddings.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="local model directory (EmbeddingModel.from_pretrained)"
    )
    p.add_argument("--corpus", required=True, metavar="FILE", help='JSONL rows {"_id", "title"?, "text"}')
    p.add_argument("--queries", required=True, metavar="FILE", help='JSONL rows {"_id", "text"}')
    p.add_argument(
        "--qrels",
        required=True,
        metavar="FILE",
        help='JSONL rows {"query-id", "corpus-id", "score"} or TSV with header query-id/corpus-id/score',
    )
    p.add_argument(
        "--pooling", help="pooling of a plain decoder checkpoint (mean, last, ...); saved models know theirs"
    )
    p.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        help="causal attention (default: the model's own; a plain decoder runs bidirectionally, as "
        "`latentembed train` trains it unless given --causal)",
    )
    p.add_argument(
        "--template",
        help="prompt template (default: the model's own; `latentembed train` uses e5 where a model has none)",
    )
    p.add_argument("--task", help="query-side task of the model's prompt template (prompt and adapter)")
    p.add_argument("--instruction", help="explicit query instruction (formatted by the template)")
    p.add_argument("--doc-task", help="document-side task (default: none; documents get no prompt)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward (default 32)")
    p.add_argument("--max-length", type=positive_int, help="truncate texts to this many tokens")
    p.add_argument(
        "--k", type=_k_list, default=(1, 5, 10, 100), metavar="K,K,...", help="cut-offs (default 1,5,10,100)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="model weights' dtype (default: the checkpoint's / loader's)")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return p


def format_table(result: dict[str, Any], k_values: Sequence[int]) -> str:
    """The metrics as a small text table (one row per metric, one column per k) plus counts."""
    ks = sorted(k_values)
    width = max(8, *(len(f"@{k}") + 2 for k in ks))
    lines = ["metric".ljust(8) + "".join(f"@{k}".rjust(width) for k in ks)]
    for name in ("ndcg", "mrr", "recall"):
        lines.append(name.ljust(8) + "".join(f"{result[f'{name}@{k}']:.4f}".rjust(width) for k in ks))
    lines.append(
        f"queries: {result['num_queries']} evaluated, {result['num_queries_skipped']} skipped "
        f"(no relevant document); documents: {result['num_docs']}; dim: {result['embedding_dim']}"
    )
    lines.append(
        f"time: encode docs {result['encode_docs_s']:.2f}s, queries {result['encode_queries_s']:.2f}s, "
        f"search {result['search_s']:.2f}s"
    )
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"latentembed eval: error: {message}", file=sys.stderr)
    return 1


def _unwritable(flag: str, path: str) -> Optional[str]:
    """Why file ``path`` could not be written (its missing parent directories created), or None."""
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory; expected the path of a file to write"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: directory {parent} is not writable"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the eval command; returns the exit code (0 ok, 1 bad files / model / data, 2 usage)."""
    args = build_parser().parse_args(argv)

    for flag, path, is_dir in (
        ("--model", args.model, True),
        ("--corpus", args.corpus, False),
        ("--queries", args.queries, False),
        ("--qrels", args.qrels, False),
    ):
        if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
            kind = "directory" if is_dir else "file"
            return _fail(f"{flag}: no such {kind}: {path}")
    # Everything the arguments and data alone can refute is checked before the model loads.
    if args.json is not None and (why := _unwritable("--json", args.json)) is not None:
        return _fail(why)
    if args.template is not None:
        from ..prompts import get_template

        try:
            get_template(args.template)
        except ValueError as e:
            return _fail(f"--template: {e}")

    import torch

    from .data import DatasetFormatError, load_retrieval_dataset
    from .evaluate import check_retrieval_inputs, evaluate_retrieval

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: CUDA is not available on this machine")

    try:
        corpus, queries, qrels = load_retrieval_dataset(args.corpus, args.queries, args.qrels)
        check_retrieval_inputs(corpus, queries, qrels, args.k)
    except (DatasetFormatError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))

    from ..models.embedding import EmbeddingModel
    from ..models.embedding_io import ArgumentError

    load_kwargs: dict[str, Any] = {"device": device, "dtype": getattr(torch, args.dtype) if args.dtype else None}
    if args.pooling is not None:
        load_kwargs["pooling"] = args.pooling
    if args.causal is not None:
        load_kwargs["causal"] = args.causal
    if args.template is not None:
        load_kwargs["prompt_template"] = args.template
    try:
        model = EmbeddingModel.from_pretrained(args.model, **load_kwargs)
    except ArgumentError as e:  # a from_pretrained argument: name the flag that set it
        return _fail(f"--model {args.model}: {e.message_for(cli_flag(e.argument))}")
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        return _fail(f"--model {args.model}: {e}")

    query_kwargs: dict[str, Any] = {}
    doc_kwargs: dict[str, Any] = {}
    if args.task is not None:
        query_kwargs["task"] = args.task
    if args.instruction is not None:
        query_kwargs["instruction"] = args.instruction
    if args.doc_task is not None:
        doc_kwargs["task"] = args.doc_task
    if args.max_length is not None:
        query_kwargs["max_length"] = doc_kwargs["max_length"] = args.max_length

    try:
        result = evaluate_retrieval(
            model,
            corpus,
            queries,
            qrels,
            k_values=args.k,
            query_kwargs=query_kwargs,
            doc_kwargs=doc_kwargs,
            batch_size=args.batch_size,
        )
    except (ValueError, TypeError) as e:  # unknown task, max_length too small for the prompt, empty qrels, ...
        return _fail(str(e))

    print(format_table(result, args.k))
    if args.json:
        payload = {
            "model": args.model,
            "corpus": args.corpus,
            "queries": args.queries,
            "qrels": args.qrels,
            "pooling": args.pooling,
            "causal": args.causal,
            "template": args.template,
            "task": args.task,
            "instruction": args.instruction,
            "doc_task": args.doc_task,
            "max_length": args.max_length,
            "device": device,
            "dtype": args.dtype,
            "k_values": list(args.k),
            "metrics": {key: value for key, value in result.items() if "@" in key},
            **{key: value for key, value in result.items() if "@" not in key},
        }
        try:
            atomic_write_json(args.json, payload)
        except OSError as e:
            return _fail(f"--json {args.json}: {e}")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
