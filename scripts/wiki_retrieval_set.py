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
docs/training.md, "Measured on the real SmolLM2 model").
"""

from __future__ import annotations

import argparse
import bz2
import html
import io
import json
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

#: Sections that hold lists of links or sources, not prose about the article's subject.
SKIPPED_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
    "gallery",
}
MIN_CHARS = 80  # a first paragraph shorter than this is a caption or a stub


def pages(xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article of a MediaWiki XML dump (namespace 0, no redirects)."""
    root_ns = ""
    for _, el in ET.iterparse(io.BytesIO(xml), events=("end",)):
        tag = el.tag
        if tag.endswith("}page"):
            root_ns = tag[: -len("page")]
            title = el.findtext(f"{root_ns}title") or ""
            namespace = el.findtext(f"{root_ns}ns") or "0"
            text = el.findtext(f"{root_ns}revision/{root_ns}text") or ""
            el.clear()
            if namespace == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """Remove every (possibly nested) ``opening ... closing`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _drop_file_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Image:...]]`` and ``[[Category:...]]`` (captions hold links)."""
    pattern = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
    while (m := pattern.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]
    return text


def clean(wikitext: str) -> str:
    """Plain text of a wikitext fragment: comments, references, templates, tables, files and
    tags removed; links and external links replaced by their text; bold / italics unquoted."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _drop_file_links(text)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[?https?://\S+\]?", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("'''", "").replace("''", "")
    text = html.unescape(text)
    return re.sub(r"\s+", " ", text).strip()


def sections(wikitext: str) -> list[tuple[str, str]]:
    """(heading, first paragraph) of every level-2 section with a prose first paragraph of at
    least :data:`MIN_CHARS` characters (lists, tables and templates are not paragraphs)."""
    parts = re.split(r"^==([^=].*?)==\s*$", wikitext, flags=re.M)
    out = []
    for heading, body in zip(parts[1::2], parts[2::2]):
        heading = clean(heading)
        if not heading or heading.lower() in SKIPPED_SECTIONS:
            continue
        body = re.split(r"^=", body, maxsplit=1, flags=re.M)[0]  # up to the first subsection
        body = _drop_file_links(
            _drop_nested(_drop_nested(re.sub(r"<!--.*?-->", "", body, flags=re.S), "{{", "}}"), "{|", "|}")
        )
        for block in re.split(r"\n\s*\n", body):
            block = block.strip()
            if not block or block[0] in "*#:;|!{":
                continue
            paragraph = clean(block)
            if len(paragraph) >= MIN_CHARS:
                out.append((heading, paragraph))
            break
    return out


def build_rows(dump: bytes, max_negatives: int = 3, min_sections: int = 3) -> list[dict]:
    """One row per section of every article with at least ``min_sections`` usable sections:
    ``{"query", "positive", "negatives", "article"}`` (up to ``max_negatives`` other sections)."""
    rows = []
    for title, text in pages(dump):
        found = sections(text)
        if len(found) < min_sections:
            continue
        for i, (heading, paragraph) in enumerate(found):
            others = [p for j, (_, p) in enumerate(found) if j != i and p != paragraph]
            rows.append(
                {
                    "query": f"{title}: {heading}",
                    "positive": paragraph,
                    "negatives": others[:max_negatives],
                    "article": title,
                }
            )
    return rows


def split_by_article(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, whole articles on each side; about ``fraction`` of the articles held out."""
    articles = sorted({r["article"] for r in rows})
    random.Random(seed).shuffle(articles)
    held = set(articles[: max(1, round(fraction * len(articles)))])
    return [r for r in rows if r["article"] not in held], [r for r in rows if r["article"] in held]


def beir_set(rows: list[dict]) -> tuple[dict, dict, dict]:
    """(corpus, queries, qrels) of held-out rows: every section paragraph of their articles."""
    corpus, ids, queries, qrels = {}, {}, {}, {}
    for i, row in enumerate(rows):
        for text in [row["positive"], *row["negatives"]]:
            if text not in ids:
                ids[text] = f"d{len(ids)}"
                corpus[ids[text]] = text
        queries[f"q{i}"] = row["query"]
        qrels[f"q{i}"] = {ids[row["positive"]]: 1}
    return corpus, queries, qrels


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
