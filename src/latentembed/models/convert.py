"""`python -m latentembed convert SRC DST`: load any directory latentembed reads (its own, NV-Embed,
a plain decoder with ``--pooling``, a sentence-transformers directory; PEFT adapters with
``--peft``) and write it as a classic sentence-transformers directory (default: what
sentence-transformers, TEI, vLLM and MTEB load) or in latentembed's own format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .._cli_types import cli_flag, positive_int

__all__ = ["main", "build_parser"]

FORMATS = ("sentence-transformers", "latentembed")


def _peft(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (an adapter name and a PEFT directory), got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentembed convert", description=__doc__)
    p.add_argument("source", metavar="SRC", help="model directory to read")
    p.add_argument("target", metavar="DST", help="directory to write (replaced whole; refused if it holds other files)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="what to write (default %(default)s)")
    p.add_argument("--pooling", help="pooling of a plain decoder checkpoint (mean, last, weighted_mean, ...)")
    p.add_argument("--prompt-template", help="prompt template (nvembed, e5, nomic, ...): its prompts are exported")
    p.add_argument(
        "--max-length", type=positive_int, help="max tokens per text (sentence-transformers' max_seq_length)"
    )
    p.add_argument(
        "--peft", type=_peft, action="append", default=[], metavar="NAME=DIR", help="a PEFT LoRA adapter (repeatable)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="the adapter a multi-adapter model merges into the export ('base': none)")
    which.add_argument(
        "--per-adapter", action="store_true", help="a multi-adapter model: one directory per adapter, DST/<adapter>"
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .embedding import EmbeddingModel
    from .embedding_io import ArgumentError
    from .st_export import save_sentence_transformers_per_adapter

    overrides = {}
    if args.prompt_template is not None:
        overrides["prompt_template"] = args.prompt_template
    if args.max_length is not None:
        overrides["max_length"] = args.max_length
    try:
        model = EmbeddingModel.from_pretrained(
            args.source, pooling=args.pooling, adapters=dict(args.peft) or None, **overrides
        ).eval()
        if args.per_adapter:
            if args.format != FORMATS[0]:
                raise ValueError(
                    "--per-adapter writes sentence-transformers directories (latentembed keeps every adapter)"
                )
            written = save_sentence_transformers_per_adapter(model, args.target)
        else:
            written = [model.save_pretrained(args.target, format=args.format, adapter=args.adapter)]
    except ArgumentError as e:
        print(f"latentembed convert: error: {e.message_for(cli_flag(e.argument))}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"latentembed convert: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {Path(path)} ({args.format})")
    return 0
