"""A small retrieval set from real text: a Wikipedia XML dump in TREC Complex Answer Retrieval style.

    python scripts/wiki_retrieval_set.py DUMP.xml[.bz2] OUT_DIR [--eval-articles 0.3] [--seed 0]

Each section of an article becomes a row: query ``"<article title>: <section heading>"``, positive
the section's first paragraph (wiki markup removed), negatives the first paragraphs of the
article's other sections (the natural hard negatives: same topic, other aspect). Writes:

* ``OUT_DIR/rows.jsonl``: every row, with its ``article`` (train with ``--data rows.jsonl
  --eval-group-key article``: the trainer holds out whole articles);
* with ``--eval-articles F`` (> 0) also a split by article, never by row (rows of one article
  share its topic and words, so a row split leaks): ``OUT_DIR/train.jsonl`` (without the
  ``article`` field: the trainer refuses fields it does not know) and the held-out
  articles as a BEIR-style set ``OUT_DIR/heldout/`` (corpus: every section paragraph of those
  articles; queries and qrels: one relevant paragraph each), for ``train --eval-data`` and
  ``latentembed eval``.

The data is built, never committed: the dump excerpt ships in the gensim wheel (see
docs/training.md, "Measured on the real SmolLM2 model"). The parsing lives in
:mod:`latentembed.demo.wikipedia`; ``python -m latentembed demo`` splits by its fixed sha256 rule
instead of this script's seeded fraction.
"""

from __future__ import annotations

import argparse
import bz2
import json
import random
import sys
from pathlib import Path

from latentembed.demo.wikipedia import beir_set, build_rows, clean, pages, sections  # noqa: F401 (the script's API)


def split_by_article(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, whole articles on each side; about ``fraction`` of the articles held out."""
    articles = sorted({r["article"] for r in rows})
    random.Random(seed).shuffle(articles)
    held = set(articles[: max(1, round(fraction * len(articles)))])
    return [r for r in rows if r["article"] not in held], [r for r in rows if r["article"] in held]


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", help="a MediaWiki XML dump (.xml or .xml.bz2)")
    p.add_argument("out", help="output directory")
    p.add_argument("--eval-articles", type=float, default=0.0, help="fraction of articles held out (0: no split)")
    p.add_argument("--max-negatives", type=int, default=3)
    p.add_argument("--min-sections", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    raw = Path(args.dump).read_bytes()
    dump = bz2.decompress(raw) if args.dump.endswith(".bz2") else raw
    rows = build_rows(dump, args.max_negatives, args.min_sections)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "rows.jsonl", rows)
    articles = len({r["article"] for r in rows})
    print(f"{len(rows)} rows from {articles} articles -> {out / 'rows.jsonl'}")
    if args.eval_articles > 0:
        train, held = split_by_article(rows, args.eval_articles, args.seed)
        _write_jsonl(out / "train.jsonl", ({k: v for k, v in r.items() if k != "article"} for r in train))
        corpus, queries, qrels = beir_set(held)
        (out / "heldout").mkdir(exist_ok=True)
        _write_jsonl(out / "heldout" / "corpus.jsonl", ({"_id": k, "text": v} for k, v in corpus.items()))
        _write_jsonl(out / "heldout" / "queries.jsonl", ({"_id": k, "text": v} for k, v in queries.items()))
        _write_jsonl(
            out / "heldout" / "qrels.jsonl",
            ({"query-id": q, "corpus-id": d, "score": s} for q, ds in qrels.items() for d, s in ds.items()),
        )
        print(f"train {len(train)} rows; held out {len(held)} queries, {len(corpus)} documents -> {out / 'heldout'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
